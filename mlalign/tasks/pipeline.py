"""task=pipeline: analyze the base model -> train an adapter -> analyze base + adapter -> evaluate both -> report.md."""

from __future__ import annotations

import shlex

from mlalign.io import write_text_atomic
from mlalign.report import gap_accuracy_correlation, render_report
from mlalign.tasks.train import check_train_config

OBJECTIVE = "alignment_score"
"""The training objective on the dev split (mlalign.training.outcomes.alignment_score), as task=train returns it."""


def check_config(cfg) -> None:
    """Run by dispatch before anything loads: the training settings, then the evaluation's (task names included)."""
    from mlalign.tasks import evaluate

    check_train_config(cfg)
    evaluate.check_config(cfg)


def rerun_command() -> str:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["python", "run.py", *(shlex.quote(o) for o in overrides)])


def write_feature_changes(cfg, ctx, summary: dict, base: dict, adapted: dict, out_dir) -> None:
    """feature_changes.json/.md: which features the adapter raised or lowered in the target languages and English."""
    from mlalign.analysis.features import adapter_changes, adapter_changes_markdown, neuronpedia_ids
    from mlalign.io import write_json_atomic
    from mlalign.tasks import train
    from mlalign.tasks.analyze import feature_settings

    fcfg = feature_settings(cfg.analysis)
    langs = [lang for lang in dict.fromkeys([*train.target_langs(cfg, ctx.langs), cfg.reference_lang]) if lang in base]
    changes = adapter_changes(base, adapted, langs, cfg.reference_lang, top_k=fcfg["top_k"],
                              min_sentences=fcfg["min_sentences"], specific_threshold=fcfg["specific_threshold"])
    write_json_atomic(out_dir / "feature_changes.json", {lang: {str(k): v for k, v in by.items()} for lang, by in changes.items()})
    layers = sorted(next(iter(base.values())))
    bands = {band: [int(layer) for layer in ls] for band, ls in summary["bands"].items()}
    path = write_text_atomic(out_dir / "feature_changes.md", adapter_changes_markdown(
        changes, bands, fcfg["top_k"], neuronpedia_ids(cfg.sae, layers)))
    print(f"features the adapter changed: {path}")


def disparity_line(cfg, ctx, before: dict, after: dict) -> str:
    """`disparity vs en (mean over layers), base -> adapter: hi -20.1% -> -12.3%, ...` for the target languages."""
    from mlalign.tasks import analyze, train

    base, adapted = analyze.scalar_results(before), analyze.scalar_results(after)
    cells = [f"{lang} {base[f'disparity_pct_{lang}']:+.1f}% -> {adapted[f'disparity_pct_{lang}']:+.1f}%"
             for lang in train.target_langs(cfg, ctx.langs)
             if f"disparity_pct_{lang}" in base and f"disparity_pct_{lang}" in adapted]
    return (f"disparity vs {cfg.reference_lang} (mean over layers), base -> base + adapter: "
            + (", ".join(cells) if cells else "n/a"))


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output, stage
    from mlalign.errors import UserError
    from mlalign.tasks import analyze, evaluate, train

    if not train.target_langs(cfg, ctx.langs):  # fail before the first analysis, not after it
        raise UserError(f"task=pipeline trains an adapter, so it needs a language besides {cfg.reference_lang}; "
                        f"type e.g. langs=[hi] (task=analyze maps {cfg.reference_lang} alone)")
    # What is measured where (docs/training.md#what-is-measured-where): step 1 computes only (language, layer)
    # statistics missing from the analysis cache; step 2 measures base vs adapter on the same dev/test tokens (the
    # paired outcome measures); step 3 computes the adapted model only; step 4 evaluates the base model only when the
    # evaluation cache lacks it.
    adapter = ctx.run_dir / "adapter"
    base_features: dict = {}
    adapted_features: dict = {}
    with stage("[1/4] analysing the base model"):
        before = analyze.analyze_model(cfg, ctx, out_dir=ctx.run_dir / "analysis_base", feature_stats_out=base_features)
    with stage("[2/4] training the adapter"):
        train_result = train.run(cfg, ctx)
    with stage("[3/4] analysing base + adapter"):
        after = analyze.analyze_model(cfg, ctx, adapter=adapter, out_dir=ctx.run_dir / "analysis_adapter",
                                      feature_stats_out=adapted_features)
        if base_features and adapted_features:
            write_feature_changes(cfg, ctx, before, base_features, adapted_features, ctx.run_dir / "analysis_adapter")
    with stage("[4/4] evaluating base vs adapter"):
        comparison = evaluate.evaluate_models(cfg, ctx, adapter=adapter)

    import json

    train_metrics = json.loads((ctx.run_dir / "train" / "metrics.json").read_text())
    report = render_report(ctx.run_dir, before, after, train_metrics, comparison, rerun_command())
    path = write_text_atomic(ctx.run_dir / "report.md", report)
    # The closing block (mlalign.console) prints the headline once, at the end: the base model's findings first,
    # then the adapter's outcome (registered by train.run), its effect on the disparity, and the benchmarks.
    headline(*(f"- {statement}" for statement in before["statements"]), at=0)
    headline(disparity_line(cfg, ctx, before, after), *evaluate.headline_lines(comparison))
    output("report", path)
    corr = gap_accuracy_correlation(before, comparison)
    result = {**train_result, **{f"before_{k}": v for k, v in analyze.scalar_results(before).items()},
              **{f"after_{k}": v for k, v in analyze.scalar_results(after).items()},
              **evaluate.summary_metrics(comparison)}
    if corr["rho"] is not None:
        result["gap_accuracy_spearman_rho"] = corr["rho"]
    return result
