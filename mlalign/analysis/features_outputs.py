"""The files task=analyze writes about features: features.csv rows, the JSON files, the markdown tables and plots.

The numbers come from `analysis/features.py` (docs/method.md §8); nothing here computes a statistic. Feature numbers
link to their Neuronpedia page where sae-lens's registry gives the SAE a Neuronpedia id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlalign.analysis.features import FeatureReport, LIST_KINDS, adapter_changes_by_band, band_overlap, finite_or_none
from mlalign.errors import UserError
from mlalign.io import save_figure

NEURONPEDIA_URL = "https://www.neuronpedia.org/{np_id}/{feature}"


def neuronpedia_ids(sae_cfg, layers) -> dict[int, str | None]:
    """layer -> the Neuronpedia id sae-lens's registry gives that layer's SAE (None for local SAEs and releases
    without one)."""
    out = {int(layer): None for layer in layers}
    release = sae_cfg.get("release") if sae_cfg is not None else None
    if not release:
        return out
    from mlalign.saes import pretrained_release, sae_id_for

    try:
        lookup = pretrained_release(release)
    except ImportError:  # pragma: no cover - sae-lens is a dependency
        return out
    ids = dict(getattr(lookup, "neuronpedia_id", None) or {})
    for layer in layers:
        out[int(layer)] = ids.get(sae_id_for(sae_cfg, layer))
    return out


def feature_url(neuronpedia: dict, layer: int, feature: int) -> str | None:
    """The feature's Neuronpedia page, where `neuronpedia` (layer -> id, as `neuronpedia_ids` gives) has the layer."""
    np_id = neuronpedia.get(layer)
    return NEURONPEDIA_URL.format(np_id=np_id, feature=int(feature)) if np_id else None


FEATURES_CSV_COLUMNS = ("lang", "layer", "feature", "firing_rate", "mean_act", "mean_act_firing", "sentences_fired",
                        "selectivity", "specificity", "specific", "diff_vs_reference", "diff_ci_low", "diff_ci_high",
                        "listed", "neuronpedia_url")


def feature_rows(report: FeatureReport, rows: str = "fired") -> list[dict]:
    """Long-format rows of `analysis/features.csv`: one per (lang, layer, feature). rows="fired": features that fire
    at least once in that (lang, layer) (a feature that never fires has zeros everywhere); "all": every feature;
    "listed": only the features in some list."""
    if rows not in ("fired", "all", "listed"):
        raise UserError(f"analysis.features.csv_rows must be fired, all or listed, got {rows!r}")
    out = []
    ref = report.langs.index(report.reference_lang)
    for layer in report.layers:
        s = report.stats[layer]
        for i, lang in enumerate(report.langs):
            kinds = report.lists[lang].get(layer, {})
            listed = {}
            for kind in LIST_KINDS:
                for f in kinds.get(kind, []):
                    listed.setdefault(f, []).append(kind)
            if rows == "listed":
                features = sorted(listed)
            elif rows == "fired":
                features = np.flatnonzero(s["firing_rate"][i] > 0)
            else:
                features = range(s["mean_act"].shape[1])
            intervals = report.intervals.get(lang, {}).get(layer, {})
            spec_ok = s["sentences_fired"][i] >= report.min_sentences
            for f in features:
                f = int(f)
                interval = intervals.get(f) or [None, None]
                spec = s["specificity"][i, f]
                out.append({
                    "lang": lang, "layer": layer, "feature": f,
                    "firing_rate": finite_or_none(s["firing_rate"][i, f]),
                    "mean_act": finite_or_none(s["mean_act"][i, f]),
                    "mean_act_firing": finite_or_none(s["mean_act_firing"][i, f]),
                    "sentences_fired": int(s["sentences_fired"][i, f]),
                    "selectivity": finite_or_none(s["selectivity"][i, f]), "specificity": finite_or_none(spec),
                    "specific": bool(np.isfinite(spec) and spec >= report.specific_threshold - 1e-12 and spec_ok[f]),
                    "diff_vs_reference": finite_or_none(s["mean_act"][i, f] - s["mean_act"][ref, f]),
                    "diff_ci_low": interval[0], "diff_ci_high": interval[1],
                    "listed": "+".join(listed.get(f, [])),
                    "neuronpedia_url": feature_url(report.neuronpedia, layer, f),
                })
    return out


