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


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.errors import UserError
    from mlalign.tasks import analyze, evaluate, train

    if not train.target_langs(cfg, ctx.langs):  # fail before the first analysis, not after it
        raise UserError(f"task=pipeline trains an adapter, so it needs a language besides {cfg.reference_lang}; "
                        f"type e.g. langs=[hi] (task=analyze maps {cfg.reference_lang} alone)")
    print("[1/4] analysing the base model")
    before = analyze.analyze_model(cfg, ctx, out_dir=ctx.run_dir / "analysis_base")
    print("[2/4] training the adapter")
    train_result = train.run(cfg, ctx)
    adapter = ctx.run_dir / "adapter"
    print("[3/4] analysing base + adapter")
    after = analyze.analyze_model(cfg, ctx, adapter=adapter, out_dir=ctx.run_dir / "analysis_adapter")
    print("[4/4] evaluating base vs adapter")
    comparison = evaluate.evaluate_models(cfg, ctx, adapter=adapter)

    import json

    train_metrics = json.loads((ctx.run_dir / "train" / "metrics.json").read_text())
    report = render_report(ctx.run_dir, before, after, train_metrics, comparison, rerun_command())
    path = write_text_atomic(ctx.run_dir / "report.md", report)
    print(f"\nreport: {path}")
    for statement in before["statements"]:
        print(f"- {statement}")
    corr = gap_accuracy_correlation(before, comparison)
    result = {**train_result, **{f"before_{k}": v for k, v in analyze.scalar_results(before).items()},
              **{f"after_{k}": v for k, v in analyze.scalar_results(after).items()},
              **evaluate.summary_metrics(comparison)}
    if corr["rho"] is not None:
        result["gap_accuracy_spearman_rho"] = corr["rho"]
    return result
