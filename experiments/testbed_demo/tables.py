"""The tables of experiments/testbed_demo/README.md, from the demo run's committed result files (`make docs`)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _fmt(value, spec: str = "+.1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ci(ci, spec: str = "+.1f") -> str:
    return f"[{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]" if ci else ""


def base_table() -> str:
    """The base model per language: layers below English, and the mean disparity per band (token aggregate)."""
    summary = _load("summary_base.json")
    ref, bands = summary["reference_lang"], summary["bands"]
    lines = ["| lang | layers below English | " + " | ".join(f"{band} (layers {layers[0]}-{layers[-1]}), mean %"
                                                         for band, layers in bands.items())
             + " | residual norm vs English, mean over layers % |",
             "| --- " * (3 + len(bands)) + "|"]
    values = summary["values"]
    for lang in summary["langs"]:
        if lang == ref:
            continue
        disp = summary["disparity_pct"][lang]
        below = sum(value < 0 for value in disp.values())
        means = [sum(disp[str(layer)] for layer in layers) / len(layers) for layers in bands.values()]
        norm = [100 * (values[lang][k]["resid_norm"] / values[ref][k]["resid_norm"] - 1) for k in disp]
        lines.append(f"| {lang} | {below} of {len(disp)} | " + " | ".join(f"{m:+.1f}" for m in means)
                     + f" | {sum(norm) / len(norm):+.1f} |")
    return "\n".join(lines)


def below_english(lang: str) -> str:
    """'25 of 26': the layers where `lang`'s disparity is negative in the base model."""
    disp = _load("summary_base.json")["disparity_pct"][lang]
    return f"{sum(value < 0 for value in disp.values())} of {len(disp)}"


def train_table() -> str:
    """The adapter's outcomes on the held-out split, per language: gain, norm-matched gain, residual norm, validity,
    LM-loss change."""
    metrics = _load("train_metrics.json")
    lines = ["| lang | gain % [95% CI] | norm-matched gain % [95% CI] | residual norm % | valid | LM loss change (nats) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for lang, o in metrics["per_lang"].items():
        lines.append(f"| {lang} | {_fmt(o['gain_pct'])} {_ci(o.get('gain_ci'))} | "
                     f"{_fmt(o['norm_matched_gain_pct'])} {_ci(o.get('norm_matched_gain_ci'))} | "
                     f"{_fmt(o['resid_norm_change_pct'])} | {'yes' if o['valid'] else 'no'} | "
                     f"{_fmt(o['lm_loss_change'], '+.3f')} {_ci(o.get('lm_loss_change_ci'), '+.3f')} |")
    return "\n".join(lines)


def eval_table() -> str:
    """Base vs adapter accuracy per benchmark and language: the paired difference, its CI, the smallest difference the
    test would detect (MDE) and its Holm-adjusted p-value."""
    results = _load("eval_results.json")["results"]
    lines = ["| benchmark | lang | items | base acc | adapter acc | difference [95% CI] | MDE | p (Holm) |",
             "| --- " * 8 + "|"]
    for bench, by_lang in results.items():
        for lang, r in by_lang.items():
            lines.append(f"| {bench} | {lang} | {r['n_samples']} | {r['base']['acc']:.3f} | {r['adapter']['acc']:.3f} | "
                         f"{r['diff']['acc']:+.3f} {_ci(r.get('diff_ci'), '+.3f')} | {_fmt(r.get('mde'), '.3f')} | "
                         f"{_fmt(r.get('p_holm'), '.2f')} |")
    return "\n".join(lines)


def disparity_change(lang: str) -> str:
    """'-13.6% -> -7.3%': `lang`'s disparity vs English, mean over layers, base model -> base + adapter."""
    before = _load("summary_base.json")["disparity_pct"][lang]
    after = _load("summary_adapter.json")["disparity_pct"][lang]
    return f"{sum(before.values()) / len(before):+.1f}% -> {sum(after.values()) / len(after):+.1f}%"


def layers_beyond_tolerance(lang: str) -> str:
    """'18 of 26': the aligned layers where the adapter broke the SAE-fidelity rule for `lang`."""
    metrics = _load("train_metrics.json")
    return f"{len(metrics['per_lang'][lang]['layers_beyond_tolerance'])} of {len(metrics['layers'])}"
