"""task=train: activation-aware LoRA (or plain LoRA with loss=plain) and its before/after numbers on held-out text."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from mlalign.errors import UserError
from mlalign.io import json_safe, write_dir_atomic, write_json_atomic
from mlalign.languages import target_langs
from mlalign.training.checks import check_train_config

if TYPE_CHECKING:
    from mlalign.training.shared_pass import AdaptedPassRecording

log = logging.getLogger(__name__)

OBJECTIVE = "alignment_score"
"""What sweepers maximise, on the dev split only (`mlalign.training.outcomes.alignment_score`): the mean activation
gain, minus penalties for English change in either direction and for any rise of the SAE's FVU."""


check_config = check_train_config
"""Run by `dispatch` before the run context loads anything."""


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    from mlalign.console import note
    from mlalign.training.checkpoint import resume_point

    point = resume_point(cfg, run_dir)  # settings compared, a damaged checkpoint skipped (dispatch checked it first)
    for line in point.notes:
        note(line)
    return point.checkpoint


@dataclass
class _Plan:
    """What a run will do, decided from the config before anything loads."""

    reference: str
    targets: list[str]
    metric: str
    aggregate: str
    tolerance: float
    resume_from: Path | None
    splits: dict[str, str]
    """role -> split name: train (learned on), dev (choices, monitoring), headline (held out, reported once)."""


@dataclass
class _Setup:
    """The loaded pieces: accelerator, tokenizer, the LoRA-wrapped model, SAEs, layers and the objective."""

    accelerator: object
    precision: str
    tokenizer: object
    model: torch.nn.Module
    saes: dict
    analysed: list[int]
    aligned: list[int]
    trainable: int
    objective: object


@dataclass
class _Data:
    stream: object
    """Parallel (target, English) training batches."""
    dev_pairs: object
    """Parallel dev batches for the loss curves logged during training."""
    texts: dict[str, dict[str, list[str]]]
    """split role (dev, headline) -> lang -> sentences measured base vs adapter."""


@dataclass
class Trained:
    """What `train_adapter` hands back: `run` returns `result`; task=pipeline reads all three."""

    result: dict[str, float]
    """What sweeps see: dev numbers only."""
    metrics: dict
    """train/metrics.json's contents, as written (JSON-safe: NaN as None, keys as strings)."""
    adapted: AdaptedPassRecording | None
    """With `recorded`: the adapter's held-out measurement, run as the adapted model's analysis pass, whose statistics
    the pipeline's next analysis reuses; else None."""


def check_config(cfg: DictConfig) -> None:
    """Settings that cannot train fail before any tokenizer or model loads and before config.yaml is written (as
    task=pipeline and task=compare check them)."""
    check_train_config(cfg)


def run(cfg: DictConfig, ctx) -> dict[str, float]:
    """Train the adapter, measure base vs adapter on dev and on the held-out split; returns what sweeps see."""
    return train_adapter(cfg, ctx).result


def train_adapter(cfg: DictConfig, ctx, recorded=None) -> Trained:
    """build -> data -> fit -> measure -> report. recorded: task=pipeline's `training.shared_pass.BasePassRecording`:
    the held-out base side its analysis pass recorded is used instead of running the base model over those sentences
    again, and the adapter's held-out measurement runs through the analysis engine (`Trained.adapted`)."""
    started = time.perf_counter()
    plan = _plan(cfg, ctx)
    setup = _build(cfg, ctx, plan)
    data = _data(cfg, plan, setup)
    state, train_s = _fit(cfg, ctx, plan, setup, data)
    reports, adapted = _measure(cfg, ctx, plan, setup, data, recorded)
    result, metrics = _report(cfg, ctx, plan, setup, state, reports, train_s=train_s,
                              total_s=time.perf_counter() - started)
    return Trained(result=result, metrics=metrics, adapted=adapted)


def _plan(cfg: DictConfig, ctx) -> _Plan:
    from mlalign.analysis.metrics import check_metric
    from mlalign.analysis.registry import check_aggregate

    check_train_config(cfg)
    reference = str(cfg.reference_lang)
    targets = target_langs(cfg, ctx.langs)
    if not targets:
        raise UserError(f"task=train needs at least one target language besides {reference}; type e.g. langs=[hi]")
    return _Plan(reference=reference, targets=targets, metric=check_metric(str(cfg.analysis.metric)),
                 aggregate=check_aggregate(str(cfg.analysis.aggregate)),
                 tolerance=float(cfg.train.fidelity_tolerance),
                 resume_from=_resume_checkpoint(cfg, ctx.run_dir),
                 splits={"train": str(cfg.data.splits.train), "dev": str(cfg.data.splits.valid),
                         "headline": str(cfg.data.splits.heldout)})


