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
"""What sweepers maximise, on the dev split only (`mlalign.training.outcomes.alignment_score`): the mean activation
gain, minus penalties for English change in either direction and for any rise of the SAE's FVU."""


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
    if t.resume not in (True, False, "auto"):
        raise UserError(f"train.resume={t.resume} must be true, false or auto (resume if this run directory holds a "
                        "checkpoint, start fresh otherwise)")
    if int(t.warmup_steps) < 0 or int(t.save_every or 0) < 0:
        raise UserError("train.warmup_steps and train.save_every must be >= 0 (save_every=0 disables checkpoints)")
    splits = cfg.data.splits
    if str(splits.train) == str(splits.heldout):
        raise UserError(f"data.splits.train and data.splits.heldout are both {splits.train!r}; held-out "
                        f"numbers need text never trained on, e.g. data.splits.heldout=test")
    if str(splits.valid) in (str(splits.heldout), str(splits.train)):
        raise UserError(f"data.splits.valid={splits.valid!r} is also the {'heldout' if str(splits.valid) == str(splits.heldout) else 'train'} "
                        f"split; choices (sweeps, alignment_score) need a dev split of their own, e.g. data.splits.valid=dev")
    tolerance = float(t.get("fidelity_tolerance", 1.25))
    if not tolerance >= 1.0:
        raise UserError(f"train.fidelity_tolerance={tolerance} must be >= 1 (1.25 = the SAE's reconstruction error "
                        f"may rise by 25%)")
    if not float(t.spliced_tolerance_nats) >= 0.0:
        raise UserError(f"train.spliced_tolerance_nats={t.spliced_tolerance_nats} must be >= 0 (nats/token the "
                        f"spliced-in LM loss may rise), e.g. train.spliced_tolerance_nats=0.05")
    if float(cfg.loss.get("act_align", 0.0)) > 0:
        from mlalign.training.losses import ALIGNABLE_METRICS

        if str(cfg.analysis.metric) not in ALIGNABLE_METRICS:
            raise UserError(f"the alignment term aims at analysis.metric={cfg.analysis.metric}, which has no per-token "
                            f"SAE value to align; use analysis.metric= one of {', '.join(ALIGNABLE_METRICS)}")


check_config = check_train_config
"""Run by `dispatch` before the run context loads anything."""


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
    if cfg.train.resume == "auto":  # a requeued job continues; a fresh one starts at step 0
        return last_checkpoint(run_dir)
    if cfg.train.resume:
        found = last_checkpoint(run_dir)
        if found is None:
            raise UserError(f"train.resume=true but {run_dir} holds no checkpoint; resume in the interrupted run's "
                            "directory with hydra.run.dir=<that directory>, or give train.resume_from=<its path>")
        return found
    return None


