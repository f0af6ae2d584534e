"""Train a JumpReLU SAE on one layer's residuals with sae-lens's SAETrainer, and measure its fidelity: the one SAE
training path, used by task=train_saes and by the testbed build."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterator

import torch

from mlalign.saes.loading import resid_post_hook

MAX_LR = 1e-2
THRESHOLD_TRAVEL = 1.2
"""Default learning rate = min(MAX_LR, THRESHOLD_TRAVEL / steps). Adam moves a JumpReLU threshold by about lr per
step, and thresholds must travel O(1) (inputs are scaled to norm sqrt(d_in)) whatever the step budget, so short runs
get a larger rate."""
TRAINER_MODULE = "sae_lens.training.sae_trainer"
"""The module of sae-lens's SAETrainer, whose per-SAE progress bar the console makes transient (console.transient_bars)."""
PRE_ACT_LOSS = 0.1
"""Anthropic's pre-activation loss on dead features: without it half the features never fire on held-out text,
with it about a third (measured on the testbed)."""


def default_lr(steps: int, travel: float = THRESHOLD_TRAVEL, max_lr: float = MAX_LR) -> float:
    """The constant learning rate that lets JumpReLU thresholds travel `travel` in `steps` Adam steps. Under Adam the
    L0 coefficient barely sets the sparsity (it rescales a gradient Adam normalises); how far thresholds can move
    does: a longer travel gives sparser SAEs."""
    return min(max_lr, travel / max(1, steps))


def activation_batches(acts: torch.Tensor, batch_size: int, seed: int, index: torch.Tensor | None = None,
                       device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """Endless minibatches reshuffled every epoch (sae-lens's DataProvider). `index` (rows of `acts`, repeats allowed)
    is the epoch's population when given: how a language mix reuses a language whose text ran out. Batches are float32
    whatever `acts` is held in (a bfloat16 buffer halves the memory)."""
    generator = torch.Generator().manual_seed(seed)
    population = len(acts) if index is None else len(index)
    while True:
        order = torch.randperm(population, generator=generator)
        if index is not None:
            order = index[order]
        for start in range(0, population - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]].to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class SAETrainSettings:
    """One JumpReLU SAE's training recipe for `train_sae`: task=train_saes builds it from sae_train.*, the testbed
    build from its spec."""

    width: int
    """Features (d_sae)."""
    steps: int
    """Optimiser steps (minibatches)."""
    batch_size: int = 256
    """Activation rows per step (at most the population)."""
    lr: float | None = None
    """Adam learning rate (constant after a 5% warm-up); None = `default_lr(steps)`."""
    l0_coefficient: float = 1.0
    """Weight of DeepMind's step L0 penalty (Gemma Scope), or of the quadratic one with `target_l0`."""
    target_l0: float | None = None
    """If set, Gemma Scope 2's quadratic penalty around this L0 instead of the step penalty."""
    pre_act_loss: float = PRE_ACT_LOSS
    """Weight of Anthropic's pre-activation loss, which pushes up the pre-activations of features that have not fired
    for `dead_window` steps."""
    dead_window: int | None = None
    """Steps without firing after which a feature counts as dead; None = half the run (the testbed's historical
    window: the push then starts only halfway through)."""
    b_dec_init: str | None = None
    """"mean" starts the decoder bias at the training activations' mean; None at zero (the testbed's historical
    recipe)."""
    model_name: str = ""
    """Recorded in the SAE's metadata."""
    context_size: int = 128
    """Tokens per sentence the activations came from (metadata)."""
    device: str = "cpu"
    """Where the SAE trains, and where the returned SAE lives."""