def _build(cfg: DictConfig, ctx, plan: _Plan) -> _Setup:
    """Accelerator, tokenizer, base model wrapped in LoRA, the SAEs of the analysed and aligned layers, objective."""
    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model

    from mlalign.models import hidden_size, num_layers
    from mlalign.tasks.common import resolve_layers
    from mlalign.training.loop import ObjectiveFn, resolve_mixed_precision

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
    log.info("LoRA: %d trainable parameters; aligning layers %s; targets %s", trainable, aligned, plan.targets)
    objective = ObjectiveFn(cfg.loss, saes, aligned, tokenizer.bos_token_id, accelerator, plan.metric, plan.aggregate)
    return _Setup(accelerator=accelerator, precision=precision, tokenizer=tokenizer, model=model, saes=saes,
                  analysed=analysed, aligned=aligned, trainable=trainable, objective=objective)


def _data(cfg: DictConfig, plan: _Plan, setup: _Setup) -> _Data:
    """Parallel (target, English) pairs for training; dev for choices and monitoring; held-out only for the numbers
    reported once."""
    from mlalign.data.corpus import load_corpus
    from mlalign.training.data import load_parallel_stream

    def pairs(split: str):
        return load_parallel_stream(cfg.data, plan.targets, plan.reference, split, setup.tokenizer,
                                    int(cfg.train.max_length), int(cfg.seed))

    measured = [*plan.targets, plan.reference]
    texts = {role: {lang: load_corpus(cfg.data, measured, plan.splits[role])[lang] for lang in measured}
             for role in ("dev", "headline")}
    return _Data(stream=pairs(plan.splits["train"]), dev_pairs=pairs(plan.splits["dev"]), texts=texts)


def _fit(cfg: DictConfig, ctx, plan: _Plan, setup: _Setup, data: _Data):
    """Optimizer, schedule and the training loop (checkpoints, resume, dev loss curves); returns (state, seconds)."""
    from hydra.utils import instantiate
    from transformers import get_scheduler

    from mlalign.console import stage
    from mlalign.training.checkpoint import run_settings
    from mlalign.training.loop import Trainee, train_loop

    accelerator, objective = setup.accelerator, setup.objective

    def dev_losses(m) -> dict[str, float]:
        m.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for i in range(len(plan.targets)):
                values = objective(m, data.dev_pairs.batch(i, int(cfg.train.batch_size), accelerator.device)).values
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value / len(plan.targets)
        return totals

    optimizer = instantiate(cfg.train.optimizer)([p for p in setup.model.parameters() if p.requires_grad])
    scheduler = get_scheduler(str(cfg.train.scheduler), optimizer, num_warmup_steps=int(cfg.train.warmup_steps),
                              num_training_steps=int(cfg.train.max_steps))
    # The scheduler stays unprepared: it steps once per optimizer step, whatever the number of processes.
    setup.model, optimizer = accelerator.prepare(setup.model, optimizer)
    started = time.perf_counter()
    with stage(f"training the adapter ({int(cfg.train.max_steps)} steps, LoRA r={cfg.lora.r}, "
               f"{', '.join(plan.targets)})"):
        state = train_loop(Trainee(accelerator, setup.model, optimizer, scheduler),
                           objective=objective, stream=data.stream, train_cfg=cfg.train,
                           checkpoints=ctx.run_dir / "checkpoints", resume_from=plan.resume_from,
                           tracker=ctx.tracker, eval_fn=dev_losses, settings=run_settings(cfg))
    return state, time.perf_counter() - started


def _measure(cfg: DictConfig, ctx, plan: _Plan, setup: _Setup, data: _Data,
             recorded) -> tuple[dict[str, dict], AdaptedPassRecording | None]:
    """Outcomes: base vs adapted on the same tokens of dev (for choices) and of the held-out split (reported once).
    Returns them by role and, with `recorded`, the held-out adapted pass (else None)."""
    from mlalign.console import stage
    from mlalign.training import base_cache
    from mlalign.training.outcomes import add_spliced, measure_adapted, outcome_report

    accelerator = setup.accelerator
    peft_model = accelerator.unwrap_model(setup.model)
    peft_model.eval()
    analysed_saes = {layer: setup.saes[layer] for layer in setup.analysed}
    measured = [*plan.targets, plan.reference]
    passes = dict(batch_size=int(cfg.analysis.batch_size), max_length=int(cfg.data.max_length),
                  progress=accelerator.is_local_main_process)
    reports, adapted = {}, None
    for role in ("dev", "headline"):
        split, texts = plan.splits[role], data.texts[role]
        # Base and adapter on the same tokens. The base side (per-token residual norms and SAE codes, per-sentence
        # sums) comes from its cache when an earlier run had the same base settings, so a sweep job measures only the
        # adapted side: docs/training.md#what-is-measured-where.
        with stage(f"measuring base vs adapter on the {split} split ({len(texts[plan.reference])} "
                   f"sentences x {len(measured)} languages x {len(setup.analysed)} layers)"):
            cache = base_cache.open_cache(cfg, ctx.testbed_dir, split, setup.analysed, setup.precision)
            with peft_model.disable_adapter():
                base_side = base_cache.base_sides(cache, peft_model, setup.tokenizer, analysed_saes, texts,
                                                  write=accelerator.is_main_process,
                                                  recorded=recorded if role == "headline" else None, **passes)
            paired = None
            if role == "headline" and recorded is not None:
                adapted = _adapted_by_analysis(cfg, ctx, setup, analysed_saes, base_side, texts, plan.metric, split)
                paired = adapted.paired if adapted.complete() else None
            if paired is None:
                paired = measure_adapted(peft_model, base_side, setup.tokenizer, analysed_saes, texts, plan.metric,
                                         **passes)
            add_spliced(paired, peft_model, peft_model.disable_adapter, setup.tokenizer,
                        {layer: setup.saes[layer] for layer in setup.aligned}, texts, **passes)
        reports[role] = outcome_report(paired, plan.reference, plan.targets, plan.aggregate, plan.tolerance,
                                       n_resamples=int(cfg.analysis.bootstrap), ci=float(cfg.analysis.ci),
                                       seed=int(cfg.seed), spliced_tolerance=float(cfg.train.spliced_tolerance_nats),
                                       judged_layers=setup.aligned)
    return reports, adapted