def run(cfg: DictConfig, ctx, shared=None) -> dict[str, float]:
    """Train the adapter, then measure base vs adapter on dev and on the held-out split. shared: task=pipeline's
    `training.shared_pass.BasePassRecording`: the held-out base side its analysis pass recorded is used instead of
    running the base model over those sentences again, and the adapter's held-out measurement runs through the
    analysis engine, leaving the adapted model's statistics for the pipeline's next step in `shared.adapted`."""
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
    from mlalign.training import base_cache
    from mlalign.training.outcomes import add_spliced, measure_adapted, outcome_report
    from mlalign.training.report import outcome_lines, plot_before_after, train_metrics

    from mlalign.console import headline, output, stage

    check_train_config(cfg)
    reference = str(cfg.reference_lang)
    targets = target_langs(cfg, ctx.langs)
    if not targets:
        raise UserError(f"task=train needs at least one target language besides {reference}; type e.g. langs=[hi]")
    metric = check_metric(str(cfg.analysis.metric))
    aggregate = check_aggregate(str(cfg.analysis.aggregate))
    tolerance = float(cfg.train.get("fidelity_tolerance", 1.25))
    resume_from = _resume_checkpoint(cfg, ctx.run_dir)
    started = time.perf_counter()

    cpu = str(cfg.model.device) == "cpu"
    precision = resolve_mixed_precision(cfg.train.mixed_precision, cpu)
    accelerator = Accelerator(mixed_precision=precision,
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

    # Data: parallel (target, English) pairs for training; dev for choices and monitoring; held-out only for the
    # numbers reported once.
    splits = {"train": str(cfg.data.splits.train), "dev": str(cfg.data.splits.valid),
              "headline": str(cfg.data.splits.heldout)}
    stream = load_parallel_stream(cfg.data, targets, reference, splits["train"], tokenizer,
                                  int(cfg.train.max_length), int(cfg.seed))
    dev_pairs = load_parallel_stream(cfg.data, targets, reference, splits["dev"], tokenizer,
                                     int(cfg.train.max_length), int(cfg.seed))
    measured = [*targets, reference]
    texts = {split: {lang: load_corpus(cfg.data, measured, splits[split])[lang] for lang in measured}
             for split in ("dev", "headline")}

    objective = ObjectiveFn(cfg.loss, saes, aligned, tokenizer.bos_token_id, accelerator, metric, aggregate)

    def dev_losses(m) -> dict[str, float]:
        m.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for i in range(len(targets)):
                values = objective(m, dev_pairs.batch(i, int(cfg.train.batch_size), accelerator.device)).values
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value / len(targets)
        return totals

    optimizer = instantiate(cfg.train.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(str(cfg.train.scheduler), optimizer, num_warmup_steps=int(cfg.train.warmup_steps),
                              num_training_steps=int(cfg.train.max_steps))
    # The scheduler stays unprepared: it steps once per optimizer step, whatever the number of processes.
    model, optimizer = accelerator.prepare(model, optimizer)

    train_started = time.perf_counter()
    with stage(f"training the adapter ({int(cfg.train.max_steps)} steps, LoRA r={cfg.lora.r}, {', '.join(targets)})"):
        state = train_loop(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                           objective=objective, stream=stream, train_cfg=cfg.train,
                           checkpoints=ctx.run_dir / "checkpoints", resume_from=resume_from, tracker=ctx.tracker,
                           eval_fn=dev_losses)
    train_s = time.perf_counter() - train_started

    # Outcomes: base vs adapted on the same tokens of dev (for choices) and of the held-out split (reported once).
    peft_model = accelerator.unwrap_model(model)
    peft_model.eval()
    analysed_saes = {layer: saes[layer] for layer in analysed}
    reports = {}
    passes = dict(batch_size=int(cfg.analysis.batch_size), max_length=int(cfg.data.max_length),
                  progress=accelerator.is_local_main_process)
    for split in ("dev", "headline"):
        # Base and adapter on the same tokens. The base side (per-token residual norms and SAE codes, per-sentence
        # sums) comes from its cache when an earlier run had the same base settings, so a sweep job measures only the
        # adapted side: docs/training.md#what-is-measured-where.
        with stage(f"measuring base vs adapter on the {splits[split]} split ({len(texts[split][reference])} "
                   f"sentences x {len(measured)} languages x {len(analysed)} layers)"):
            cache = base_cache.open_cache(cfg, ctx.testbed_dir, splits[split], analysed, precision)
            with peft_model.disable_adapter():
                base_side = base_cache.base_sides(cache, peft_model, tokenizer, analysed_saes, texts[split],
                                                  write=accelerator.is_main_process,
                                                  recorded=shared if split == "headline" else None, **passes)
            paired = None
            if split == "headline" and shared is not None:
                shared.adapted = _adapted_by_analysis(cfg, ctx, accelerator, peft_model, tokenizer, saes, analysed_saes,
                                                      base_side, texts[split], metric, splits[split])
                paired = shared.adapted.paired if shared.adapted.complete() else None
            if paired is None:
                paired = measure_adapted(peft_model, base_side, tokenizer, analysed_saes, texts[split], metric,
                                         **passes)
            add_spliced(paired, peft_model, peft_model.disable_adapter, tokenizer,
                        {layer: saes[layer] for layer in aligned}, texts[split], **passes)
        reports[split] = outcome_report(paired, reference, targets, aggregate, tolerance,
                                        n_resamples=int(cfg.analysis.bootstrap), ci=float(cfg.analysis.ci),
                                        seed=int(cfg.seed), spliced_tolerance=float(cfg.train.spliced_tolerance_nats),
                                        judged_layers=aligned)
    report = train_metrics(reports["headline"], reports["dev"], metric=metric, aggregate=aggregate,
                           reference_lang=reference, targets=targets, layers=analysed, splits=splits,
                           tolerance=tolerance, floor_pct=float(cfg.train.get("retention_floor_pct", 90.0)),
                           spliced_tolerance=float(cfg.train.spliced_tolerance_nats))
    report.update(steps=state.step, resumed_from_step=state.resumed_from, train_s=train_s,
                  total_s=time.perf_counter() - started, trainable_params=trainable, aligned_layers=aligned)

    out = ctx.run_dir / "train"
    if accelerator.is_main_process:
        peft_model.save_pretrained(str(ctx.run_dir / "adapter"))
        write_json_atomic(out / "history.json", state.history)
        write_json_atomic(out / "metrics.json", _json_safe(report))
        if cfg.analysis.get("plots", True):
            ctx.tracker.log_images({"train/activation_before_after": plot_before_after(
                report, out / "activation_before_after.png")})
    accelerator.wait_for_everyone()

    # What sweeps see: dev numbers only (the held-out ones live in train/metrics.json, reported once).
    dev = reports["dev"]
    final = state.history[-1] if state.history else {}
    result = {
        "alignment_score": report["alignment_score"],
        "dev_activation_gain_pct_mean": dev["activation_gain_pct_mean"],
        **{f"dev_activation_gain_pct_{lang}": v for lang, v in dev["activation_gain_pct"].items()},
        **{f"dev_norm_matched_gain_pct_{lang}": v for lang, v in dev["norm_matched_gain_pct"].items()},
        **{f"dev_fvu_ratio_{lang}": o["fvu_ratio"] for lang, o in dev["per_lang"].items()},
        "dev_english_retention_pct": dev["english_retention_pct"],
        "dev_all_valid": float(dev["all_valid"]),
        **{f"final_{k}": float(v) for k, v in final.items()
           if k in ("ce", "act_align", "sae_fidelity", "en_retain", "total", "act_ratio", "fvu_ratio")},
        "steps": float(state.step),
        "train_s": float(train_s),
    }
    ctx.tracker.log({f"result/{k}": v for k, v in result.items()})
    ctx.tracker.summary(_outcome_scalars(report))
    ctx.tracker.log_table("train/outcomes", _outcome_rows(report))
    # The closing block (mlalign.console) prints these once, at the end of the run (task=pipeline's too).
    headline(f"{splits['headline']} split, reported once (dev numbers drive sweeps; alignment_score "
             f"{report['alignment_score']:.2f} on {splits['dev']}):",
             *(line.replace("**", "") for line in outcome_lines(report)[:-1]))
    output("adapter", ctx.run_dir / "adapter")
    output("train metrics", out / "metrics.json")
    return result


def _adapted_by_analysis(cfg, ctx, accelerator, peft_model, tokenizer, saes: dict, analysed_saes: dict, base_side,
                         texts: dict, metric: str, split: str):
    """The adapter's held-out measurement as an analysis pass (task=pipeline, docs/training.md#what-is-measured-where):
    one engine run over `split` computes the adapted model's analysis statistics (cached under the adapter's key, as
    `task=analyze adapter=...` would) and the paired outcome sums against `base_side`. The adapter is saved first:
    its weights' hash is part of that key."""
    from mlalign.data.corpus import load_corpus
    from mlalign.tasks import analyze
    from mlalign.training.shared_pass import AdaptedPassRecording

    adapter = ctx.run_dir / "adapter"
    if accelerator.is_main_process:
        peft_model.save_pretrained(str(adapter))
    accelerator.wait_for_everyone()
    recording = AdaptedPassRecording(base_side, texts, analysed_saes, metric, accelerator.device)
    corpus = load_corpus(cfg.data, ctx.langs, split)
    analyze.cached_stats(cfg, ctx, adapter, corpus, split, analyze.feature_settings(cfg.analysis), model=peft_model,
                         tokenizer=tokenizer, label="base + adapter: ", recording=recording, saes=saes)
    return recording


OUTCOME_KEYS = ("gain_pct", "norm_matched_gain_pct", "fvu_before", "fvu_after", "fvu_ratio", "resid_norm_change_pct",
                "l0_before", "l0_after", "lm_loss_change", "valid")


def _outcome_scalars(report: dict) -> dict[str, float]:
    """W&B summary values with stable names: `<split>/<lang>/<measure>` for dev and the headline (test) split."""
    out = {}
    for split, block in (("dev", report["dev"]), (report["splits"]["headline"], report)):
        for lang, o in block["per_lang"].items():
            out.update({f"{split}/{lang}/{key}": float(o[key]) for key in OUTCOME_KEYS if o.get(key) is not None})
        out[f"{split}/english_retention_pct"] = float(block["english_retention_pct"])
        out[f"{split}/activation_gain_pct_mean"] = float(block["activation_gain_pct_mean"])
    return out


def _outcome_rows(report: dict) -> list[dict]:
    return [{"split": split, "lang": lang, **{key: o.get(key) for key in OUTCOME_KEYS}}
            for split, block in (("dev", report["dev"]), (report["splits"]["headline"], report))
            for lang, o in block["per_lang"].items()]


def _json_safe(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    import math

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
