"""Atomic training checkpoints: adapter, LoRA weights, optimizer, scheduler, RNG states and step, one folder per save.

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once complete, so a
crash or kill mid-save leaves the previous checkpoint as the last good one. The newest two are kept: a newest one
damaged after its rename (a crash before the data reached the disk, a copy cut short) falls back to the one before.

Each checkpoint records the settings that define the run (`run_settings`); a resume compares them with the settings
typed now (`resume_point`) before anything is loaded or written.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlalign.errors import UserError

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")
KEEP = 2
"""Checkpoints kept in a run directory: the newest and the one a damaged newest one falls back to."""


def rng_state() -> dict:
    """RNG states as tensors and plain Python values only, so checkpoints load with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, checkpoints: Path, extra: dict | None = None,
                    settings: dict | None = None) -> Path:
    """Write the checkpoint of `step` (all processes call this; the main one writes the shared parts). `settings`:
    the run's `run_settings`, compared by a later resume."""
    checkpoints = Path(checkpoints)
    final = step_dir(checkpoints, step)
    staging = checkpoints / f".tmp-{final.name}"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(staging / "adapter"))
        state = {
            "step": int(step),
            "trainable": trainable_state(unwrapped),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "num_processes": accelerator.num_processes,
            **({"settings": settings} if settings is not None else {}),
            **(extra or {}),
        }
        if getattr(accelerator, "scaler", None) is not None:  # fp16: the loss scale it reached (accelerate's save_state)
            state["grad_scaler"] = accelerator.scaler.state_dict()
        torch.save(state, staging / STATE_FILE)  # written last inside the folder
        if final.exists():  # a previous attempt at the same step: replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        older = sorted((int(m.group(1)), d) for d in checkpoints.iterdir() if (m := STEP_DIR.match(d.name))
                       and int(m.group(1)) < step)
        for _, old in older[:max(0, len(older) - (KEEP - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoints_newest_first(path: str | Path) -> list[Path]:
    """The complete checkpoints in `path`, newest first: a checkpoint itself, a checkpoints/ folder, or a run
    directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return [path]
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            found = [(int(m.group(1)), d) for d in folder.iterdir()
                     if (m := STEP_DIR.match(d.name)) and (d / STATE_FILE).is_file()]
            if found:
                return [d for _, d in sorted(found, reverse=True)]
    return []


def last_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint in `path`: a checkpoint itself, a checkpoints/ folder, or a run directory."""
    found = checkpoints_newest_first(path)
    return found[0] if found else None


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved state (with `step`)."""
    state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    unwrapped = accelerator.unwrap_model(model)
    params = dict(unwrapped.named_parameters())
    missing = [name for name in state["trainable"] if name not in params]
    missing += [f"{name} of shape {list(value.shape)}, here {list(params[name].shape)}"
                for name, value in state["trainable"].items() if name in params and value.shape != params[name].shape]
    if missing or len(state["trainable"]) != sum(p.requires_grad for p in params.values()):
        raise UserError(f"checkpoint {checkpoint} was written for a different adapter (e.g. {missing[:1]}); resume with "
                        "the same model=, lora= and loss.layers as the interrupted run")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "grad_scaler" in state and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])  # else fp16 restarts at 2**16 and skips steps again
    rng_file = Path(checkpoint) / f"rng_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        rng_file = Path(checkpoint) / "rng_0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


# --- what a resume may change --------------------------------------------------------------------------------------

RUN_DEFINING = (
    # the model and the SAEs the objective reads
    "model.name", "model.hf_id", "model.revision", "model.source", "model.gguf_file", "model.gguf_sha256",
    "model.pypi_package", "model.dtype", "model.attn_implementation", "model.testbed",
    "sae.name", "sae.release", "sae.id_template", "sae.path_template", "sae.dtype",
    # the adapter's shape
    "lora",
    # optimizer, schedule and batches
    "train.optimizer", "train.max_grad_norm", "train.scheduler", "train.warmup_steps", "train.max_steps",
    "train.batch_size", "train.grad_accum", "train.max_length", "train.mixed_precision",
    # data
    "langs", "reference_lang", "train.target_langs", "data",
    # loss (the alignment term aims at the analysis metric of the aligned layers)
    "loss", "layers", "analysis.metric", "analysis.aggregate",
    "seed",
)
"""Config keys (groups are compared leaf by leaf) that define a training run: a checkpoint records them, and a resume
with any of them changed is refused, except the changes in `resume_point` that are safe to continue."""

NOT_DEFINING = ("data.splits.analysis",)
"""Leaves under RUN_DEFINING that training never reads."""

_UNSET = "<not set>"


def run_settings(cfg) -> dict[str, Any]:
    """The run-defining settings of `cfg` as {dotted key: value}, interpolations as typed (not resolved), so that
    the values a run fills in at run time (the testbed's folder) compare equal before and after."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    flat: dict[str, Any] = {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for sub, item in value.items():
                put(f"{key}.{sub}", item)
        elif key not in NOT_DEFINING:
            flat[key] = value

    for key in RUN_DEFINING:
        node = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        put(key, node)
    return flat


def _typed(value) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_typed(item) for item in value) + "]"
    return str(value)


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's saved state, or a UserError naming the file that is truncated or damaged."""
    checkpoint = Path(checkpoint)
    for name in (STATE_FILE, "rng_0.pt"):
        file = checkpoint / name
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"checkpoint file {file} is missing") from None
        except Exception as err:  # torch reports a cut zip or pickle in several types; each means the same here
            raise UserError(f"checkpoint file {file} is truncated or damaged "
                            f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None
        if name == STATE_FILE:
            missing = [key for key in ("step", "trainable", "optimizer", "scheduler") if key not in state]
            if missing:
                raise UserError(f"checkpoint file {file} lacks {', '.join(missing)}: not a task=train checkpoint")
            saved = state
    return saved


@dataclass
class ResumePoint:
    """Where training continues: `checkpoint` (None = from step 0) and the lines to say about it."""

    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)


def resume_point(cfg, run_dir: str | Path) -> ResumePoint:
    """The checkpoint `cfg.train.resume` / `resume_from` continue from, checked before anything loads or is written:
    a damaged newest checkpoint in a run directory falls back to the one before it (said in `notes`); the checkpoint's
    recorded settings must equal `run_settings(cfg)`, except train.max_steps raised past its step (said in `notes`);
    any other difference is one UserError naming each key, its recorded value and what to type."""
    train = cfg.train
    resume_from = train.get("resume_from")
    if resume_from:
        candidates = checkpoints_newest_first(resume_from)
        if not candidates:
            raise UserError(f"train.resume_from={resume_from} holds no checkpoint; point it at a run directory, its "
                            "checkpoints/ folder or one checkpoints/step-N folder written by task=train")
        if (Path(resume_from) / STATE_FILE).is_file():  # that one checkpoint was asked for: no fallback
            candidates = candidates[:1]
    elif train.resume in (True, "auto"):
        candidates = checkpoints_newest_first(run_dir)
        if not candidates and train.resume == "auto":  # a requeued job continues; a fresh one starts at step 0
            return ResumePoint()
        if not candidates:
            raise UserError(f"train.resume=true but {run_dir} holds no checkpoint; resume in the interrupted run's "
                            "directory with hydra.run.dir=<that directory>, or give train.resume_from=<its path>")
    else:
        return ResumePoint()

    notes: list[str] = []
    for num, checkpoint in enumerate(candidates):
        try:
            state = read_state(checkpoint)
            break
        except UserError as err:
            if num + 1 == len(candidates):
                before = "" if len(candidates) == 1 else " (and every earlier one)"
                raise UserError(f"{err}{before}; no readable checkpoint to resume from: start afresh in a new "
                                "directory (hydra.run.dir=<new dir> train.resume=false)") from None
            notes.append(f"{err}; resuming from the checkpoint before it, {candidates[num + 1]}")
    point = ResumePoint(checkpoint, notes)
    saved = state.get("settings")
    if saved is None:
        notes.append(f"checkpoint {checkpoint} records no run settings (written before mlalign recorded them): not "
                     "compared; resume it only with the interrupted run's settings")
        return point
    now, step = run_settings(cfg), int(state["step"])
    differing = [key for key in sorted(set(saved) | set(now)) if saved.get(key, _UNSET) != now.get(key, _UNSET)]
    if "train.max_steps" in differing and int(now["train.max_steps"]) > step:
        differing.remove("train.max_steps")
        old, new, schedule = saved["train.max_steps"], now["train.max_steps"], str(now.get("train.scheduler"))
        notes.append(f"train.max_steps changed from {old} to {new}: continuing from step {step} to step {new}"
                     + ("" if schedule.startswith("constant") else
                        f"; the {schedule} schedule now spans {new} steps, so the learning rate from step {step} on "
                        f"is not the one the first {step} steps were heading for"))
    if differing:
        shown = ", ".join(f"{key}={_typed(saved.get(key, _UNSET))} (now {_typed(now.get(key, _UNSET))})"
                          for key in differing)
        typed = " ".join(f"{key}={_typed(saved[key])}" for key in differing if key in saved)
        raise UserError(f"cannot resume from {checkpoint} (step {step}): it was written with {shown}; to continue "
                        f"it, type the recorded values ({typed}); to train with the new ones, start a new run "
                        "(hydra.run.dir=<new dir> train.resume=false)")
    return point
