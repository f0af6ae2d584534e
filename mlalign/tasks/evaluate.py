"""task=eval: ARC-Challenge, MMLU, HellaSwag, Belebele (and any lm-eval task) in every language through lm-eval, base
model vs LoRA adapter, each difference tested paired on the same items; base results cached across runs."""

from __future__ import annotations

import logging
from pathlib import Path

from mlalign.config import EvalConfig, typed
from mlalign.errors import UserError
from mlalign.evaluation import compare_results, flat_metrics, write_eval_outputs
from mlalign.evaluation.harness import plan_benchmarks, run_plan
from mlalign.evaluation.report import headline_lines, summary_metrics  # noqa: F401  (task=pipeline's too)
from mlalign.io import write_text_atomic
from mlalign.models import model_source

log = logging.getLogger(__name__)

OBJECTIVE = "mean_diff_acc"


def _as_plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def make_plan(cfg, langs: list[str], work_dir: Path):
    """The evaluation plan of `cfg.eval` in `langs`: every task name checked against lm-eval's index (UserError)."""
    return plan_benchmarks(langs, typed(cfg.eval, EvalConfig), seed=int(cfg.seed), work_dir=work_dir)


def adapter_list(cfg) -> list[str]:
    """The adapters this eval compares with the base model: adapter=DIR, or adapters=[A,B,...] (not both)."""
    adapters = _as_plain(cfg.get("adapters")) or []
    if isinstance(adapters, str):
        adapters = [adapters]
    if adapters and cfg.get("adapter"):
        raise UserError("give adapter=DIR or adapters=[A,B,...], not both")
    if len(set(map(str, adapters))) != len(adapters):
        raise UserError(f"adapters= lists a folder twice ({adapters}); list each adapter once")
    return [str(a) for a in adapters] or ([str(cfg.adapter)] if cfg.get("adapter") else [])


def check_config(cfg) -> None:
    """Benchmarks, eval.tasks, few-shot and batch settings checked before any testbed, tokenizer or model loads."""
    import tempfile

    from mlalign.languages import resolve_langs
    from mlalign.models import check_adapter

    adapters = adapter_list(cfg)
    for adapter in adapters:
        check_adapter(adapter)
    if not adapters and not cfg.eval.compare_base and cfg.task == "eval":
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


def evaluate_sides(cfg, ctx, plan, sides: list[tuple[str, str | None]], out_dir: Path) -> dict[str, dict]:
    """side -> `run_plan` result for each (side, adapter or None): from the evaluation cache where it holds the same
    settings (`cache hit`), else evaluated. The base model loads once, at the first side that needs it; adapters are
    swapped on it through peft (mlalign.models.swap_adapter), so the base side must come first."""
    from mlalign.analysis.cache import adapter_fingerprint
    from mlalign.console import report_truncations, stage
    from mlalign.evaluation.cache import EvalCache, entry_key, eval_identity
    from mlalign.models import swap_adapter

    ecfg = typed(cfg.eval, EvalConfig)
    log_samples = bool(ecfg.log_samples)
    cache = EvalCache(Path(cfg.paths.cache_dir) / "eval", enabled=bool(ecfg.cache))
    source = model_source(cfg.model, ctx.testbed_dir)
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
        elif side_adapter is None:
            raise RuntimeError("the base side must be evaluated before any adapter is swapped in")
        if side_adapter:
            model = swap_adapter(model, side_adapter, side, source)
        model_args = {"pretrained": source}
        if side_adapter:
            model_args["peft"] = str(side_adapter)
        what = f"base + adapter {side_adapter}" if side_adapter else "the base model"
        with stage(f"evaluating {what} on {len(plan.entries)} lm-eval task(s)"):
            runs[side] = run_plan(model, tokenizer, plan, output_dir=files, log_samples=log_samples,
                                  model_args=model_args)
            report_truncations()
        # After loading: a first download fixed the snapshot the key names, so later runs compute the same key.
        cache.save(identity(), runs[side], files_from=files)
    return runs


def _compare(cfg, runs: dict, side: str, adapter: str | None) -> dict:
    ecfg = typed(cfg.eval, EvalConfig)
    test_settings = dict(alpha=float(ecfg.alpha), ci=float(ecfg.ci), resamples=int(ecfg.bootstrap), seed=int(cfg.seed))
    if "base" in runs:
        return compare_results(runs["base"], runs.get(side), **test_settings)
    comparison = compare_results(runs[side], **test_settings)
    comparison["subject"] = f"base + adapter {adapter}"
    return comparison


