"""The map across SAE seeds: each (language, layer) cell's disparity under every seed's SAEs, their spread, and whether
the cell's sign survives a different SAE seed (task=analyze sae.seeds=[...]; docs/method.md §9)."""

from __future__ import annotations

import statistics
from pathlib import Path

from mlalign.analysis.registry import get_metric
from mlalign.analysis.summary import order_by_tier

MAX_LISTED = 8
"""Sign-unstable cells named in the statement; the rest are counted."""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def same_sign(values) -> bool:
    """Every value strictly on one side of 0 (a 0 keeps no sign)."""
    return all(v > 0 for v in values) or all(v < 0 for v in values)


def cell_record(values: dict[str, float | None], cis: dict[str, list | None], fit: bool) -> dict:
    """One cell across seeds: each seed's disparity and CI, their mean, SD (n - 1; exactly 0 for identical values:
    `statistics` sums exactly) and range, the mean sentence-CI half-width beside them, and the two sign verdicts:
    `sign_stable` (every seed's point estimate on the same side of 0) and `ci_sign_stable` (every seed's CI excludes 0
    on the same side; null without CIs). Null everywhere a seed left the cell undefined."""
    record = {"disparity_pct": values, "disparity_ci": cis, "fit": fit}
    numbers = list(values.values())
    if not all(_finite(v) for v in numbers):
        return {**record, "mean_disparity_pct": None, "seed_sd": None, "seed_range": None,
                "sentence_ci_halfwidth": None, "sign_stable": None, "ci_sign_stable": None}
    intervals = list(cis.values())
    with_cis = all(ci is not None and all(_finite(end) for end in ci) for ci in intervals)
    return {**record, "mean_disparity_pct": statistics.mean(numbers), "seed_sd": statistics.stdev(numbers),
            "seed_range": [min(numbers), max(numbers)],
            "sentence_ci_halfwidth": statistics.mean((high - low) / 2 for low, high in intervals) if with_cis else None,
            "sign_stable": same_sign(numbers),
            "ci_sign_stable": (all(low > 0 for low, _ in intervals) or all(high < 0 for _, high in intervals))
            if with_cis else None}


def _unfit(summary: dict, lang: str, layer: str) -> bool:
    return (int(layer) in {int(x) for x in summary.get("unfit_layers") or []}
            or int(layer) in {int(x) for x in (summary.get("unfit_cells") or {}).get(lang, [])})


