"""The accelerate-driven LoRA training loop: loss terms per micro-batch, accumulation, checkpoints, SIGTERM/SIGUSR2 and NaN stops."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.analysis.engine import analysed_positions
from mlalign.errors import UserError
from mlalign.saes.surrogates import feature_activations
from mlalign.training import losses as L
from mlalign.training.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from mlalign.training.data import ParallelBatch, ParallelStream

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class TrainingStopped(UserError):
    """Training stopped early on purpose (SIGTERM) or for a reason the user can act on (non-finite loss)."""

    def __init__(self, what: str, advice: str, saved: Path | None = None):
        super().__init__(f"{what}; {advice}")
        self.what = what
        """What happened, without the advice (a caller that knows better how to continue words its own)."""
        self.saved = saved
        """The checkpoint written on the way out of a signal stop; None after a non-finite loss."""


def resolve_mixed_precision(name: str, cpu: bool) -> str:
    """`auto`: bf16 on a CUDA GPU that supports it, else no mixed precision."""
    name = str(name)
    if name not in MIXED_PRECISION:
        raise UserError(f"unknown train.mixed_precision={name!r}; use one of: {', '.join(MIXED_PRECISION)}")
    if name != "auto":
        return name
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


@dataclass
class LossTerms:
    """Weighted objective of one micro-batch; `values` are the unweighted terms, for logging."""

    total: torch.Tensor
    values: dict[str, float] = field(default_factory=dict)


class _BatchForwards:
    """The forward passes one micro-batch's loss terms share, each run once, when a term first asks for it.

    Terms ask in `LOSS_TERMS` order, so the passes run as: adapted model on the target text, frozen base model on the
    English translations, base model on the target text (fidelity), adapted model on English (fidelity, retention);
    the two adapted passes, which draw LoRA dropout, keep that order whatever the weights.
    """

    def __init__(self, objective: "ObjectiveFn", model, batch: ParallelBatch):
        self.objective, self.model, self.batch = objective, model, batch
        self.peft_model = objective.accelerator.unwrap_model(model)
        bos = objective.bos_id
        self.keep_target = analysed_positions(batch.target["input_ids"], batch.target["attention_mask"], bos)
        self.keep_reference = analysed_positions(batch.reference["input_ids"], batch.reference["attention_mask"], bos)
        w = objective.weights
        self.need_base_logits = w["en_retain"] > 0 and objective.retain_kind == "kl"

    @cached_property
    def adapted_target(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(logits, residuals) of the adapted model on the target language, with the graph kept for trained SAE terms."""
        w = self.objective.weights
        keep_graph = w["act_align"] > 0 or w["sae_fidelity"] > 0
        with ResidualCapture(self.peft_model, self.objective.layers, detach=not keep_graph) as capture:
            logits = self.model(**self.batch.target, use_cache=False).logits
            return logits, dict(capture.activations)

    @cached_property
    def base_reference(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """(logits if the KL retention needs them, residuals) of the frozen base model on the English translations."""
        with torch.no_grad(), self.peft_model.disable_adapter(), self.objective.accelerator.autocast():
            with ResidualCapture(self.peft_model, self.objective.layers, detach=True,
                                 stop_after_last=not self.need_base_logits) as capture:
                if self.need_base_logits:
                    logits = self.peft_model(**self.batch.reference, use_cache=False).logits
                    return logits, dict(capture.activations)
                # no LM head needed: stop after the deepest aligned layer
                return None, capture.forward(**self.batch.reference, use_cache=False)

    @cached_property
    def base_target(self) -> dict[int, torch.Tensor]:
        """Residuals of the frozen base model on the target text (the fidelity term's yardstick, same tokens)."""
        with torch.no_grad(), self.peft_model.disable_adapter(), self.objective.accelerator.autocast():
            with ResidualCapture(self.peft_model, self.objective.layers, detach=True, stop_after_last=True) as capture:
                return capture.forward(**self.batch.target, use_cache=False)

    @cached_property
    def adapted_reference(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """(logits if the KL retention needs them, residuals) of the adapted model on English, with the graph."""
        # Through the unwrapped model: one forward per backward through a DDP wrapper.
        with ResidualCapture(self.peft_model, self.objective.layers, detach=False,
                             stop_after_last=not self.need_base_logits) as capture, \
                self.objective.accelerator.autocast():
            if self.need_base_logits:
                logits = self.peft_model(**self.batch.reference, use_cache=False).logits
                return logits, dict(capture.activations)
            return None, capture.forward(**self.batch.reference, use_cache=False)


class ObjectiveFn:
    """total = Σ_term weight·term over `LOSS_TERMS` (ce, act_align, sae_fidelity, en_retain) on one parallel batch
    (docs/training.md).

    Each term is one method of the same name, `term(forwards) -> (value, logged values)`; an objective (a comparison
    arm) is its weights, so a new arm composes terms rather than adding branches. A term with weight 0 is not
    computed, except `ce` and `act_align`, which are always logged (the alignment term then without a graph). The
    alignment term compares the analysis metric itself (`metric`, `aggregate`: the numbers task=analyze and the
    held-out outcome report), with the surrogate supplying only its gradient.
    """

    ALWAYS_LOGGED = ("ce", "act_align")

    def __init__(self, loss_cfg, saes: dict, layers: list[int], bos_id: int | None, accelerator,
                 metric: str = "mean_act", aggregate: str = "token"):
        self.weights = {term: float(loss_cfg[term]) for term in L.LOSS_TERMS}
        self.kind = str(loss_cfg.act_align_kind)
        self.margin = float(loss_cfg.margin)
        self.surrogate = str(loss_cfg.surrogate)
        self.bandwidth = float(loss_cfg.ste_bandwidth)
        self.retain_kind = str(loss_cfg.retain_kind)
        self.metric = metric
        self.aggregate = aggregate
        self.saes = saes
        self.layers = layers
        self.bos_id = bos_id
        self.accelerator = accelerator

    def __call__(self, model, batch: ParallelBatch) -> LossTerms:
        forwards = _BatchForwards(self, model, batch)
        total, values = None, {}
        for term in L.LOSS_TERMS:
            weight = self.weights[term]
            if weight == 0 and term not in self.ALWAYS_LOGGED:
                continue
            value, logged = getattr(self, term)(forwards)
            values.update(logged)
            if weight > 0:
                total = weight * value if total is None else total + weight * value
        values["total"] = float(total.detach())
        return LossTerms(total, values)

    # ------------------------------------------------------------------------------------------------ the terms

    def ce(self, fw: _BatchForwards) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token cross-entropy of the adapted model on the target language."""
        logits, _ = fw.adapted_target
        target = fw.batch.target
        ce = L.lm_cross_entropy(logits, target["input_ids"], target["attention_mask"])
        return ce, {"ce": float(ce.detach())}

    def act_align(self, fw: _BatchForwards) -> tuple[torch.Tensor, dict[str, float]]:
        """The target language's per-layer metric level under the adapter against English's under the base model."""
        trained = self.weights["act_align"] > 0
        _, target_acts = fw.adapted_target
        _, base_acts = fw.base_reference
        with self._fp32():
            with torch.no_grad():
                reference_level = self._levels(base_acts, fw.keep_reference, None)
            with contextlib.nullcontext() if trained else torch.no_grad():
                target_level = self._levels(target_acts, fw.keep_target, self.surrogate if trained else None)
                act = L.act_align_loss(target_level, reference_level, self.kind, self.margin)
        # The exact metric's ratio (what the outcome report measures), not the surrogate's.
        ratio = float((target_level / reference_level.clamp_min(L.EPS)).mean().detach())
        return act, {"act_align": float(act.detach()), "act_ratio": ratio}

    def sae_fidelity(self, fw: _BatchForwards) -> tuple[torch.Tensor, dict[str, float]]:
        """How much worse the SAE reconstructs the adapted residual than the base's, on the same tokens, both languages."""
        _, target_acts = fw.adapted_target
        _, base_acts = fw.base_reference
        base_target_acts = fw.base_target
        _, adapted_acts = fw.adapted_reference
        with self._fp32():
            with torch.no_grad():
                base_fvu_t = self._fvus(base_target_acts, fw.keep_target)
                base_fvu_r = self._fvus(base_acts, fw.keep_reference)
            adapted_fvu_t = self._fvus(target_acts, fw.keep_target)
            adapted_fvu_r = self._fvus(adapted_acts, fw.keep_reference)
            fid = 0.5 * (L.fidelity_loss(adapted_fvu_t, base_fvu_t) + L.fidelity_loss(adapted_fvu_r, base_fvu_r))
        ratio = float((adapted_fvu_t / base_fvu_t.clamp_min(L.EPS)).mean().detach())
        return fid, {"sae_fidelity": float(fid.detach()), "fvu_ratio": ratio}

    def en_retain(self, fw: _BatchForwards) -> tuple[torch.Tensor, dict[str, float]]:
        """English kept: KL(base || adapted) of next-token distributions, or the SAE codes' relative change."""
        base_logits, base_acts = fw.base_reference
        adapted_logits, adapted_acts = fw.adapted_reference
        if self.retain_kind == "kl":
            retain = L.kl_base_to_adapted(base_logits, adapted_logits, fw.batch.reference["attention_mask"])
        else:
            keep = fw.keep_reference
            with self._fp32():
                retain = torch.stack([
                    L.relative_act_mse(feature_activations(self.saes[layer], adapted_acts[layer][keep].float()),
                                       feature_activations(self.saes[layer], base_acts[layer][keep].float()))
                    for layer in self.layers]).mean()
        return retain, {"en_retain": float(retain.detach())}

    # ------------------------------------------------------------------------------------------------ helpers

    def _fp32(self):
        # SAE losses in float32 even under mixed precision: ratios of small means lose too much in bf16.
        return torch.autocast(device_type=self.accelerator.device.type, enabled=False)

    def _levels(self, acts: dict[int, torch.Tensor], keep: torch.Tensor, surrogate: str | None) -> torch.Tensor:
        """[layers] the metric per aligned layer over the kept tokens (with the surrogate's gradient if given)."""
        sentence = keep.nonzero()[:, 0]  # row of every kept token, row-major like acts[layer][keep]
        return torch.stack([L.metric_level(self.saes[layer], acts[layer][keep].float(), self.metric, self.aggregate,
                                           sentence, surrogate, self.bandwidth) for layer in self.layers])

    def _fvus(self, acts: dict[int, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        return torch.stack([L.batch_fvu(self.saes[layer], acts[layer][keep].float()) for layer in self.layers])


# SIGTERM: the scheduler (or a user) ends the job. SIGUSR2: submitit's "preempted / about to time out" signal, whose
# handler requeues the job; with train.resume=auto the requeued job continues from the checkpoint written first.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class _SigtermFlag:
    """Records SIGTERM or SIGUSR2 instead of dying, so the loop can write a checkpoint first; `hand_over` then calls the
    handler that was there before (submitit's requeue for SIGUSR2); the old handlers come back on exit."""

    def __init__(self):
        self.raised = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.raised = True
        self.signum = self.signum or signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"

    def hand_over(self) -> None:
        """After the checkpoint: let a Python handler installed before us (submitit's requeue) act on the signal."""
        previous = self._previous.get(self.signum)
        if self.signum == signal.SIGUSR2 and callable(previous):
            self.__exit__()
            previous(self.signum, None)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}


@dataclass
class TrainState:
    step: int
    history: list[dict]
    resumed_from: int | None


def _all_processes_agree(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any (a stop must be collective)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


@dataclass
class Trainee:
    """What `train_loop` steps: the model (prepared by the accelerator) with its optimizer and scheduler."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object


def train_loop(trainee: Trainee, *, objective: ObjectiveFn, stream: ParallelStream, train_cfg, checkpoints: Path,
               resume_from: Path | None, tracker, eval_fn=None, settings: dict | None = None) -> TrainState:
    """Run optimizer steps up to train.max_steps (from a checkpoint if `resume_from`); returns the final state.
    `settings`: the run's `checkpoint.run_settings`, recorded in every checkpoint for a later resume to compare."""
    accelerator, model, optimizer, scheduler = trainee.accelerator, trainee.model, trainee.optimizer, trainee.scheduler
    max_steps = int(train_cfg.max_steps)
    grad_accum = int(train_cfg.grad_accum)
    batch_size = int(train_cfg.batch_size)
    save_every = int(train_cfg.save_every or 0)
    eval_every = int(train_cfg.get("eval_every") or 0)
    max_grad_norm = float(train_cfg.max_grad_norm or 0)
    params = [p for p in model.parameters() if p.requires_grad]

    step, history, resumed_from = 0, [], None
    if resume_from is not None:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, resume_from)
        step, history, resumed_from = int(state["step"]), list(state.get("history", [])), int(state["step"])
        accelerator.print(f"resumed from step {step} ({resume_from})")
        log.info("resumed from step %d (%s)", step, resume_from)

    def checkpoint(at: int) -> Path:
        return save_checkpoint(accelerator, model, optimizer, scheduler, at, checkpoints, {"history": history},
                               settings=settings)

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_local_main_process)
    model.train()
    with _SigtermFlag() as sigterm:
        while step < max_steps:
            sums: dict[str, float] = {}
            for micro in range(grad_accum):
                index = (step * grad_accum + micro) * accelerator.num_processes + accelerator.process_index
                batch = stream.batch(index, batch_size, accelerator.device)
                with accelerator.accumulate(model):
                    terms = objective(model, batch)
                    bad = not math.isfinite(terms.values["total"])
                    if _all_processes_agree(accelerator, bad):
                        _stop_non_finite(accelerator, step, terms.values, checkpoints)
                    accelerator.backward(terms.total)
                    grad_norm = None
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
                    if grad_norm is not None and _all_processes_agree(accelerator, not math.isfinite(float(grad_norm))):
                        _stop_non_finite(accelerator, step, {**terms.values, "grad_norm": float(grad_norm)}, checkpoints)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in terms.values.items():
                    sums[key] = sums.get(key, 0.0) + value / grad_accum
            step += 1
            record = {"step": step, "lr": scheduler.get_last_lr()[0], **sums}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == max_steps):
                record.update({f"heldout/{k}": v for k, v in eval_fn(model).items()})
                model.train()
            history.append(record)
            tracker.log({f"train/{k}" if not k.startswith("heldout/") else k: v
                         for k, v in record.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix({k: f"{sums[k]:.4g}" for k in ("ce", "act_ratio", "fvu_ratio", "en_retain") if k in sums})
            if save_every and step % save_every == 0 and step < max_steps:
                checkpoint(step)
            if _all_processes_agree(accelerator, sigterm.raised):
                path = checkpoint(step)
                bar.close()
                sigterm.hand_over()  # submitit requeues the job here (and exits); otherwise we stop below
                raise TrainingStopped(f"stopped by {sigterm.name} after step {step}/{max_steps}; checkpoint saved to "
                                      f"{path}", "continue in this run directory with train.resume=auto "
                                      f"hydra.run.dir={path.parent.parent}", saved=path)
    bar.close()
    checkpoint(step)
    return TrainState(step, history, resumed_from)


def _stop_non_finite(accelerator, step: int, values: dict, checkpoints: Path) -> None:
    last = last_checkpoint(checkpoints)
    where = (f"the last good checkpoint is {last}; resume from it with train.resume_from={last}" if last
             else "no checkpoint was written yet")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise TrainingStopped(f"non-finite loss at step {step + 1} ({shown})", f"{where} after lowering "
                          f"train.optimizer.lr or the loss weights")
