"""task=pipeline: analyze the base model -> train an adapter -> analyze base + adapter -> evaluate both -> report.md."""

from __future__ import annotations

import shlex

from mlalign.io import write_text_atomic
from mlalign.report import gap_accuracy_correlation, render_report
from mlalign.languages import target_langs
from mlalign.training.checks import check_train_config

OBJECTIVE = "alignment_score"
"""The training objective on the dev split (mlalign.training.outcomes.alignment_score), as task=train returns it."""


def check_config(cfg) -> None:
    """Run by dispatch before anything loads: the training settings, then the evaluation's (task names included), then
    the causal steps' (`check_causal_config`), then the analysis split: the pipeline analyses held-out sentences only
    (`held_out_analysis`)."""
    from mlalign.tasks import evaluate

    check_train_config(cfg)
    evaluate.check_config(cfg)
    check_causal_config(cfg)
    held_out_analysis(cfg)


def check_causal_config(cfg) -> None:
    """analysis.features.ablate/steer/dashboard, which both analyses run: checked here, before config.yaml, the corpus
    report or a resumed run's files are written, not when step 1's analysis starts. The layers where the config alone
    names them (model=hf with layers=null: when the analysis starts, after its config.json is read)."""
    from mlalign.analysis.causal import check_settings
    from mlalign.config import AnalysisConfig, typed
    from mlalign.tasks.common import resolve_layers

    num_layers = cfg.model.get("num_layers")
    layers = None if num_layers is None else resolve_layers(cfg.layers, int(num_layers))
    check_settings(typed(cfg.analysis, AnalysisConfig), layers)


def held_out_analysis(cfg) -> None:
    """The adapter must be analysed on sentences it was not trained on. Where `data.splits.analysis` holds training
    sentences (data=text_dir and data=hf default to `all`), both models are analysed on `data.splits.heldout`
    instead, so that before and after stay the same sentences; the saved config and corpus.json
    (`analysis_held_out`) say so."""
    from omegaconf import open_dict

    from mlalign.console import note
    from mlalign.data.corpus import analysis_overlap

    splits = cfg.data.splits
    overlap = analysis_overlap(splits)
    if not overlap:
        return
    note(f"data.splits.analysis={splits.analysis} holds the adapter's training sentences ({', '.join(overlap)}): "
         f"the pipeline analyses both models on data.splits.heldout={splits.heldout} instead")
    with open_dict(cfg):
        cfg.data.splits.analysis = str(splits.heldout)


def rerun_command() -> str:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["python", "run.py", *(shlex.quote(o) for o in overrides)])


def disparity_line(cfg, ctx, before: dict, after: dict) -> str:
    """`disparity vs en (mean over layers), base -> adapter: hi -20.1% -> -12.3%, ...` for the target languages."""
    from mlalign.tasks import analyze

    base, adapted = analyze.scalar_results(before), analyze.scalar_results(after)
    cells = [f"{lang} {base[f'disparity_pct_{lang}']:+.1f}% -> {adapted[f'disparity_pct_{lang}']:+.1f}%"
             for lang in target_langs(cfg, ctx.langs)
             if f"disparity_pct_{lang}" in base and f"disparity_pct_{lang}" in adapted]
    return (f"disparity vs {cfg.reference_lang} (mean over layers), base -> base + adapter: "
            + (", ".join(cells) if cells else "n/a"))


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output, stage
    from mlalign.errors import UserError
    from mlalign.tasks import analyze, evaluate, train

    if not target_langs(cfg, ctx.langs):  # fail before the first analysis, not after it
        raise UserError(f"task=pipeline trains an adapter, so it needs a language besides {cfg.reference_lang}; "
                        f"type e.g. langs=[hi] (task=analyze maps {cfg.reference_lang} alone)")
    # What is measured where (docs/training.md#what-is-measured-where): step 1 computes only (language, layer)
    # statistics missing from the analysis cache, and the held-out base side of step 2's paired pass in the same
    # forward passes; step 2 measures the adapter against it in the adapted model's analysis pass (and base vs adapter
    # on dev); step 3 reuses that pass and runs only the listed features' second pass; step 4 evaluates the base model
    # only when the evaluation cache lacks it.
    from mlalign.training.shared_pass import BasePassRecording

    adapter = ctx.run_dir / "adapter"
    base_features: dict = {}
    # Where it is the same measurement (training.shared_pass), step 1's pass over the held-out split also records the
    # base side of step 2's paired outcome pass, and step 2's adapted side runs as the adapted model's analysis pass,
    # which step 3 then reuses: each model runs over the held-out sentences once.
    recorded = BasePassRecording.for_pipeline(cfg, ctx, [*target_langs(cfg, ctx.langs), cfg.reference_lang])
    with stage("[1/4] analysing the base model"):
        before = analyze.analyze_model(cfg, ctx, out_dir=ctx.run_dir / "analysis_base", feature_stats_out=base_features,
                                       recording=recorded)
    with stage("[2/4] training the adapter"):
        trained = train.train_adapter(cfg, ctx, recorded=recorded)
    with stage("[3/4] analysing base + adapter"):
        # With the base model's per-feature statistics, also which features the adapter changed (feature_changes.md),
        # the same code path as task=analyze adapter=...
        after = analyze.analyze_model(cfg, ctx, adapter=adapter, out_dir=ctx.run_dir / "analysis_adapter",
                                      base_features=base_features, computed_before=trained.adapted)
    with stage("[4/4] evaluating base vs adapter"):
        comparison = evaluate.evaluate_models(cfg, ctx, adapter=adapter)

    report = render_report(ctx.run_dir, before, after, trained.metrics, comparison, rerun_command())
    path = write_text_atomic(ctx.run_dir / "report.md", report)
    # The closing block (mlalign.console) prints the headline once, at the end: the base model's findings first,
    # then the adapter's outcome (registered by train.train_adapter), its effect on the disparity, and the benchmarks.
    headline(*(f"- {statement}" for statement in before["statements"]), at=0)
    headline(disparity_line(cfg, ctx, before, after), *evaluate.headline_lines(comparison))
    output("report", path)
    if after.get("feature_changes"):
        output("feature changes", after["feature_changes"]["md"])
    corr = gap_accuracy_correlation(before, comparison)
    result = {**trained.result, **{f"before_{k}": v for k, v in analyze.scalar_results(before).items()},
              **{f"after_{k}": v for k, v in analyze.scalar_results(after).items()},
              **evaluate.summary_metrics(comparison)}
    if corr["rho"] is not None:
        result["gap_accuracy_spearman_rho"] = corr["rho"]
    return result
