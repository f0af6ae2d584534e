"""task=train: activation-aware LoRA (or plain LoRA with loss=plain) and its before/after numbers on held-out text."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from mlalign.errors import UserError
from mlalign.io import write_json_atomic

log = logging.getLogger(__name__)

OBJECTIVE = "alignment_score"
"""What sweepers maximise: the mean held-out activation gain (%), minus 10 points per point of English retention
below `train.retention_floor_pct` (the study keeps ~91% of English)."""


def alignment_score(gain_pct: float, retention_pct: float, floor_pct: float) -> float:
    return float(gain_pct) - 10.0 * max(0.0, float(floor_pct) - float(retention_pct))


def check_train_config(cfg: DictConfig) -> None:
    """Fail on settings that cannot train before any model loads."""
    from mlalign.training.losses import check_loss_config

    check_loss_config(cfg.loss)
    r = cfg.lora.get("r")
    if r is None or int(r) <= 0:
        raise UserError(f"lora.r={r} must be a positive integer (the LoRA rank); type e.g. lora.r=8")
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum"):
        if int(t[key]) < 1:
            raise UserError(f"train.{key}={t[key]} must be at least 1")
    if int(t.warmup_steps) < 0 or int(t.save_every or 0) < 0:
        raise UserError("train.warmup_steps and train.save_every must be >= 0 (save_every=0 disables checkpoints)")
    if str(cfg.data.splits.train) == str(cfg.data.splits.heldout):
        raise UserError(f"data.splits.train and data.splits.heldout are both {cfg.data.splits.train!r}; held-out "
                        f"numbers need text never trained on, e.g. data.splits.heldout=test")


def target_langs(cfg: DictConfig, langs: list[str]) -> list[str]:
    """The languages the adapter is trained to lift: `train.target_langs`, or every analysed language but the reference."""
    reference = str(cfg.reference_lang)
    chosen = cfg.train.get("target_langs")
    if chosen is None:
        return [lang for lang in langs if lang != reference]
    chosen = [str(lang) for lang in chosen]
    outside = [lang for lang in chosen if lang not in langs or lang == reference]
    if outside:
        raise UserError(f"train.target_langs has {outside[0]!r}, which is not among the non-reference langs "
                        f"{[lang for lang in langs if lang != reference]}; add it to langs or drop it")
    return chosen


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    from mlalign.training.checkpoint import last_checkpoint

    resume_from = cfg.train.get("resume_from")
    if resume_from:
        found = last_checkpoint(resume_from)
        if found is None:
            raise UserError(f"train.resume_from={resume_from} holds no checkpoint; point it at a run directory, its "
                            "checkpoints/ folder or one checkpoints/step-N folder written by task=train")
        return found
    if cfg.train.resume:
        found = last_checkpoint(run_dir)
        if found is None:
            raise UserError(f"train.resume=true but {run_dir} holds no checkpoint; resume in the interrupted run's "
                            "directory with hydra.run.dir=<that directory>, or give train.resume_from=<its path>")
        return found
    return None


def _base_stats_cache(cfg: DictConfig, ctx):
    """The analysis task's cache of base-model statistics on the held-out split (shared with task=analyze)."""
    from mlalign.analysis.cache import StatsCache
    from mlalign.tasks.analyze import cache_identity

    split = str(cfg.data.splits.heldout)
    return StatsCache(Path(cfg.paths.cache_dir) / "analysis", cache_identity(cfg, ctx.testbed_dir, None, split),
                      enabled=bool(cfg.analysis.get("cache", True)))