def _training_sae(d_in: int, layer: int, s: SAETrainSettings):
    """The untrained sae-lens JumpReLU training SAE of `train_sae` (its settings, same meaning)."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=d_in,
        d_sae=int(s.width),
        # Residual norms grow with depth; scaling inputs to norm sqrt(d_in) lets one L0 coefficient suit every
        # layer. The trainer folds the scale back into the weights, so the saved SAE takes raw residuals.
        normalize_activations="expected_average_only_in",
        l0_coefficient=s.l0_coefficient,
        l0_warm_up_steps=s.steps // 10,
        jumprelu_init_threshold=0.01,
        jumprelu_bandwidth=0.05,
        pre_act_loss_coefficient=s.pre_act_loss,
        # DeepMind's step L0 loss, as Gemma Scope used for Gemma-2; quadratic around a target L0 as Gemma Scope 2.
        jumprelu_sparsity_loss_mode="step" if s.target_l0 is None else "quadratic",
        target_l0=s.target_l0,
        device=str(s.device),
        metadata=SAEMetadata(
            model_name=s.model_name,
            hook_name=resid_post_hook(layer),
            hook_layer=layer,
            context_size=s.context_size,
            prepend_bos=True,
            model_from_pretrained_kwargs={},
        ),
    ))


def train_sae(acts: torch.Tensor, layer: int, settings: SAETrainSettings, *, seed: int = 0,
              index: torch.Tensor | None = None, checkpoint_dir: str | None = None, progress: bool = False):
    """A JumpReLU SAE of `settings.width` features for decoder layer `layer`, trained with sae-lens's SAETrainer on
    `acts` ([tokens, d_in], BOS and padding already dropped) for `settings.steps` minibatches; returns its inference
    form (a `JumpReLUSAE` in eval mode, on `settings.device`) that takes raw residuals.

    The recipe (`SAETrainSettings`): sparsity from DeepMind's step L0 penalty weighted by `l0_coefficient` (Gemma
    Scope), or, with `target_l0`, Gemma Scope 2's quadratic penalty around that L0; the decoder bias's start
    (`b_dec_init`); Anthropic's pre-activation loss on dead features (`pre_act_loss`, `dead_window`). The global torch
    RNG initialises the weights: seed it first. `seed` orders the minibatches; `index` (rows of `acts`, repeats
    allowed) is each epoch's population when given.
    """
    from sae_lens import JumpReLUSAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps, device, dead_window, b_dec_init = settings.steps, settings.device, settings.dead_window, settings.b_dec_init
    population = len(acts) if index is None else len(index)
    batch_size = min(settings.batch_size, population)
    lr = default_lr(steps) if settings.lr is None else settings.lr
    sae = _training_sae(int(acts.shape[-1]), layer, settings)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # the constant schedule ignores it, but SAETrainer requires it set
        lr_warm_up_steps=steps // 20,
        lr_scheduler_name="constant",
        device=str(device),
        dead_feature_window=max(1, steps // 2 if dead_window is None else min(int(dead_window), steps)),
        feature_sampling_window=max(1, steps // 2),
        n_checkpoints=0,
        checkpoint_path=checkpoint_dir,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=max(1, min(50, population // batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, data_provider=activation_batches(acts, batch_size, seed, index, device))
    if b_dec_init == "mean":
        # Real residual streams carry a few huge, nearly constant dimensions (Gemma-3-270M: the mean is 93-98% of the
        # residual norm at layers 3-15). Adam moves b_dec by about lr per step, so from zero it reaches them only
        # slowly in a CPU-sized run (docs/saes.md). The scale is estimated here exactly as fit() would (same
        # batches, fit() then skips it), so b_dec can start at the mean in the SAE's scaled units.
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=int(acts.shape[-1]), data_provider=trainer.data_provider,
            n_batches_for_norm_estimate=trainer_cfg.n_batches_for_norm_estimate)
        mean = (acts if index is None else acts[index]).float().mean(0)
        sae.b_dec.data = (mean * trainer.activation_scaler.scaling_factor).to(sae.b_dec)
    elif b_dec_init is not None:
        raise ValueError(f"b_dec_init={b_dec_init!r}: use 'mean' or None")
    # SAETrainer opens a tqdm bar per SAE on stderr; callers that show one bar over layers silence it.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        trained = trainer.fit()
    inference = JumpReLUSAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    inference.load_state_dict(state)
    return inference.to(device).eval()


@torch.no_grad()
def fidelity(sae, acts: torch.Tensor, chunk_tokens: int = 8192) -> dict[str, float]:
    """How faithfully `sae` reconstructs `acts` ([tokens, d_in]): `fvu` (residual / total variance, total taken
    about the tokens' mean), `l0` (features firing per token), `l0_pct` (of the width), `dead_pct` (features that
    fire on none of these tokens), `dead_features`, `tokens`."""
    device = next(sae.parameters()).device
    mean = acts.float().mean(0).to(device)
    residual = total = l0_sum = 0.0
    fired_any = None
    for start in range(0, len(acts), chunk_tokens):
        x = acts[start:start + chunk_tokens].to(device=device, dtype=torch.float32)
        features = sae.encode(x)
        recon = sae.decode(features)
        fired = features > 0
        residual += (x - recon).pow(2).sum().item()
        total += (x - mean).pow(2).sum().item()
        l0_sum += fired.sum().item()
        fired_any = fired.any(0) if fired_any is None else fired_any | fired.any(0)
    width = int(sae.cfg.d_sae)
    dead = int((~fired_any).sum().item()) if fired_any is not None else width
    l0 = l0_sum / max(1, len(acts))
    return {
        "fvu": residual / total if total > 0 else float("nan"),
        "l0": l0,
        "l0_pct": 100 * l0 / width,
        "dead_pct": 100 * dead / width,
        "dead_features": dead,
        "tokens": int(len(acts)),
    }
