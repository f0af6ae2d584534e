"""Sizes of the tiny test model and sae-lens SAEs with hand-set weights, shared by the analysis tests."""

import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

N_LAYERS = 4
D_MODEL = 16
LANGS = ["en", "es", "hi"]


def jumprelu_sae(d_in: int, d_sae: int, seed: int, threshold: float = 0.05) -> JumpReLUSAE:
    """A JumpReLU SAE with random (seeded) weights, non-zero b_dec and thresholds, applying b_dec to the input."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.threshold.fill_(threshold)
    return sae


def identity_sae(d_in: int) -> StandardSAE:
    """d_sae = 2 d_in, W_enc = [I, -I], zero biases, ReLU: features are relu(x) and relu(-x), so by hand
    sum_f a_f = ||x||_1, #active = #non-zero coordinates, and W_dec = [I; -I] reconstructs x exactly (FVU = 0)."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
