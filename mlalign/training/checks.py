"""Settings a training run cannot start with, caught before any model loads (task=train, task=pipeline, task=compare)."""

from __future__ import annotations

from omegaconf import DictConfig

from mlalign.errors import UserError


def check_train_config(cfg: DictConfig) -> None:
    """Fail on settings that cannot train before any model loads."""
    from mlalign.training.losses import check_loss_config

    check_loss_config(cfg.loss)
    r = cfg.lora.get("r")
    if r is None or int(r) <= 0:
        raise UserError(f"lora.r={r} must be a positive integer (the LoRA rank); type e.g. lora.r=8")
    dropout = cfg.lora.get("lora_dropout")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:  # torch's Dropout raised it after the model loaded
        raise UserError(f"lora.lora_dropout={dropout} must be a probability in [0, 1); type e.g. lora.lora_dropout=0.05")
    alpha = cfg.lora.get("lora_alpha")
    if alpha is not None and not float(alpha) > 0:  # 0 trains nothing (updates scaled by lora_alpha / r)
        raise UserError(f"lora.lora_alpha={alpha} must be > 0 (updates are scaled by lora_alpha / r); type e.g. "
                        "lora.lora_alpha=16")
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
        from mlalign.training.losses import alignable_metrics

        if str(cfg.analysis.metric) not in alignable_metrics():
            raise UserError(f"the alignment term aims at analysis.metric={cfg.analysis.metric}, which has no per-token "
                            f"SAE value to align; use analysis.metric= one of {', '.join(alignable_metrics())}")
