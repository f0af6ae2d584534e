"""task=eval: ARC-Challenge, MMLU, HellaSwag, Belebele (and any lm-eval task) in every language through lm-eval, base
model vs LoRA adapter, each difference tested paired on the same items; base results cached across runs."""

from __future__ import annotations

import logging
from pathlib import Path

from mlalign.errors import UserError
from mlalign.evaluation import compare_results, flat_metrics, write_eval_outputs
from mlalign.evaluation.harness import plan_benchmarks, run_plan
from mlalign.evaluation.report import headline_lines, summary_metrics  # noqa: F401  (task=pipeline's too)
from mlalign.models import attach_adapter, model_source

log = logging.getLogger(__name__)

OBJECTIVE = "mean_diff_acc"


def _as_plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def make_plan(cfg, langs: list[str], work_dir: Path):
    """The evaluation plan of `cfg.eval` in `langs`: every task name checked against lm-eval's index (UserError)."""
    ecfg = cfg.eval
    return plan_benchmarks(langs, _as_plain(ecfg.benchmarks), ecfg.suite, num_fewshot=_as_plain(ecfg.num_fewshot),
                           limit=ecfg.limit, batch_size=ecfg.batch_size, seed=int(cfg.seed), work_dir=work_dir,
                           tasks=_as_plain(ecfg.get("tasks")))


def check_config(cfg) -> None:
    """Benchmarks, eval.tasks, few-shot and batch settings checked before any testbed, tokenizer or model loads."""
    import tempfile

    from mlalign.languages import resolve_langs

    if not cfg.get("adapter") and not cfg.eval.compare_base and cfg.task == "eval":
        raise UserError("eval.compare_base=false needs an adapter to evaluate: add adapter=PATH (a task=train adapter/ folder)")
    with tempfile.TemporaryDirectory(prefix="mlalign-eval-check-") as work_dir:
        make_plan(cfg, resolve_langs(cfg.langs, cfg.reference_lang), Path(work_dir))


def model_identity(cfg, ctx) -> dict:
    """What identifies the base model's weights and how they run, for the evaluation cache key."""
    from mlalign.analysis.cache import model_fingerprint

    source = model_source(cfg.model, ctx.testbed_dir)
    return {"source": source, "revision": cfg.model.get("revision"),
            "files": model_fingerprint(source, cfg.model.get("revision")), "dtype": cfg.model.dtype,
            "attn_implementation": cfg.model.get("attn_implementation")}


def evaluate_models(cfg, ctx, adapter=None, out_dir: Path | None = None) -> dict:
    """Evaluate the base model (if `eval.compare_base` or no adapter) and base + adapter on the same items; write
    `eval/results.json`, `results.md`, `accuracy.png` and lm-eval's own files under `eval/lm_eval/{base,adapter}/`;
    return the comparison. A side evaluated before with the same settings comes from the cache (`cache hit`).
    Reused by task=pipeline."""
    from mlalign.analysis.cache import adapter_fingerprint
    from mlalign.console import report_truncations, stage
    from mlalign.evaluation.cache import EvalCache, entry_key, eval_identity

    ecfg = cfg.eval
    out_dir = Path(out_dir or ctx.run_dir / "eval")
    if not adapter and not ecfg.compare_base:
        raise UserError("eval.compare_base=false needs an adapter to evaluate: add adapter=PATH (a task=train adapter/ folder)")
    plan = make_plan(cfg, ctx.langs, out_dir / "work")
    log_samples = bool(ecfg.get("log_samples", True))
    cache = EvalCache(Path(cfg.paths.cache_dir) / "eval", enabled=bool(ecfg.get("cache", True)))
    sides = ([("base", None)] if ecfg.compare_base or not adapter else []) + ([("adapter", adapter)] if adapter else [])
    runs: dict[str, dict] = {}
    model = tokenizer = None
    for side, side_adapter in sides:
        files = out_dir / "lm_eval" / side

        def identity():
            return {**eval_identity(model_identity(cfg, ctx), adapter_fingerprint(side_adapter), plan),
                    "log_samples": log_samples}

        cached = cache.load(identity(), files_to=files)
        if cached is not None:
            message = (f"cache hit: {side} results for {len(plan.entries)} task(s) from "
                       f"{cache.root / entry_key(identity())} (eval.cache=false reruns)")
            print(message)
            log.info(message)
            runs[side] = cached
            continue
        if model is None:
            tokenizer = ctx.load_tokenizer()
            model = ctx.load_model()
        if side_adapter:
            model = attach_adapter(model, side_adapter, model_source(cfg.model, ctx.testbed_dir))
            model.eval()
        model_args = {"pretrained": model_source(cfg.model, ctx.testbed_dir)}
        if side_adapter:
            model_args["peft"] = str(side_adapter)
        what = f"base + adapter {side_adapter}" if side_adapter else "the base model"
        with stage(f"evaluating {what} on {len(plan.entries)} lm-eval task(s)"):
            runs[side] = run_plan(model, tokenizer, plan, output_dir=files, log_samples=log_samples,
                                  model_args=model_args)
            report_truncations()
        # After loading: a first download fixed the snapshot the key names, so later runs compute the same key.
        cache.save(identity(), runs[side], files_from=files)
    test_settings = dict(alpha=float(ecfg.get("alpha", 0.05)), ci=float(ecfg.get("ci", 0.95)),
                         resamples=int(ecfg.get("bootstrap", 10000)), seed=int(cfg.seed))
    if "base" in runs:
        comparison = compare_results(runs["base"], runs.get("adapter"), **test_settings)
    else:
        comparison = compare_results(runs["adapter"], **test_settings)
        comparison["subject"] = f"base + adapter {adapter}"
    paths = write_eval_outputs(out_dir, comparison)
    ctx.tracker.log(flat_metrics(comparison))
    ctx.tracker.log_images({"eval/accuracy": paths["plot"]})
    for item in comparison.get("skipped", []):
        print(f"skipped {item['benchmark']} in {item['lang']}: {item['reason']}")
    return comparison


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output

    comparison = evaluate_models(cfg, ctx, adapter=cfg.adapter)
    print((ctx.run_dir / "eval" / "results.md").read_text())
    headline(*headline_lines(comparison))
    output("results", ctx.run_dir / "eval" / "results.md")
    return summary_metrics(comparison)
