"""The end-to-end report of task=pipeline: the study's headline numbers before/after, benchmark deltas, and the
rank correlation between each language's activation gap and its benchmark accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mlalign.analysis.summary import disparity_table


def band_disparity(summary: dict) -> dict[str, dict[str, float]]:
    """Mean disparity_pct per language and layer band (early/middle/deep)."""
    out = {}
    for lang in summary["langs"]:
        if lang == summary["reference_lang"]:
            continue
        out[lang] = {}
        for band, layers in summary["bands"].items():
            values = [summary["disparity_pct"][lang][str(layer)] for layer in layers]
            values = [v for v in values if v is not None]
            out[lang][band] = float(np.mean(values)) if values else float("nan")
    return out


def mean_disparity(summary: dict) -> dict[str, float]:
    """Mean disparity_pct over all analysed layers, per non-reference language."""
    out = {}
    for lang in summary["langs"]:
        if lang != summary["reference_lang"]:
            values = [v for v in summary["disparity_pct"][lang].values() if v is not None]
            out[lang] = float(np.mean(values)) if values else float("nan")
    return out


def mean_accuracy(comparison: dict, side: str = "base") -> dict[str, float]:
    """Accuracy per language, averaged over the benchmarks that ran in it."""
    per_lang: dict[str, list[float]] = {}
    for by_lang in comparison["results"].values():
        for lang, cell in by_lang.items():
            acc = (cell.get(side) or {}).get("acc")
            if acc is not None:
                per_lang.setdefault(lang, []).append(float(acc))
    return {lang: float(np.mean(v)) for lang, v in per_lang.items()}


def gap_accuracy_correlation(summary: dict, comparison: dict) -> dict:
    """Spearman rank correlation across languages between mean activation disparity and mean base accuracy.

    The study claims the two go together (weaker activations, lower accuracy): a positive rho supports it.
    """
    from scipy.stats import spearmanr

    gaps, accs = mean_disparity(summary), mean_accuracy(comparison, "base")
    langs = [lang for lang in gaps if lang in accs and math.isfinite(gaps[lang])]
    result = {"langs": langs, "rho": None, "p_value": None, "n": len(langs)}
    if len(langs) >= 3:
        rho, p = spearmanr([gaps[lang] for lang in langs], [accs[lang] for lang in langs])
        if math.isfinite(rho):
            result.update(rho=float(rho), p_value=float(p))
    return result


def _fmt(value, spec: str = "+.1f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _rel(path: str | Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _corpus_section(run_dir: Path) -> list[str]:
    """The corpus summary from `corpus.json` (what was dropped, repeated, and how it was split), if it was written."""
    import json

    from mlalign.data.corpus import report_lines

    path = run_dir / "corpus.json"
    if not path.is_file():
        return []
    return ["## Corpus", "", *[f"- {line}" for line in report_lines(json.loads(path.read_text()))],
            "- details, and the ids of every split: `corpus.json`", ""]


def _feature_changes_section(run_dir: Path, changes: dict | None) -> list[str]:
    """Which features the adapter changed (analysis_adapter/feature_changes.md), key numbers per language and band."""
    if not changes:
        return []
    k = changes["top_k"]
    lines = ["", "## Which features the adapter changed", "",
             f"Per language and layer band (shares: mean over the band's layers): the adapter's total rise and fall in "
             f"per-feature mean activation, the share of the rise carried by its top {k} raised features (near 1 = a "
             f"handful of features), and the share on the language's own specific features in the base model next to "
             f"the base model's activation mass on them (an adapter that scaled every feature alike gives the two "
             f"equal). Definitions: docs/method.md §8; the features themselves: "
             f"`{_rel(changes['md'], run_dir)}`.", "",
             f"| lang | band | rise | fall | top-{k} share | specific share | base mass on specific | turned on / off |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lang, by_band in changes["by_band"].items():
        for band, row in by_band.items():
            lines.append(f"| {lang} | {band} | {_fmt(row['total_rise'], '.3g')} | {_fmt(row['total_fall'], '.3g')} | "
                         f"{_fmt(row['gain_top_k_share'], '.2f')} | {_fmt(row['gain_specific_share'], '.2f')} | "
                         f"{_fmt(row['base_specific_share'], '.2f')} | {row['turned_on']} / {row['turned_off']} |")
    return lines


def _causal_section(run_dir: Path, before: dict, after: dict) -> list[str]:
    """Each model's causal checks (analysis.features.ablate/steer/dashboard, docs/method.md §8c): the ablation verdicts
    and every file the steps wrote (the plots are also under Plots)."""
    models = [(name, summary["causal"]) for name, summary in (("base model", before), ("base + adapter", after))
              if summary.get("causal")]
    if not models:
        return []
    lines = ["", "## Are the language-specific features causal?", "",
             "Ablation, steering and feature dashboards of each model's language-specific features (docs/method.md "
             "§8c)."]
    for name, causal in models:
        files = ", ".join(f"`{_rel(path, run_dir)}`" for step in causal.values() for path in step["files"].values())
        lines += ["", f"**{name}**: {files}", ""]
        lines += [f"- {statement}" for statement in causal.get("ablation", {}).get("statements", [])]
    return lines


def render_report(run_dir: Path, before: dict, after: dict, train: dict, comparison: dict, command: str) -> str:
    """report.md: everything a reader needs to judge the run, in the study's terms: the base model's findings, the
    band disparities before -> after, the adapter's outcomes, which features it changed, whether each model's
    language-specific features are causal, the benchmarks, the activation gap against accuracy, the plots."""
    lines = [*_head_section(run_dir, before, command), *_band_section(before, after), *_outcome_section(train),
             *_feature_changes_section(run_dir, after.get("feature_changes")),
             *_causal_section(run_dir, before, after), *_benchmark_section(comparison),
             *_correlation_section(before, comparison), *_plots_section(run_dir, before, after)]
    return "\n".join(lines) + "\n"


def _head_section(run_dir: Path, before: dict, command: str) -> list[str]:
    """The title, what was measured, how to rerun it, the corpus, the base model's statements and disparities."""
    ref = before["reference_lang"]
    return [
        f"# mlalign pipeline report: {before['model']} / {before['sae']}",
        "",
        f"Reference language **{ref}**; metric `{before['metric']}` ({before['aggregate']} aggregate) on the "
        f"`{before['corpus']['split']}` split; layers {before['layers'][0]}-{before['layers'][-1]}.",
        "",
        "Rerun with:",
        "",
        f"```\n{command}\n```",
        "",
        *_corpus_section(run_dir),
        "## Headline statements (base model)",
        "",
        *[f"- {s}" for s in before["statements"]],
        "",
        f"## Disparity vs {ref} per layer (base model, %)",
        "",
        *disparity_table(before),
        "",
    ]