def overlap_json(report: FeatureReport) -> dict:
    """`analysis/feature_overlap.json`: {"<layer>": {"<lang>": {"<lang>": value}}}, values in [0, 1], 1 on the diagonal."""
    return {str(layer): {a: {b: float(report.overlap[layer][i, j]) for j, b in enumerate(report.langs)}
                         for i, a in enumerate(report.langs)} for layer in report.layers}


def features_summary(report: FeatureReport, bands: dict[str, list[int]]) -> dict:
    """`analysis/features_summary.json`: settings, specific-feature counts, reference shares, the lists."""
    return {
        "reference_lang": report.reference_lang, "langs": report.langs, "layers": report.layers,
        "top_k": report.top_k, "min_sentences": report.min_sentences, "specific_threshold": report.specific_threshold,
        "specific_counts": {lang: {str(k): v for k, v in by.items()} for lang, by in report.specific_counts.items()},
        "reference_share": {lang: {str(k): v for k, v in by.items()} for lang, by in report.reference_share.items()},
        "band_overlap_with_reference": {lang: {band: band_overlap(report, lang, ls) for band, ls in bands.items()}
                                        for lang in report.langs},
        "lists": {lang: {str(layer): {kind: [{"feature": f,
                                              "diff_vs_reference": finite_or_none(report.diff(lang, layer, f)),
                                              "ci": report.intervals.get(lang, {}).get(layer, {}).get(f),
                                              "neuronpedia_url": feature_url(report.neuronpedia, layer, f)} for f in fs]
                                      for kind, fs in kinds.items()}
                         for layer, kinds in by.items()} for lang, by in report.lists.items()},
        "neuronpedia": {str(k): v for k, v in report.neuronpedia.items()},
    }


def _fmt(x, digits=4) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _link(neuronpedia: dict, layer: int, feature: int) -> str:
    url = feature_url(neuronpedia, layer, feature)
    return f"[{feature}]({url})" if url else str(feature)


