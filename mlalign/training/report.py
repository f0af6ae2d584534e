"""The train task's report: metrics.json from the outcome measures (training/outcomes.py), its plot and its lines.

`activation_levels` reads the analysis engine (`collect_stats` + `compute_metrics`) for code that wants the analysis
task's numbers for a model directly.
"""

from __future__ import annotations

import math
from pathlib import Path


from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.analysis.metrics import compute_metrics


def activation_levels(model, tokenizer, saes: dict, texts_by_lang: dict[str, list[str]], metric: str, aggregate: str,
                      batch_size: int, max_length: int, sae_chunk=None, cache=None) -> dict[str, dict[int, float]]:
    """levels[lang][layer] of the analysis metric on `texts_by_lang`.

    `cache`: the analysis task's `StatsCache` for this model and split; (language, layer) results found there are
    reused and new ones stored, so a sweep of training runs (and task=pipeline) measures the base model once.
    """
    stats = {lang: {} for lang in texts_by_lang}
    missing = set()
    for lang in texts_by_lang:
        for layer in saes:
            hit = cache.load(lang, layer) if cache is not None else None
            if hit is None:
                missing.add(lang)
            else:
                stats[lang][layer] = hit
    if missing:
        todo = {lang: texts_by_lang[lang] for lang in texts_by_lang if lang in missing}
        settings = EngineSettings(batch_size=batch_size, max_length=max_length, sae_chunk=sae_chunk, progress=False)
        computed = collect_stats(model, tokenizer, saes, todo, settings)
        for lang, by_layer in computed.items():
            for layer, sums in by_layer.items():
                stats[lang][layer] = sums
                if cache is not None:
                    cache.save(lang, layer, sums)
    values = compute_metrics(stats, aggregate)
    return {lang: {int(layer): float(v[metric]) for layer, v in by_layer.items()} for lang, by_layer in values.items()}


STUDY_FIGURES = "+87% (ml) and +86% (hi) activation gain with ~91% of English kept"


def train_metrics(test_report: dict, dev_report: dict, *, metric: str, aggregate: str, reference_lang: str,
                  targets: list[str], layers: list[int], splits: dict[str, str], tolerance: float,
                  floor_pct: float, spliced_tolerance: float | None = None, seed: int | None = None) -> dict:
    """The train task's metrics.json: headline outcomes on the held-out (test) split, the same on dev for choices.

    Top level and `per_lang` come from `splits["headline"]`; `dev` (and `alignment_score`) from `splits["dev"]`.
    Why 12 parameters: each keyword is one recorded key of metrics.json, named where tasks/train.py, the one caller,
    passes it.
    """
    from mlalign.training.outcomes import alignment_score

    return {
        "metric": metric,
        "aggregate": aggregate,
        "reference_lang": reference_lang,
        "targets": targets,
        "layers": layers,
        "fidelity_tolerance": tolerance,
        "spliced_tolerance_nats": spliced_tolerance,
        "splits": {**splits, "note": "top-level numbers and per_lang: the headline split, reported once; `dev` and "
                                     "alignment_score: the dev split, for choices (sweeps, early stopping)"},
        **test_report,
        "lm_loss_change": {lang: v["lm_loss_change"] for lang, v in test_report["per_lang"].items()},
        "dev": dev_report,
        "alignment_score": alignment_score(dev_report, floor_pct, tolerance),
        "seeds": {"n": 1, "seed": seed, "note": ONE_RUN_NOTE},
    }


ONE_RUN_NOTE = ("one training run (one seed): every CI here resamples sentences, not runs, and is narrower than the "
                "run-to-run spread; for that spread train each arm with several seeds: task=compare "
                "compare.arms=[base,act_align] compare.seeds=3")
"""What metrics.json and the report say about seeds: task=train trains one adapter; task=compare trains arms x seeds."""