def seed_spread(summaries: dict[int, dict]) -> dict:
    """`analysis/sae_seeds.json` from each seed's summary.json content ({seed: summary}, same languages, layers and
    metric): `cells[lang][layer]` (`cell_record`, the primary metric's disparity_pct), the counts over cells that
    every seed's SAE fits and that every seed defines (`n_cells`, `n_sign_stable`, `n_ci_sign_stable`, per band in
    `by_band`), `sign_unstable` ([lang, layer] pairs) and `statements`. Where every seed's summary has the
    norm-matched disparity (analysis.norm_matched=true), each cell also holds `norm_matched`: the same record of it
    (per-seed values and CIs, mean, SD, range, sign verdicts)."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    for seed in seeds[1:]:
        other = summaries[seed]
        for key in ("reference_lang", "metric", "aggregate", "layers", "langs"):
            if other[key] != first[key]:
                raise ValueError(f"SAE seed {seed}'s analysis has {key}={other[key]!r}, seed {seeds[0]}'s {first[key]!r}")
    ref = first["reference_lang"]
    langs = [lang for lang in order_by_tier(first["langs"]) if lang != ref]
    layers = [str(layer) for layer in first["layers"]]
    cells = {lang: {layer: cell_record(
        {str(s): summaries[s]["disparity_pct"][lang][layer] for s in seeds},
        {str(s): ((summaries[s].get("disparity_ci") or {}).get(lang) or {}).get(layer) for s in seeds},
        fit=not any(_unfit(summaries[s], lang, layer) for s in seeds)) for layer in layers} for lang in langs}
    if all(summaries[s].get("disparity_pct_norm_matched") for s in seeds):
        # The centred, norm-matched disparity (method §1c) across the same seeds: does "direction, not scale" hold
        # under every seed's SAEs?
        for lang in langs:
            for layer in layers:
                cell = cells[lang][layer]
                cell["norm_matched"] = {key: value for key, value in cell_record(
                    {str(s): summaries[s]["disparity_pct_norm_matched"][lang][layer] for s in seeds},
                    {str(s): ((summaries[s].get("disparity_ci_norm_matched") or {}).get(lang) or {}).get(layer)
                     for s in seeds}, fit=cell["fit"]).items() if key != "fit"}
    return _tallied({"seeds": seeds, "reference_lang": ref, "metric": first["metric"], "aggregate": first["aggregate"],
                     "ci": first["ci"], "bootstrap": first["bootstrap"], "layers": first["layers"], "langs": langs,
                     "bands": first["bands"], "cells": cells})


def _tallied(spread: dict) -> dict:
    """`spread` (its header and `cells`) with the counts over cells, `by_band`, `sign_unstable`, `n_cells_left_out`
    and `statements` computed from its cells."""
    cells, langs, layers = spread["cells"], spread["langs"], [str(layer) for layer in spread["layers"]]
    counted = [(lang, layer) for lang in langs for layer in layers
               if cells[lang][layer]["fit"] and cells[lang][layer]["sign_stable"] is not None]
    out = {
        **spread, **_counts(cells, counted),
        "by_band": {band: _counts(cells, [(lang, layer) for lang, layer in counted if int(layer) in band_layers])
                    for band, band_layers in spread["bands"].items()},
        "sign_unstable": [[lang, int(layer)] for lang, layer in counted if not cells[lang][layer]["sign_stable"]],
        "n_cells_left_out": len(langs) * len(layers) - len(counted),
    }
    out["statements"] = seed_statements(out)
    return out


SAME_FOOTING = ("seeds", "reference_lang", "metric", "aggregate", "ci", "bootstrap", "langs")
"""What two seed spreads must share for one's layers to stand in for the other's (`replace_layers`)."""


def replace_layers(spread: dict, other: dict) -> dict:
    """`spread` (an analysis/sae_seeds.json) with every layer `other` covers taken from `other` instead: a map some of
    whose layers were analysed again with other SAEs (a recipe per depth), on the same sentences, seeds, metric and
    languages. Each cell stands alone, so the counts, bands and statements are recomputed over the merged cells;
    `replaced_layers` lists the layers taken from `other` (and `replaced_from` its `files`, where it has them)."""
    for key in SAME_FOOTING:
        if other[key] != spread[key]:
            raise ValueError(f"the replacing spread has {key}={other[key]!r}, the map {spread[key]!r}: not the same "
                             f"footing")
    layers, replacing = [str(layer) for layer in spread["layers"]], [str(layer) for layer in other["layers"]]
    if not set(replacing) <= set(layers):
        raise ValueError(f"the replacing spread covers layers {replacing}, not all among the map's {layers}")
    cells = {lang: {layer: (other if layer in replacing else spread)["cells"][lang][layer] for layer in layers}
             for lang in spread["langs"]}
    header = {key: value for key, value in spread.items()
              if key in ("seeds", "reference_lang", "metric", "aggregate", "ci", "bootstrap", "layers", "langs",
                         "bands")}
    out = _tallied({**header, "cells": cells})
    out["replaced_layers"] = sorted(set(map(int, replacing)) | set(spread.get("replaced_layers") or []))
    if other.get("files"):
        out["replaced_from"] = other["files"]
    return out


def _counts(cells: dict, counted: list) -> dict:
    """n_cells, n_sign_stable and n_ci_sign_stable (null where no cell has CIs) over the `counted` cells."""
    verdicts = [cells[lang][layer]["ci_sign_stable"] for lang, layer in counted]
    return {"n_cells": len(counted),
            "n_sign_stable": sum(bool(cells[lang][layer]["sign_stable"]) for lang, layer in counted),
            "n_ci_sign_stable": sum(map(bool, verdicts)) if any(v is not None for v in verdicts) else None}


def seed_statements(spread: dict) -> list[str]:
    """What the seeds say, in words: how many cells keep their sign, where the sign depends on the seed, and how the
    seed spread compares with the sentence CI."""
    seeds, ref, cells = spread["seeds"], spread["reference_lang"], spread["cells"]
    level = f"{100 * spread['ci']:.0f}%"
    words = get_metric(spread["metric"]).words
    lines = [f"{spread['n_sign_stable']} of {spread['n_cells']} (language, layer) cells keep the sign of their "
             f"disparity vs {ref} ({words}) under all {len(seeds)} SAE seeds ({', '.join(map(str, seeds))})"
             + (f"; in {spread['n_ci_sign_stable']} every seed's {level} sentence CI excludes 0 on the same side"
                if spread["n_ci_sign_stable"] is not None else "")
             + (f" ({spread['n_cells_left_out']} cell(s) left out: undefined, or some seed's SAE does not fit there)"
                if spread["n_cells_left_out"] else "") + "."]
    if len(spread["by_band"]) > 1:
        lines.append("Sign-stable by band: " + ", ".join(
            f"{band} {counts['n_sign_stable']} of {counts['n_cells']}" for band, counts in spread["by_band"].items()
            if counts["n_cells"]) + ".")
    unstable = spread["sign_unstable"]
    if unstable:
        named = [f"{lang} layer {layer} ({cells[lang][str(layer)]['seed_range'][0]:+.1f} to "
                 f"{cells[lang][str(layer)]['seed_range'][1]:+.1f}%)" for lang, layer in unstable[:MAX_LISTED]]
        more = f" and {len(unstable) - MAX_LISTED} more" if len(unstable) > MAX_LISTED else ""
        lines.append(f"The sign depends on the SAE seed at {', '.join(named)}{more}.")
    counted = [cells[lang][layer] for lang in cells for layer in cells[lang]
               if cells[lang][layer]["fit"] and cells[lang][layer]["seed_sd"] is not None]
    if counted:
        widest = max(counted, key=lambda cell: cell["seed_sd"])
        where = next(f"{lang} layer {layer}" for lang in cells for layer in cells[lang] if cells[lang][layer] is widest)
        halfwidths = [cell["sentence_ci_halfwidth"] for cell in counted if cell["sentence_ci_halfwidth"] is not None]
        lines.append(f"Across SAE seeds the disparity's SD is {statistics.median(c['seed_sd'] for c in counted):.2f} "
                     f"points at the median cell (largest {widest['seed_sd']:.2f}, {where})"
                     + (f", beside a median {level} sentence-CI half-width of {statistics.median(halfwidths):.2f} "
                        "points" if halfwidths else "") + ".")
    return lines


def seeds_markdown(spread: dict, analyses: dict[str, str]) -> str:
    """analysis/sae_seeds.md: the statements and one table of mean (SD) per language x layer, `‡` where the sign
    depends on the seed, `†` where some seed's SAE does not fit."""
    layers = [str(layer) for layer in spread["layers"]]
    lines = [f"# Disparity across SAE seeds {', '.join(map(str, spread['seeds']))}", "",
             *[f"- {statement}" for statement in spread["statements"]], "",
             f"## Mean (SD) of disparity_pct vs {spread['reference_lang']} over SAE seeds", "",
             "| lang | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for lang, by_layer in spread["cells"].items():
        row = []
        for layer in layers:
            cell = by_layer[layer]
            if cell["mean_disparity_pct"] is None:
                row.append("–")
                continue
            mark = "†" if not cell["fit"] else "" if cell["sign_stable"] else "‡"
            row.append(f"{cell['mean_disparity_pct']:.1f} ({cell['seed_sd']:.1f}){mark}")
        lines.append(f"| {lang} | " + " | ".join(row) + " |")
    lines += ["", "‡ the sign differs between SAE seeds; † some seed's SAE does not fit there (left out of the counts).",
              "", "Each seed's own analysis: " + ", ".join(f"seed {s}: `{path}`" for s, path in analyses.items()), ""]
    return "\n".join(lines)


def heatmap_view(spread: dict, summary: dict) -> tuple[dict, dict[str, set[int]]]:
    """(a summary-shaped dict whose disparity_pct is the mean over seeds, {lang: sign-unstable layers}) for
    `plots.plot_disparity_heatmap`."""
    view = {**summary, "disparity_pct": {lang: {layer: cell["mean_disparity_pct"] for layer, cell in by_layer.items()}
                                         for lang, by_layer in spread["cells"].items()},
            "sae": f"{summary.get('sae') or 'SAE'} seeds {','.join(map(str, spread['seeds']))}"}
    marked: dict[str, set[int]] = {}
    for lang, layer in spread["sign_unstable"]:
        marked.setdefault(lang, set()).add(int(layer))
    return view, marked


def write_seed_spread(summaries: dict[int, dict], analyses: dict[int, Path], out_dir: Path, plots: bool) -> dict:
    """analysis/sae_seeds.json, sae_seeds.md and (plots) sae_seeds_heatmap.png: the mean disparity over seeds with
    the sign-unstable cells hatched. Returns the JSON's content (with `analyses` and `files`)."""
    from mlalign.io import write_json_atomic, write_text_atomic

    spread = seed_spread(summaries)
    spread["analyses"] = {str(seed): str(path) for seed, path in analyses.items()}
    files = {"json": str(out_dir / "sae_seeds.json"), "md": str(out_dir / "sae_seeds.md")}
    if plots:
        from mlalign.analysis.plots import plot_disparity_heatmap

        view, marked = heatmap_view(spread, summaries[spread["seeds"][0]])
        files["heatmap"] = str(plot_disparity_heatmap(view, out_dir / "sae_seeds_heatmap.png", marked=marked,
                                                      what="mean over SAE seeds, hatched: sign depends on the seed"))
    spread["files"] = files
    write_json_atomic(out_dir / "sae_seeds.json", spread)
    write_text_atomic(out_dir / "sae_seeds.md", seeds_markdown(spread, spread["analyses"]))
    return spread