def features_markdown(report: FeatureReport, bands: dict[str, list[int]], title: str = "", ci: float = 0.95) -> str:
    """`analysis/features_top.md`: per language and layer band, the features most under- and over-active against the
    reference (with their paired bootstrap CIs), the language's specific features, and overlap numbers."""
    ref = report.reference_lang
    lines = [f"# Which features{': ' + title if title else ''}", "",
             f"Reference: {ref}. Top {report.top_k} per language and band, pooled over the band's layers; a feature "
             f"counts only where it fires in at least {report.min_sentences} sentences; specific = specificity >= "
             f"{report.specific_threshold}. Definitions: docs/method.md §8. "
             + ("Feature numbers link to Neuronpedia." if any(report.neuronpedia.values())
                else "No Neuronpedia links: this SAE set has no Neuronpedia id in sae-lens's registry."), ""]
    others = [lang for lang in report.langs if lang != ref]
    band_names = list(bands)
    lines += ["## Overlap with the reference", "",
              f"Activation-weighted Jaccard with {ref} (mean over the band's layers) / share of {ref}'s features "
              f"(fired in >= {report.min_sentences} sentences) the language also uses.", "",
              "| lang | " + " | ".join(band_names) + " |", "|---|" + "---|" * len(band_names)]
    for lang in others:
        cells = []
        for band in band_names:
            jac = band_overlap(report, lang, bands[band])
            shares = [report.reference_share[lang][layer]["features"] for layer in bands[band]
                      if layer in report.reference_share[lang] and report.reference_share[lang][layer]["features"] is not None]
            cells.append(f"{_fmt(jac, 3)} / {_fmt(float(np.mean(shares)) if shares else None, 3)}")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    lines += ["", "## Language-specific features (count per band, summed over its layers)", "",
              "| lang | " + " | ".join(band_names) + " |", "|---|" + "---|" * len(band_names)]
    for lang in report.langs:
        cells = [str(sum(report.specific_counts[lang].get(layer, 0) for layer in bands[band])) for band in band_names]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    pct = int(round(100 * ci))
    for lang in report.langs:
        lines += ["", f"## {lang}"]
        for band in band_names:
            layers = [layer for layer in bands[band] if layer in report.lists[lang]]
            if not layers:
                continue
            lines += ["", f"### {band} (layers {layers[0]}-{layers[-1]})"]
            kinds = (("under", f"under-active vs {ref}"), ("over", f"over-active vs {ref}"), ("specific", f"specific to {lang}"))
            for kind, words in kinds:
                items = [(layer, f) for layer in layers for f in report.lists[lang][layer].get(kind, [])]
                if kind == "specific":
                    items.sort(key=lambda lf: (-report.value("mean_act", lang, *lf), lf))
                else:
                    items.sort(key=lambda lf: (-abs(report.diff(lang, *lf)), lf))
                items = items[: report.top_k]
                if lang == ref and kind != "specific":
                    continue
                lines += ["", f"**{words}**", ""]
                if not items:
                    lines.append("none")
                    continue
                if lang == ref:
                    lines += ["| layer | feature | mean_act | firing rate | selectivity | sentences fired |",
                              "|---|---|---|---|---|---|"]
                    lines += [f"| {layer} | {_link(report.neuronpedia, layer, f)} | {_fmt(report.value('mean_act', lang, layer, f))} | "
                              f"{_fmt(report.value('firing_rate', lang, layer, f), 3)} | "
                              f"{_fmt(report.value('selectivity', lang, layer, f), 3)} | "
                              f"{int(report.value('sentences_fired', lang, layer, f))} |" for layer, f in items]
                    continue
                lines += [f"| layer | feature | mean_act {lang} | mean_act {ref} | diff [{pct}% CI] | selectivity | "
                          f"sentences fired {lang} / {ref} |", "|---|---|---|---|---|---|---|"]
                for layer, f in items:
                    interval = report.intervals.get(lang, {}).get(layer, {}).get(f)
                    ci_words = f" [{_fmt(interval[0], 3)}, {_fmt(interval[1], 3)}]" if interval else ""
                    lines.append(
                        f"| {layer} | {_link(report.neuronpedia, layer, f)} | {_fmt(report.value('mean_act', lang, layer, f))} | "
                        f"{_fmt(report.value('mean_act', ref, layer, f))} | {_fmt(report.diff(lang, layer, f), 3)}{ci_words} | "
                        f"{_fmt(report.value('selectivity', lang, layer, f), 3)} | "
                        f"{int(report.value('sentences_fired', lang, layer, f))} / "
                        f"{int(report.value('sentences_fired', ref, layer, f))} |")
    return "\n".join(lines) + "\n"