def _report(ctx, comparison: dict, out_dir: Path, prefix: str = "") -> None:
    paths = write_eval_outputs(out_dir, comparison)
    ctx.tracker.log({f"{prefix}{key}": value for key, value in flat_metrics(comparison).items()})
    ctx.tracker.log_images({f"eval/{prefix}accuracy": paths["plot"]})
    for item in comparison.get("skipped", []):
        print(f"skipped {item['benchmark']} in {item['lang']}: {item['reason']}")


def evaluate_models(cfg, ctx, adapter=None, out_dir: Path | None = None) -> dict:
    """Evaluate the base model (if `eval.compare_base` or no adapter) and base + adapter on the same items; write
    `eval/results.json`, `results.md`, `accuracy.png` and lm-eval's own files under `eval/lm_eval/{base,adapter}/`;
    return the comparison. A side evaluated before with the same settings comes from the cache (`cache hit`).
    Reused by task=pipeline."""
    ecfg = cfg.eval
    out_dir = Path(out_dir or ctx.run_dir / "eval")
    if not adapter and not ecfg.compare_base:
        raise UserError("eval.compare_base=false needs an adapter to evaluate: add adapter=PATH (a task=train adapter/ folder)")
    plan = make_plan(cfg, ctx.langs, out_dir / "work")
    sides = ([("base", None)] if ecfg.compare_base or not adapter else []) + ([("adapter", adapter)] if adapter else [])
    runs = evaluate_sides(cfg, ctx, plan, sides, out_dir)
    comparison = _compare(cfg, runs, "adapter", adapter)
    _report(ctx, comparison, out_dir)
    return comparison


def evaluate_adapters(cfg, ctx, adapters: list[str], out_dir: Path | None = None) -> list[dict]:
    """adapters=[A,B,...]: the base model once (or from the cache) and every adapter swapped onto the same loaded base;
    each adapter's comparison with the base, exactly as its own `adapter=` run would give it (its own Holm family),
    under `eval/adapter_<k>/`, lm-eval's files under `eval/lm_eval/adapter_<k>/`, and `eval/adapters.md`."""
    out_dir = Path(out_dir or ctx.run_dir / "eval")
    plan = make_plan(cfg, ctx.langs, out_dir / "work")
    names = [f"adapter_{k}" for k in range(len(adapters))]
    sides = ([("base", None)] if cfg.eval.compare_base else []) + list(zip(names, adapters))
    runs = evaluate_sides(cfg, ctx, plan, sides, out_dir)
    comparisons = []
    rows = ["| adapter | folder | mean Δ acc | significant (Holm, per adapter) |", "|---|---|---:|---|"]
    for name, adapter in zip(names, adapters):
        comparison = _compare(cfg, runs, name, adapter)
        comparison["adapter"] = adapter
        _report(ctx, comparison, out_dir / name, prefix=f"{name}/")
        comparisons.append(comparison)
        flat = summary_metrics(comparison)
        mean = flat.get("mean_diff_acc")
        rows.append(f"| {name} | {adapter} | {'–' if mean is None else f'{mean:+.4f}'} | "
                    f"{int(flat.get('n_significant', 0))} of {int(flat.get('n_tests', 0))} |")
    write_text_atomic(out_dir / "adapters.md", "# Adapters on one base model\n\nEach adapter is compared with the "
                      "same base results; per-cell tables in adapter_<k>/results.md.\n\n" + "\n".join(rows) + "\n")
    return comparisons


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output

    adapters = adapter_list(cfg)
    if len(adapters) <= 1:
        comparison = evaluate_models(cfg, ctx, adapter=adapters[0] if adapters else None)
        print((ctx.run_dir / "eval" / "results.md").read_text())
        headline(*headline_lines(comparison))
        output("results", ctx.run_dir / "eval" / "results.md")
        return summary_metrics(comparison)
    metrics: dict[str, float] = {}
    lines = []
    for k, comparison in enumerate(evaluate_adapters(cfg, ctx, adapters)):
        metrics.update({f"adapter_{k}/{key}": value for key, value in summary_metrics(comparison).items()})
        lines += [f"adapter_{k} ({comparison['adapter']}): {line}" for line in headline_lines(comparison)]
    print((ctx.run_dir / "eval" / "adapters.md").read_text())
    headline(*lines)
    output("results", ctx.run_dir / "eval" / "adapters.md")
    return metrics
