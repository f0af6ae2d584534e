"""Atomic training checkpoints: adapter, LoRA weights, optimizer, scheduler, RNG states and step, one folder per save.

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once complete, so a
crash or kill mid-save leaves the previous checkpoint as the last good one; older checkpoints are removed after the
rename succeeds.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mlalign.errors import UserError

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


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


def save_checkpoint(accelerator, model, optimizer, scheduler, step: int, checkpoints: Path, extra: dict | None = None) -> Path:
    """Write the checkpoint of `step` (all processes call this; the main one writes the shared parts)."""
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
            **(extra or {}),
        }
        if getattr(accelerator, "scaler", None) is not None:  # fp16: the loss scale it reached (accelerate's save_state)
            state["grad_scaler"] = accelerator.scaler.state_dict()
        torch.save(state, staging / STATE_FILE)  # written last inside the folder
        if final.exists():  # a previous attempt at the same step: replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        for old in checkpoints.iterdir():
            match = STEP_DIR.match(old.name)
            if match and int(match.group(1)) < step:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def last_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint in `path`: a checkpoint itself, a checkpoints/ folder, or a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        if folder.is_dir():
            found = [(int(m.group(1)), d) for d in folder.iterdir()
                     if (m := STEP_DIR.match(d.name)) and (d / STATE_FILE).is_file()]
            if found:
                return max(found)[1]
    return None


def load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint: Path) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the saved state (with `step`)."""
    state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)
    unwrapped = accelerator.unwrap_model(model)
    params = dict(unwrapped.named_parameters())
    missing = [name for name in state["trainable"] if name not in params]
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