def plot_features(report: FeatureReport, bands: dict[str, list[int]], out_dir: str | Path, title: str = "") -> list[Path]:
    """feature_overlap.png (languages x languages weighted Jaccard, mean over each band's layers) and
    selective_features.png (specific-feature counts, languages x layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    langs, n = report.langs, len(report.langs)
    bands = {b: [layer for layer in ls if layer in report.overlap] for b, ls in bands.items()}
    bands = {b: ls for b, ls in bands.items() if ls}
    fig, axes = plt.subplots(1, len(bands), figsize=(0.45 * n * len(bands) + 2.5 * len(bands), 0.45 * n + 2.0), squeeze=False)
    for ax, (band, layers) in zip(axes[0], bands.items()):
        grid = np.mean([report.overlap[layer] for layer in layers], axis=0)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n), langs, fontsize=8, rotation=90)
        ax.set_yticks(range(n), langs, fontsize=8)
        if n <= 12:
            for a in range(n):
                for b in range(n):
                    ax.text(b, a, f"{grid[a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if grid[a, b] > 0.6 else "white")
        ax.set_title(f"{band} (layers {layers[0]}-{layers[-1]})", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label="activation-weighted Jaccard")
    fig.suptitle(f"Feature overlap between languages{' — ' + title if title else ''}", fontsize=10)
    overlap_path = out_dir / "feature_overlap.png"
    save_figure(fig, overlap_path, dpi=150)
    plt.close(fig)

    layers = report.layers
    grid = np.array([[report.specific_counts[lang].get(layer, 0) for layer in layers] for lang in langs], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2.5), 0.45 * n + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(n), langs)
    if n * len(layers) <= 300:
        top = grid.max() if grid.size else 0
        for r in range(n):
            for c in range(len(layers)):
                ax.text(c, r, f"{int(grid[r, c])}", ha="center", va="center", fontsize=6,
                        color="black" if grid[r, c] > 0.6 * top else "white")
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label=f"specific features (specificity >= {report.specific_threshold})")
    ax.set_title(f"Language-specific SAE features per layer{' — ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    selective_path = out_dir / "selective_features.png"
    save_figure(fig, selective_path, dpi=150)
    plt.close(fig)
    return [overlap_path, selective_path]


def adapter_changes_markdown(changes: dict, bands: dict[str, list[int]], top_k: int, neuronpedia: dict | None = None) -> str:
    """`feature_changes.md`: per language and band, how concentrated the adapter's rises are and on which features."""
    neuronpedia = neuronpedia or {}
    lines = ["# Which features the adapter changed", "",
             "Mean activation with the adapter minus without it, on the same sentences, summed over the band's layers "
             f"(rise / fall). top-{top_k} share: the part of all rises that the top {top_k} raised features carry (near "
             "1 = a handful of features); specific share: the part that falls on the language's own specific features "
             "in the base model, next to the base model's activation mass on them (what an adapter that scaled every "
             "feature alike would give: a specific share above it = the adapter favours the language's own "
             "features); on/off: features that gain / lose support. Shares are means over the band's layers. "
             "Definitions: docs/method.md §8.", ""]
    by_band = adapter_changes_by_band(changes, bands)
    for lang, by_layer in changes.items():
        lines += [f"## {lang}", "", f"| band | rise | fall | top-{top_k} share | specific share | base mass on specific "
                  "| turned on | turned off |", "|---|---|---|---|---|---|---|---|"]
        for band, row in by_band[lang].items():
            lines.append(f"| {band} | {_fmt(row['total_rise'], 3)} | {_fmt(row['total_fall'], 3)} | "
                         f"{_fmt(row['gain_top_k_share'], 3)} | {_fmt(row['gain_specific_share'], 3)} | "
                         f"{_fmt(row['base_specific_share'], 3)} | {row['turned_on']} | {row['turned_off']} |")
        if not any(cell["up"] or cell["down"] for cell in by_layer.values()):
            lines += ["", "No feature counting in either model changed beyond float rounding."]
        for band, layers in bands.items():
            for kind, words in (("up", "raised"), ("down", "lowered")):
                items = [(layer, item) for layer in layers if layer in by_layer for item in by_layer[layer][kind]]
                items.sort(key=lambda li: (-abs(li[1]["change"]), li[0], li[1]["feature"]))
                if not items:
                    continue
                lines += ["", f"**{band}, {words}**", "",
                          f"| layer | feature | base | adapter | change | base selectivity | specific to {lang} |",
                          "|---|---|---|---|---|---|---|"]
                lines += [f"| {layer} | {_link(neuronpedia, layer, it['feature'])} | {_fmt(it['base'])} | {_fmt(it['adapted'])} | "
                          f"{_fmt(it['change'], 3)} | {_fmt(it['base_selectivity'], 3)} | "
                          f"{'yes' if it['specific'] else 'no'} |" for layer, it in items[:top_k]]
        lines.append("")
    return "\n".join(lines) + "\n"
