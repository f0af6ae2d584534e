"""The SAE code as the loss differentiates it: pre-activations, thresholds, JumpReLU and its straight-through estimator.

The loss terms themselves (training/losses.py) read the code through these functions, so sae-lens's internals (its
input processing, the JumpReLU threshold, the `JumpReLU` and `Step` autograd functions) are reached only here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sae_pre_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """[tokens, d_sae] pre-activations `x @ W_enc + b_enc` after the SAE's own input processing (b_dec, norm)."""
    sae_in = sae.process_sae_in(x)
    return sae_in @ sae.W_enc + sae.b_enc


def threshold_of(sae) -> torch.Tensor:
    """JumpReLU threshold; SAEs without one (ReLU) gate at 0."""
    threshold = getattr(sae, "threshold", None)
    return threshold if threshold is not None else torch.zeros((), device=sae.W_enc.device, dtype=sae.W_enc.dtype)


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The SAE's feature activations from its pre-activations: h · 1[h > θ] (θ = 0: ReLU), as sae-lens encodes them."""
    return pre * (pre > threshold)


def decoder_norms_of(sae) -> torch.Tensor:
    """[1, d_sae] ||W_dec,f|| of one SAE, as the code views take them."""
    return sae.W_dec.detach().norm(dim=-1).unsqueeze(0)


def feature_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's own (JumpReLU) feature activations [tokens, d_sae]; gradient flows through active features."""
    return sae.encode(x)


def ste_code(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """[tokens, d_sae] the exact JumpReLU code of `pre`, with sae-lens's straight-through pseudo-derivative near each
    threshold in the backward pass."""
    from sae_lens.saes.jumprelu_sae import JumpReLU

    # ste_to_input=True: the pseudo-derivative near the threshold reaches the pre-activations (and so the LoRA
    # weights), not just the threshold, which is frozen here anyway.
    return JumpReLU.apply(F.relu(pre), threshold, bandwidth, True)


def ste_step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """[tokens, d_sae] the firing indicator 1[pre > θ], with sae-lens's straight-through estimator of the step's
    derivative (what counting features differentiates)."""
    from sae_lens.saes.jumprelu_sae import Step

    return Step.apply(pre, threshold, bandwidth, True)