def _band_section(before: dict, after: dict) -> list[str]:
    """Each language's disparity per layer band, before -> after."""
    lines = ["## Disparity vs English per layer band, before -> after (%)", ""]
    bands = list(before["bands"])
    b_before, b_after = band_disparity(before), band_disparity(after)
    lines += ["| lang | " + " | ".join(bands) + " |", "| --- | " + " | ".join("---" for _ in bands) + " |"]
    for lang in b_before:
        cells = [f"{_fmt(b_before[lang][band])} -> {_fmt(b_after.get(lang, {}).get(band))}" for band in bands]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return lines


def _outcome_section(train: dict) -> list[str]:
    """The adapter's outcomes on the held-out split, per language."""
    from mlalign.training.report import outcome_lines

    lines = ["", f"## Activation-aware LoRA: outcomes on the {train['splits']['headline']} split, base -> adapter", "",
             f"Metric `{train['metric']}` ({train['aggregate']} aggregate); a gain counts only where, at every "
             f"aligned layer, the SAE's reconstruction error of the same tokens stays within "
             f"x{train['fidelity_tolerance']:g} of the base model's and the spliced-in LM loss rises at most "
             f"{train.get('spliced_tolerance_nats') or 0:g} nats/token (target and English); 95% paired "
             f"bootstrap CIs over sentences. Definitions: docs/training.md. Choices (sweeps) used the "
             f"`{train['splits']['dev']}` split; these numbers are reported once.", "",
             *outcome_lines(train), "",
             "| lang | gain (%) | 95% CI | norm-matched (%) | residual norm (%) | FVU before -> after | valid | LM loss change |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lang, o in train["per_lang"].items():
        ci = o.get("gain_ci") or [None, None]
        lines.append(f"| {lang} | {_fmt(o['gain_pct'])} | [{_fmt(ci[0])}, {_fmt(ci[1])}] | "
                     f"{_fmt(o['norm_matched_gain_pct'])} | {_fmt(o['resid_norm_change_pct'])} | "
                     f"{_fmt(o['fvu_before'], '.3f')} -> {_fmt(o['fvu_after'], '.3f')} | {'yes' if o['valid'] else 'no'} | "
                     f"{_fmt(o['lm_loss_change'], '+.3f')} |")
    return lines


def _benchmark_section(comparison: dict) -> list[str]:
    """The paired benchmark comparison, base -> adapter, and what was skipped."""
    n_tests = comparison.get("n_tests") or 0
    n_significant = sum(1 for by_lang in comparison["results"].values() for cell in by_lang.values()
                        if cell.get("significant"))
    lines = ["", "## Benchmarks, base -> adapter (accuracy)", "",
             f"Paired on the same items: McNemar's exact p, Holm-adjusted over the {n_tests} cells, and a 95% paired "
             f"bootstrap CI of the difference. **{n_significant} of {n_tests} differences are significant**; a "
             f"difference marked n.s. is not an effect of the adapter.", "",
             "| benchmark | lang | base | adapter | diff | 95% CI | p (Holm) | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for benchmark, by_lang in comparison["results"].items():
        for lang, cell in by_lang.items():
            base_acc = (cell.get("base") or {}).get("acc")
            tuned_acc = (cell.get("adapter") or {}).get("acc")
            diff = (cell.get("diff") or {}).get("acc")
            ci = cell.get("diff_ci") or [None, None]
            verdict = "" if cell.get("significant") is None else ("significant" if cell["significant"] else "n.s.")
            lines.append(f"| {benchmark} | {lang} | {_fmt(base_acc, '.3f')} | {_fmt(tuned_acc, '.3f')} | "
                         f"{_fmt(diff, '+.3f')} | [{_fmt(ci[0], '+.3f')}, {_fmt(ci[1], '+.3f')}] | "
                         f"{_fmt(cell.get('p_holm'), '.3g')} | {verdict} |")
    for item in comparison.get("skipped", []):
        lines.append(f"\nSkipped {item['benchmark']} in {item['lang']}: {item['reason']}")
    return lines


def _correlation_section(before: dict, comparison: dict) -> list[str]:
    """Spearman's rho between each language's activation gap and its base accuracy."""
    corr = gap_accuracy_correlation(before, comparison)
    lines = ["", "## Activation gap vs benchmark accuracy", ""]
    if corr["rho"] is None:
        lines.append(f"Spearman correlation needs at least 3 languages with both numbers (have {corr['n']}).")
    else:
        verdict = ("languages with weaker activations also score lower, as the study claims" if corr["rho"] > 0 else
                   "this run does not show weaker activations going with lower scores, as the study claims they do")
        lines.append(f"Spearman rho between each language's mean disparity and its mean base accuracy over "
                     f"{corr['n']} languages: **{corr['rho']:+.2f}** (p = {corr['p_value']:.3f}): {verdict}.")
    return lines


def _plots_section(run_dir: Path, before: dict, after: dict) -> list[str]:
    lines = ["", "## Plots", ""]
    for title, path in [*before.get("plots", {}).items(), *[(f"after: {k}", v) for k, v in after.get("plots", {}).items()]]:
        lines.append(f"![{title}]({_rel(path, run_dir)})")
    for name in ("train/activation_before_after.png", "eval/accuracy.png"):
        if (run_dir / name).is_file():
            lines.append(f"![{name}]({name})")
    return lines
