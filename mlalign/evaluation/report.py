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


def compare_results(base: dict, adapter: dict | None = None) -> dict:
    """Join two `run_benchmarks` outputs cell by cell; `diff` is adapter minus base (None where either is missing).

    Returns {"results": {benchmark: {lang: {"task", "n_samples", "base": {acc, acc_stderr, acc_norm,
    acc_norm_stderr}, "adapter": {...} | None, "diff": {"acc", "acc_norm"} | None}}}, "skipped": [...],
    "settings": {...}, "has_adapter": bool}. Both runs must have scored the same items.
    """
    adapter_results = (adapter or {}).get("results", {})
    results: dict[str, dict[str, dict]] = {}
    for benchmark, by_lang in base["results"].items():
        results[benchmark] = {}
        for lang, base_row in by_lang.items():
            adapter_row = adapter_results.get(benchmark, {}).get(lang)
            if adapter_row is not None and adapter_row["n_samples"] != base_row["n_samples"]:
                raise ValueError(
                    f"{benchmark}/{lang}: base scored {base_row['n_samples']} items, adapter {adapter_row['n_samples']}; "
                    "compare runs with the same limit"
                )
            results[benchmark][lang] = {
                "task": base_row["task"],
                "n_samples": base_row["n_samples"],
                "base": _scores(base_row),
                "adapter": _scores(adapter_row),
                "diff": None if adapter_row is None
                else {metric: _diff(adapter_row.get(metric), base_row.get(metric)) for metric in METRICS},
            }
    return {
        "results": results,
        "skipped": list(base.get("skipped", [])),
        "settings": dict(base.get("settings", {})),
        "has_adapter": adapter is not None,
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
    return flat


# --- files ------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def _fmt_diff(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def results_markdown(comparison: dict) -> str:
    """One table row per benchmark x language (acc ± stderr, base vs adapter), then the skipped combinations."""
    lines = ["| benchmark | lang | task | n | base acc | adapter acc | Δ acc | base acc_norm | adapter acc_norm | Δ acc_norm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for benchmark, by_lang in comparison["results"].items():
        for lang, cell in by_lang.items():
            base, adapter, diff = cell["base"], cell["adapter"] or {}, cell["diff"] or {}
            lines.append(
                f"| {benchmark} | {lang} | {cell['task']} | {cell['n_samples']} "
                f"| {_fmt(base['acc'], base['acc_stderr'])} | {_fmt(adapter.get('acc'), adapter.get('acc_stderr'))} "
                f"| {_fmt_diff(diff.get('acc'))} "
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