def _report(cfg: DictConfig, ctx, plan: _Plan, setup: _Setup, state, reports: dict, *, train_s: float,
            total_s: float) -> tuple[dict[str, float], dict]:
    """train/metrics.json, the adapter, the plot, the tracker's values and the closing lines; returns what sweeps see
    and what metrics.json holds."""
    from mlalign.console import headline, output
    from mlalign.training.report import (act_align_activity, idle_act_align_line, outcome_lines, plot_before_after,
                                         train_metrics)

    accelerator, splits = setup.accelerator, plan.splits
    peft_model = accelerator.unwrap_model(setup.model)
    report = train_metrics(reports["headline"], reports["dev"], metric=plan.metric, aggregate=plan.aggregate,
                           reference_lang=plan.reference, targets=plan.targets, layers=setup.analysed, splits=splits,
                           tolerance=plan.tolerance, floor_pct=float(cfg.train.retention_floor_pct),
                           spliced_tolerance=float(cfg.train.spliced_tolerance_nats), seed=int(cfg.seed))
    report.update(steps=state.step, resumed_from_step=state.resumed_from, train_s=train_s, total_s=total_s,
                  trainable_params=setup.trainable, aligned_layers=setup.aligned,
                  act_align_activity=act_align_activity(state.history, float(cfg.loss.act_align)))
    if accelerator.is_main_process and idle_act_align_line(report["act_align_activity"]):
        log.warning("%s", idle_act_align_line(report["act_align_activity"]))  # once, not once per process

    out = ctx.run_dir / "train"
    metrics = json_safe(report)
    if accelerator.is_main_process:
        write_dir_atomic(ctx.run_dir / "adapter", lambda tmp: peft_model.save_pretrained(str(tmp)))
        write_json_atomic(out / "history.json", state.history)
        write_json_atomic(out / "metrics.json", metrics)
        if cfg.analysis.plots:
            ctx.tracker.log_images({"train/activation_before_after": plot_before_after(
                report, out / "activation_before_after.png")})
    accelerator.wait_for_everyone()

    result = _sweep_result(report, reports["dev"], state, train_s)
    ctx.tracker.log({f"result/{k}": v for k, v in result.items()})
    ctx.tracker.summary(_outcome_scalars(report))
    ctx.tracker.log_table("train/outcomes", _outcome_rows(report))
    # The closing block (mlalign.console) prints these once, at the end of the run (task=pipeline's too).
    headline(f"{splits['headline']} split, reported once (dev numbers drive sweeps; alignment_score "
             f"{report['alignment_score']:.2f} on {splits['dev']}):",
             *(line.replace("**", "") for line in outcome_lines(report)[:-1]))
    output("adapter", ctx.run_dir / "adapter")
    output("train metrics", out / "metrics.json")
    return result, metrics


def _sweep_result(report: dict, dev: dict, state, train_s: float) -> dict[str, float]:
    """What sweeps see: dev numbers only (the held-out ones live in train/metrics.json, reported once)."""
    final = state.history[-1] if state.history else {}
    return {
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


def _adapted_by_analysis(cfg, ctx, setup: _Setup, analysed_saes: dict, base_side, texts: dict, metric: str,
                         split: str):
    """The adapter's held-out measurement as an analysis pass (task=pipeline, docs/training.md#what-is-measured-where):
    one engine run over `split` computes the adapted model's analysis statistics (cached under the adapter's key, as
    `task=analyze adapter=...` would) and the paired outcome sums against `base_side`. The adapter is saved first:
    its weights' hash is part of that key."""
    from mlalign.analysis.sources import Loaded, cached_stats
    from mlalign.data.corpus import load_corpus
    from mlalign.training.shared_pass import AdaptedPassRecording

    accelerator = setup.accelerator
    peft_model = accelerator.unwrap_model(setup.model)
    adapter = ctx.run_dir / "adapter"
    if accelerator.is_main_process:
        write_dir_atomic(adapter, lambda tmp: peft_model.save_pretrained(str(tmp)))
    accelerator.wait_for_everyone()
    recording = AdaptedPassRecording(base_side, texts, analysed_saes, metric, accelerator.device)
    corpus = load_corpus(cfg.data, ctx.langs, split)
    cached_stats(cfg, ctx, adapter, corpus, split, Loaded(peft_model, setup.tokenizer, setup.saes),
                 label="base + adapter: ", recording=recording)
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
