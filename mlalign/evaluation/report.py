"""Base vs adapter accuracy per benchmark and language: the comparison, results.json, results.md and accuracy.png."""

from __future__ import annotations

import json
from pathlib import Path

from mlalign.io import write_atomic

METRICS = ("acc", "acc_norm")


def _scores(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {key: row.get(key) for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}


def _diff(adapter: float | None, base: float | None) -> float | None:
    return None if adapter is None or base is None else adapter - base


def compare_results(base: dict, adapter: dict | None = None, alpha: float = 0.05, ci: float = 0.95,
                    resamples: int = 10000, seed: int = 0) -> dict:
    """Join two `run_benchmarks` outputs cell by cell; `diff` is adapter minus base (None where either is missing).

    Returns {"results": {benchmark: {lang: {"task", "n_samples", "num_fewshot", "base": {acc, acc_stderr, acc_norm,
    acc_norm_stderr}, "adapter": {...} | None, "diff": {"acc", "acc_norm"} | None, "p_value", "diff_ci", "p_holm",
    "significant", "significance"}}}, "skipped": [...], "settings": {...}, "has_adapter": bool, "alpha": alpha}.

    Both runs must have scored the same items. Where both sides kept per-item scores, each cell gets a paired test
    of acc on those items (mlalign.evaluation.significance.paired_test): `p_value` (McNemar exact), `diff_ci`
    (paired bootstrap, level `ci`), `mde` (the smallest |diff| this test detects at `alpha` with power 0.8:
    significance.minimum_detectable_effect), and `p_holm`, the p-value Holm-adjusted over every tested cell of this
    run; `significant` is p_holm < alpha. Cells without a test hold None there.
    """
    from mlalign.evaluation.significance import holm, paired_test

    adapter_results = (adapter or {}).get("results", {})
    results: dict[str, dict[str, dict]] = {}
    tested: list[dict] = []
    for benchmark, by_lang in base["results"].items():
        results[benchmark] = {}
        for lang, base_row in by_lang.items():
            adapter_row = adapter_results.get(benchmark, {}).get(lang)
            if adapter_row is not None and adapter_row["n_samples"] != base_row["n_samples"]:
                raise ValueError(
                    f"{benchmark}/{lang}: base scored {base_row['n_samples']} items, adapter {adapter_row['n_samples']}; "
                    "compare runs with the same limit"
                )
            cell = {
                "task": base_row["task"],
                "n_samples": base_row["n_samples"],
                "num_fewshot": base_row.get("num_fewshot"),
                "base": _scores(base_row),
                "adapter": _scores(adapter_row),
                "diff": None if adapter_row is None
                else {metric: _diff(adapter_row.get(metric), base_row.get(metric)) for metric in METRICS},
                "p_value": None, "diff_ci": None, "mde": None, "p_holm": None, "significant": None,
                "significance": None,
            }
            base_items = base_row.get("items") or {}
            adapter_items = (adapter_row or {}).get("items") or {}
            if base_items.get("acc") is not None and adapter_items.get("acc") is not None:
                try:
                    test = paired_test(base_items, adapter_items, "acc", resamples=resamples, ci=ci, seed=seed,
                                       mde_alpha=alpha)
                except ValueError as err:
                    raise ValueError(f"{benchmark}/{lang}: {err}") from None
                cell.update(p_value=test["p_value"], diff_ci=test["diff_ci"], mde=test["mde"], significance=test)
                tested.append(cell)
            results[benchmark][lang] = cell
    for cell, adjusted in zip(tested, holm([cell["p_value"] for cell in tested])):
        cell["p_holm"] = adjusted
        cell["significant"] = bool(adjusted < alpha)
    return {
        "results": results,
        "skipped": list(base.get("skipped", [])),
        "settings": dict(base.get("settings", {})),
        "has_adapter": adapter is not None,
        "alpha": alpha,
        "n_tests": len(tested),
    }


def flat_metrics(comparison: dict) -> dict[str, float]:
    """`{benchmark}/{lang}/{base|adapter|diff}_{acc|acc_norm}` -> value, for trackers and task return values."""
    flat = {}
    for benchmark, by_lang in comparison["results"].items():
        for lang, cell in by_lang.items():
            for side in ("base", "adapter", "diff"):
                for metric in METRICS:
                    value = (cell[side] or {}).get(metric)
                    if value is not None:
                        flat[f"{benchmark}/{lang}/{side}_{metric}"] = float(value)
            if cell.get("p_value") is not None:
                flat[f"{benchmark}/{lang}/p_value"] = float(cell["p_value"])
    return flat


def summary_metrics(comparison: dict) -> dict[str, float]:
    """`<benchmark>/<lang>/<side>_<metric>` and p-values (flat_metrics), plus, where there is an adapter, the mean
    accuracy difference (`mean_diff_acc`, `<benchmark>/mean_diff_acc`) and the number of differences significant after
    Holm's adjustment (`n_significant`, of `n_tests`): the W&B summary values of task=eval and pipeline."""
    flat = flat_metrics(comparison)
    diffs = [v for k, v in flat.items() if k.endswith("/diff_acc")]
    if diffs:
        flat["mean_diff_acc"] = sum(diffs) / len(diffs)
    for benchmark, by_lang in comparison["results"].items():
        values = [cell["diff"]["acc"] for cell in by_lang.values() if (cell.get("diff") or {}).get("acc") is not None]
        if values:
            flat[f"{benchmark}/mean_diff_acc"] = sum(values) / len(values)
    if comparison.get("has_adapter"):
        cells = [cell for by_lang in comparison["results"].values() for cell in by_lang.values()]
        flat["n_significant"] = float(sum(1 for cell in cells if cell.get("significant")))
        flat["n_tests"] = float(comparison.get("n_tests", 0))
    return flat


def headline_lines(comparison: dict) -> list[str]:
    """One line per benchmark for the closing block: mean accuracy (base, and the adapter's difference), and which
    differences are significant after Holm's adjustment."""
    lines = []
    alpha = comparison.get("alpha", 0.05)
    a, b = comparison.get("labels") or ("base", "adapter")
    for benchmark, by_lang in comparison["results"].items():
        cells = {lang: cell for lang, cell in by_lang.items() if (cell.get("base") or {}).get("acc") is not None}
        if not cells:
            continue
        base = sum(cell["base"]["acc"] for cell in cells.values()) / len(cells)
        line = f"{benchmark}: {a} acc {base:.3f} (mean of {len(cells)} language(s))"
        diffs = {lang: cell["diff"]["acc"] for lang, cell in cells.items() if (cell.get("diff") or {}).get("acc") is not None}
        if diffs:
            significant = [f"{lang} {diffs[lang]:+.3f}" for lang, cell in cells.items() if cell.get("significant")]
            line += (f", {b} {sum(diffs.values()) / len(diffs):+.3f}; significant (Holm, p < {alpha:g}): "
                     + (", ".join(significant) if significant else f"none of {len(diffs)}"))
        lines.append(line)
    return lines


# --- files ------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def _fmt_diff(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def _fmt_test(cell: dict) -> tuple[str, str, str, str]:
    """(p, CI, MDE, verdict) columns: `n.s.` where the paired test cannot tell the adapter from the base model."""
    if cell.get("p_value") is None:
        return "–", "–", "–", "–"
    low, high = cell["diff_ci"]
    verdict = "significant" if cell["significant"] else "n.s."
    mde = "–" if cell.get("mde") is None else f"{cell['mde']:.4f}"
    return f"{cell['p_value']:.3g} (Holm {cell['p_holm']:.3g})", f"[{low:+.4f}, {high:+.4f}]", mde, verdict


def results_markdown(comparison: dict) -> str:
    """One table row per benchmark x language (acc ± stderr, base vs adapter, paired test), then the skipped ones."""
    a, b = comparison.get("labels") or ("base", "adapter")  # task=eval_compare: the two folders' names
    lines = [f"| benchmark | lang | task | n | shots | {a} acc | {b} acc | Δ acc | p (McNemar) | CI Δ acc | MDE "
             f"| verdict | {a} acc_norm | {b} acc_norm | Δ acc_norm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for benchmark, by_lang in comparison["results"].items():
        for lang, cell in by_lang.items():
            base, adapter, diff = cell["base"], cell["adapter"] or {}, cell["diff"] or {}
            p_value, interval, mde, verdict = _fmt_test(cell)
            shots = cell.get("num_fewshot")
            lines.append(
                f"| {benchmark} | {lang} | {cell['task']} | {cell['n_samples']} | {'–' if shots is None else shots} "
                f"| {_fmt(base['acc'], base['acc_stderr'])} | {_fmt(adapter.get('acc'), adapter.get('acc_stderr'))} "
                f"| {_fmt_diff(diff.get('acc'))} | {p_value} | {interval} | {mde} | {verdict} "
                f"| {_fmt(base['acc_norm'], base['acc_norm_stderr'])} "
                f"| {_fmt(adapter.get('acc_norm'), adapter.get('acc_norm_stderr'))} | {_fmt_diff(diff.get('acc_norm'))} |"
            )
    settings = comparison.get("settings") or {}
    header = "# Evaluation results\n\n"
    if settings:
        header += ", ".join(f"{key}: {value}" for key, value in settings.items()) + "\n\n"
    if comparison.get("subject"):
        header += f"Evaluated {comparison['subject']} alone (eval.compare_base=false): the base columns hold it.\n\n"
    elif not comparison.get("has_adapter"):
        header += "Base model only (no adapter).\n\n"
    if comparison.get("n_tests"):
        tested = [cell for by_lang in comparison["results"].values() for cell in by_lang.values()
                  if cell.get("p_value") is not None]
        n_significant = sum(1 for cell in tested if cell["significant"])
        ci = tested[0]["significance"]["ci"]
        header += (f"{a.capitalize()} and {b} answered the same items, so each Δ acc is tested paired: McNemar's "
                   f"exact test on the items only one of them got right, Holm-adjusted over the {len(tested)} cells; CI Δ acc is a "
                   f"{ci:.0%} paired bootstrap over items; MDE is the smallest |Δ acc| the test detects at "
                   f"{comparison.get('alpha', 0.05)} with 80% power on these items (a smaller true change is missed "
                   f"more often than not). **{n_significant} of {len(tested)} differences are "
                   f"significant** (adjusted p < {comparison.get('alpha', 0.05)}); a cell marked n.s. is not an "
                   f"effect of {b}: on these items it cannot be told from no change.\n\n")
    text = header + "\n".join(lines) + "\n"
    if comparison.get("skipped"):
        text += "\nSkipped:\n\n" + "".join(
            f"- {entry['benchmark']} / {entry['lang']}: {entry['reason']}\n" for entry in comparison["skipped"]
        )
    return text


def plot_accuracy(comparison: dict, path: Path) -> None:
    """Grouped bars per language (base, adapter) with stderr whiskers; one panel per benchmark that has results."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(benchmark, by_lang) for benchmark, by_lang in comparison["results"].items() if by_lang]
    figure = Figure(figsize=(max(4.0, 0.9 * max((len(b) for _, b in panels), default=1) + 1.5), 3.2 * max(len(panels), 1)))
    FigureCanvasAgg(figure)
    if not panels:
        figure.text(0.5, 0.5, "no results", ha="center", va="center")
    sides = ["base", "adapter"] if comparison.get("has_adapter") else ["base"]
    width = 0.8 / len(sides)
    for index, (benchmark, by_lang) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        langs = list(by_lang)
        for offset, side in enumerate(sides):
            cells = [by_lang[lang][side] or {} for lang in langs]
            values = [cell.get("acc") if cell.get("acc") is not None else float("nan") for cell in cells]
            errors = [cell.get("acc_stderr") or 0.0 for cell in cells]
            positions = [i + (offset - (len(sides) - 1) / 2) * width for i in range(len(langs))]
            axes.bar(positions, values, width, yerr=errors, capsize=2, label=side)
        axes.set_xticks(range(len(langs)), langs)
        axes.set_ylim(0.0, 1.0)
        axes.set_ylabel("accuracy")
        axes.set_title(benchmark)
        axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)


def write_eval_outputs(out_dir: str | Path, comparison: dict) -> dict[str, Path]:
    """Write results.json, results.md and accuracy.png into `out_dir` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "plot": out_dir / "accuracy.png"}
    write_atomic(paths["json"], lambda p: p.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8"))
    write_atomic(paths["markdown"], lambda p: p.write_text(results_markdown(comparison), encoding="utf-8"))
    write_atomic(paths["plot"], lambda p: plot_accuracy(comparison, p))
    return paths