def _fmt(value, spec: str = "+.1f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _ci_text(ci, spec: str = "+.1f") -> str:
    return f" [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]" if ci else ""


def _beyond_text(o: dict, metrics: dict) -> str:
    """Which aligned layers break the fidelity rule, and by how much (reconstruction error; spliced-in LM loss)."""
    tol, spliced_tol = metrics["fidelity_tolerance"], metrics.get("spliced_tolerance_nats")
    layers = [str(layer) for layer in metrics["layers"]]
    parts = []
    for layer in o.get("layers_beyond_tolerance", []):
        words = []
        if str(layer) in layers:
            words.append(f"reconstruction error x{_fmt(o['recon_error_ratio'][layers.index(str(layer))], '.2f')}")
        if layer in o.get("spliced_layers", []):
            j = o["spliced_layers"].index(layer)
            words.append(f"spliced-in LM loss {_fmt(o['spliced_dlm_loss_before'][j], '.3f')} -> "
                         f"{_fmt(o['spliced_dlm_loss_after'][j], '.3f')} nats")
        parts.append(f"layer {layer}: {', '.join(words)}")
    limits = f"tolerance x{tol:g}" + (f" and +{spliced_tol:g} nats" if spliced_tol is not None else "")
    return ("; ".join(parts) or "no aligned layer measured") + f" ({limits})"


IDLE_ACT_ALIGN_PCT = 25.0
"""Below this share of steps with the activation term above zero, a run says its adapter was trained mostly by its
other terms (experiments/gemma3_270m_compare: 4-6 of 100 steps, the targets already at English's level)."""


def act_align_activity(history: list[dict], weight: float) -> dict | None:
    """How often the activation term pushed: the steps whose `act_align` loss was above zero (a relative hinge is zero
    once the target reaches English's level), and the median target/English ratio the loop logged (`act_ratio`).
    None where the objective has no activation term (weight 0) or no step ran."""
    if weight <= 0 or not history:
        return None
    active = sum(float(row.get("act_align", 0.0)) > 0 for row in history)
    ratios = sorted(float(row["act_ratio"]) for row in history if row.get("act_ratio") is not None)
    pct = 100.0 * active / len(history)
    return {"active_steps": active, "steps": len(history), "active_pct": pct,
            "act_ratio_median": ratios[len(ratios) // 2] if ratios else None, "idle": pct < IDLE_ACT_ALIGN_PCT}


def idle_act_align_line(activity: dict | None) -> str | None:
    """One line where the activation term was nearly idle: what it means and what to do; None otherwise."""
    if not activity or not activity["idle"]:
        return None
    ratio = activity["act_ratio_median"]
    why = (f" (median target/English ratio {ratio:.2f}: the targets already reach English's level at the aligned "
           f"layers)" if ratio is not None and ratio >= 1 else "")
    return (f"the activation term was above zero on {activity['active_steps']} of {activity['steps']} steps{why}, so "
            f"this adapter was trained mostly by its other terms; align layers where task=analyze shows a deficit "
            f"(loss.layers=[...])")


def outcome_lines(metrics: dict) -> list[str]:
    """Markdown bullet lines: per target language a result or an artefact verdict, then English, then the study."""
    tol = metrics["fidelity_tolerance"]
    ref = metrics["reference_lang"]
    per_lang = metrics["per_lang"]
    english = per_lang[ref]
    split = metrics["splits"].get("headline", "held-out")
    lines = []
    for lang in metrics["targets"]:
        o = per_lang[lang]
        fvu = f"FVU {o['fvu_before']:.3f} -> {o['fvu_after']:.3f}"
        if not o["valid"]:
            lines.append(f"- **{lang}: SAE artefact: {_beyond_text(o, metrics)}**: the raw {metrics['metric']} "
                         f"change of {_fmt(o['gain_pct'])}% is the SAE failing on the adapted residual stream, not a "
                         f"result.")
            continue
        if not english["valid"]:
            lines.append(f"- **{lang}: not counted**: its SAE fidelity is within tolerance at every aligned layer, "
                         f"but English's is not: {_beyond_text(english, metrics)}.")
            continue
        gain_ci = o["gain_ci"]
        significant = gain_ci is not None and (gain_ci[0] > 0 or gain_ci[1] < 0)
        scale = (o["gain_pct"] > 0 and o["norm_matched_gain_pct"] < 0.5 * o["gain_pct"])
        words = [f"- **{lang}: {_fmt(o['gain_pct'])}%**{_ci_text(gain_ci)} {metrics['metric']} on {split} "
                 f"(norm-matched {_fmt(o['norm_matched_gain_pct'])}%{_ci_text(o['norm_matched_gain_ci'])}; "
                 f"residual norm {_fmt(o['resid_norm_change_pct'])}%; reconstruction error at most "
                 f"x{_fmt(o.get('recon_error_ratio_max'), '.2f')}, within x{tol:g}; {fvu}; "
                 f"LM loss {_fmt(o['lm_loss_change'], '+.3f')} nats)"]
        if not significant:
            words.append(": the 95% CI includes 0, so no change is shown")
        elif scale:
            words.append(": more than half of it is residual scale (the norm-matched gain is under half the raw "
                         "gain), so it says little about what the model represents")
        lines.append("".join(words) + ".")
    # Retention (the level of the pooled metric) cannot see which features changed: the SAE-code cosine and the LM
    # loss change stand beside it in the headline.
    lines.append(f"- **English: retention {_fmt(metrics['english_retention_pct'], '.1f')}%"
                 f"{_ci_text(metrics['english_retention_ci'], '.1f')}, SAE-code cosine "
                 f"{_fmt(english['code_cosine'], '.3f')}, LM loss {_fmt(english['lm_loss_change'], '+.3f')} nats"
                 f"{_ci_text(english.get('lm_loss_change_ci'), '+.3f')}** (retention 100 = unchanged level; cosine 1 = "
                 f"the same features; signed change {_fmt(english['gain_pct'])}%, FVU {english['fvu_before']:.3f} -> "
                 f"{english['fvu_after']:.3f}, reconstruction error at most "
                 f"x{_fmt(english.get('recon_error_ratio_max'), '.2f')}).")
    idle = idle_act_align_line(metrics.get("act_align_activity"))
    if idle:
        lines.append(f"- **Activation term nearly idle**: {idle}.")
    lines.append(f"- Seeds: {metrics['seeds']['note']}." if "seeds" in metrics else
                 "- Seeds: not recorded (a metrics.json from before seeds were recorded).")
    lines.append(f"- For comparison only: the study reports {STUDY_FIGURES} for its own, unpublished definition; "
                 f"the numbers above are mlalign's definitions (docs/training.md), not the same quantity.")
    return lines


def plot_before_after(report: dict, path: Path) -> Path:
    """Per layer and language: the metric before (dashed) / after (solid); raw vs norm-matched gain; FVU before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [str(layer) for layer in report["layers"]]
    xs = [int(layer) for layer in layers]
    langs = [*report["targets"], report["reference_lang"]]
    fig, (ax_level, ax_gain, ax_fvu) = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, lang in enumerate(langs):
        colour = f"C{i}"
        per_layer = report["per_lang"][lang]["per_layer"]
        ax_level.plot(xs, [per_layer[k]["level_before"] for k in layers], "--", color=colour, alpha=0.7)
        ax_level.plot(xs, [per_layer[k]["level_after"] for k in layers], "-", color=colour, label=lang)
        ax_gain.plot(xs, [per_layer[k]["gain_pct"] for k in layers], "-o", color=colour, markersize=3,
                     label=f"{lang} raw")
        ax_gain.plot(xs, [per_layer[k]["norm_matched_gain_pct"] for k in layers], ":", color=colour,
                     label=f"{lang} norm-matched")
        ax_fvu.plot(xs, [per_layer[k]["fvu_before"] for k in layers], "--", color=colour, alpha=0.7)
        ax_fvu.plot(xs, [per_layer[k]["fvu_after"] for k in layers], "-", color=colour, label=lang)
    split = report["splits"].get("headline", "held-out")
    ax_level.set(xlabel="layer", ylabel=report["metric"], title=f"{split}: before (dashed) / after (solid)")
    ax_gain.axhline(0.0, color="grey", lw=0.8)
    ax_gain.set(xlabel="layer", ylabel="change after training (%)", title="raw vs norm-matched change")
    ax_fvu.set(xlabel="layer", ylabel="FVU", title=f"SAE fidelity (tolerance x{report['fidelity_tolerance']:g})")
    for ax in (ax_level, ax_gain, ax_fvu):
        ax.legend(fontsize=7)
    fig.tight_layout()
    from mlalign.io import save_figure

    try:
        save_figure(fig, path, dpi=120)  # atomic, and a failed write leaves no temp file behind
    finally:
        plt.close(fig)
    return path