def run(cfg: DictConfig, ctx) -> dict[str, float]:
    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model
    from transformers import get_scheduler

    from mlalign.analysis.metrics import check_aggregate, check_metric
    from mlalign.data.corpus import load_corpus
    from mlalign.models import hidden_size, num_layers
    from mlalign.tasks.common import resolve_layers
    from mlalign.training.data import load_parallel_stream
    from mlalign.training.loop import ObjectiveFn, resolve_mixed_precision, train_loop
    from mlalign.training.report import activation_levels, before_after_report, lm_loss, plot_before_after

    check_train_config(cfg)
    reference = str(cfg.reference_lang)
    targets = target_langs(cfg, ctx.langs)
    if not targets:
        raise UserError(f"task=train needs at least one target language besides {reference}; type e.g. langs=[hi]")
    metric = check_metric(str(cfg.analysis.metric))
    aggregate = check_aggregate(str(cfg.analysis.aggregate))
    resume_from = _resume_checkpoint(cfg, ctx.run_dir)
    started = time.perf_counter()

    cpu = str(cfg.model.device) == "cpu"
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, cpu),
                              gradient_accumulation_steps=int(cfg.train.grad_accum), cpu=cpu)
    tokenizer = ctx.load_tokenizer()
    base = ctx.load_model(device=str(accelerator.device))
    n_layers, d_model = num_layers(base), hidden_size(base)
    analysed = ctx.layers(n_layers)
    aligned = resolve_layers(cfg.loss.layers, n_layers) if cfg.loss.layers is not None else analysed
    saes = ctx.load_saes(sorted(set(analysed) | set(aligned)), d_model, accelerator.device)
    try:
        model = get_peft_model(base, instantiate(cfg.lora, _convert_="all"))
    except ValueError as err:
        raise UserError(f"the LoRA config does not fit model {cfg.model.name}: {str(err).splitlines()[0]}; "
                        "check lora.target_modules against the model's module names") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters; aligning layers %s; targets %s", trainable, aligned, targets)

    # Data: parallel (target, English) pairs for training; the held-out split only for measuring.
    stream = load_parallel_stream(cfg.data, targets, reference, str(cfg.data.splits.train), tokenizer,
                                  int(cfg.train.max_length), int(cfg.seed))
    heldout_corpus = load_corpus(cfg.data, ctx.langs, str(cfg.data.splits.heldout))
    heldout = {lang: heldout_corpus[lang] for lang in ctx.langs}
    heldout_pairs = load_parallel_stream(cfg.data, targets, reference, str(cfg.data.splits.heldout), tokenizer,
                                         int(cfg.train.max_length), int(cfg.seed))
    measure_kwargs = dict(batch_size=int(cfg.analysis.batch_size), max_length=int(cfg.data.max_length))

    def measure(peft_model, cache=None) -> tuple[dict, dict]:
        levels = activation_levels(peft_model, tokenizer, {layer: saes[layer] for layer in analysed}, heldout, metric,
                                   aggregate, sae_chunk=cfg.analysis.get("sae_chunk"), cache=cache, **measure_kwargs)
        return levels, lm_loss(peft_model, tokenizer, heldout, **measure_kwargs)

    with model.disable_adapter():
        before, loss_before = measure(model, cache=_base_stats_cache(cfg, ctx))

    objective = ObjectiveFn(cfg.loss, saes, aligned, tokenizer.bos_token_id, accelerator)

    def heldout_losses(m) -> dict[str, float]:
        m.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for i in range(len(targets)):
                values = objective(m, heldout_pairs.batch(i, int(cfg.train.batch_size), accelerator.device)).values
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value / len(targets)
        return totals

    optimizer = instantiate(cfg.train.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(str(cfg.train.scheduler), optimizer, num_warmup_steps=int(cfg.train.warmup_steps),
                              num_training_steps=int(cfg.train.max_steps))
    # The scheduler stays unprepared: it steps once per optimizer step, whatever the number of processes.
    model, optimizer = accelerator.prepare(model, optimizer)

    train_started = time.perf_counter()
    state = train_loop(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                       objective=objective, stream=stream, train_cfg=cfg.train,
                       checkpoints=ctx.run_dir / "checkpoints", resume_from=resume_from, tracker=ctx.tracker,
                       eval_fn=heldout_losses)
    train_s = time.perf_counter() - train_started

    peft_model = accelerator.unwrap_model(model)
    peft_model.eval()
    after, loss_after = measure(peft_model)
    report = before_after_report(before, after, reference, targets, analysed, cfg.analysis.get("bands"),
                                 loss_before, loss_after, metric)
    report.update(steps=state.step, resumed_from_step=state.resumed_from, train_s=train_s,
                  total_s=time.perf_counter() - started, trainable_params=trainable, aligned_layers=aligned)

    out = ctx.run_dir / "train"
    if accelerator.is_main_process:
        peft_model.save_pretrained(str(ctx.run_dir / "adapter"))
        write_json_atomic(out / "history.json", state.history)
        write_json_atomic(out / "metrics.json", report)
        if cfg.analysis.get("plots", True):
            ctx.tracker.log_images({"train/activation_before_after": plot_before_after(
                report, out / "activation_before_after.png")})
    accelerator.wait_for_everyone()

    final = state.history[-1] if state.history else {}
    result = {
        "activation_gain_pct_mean": report["activation_gain_pct_mean"],
        **{f"activation_gain_pct_{lang}": v for lang, v in report["activation_gain_pct"].items()},
        **{f"activation_gain_pct_{lang}_{band}": v
           for lang, by_band in report["activation_gain_pct_by_band"].items() for band, v in by_band.items()},
        "english_retention_pct": report["english_retention_pct"],
        **{f"lm_loss_change_{lang}": v for lang, v in report["lm_loss_change"].items()},
        **{f"final_{k}": float(v) for k, v in final.items() if k in ("ce", "act_align", "en_retain", "total")},
        "steps": float(state.step),
        "train_s": float(train_s),
    }
    result["alignment_score"] = alignment_score(result["activation_gain_pct_mean"], result["english_retention_pct"],
                                                cfg.train.get("retention_floor_pct", 90.0))
    ctx.tracker.log({f"result/{k}": v for k, v in result.items()})
    gains = ", ".join(f"{lang} {v:+.1f}%" for lang, v in report["activation_gain_pct"].items())
    accelerator.print(f"held-out {metric} gain: {gains}; English retention {report['english_retention_pct']:.1f}%; "
                      f"adapter: {ctx.run_dir / 'adapter'}")
    return result
