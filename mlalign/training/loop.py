"""The accelerate-driven LoRA training loop: loss terms per micro-batch, accumulation, checkpoints, SIGTERM/SIGUSR2 and NaN stops."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.analysis.engine import analysed_positions
from mlalign.errors import UserError
from mlalign.training import losses as L
from mlalign.training.checkpoint import last_checkpoint, load_checkpoint, save_checkpoint
from mlalign.training.data import ParallelBatch, ParallelStream

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


class TrainingStopped(UserError):
    """Training stopped early on purpose (SIGTERM) or for a reason the user can act on (non-finite loss)."""


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


class ObjectiveFn:
    """total = ce·L_ce + act_align·L_act + sae_fidelity·L_fid + en_retain·L_retain on one parallel batch (docs/training.md).

    The alignment term compares the analysis metric itself (`metric`, `aggregate`: the numbers task=analyze and the
    held-out outcome report), with the surrogate supplying only its gradient.
    """

    def __init__(self, loss_cfg, saes: dict, layers: list[int], bos_id: int | None, accelerator,
                 metric: str = "mean_act", aggregate: str = "token"):
        self.weights = {term: float(loss_cfg.get(term, 0.0)) for term in L.LOSS_TERMS}
        self.kind = str(loss_cfg.act_align_kind)
        self.margin = float(loss_cfg.margin)
        self.surrogate = str(loss_cfg.surrogate)
        self.bandwidth = float(loss_cfg.get("ste_bandwidth", 0.1))
        self.retain_kind = str(loss_cfg.retain_kind)
        self.metric = metric
        self.aggregate = aggregate
        self.saes = saes
        self.layers = layers
        self.bos_id = bos_id
        self.accelerator = accelerator

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

    def __call__(self, model, batch: ParallelBatch) -> LossTerms:
        accelerator, w = self.accelerator, self.weights
        peft_model = accelerator.unwrap_model(model)
        target, reference = batch.target, batch.reference
        keep_t = analysed_positions(target["input_ids"], target["attention_mask"], self.bos_id)
        keep_r = analysed_positions(reference["input_ids"], reference["attention_mask"], self.bos_id)
        need_base_logits = w["en_retain"] > 0 and self.retain_kind == "kl"
        fidelity = w["sae_fidelity"] > 0
        need_adapted_english = w["en_retain"] > 0 or fidelity

        # Adapted model on the target language: LM loss and (with the graph kept) the residuals to align.
        keep_graph = w["act_align"] > 0 or fidelity
        with ResidualCapture(peft_model, self.layers, detach=not keep_graph) as capture:
            logits = model(**target, use_cache=False).logits
            target_acts = dict(capture.activations)
        ce = L.lm_cross_entropy(logits, target["input_ids"], target["attention_mask"])
        total = w["ce"] * ce
        values = {"ce": float(ce.detach())}

        # Frozen base model on the English translations: the reference level (and the retention targets); on the
        # target sentences too when the fidelity term needs the base model's FVU on the same tokens.
        with torch.no_grad(), peft_model.disable_adapter(), accelerator.autocast():
            base_logits = None
            with ResidualCapture(peft_model, self.layers, detach=True, stop_after_last=not need_base_logits) as capture:
                if need_base_logits:
                    base_logits = peft_model(**reference, use_cache=False).logits
                    base_acts = dict(capture.activations)
                else:  # no LM head needed: stop after the deepest aligned layer
                    base_acts = capture.forward(**reference, use_cache=False)
            if fidelity:
                with ResidualCapture(peft_model, self.layers, detach=True, stop_after_last=True) as capture:
                    base_target_acts = capture.forward(**target, use_cache=False)

        with self._fp32():
            with torch.no_grad():
                reference_level = self._levels(base_acts, keep_r, None)
            context = contextlib.nullcontext() if w["act_align"] > 0 else torch.no_grad()
            with context:
                target_level = self._levels(target_acts, keep_t, self.surrogate if w["act_align"] > 0 else None)
                act = L.act_align_loss(target_level, reference_level, self.kind, self.margin)
        values["act_align"] = float(act.detach())
        # The exact metric's ratio (what the outcome report measures), not the surrogate's.
        values["act_ratio"] = float((target_level / reference_level.clamp_min(L.EPS)).mean().detach())
        if w["act_align"] > 0:
            total = total + w["act_align"] * act

        adapted_acts = None
        if need_adapted_english:
            # Through the unwrapped model: one forward per backward through a DDP wrapper.
            with ResidualCapture(peft_model, self.layers, detach=False,
                                 stop_after_last=not need_base_logits) as capture, accelerator.autocast():
                if need_base_logits:
                    adapted_logits = peft_model(**reference, use_cache=False).logits
                    adapted_acts = dict(capture.activations)
                else:
                    adapted_acts = capture.forward(**reference, use_cache=False)

        if fidelity:
            with self._fp32():
                with torch.no_grad():
                    base_fvu_t, base_fvu_r = self._fvus(base_target_acts, keep_t), self._fvus(base_acts, keep_r)
                adapted_fvu_t, adapted_fvu_r = self._fvus(target_acts, keep_t), self._fvus(adapted_acts, keep_r)
                fid = 0.5 * (L.fidelity_loss(adapted_fvu_t, base_fvu_t) + L.fidelity_loss(adapted_fvu_r, base_fvu_r))
            values["sae_fidelity"] = float(fid.detach())
            values["fvu_ratio"] = float((adapted_fvu_t / base_fvu_t.clamp_min(L.EPS)).mean().detach())
            total = total + w["sae_fidelity"] * fid

        if w["en_retain"] > 0:
            if self.retain_kind == "kl":
                retain = L.kl_base_to_adapted(base_logits, adapted_logits, reference["attention_mask"])
            else:
                with self._fp32():
                    retain = torch.stack([
                        L.relative_act_mse(L.feature_activations(self.saes[layer], adapted_acts[layer][keep_r].float()),
                                           L.feature_activations(self.saes[layer], base_acts[layer][keep_r].float()))
                        for layer in self.layers]).mean()
            values["en_retain"] = float(retain.detach())
            total = total + w["en_retain"] * retain
        values["total"] = float(total.detach())
        return LossTerms(total, values)


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


def train_loop(*, accelerator, model, optimizer, scheduler, objective: ObjectiveFn, stream: ParallelStream,
               train_cfg, checkpoints: Path, resume_from: Path | None, tracker, eval_fn=None,
               settings: dict | None = None) -> TrainState:
    """Run optimizer steps up to train.max_steps (from a checkpoint if `resume_from`); returns the final state.
    `settings`: the run's `checkpoint.run_settings`, recorded in every checkpoint for a later resume to compare."""
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
                                      f"{path}; continue in this run directory with train.resume=auto "
                                      f"hydra.run.dir={path.parent.parent}")
    bar.close()
    checkpoint(step)
    return TrainState(step, history, resumed_from)


def _stop_non_finite(accelerator, step: int, values: dict, checkpoints: Path) -> None:
    last = last_checkpoint(checkpoints)
    where = (f"the last good checkpoint is {last}; resume from it with train.resume_from={last}" if last
             else "no checkpoint was written yet")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise TrainingStopped(f"non-finite loss at step {step + 1} ({shown}); {where} after lowering "
                          f"train.optimizer.lr or the loss weights")
