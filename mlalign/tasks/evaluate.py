"""task=eval: ARC-Challenge, MMLU and HellaSwag in every language through lm-eval, base model vs LoRA adapter."""

from __future__ import annotations

from pathlib import Path

from mlalign.errors import UserError
from mlalign.evaluation import compare_results, flat_metrics, run_benchmarks, write_eval_outputs
from mlalign.models import attach_adapter, model_source

OBJECTIVE = "mean_diff_acc"


def evaluate_models(cfg, ctx, adapter=None, out_dir: Path | None = None) -> dict:
    """Evaluate the base model (if `eval.compare_base` or no adapter) and base + adapter on the same items; write
    `eval/results.json`, `results.md` and `accuracy.png`; return the comparison. Reused by task=pipeline."""
    ecfg = cfg.eval
    out_dir = Path(out_dir or ctx.run_dir / "eval")
    if not adapter and not ecfg.compare_base:
        raise UserError("eval.compare_base=false needs an adapter to evaluate: add adapter=PATH (a task=train adapter/ folder)")
    settings = dict(langs=ctx.langs, benchmarks=list(ecfg.benchmarks), suite=ecfg.suite,
                    num_fewshot=int(ecfg.num_fewshot), limit=ecfg.limit, batch_size=int(ecfg.batch_size),
                    seed=int(cfg.seed), work_dir=out_dir / "work")
    from mlalign.evaluation.tasks import check_benchmarks, check_suite

    check_suite(ecfg.suite)
    check_benchmarks(list(ecfg.benchmarks))
    tokenizer = ctx.load_tokenizer()
    model = ctx.load_model()
    base = None
    if ecfg.compare_base or not adapter:
        print("evaluating the base model")
        base = run_benchmarks(model, tokenizer, **settings)
    tuned = None
    if adapter:
        print(f"evaluating base + adapter {adapter}")
        model = attach_adapter(model, adapter, model_source(cfg.model, ctx.testbed_dir))
        model.eval()
        tuned = run_benchmarks(model, tokenizer, **settings)
    if base is not None:
        comparison = compare_results(base, tuned)
    else:
        comparison = compare_results(tuned)
        comparison["subject"] = f"base + adapter {adapter}"
    paths = write_eval_outputs(out_dir, comparison)
    ctx.tracker.log(flat_metrics(comparison))
    ctx.tracker.log_images({"eval/accuracy": paths["plot"]})
    for item in comparison.get("skipped", []):
        print(f"skipped {item['benchmark']} in {item['lang']}: {item['reason']}")
    return comparison


def summary_metrics(comparison: dict) -> dict[str, float]:
    flat = flat_metrics(comparison)
    diffs = [v for k, v in flat.items() if k.endswith("/diff_acc")]
    if diffs:
        flat["mean_diff_acc"] = sum(diffs) / len(diffs)
    return flat


def run(cfg, ctx) -> dict[str, float]:
    comparison = evaluate_models(cfg, ctx, adapter=cfg.adapter)
    print((ctx.run_dir / "eval" / "results.md").read_text())
    return summary_metrics(comparison)
