"""SAE reconstruction from the active features only: the decode that FVU needs, at a fraction of the dense cost.

A JumpReLU (or ReLU) SAE fires on a few percent of its features per token, yet `sae.decode` multiplies the whole
[tokens, d_sae] code by the whole [d_sae, d_model] decoder. `decode_active` gathers and weights only the rows of
`W_dec` of the features that fired (one `embedding_bag` in "sum" mode, which torch implements as a fused gather +
weighted sum on CPU and GPU): the same x̂ up to float summation order, for nnz x d_model instead of
tokens x d_sae x d_model multiply-adds.

Only SAEs whose decode is exactly `acts @ W_dec + b_dec` followed by identity steps take this path (sae-lens's
JumpReLU and standard SAEs without activation normalisation or hook_z reshaping). Any other SAE class or setting
falls back to `sae.decode`, so numbers never depend on the path.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

DECODE_MODES = ("auto", "sparse", "dense")


def _linear_decoders() -> tuple:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUTrainingSAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardTrainingSAE

    return (JumpReLUSAE.decode, JumpReLUTrainingSAE.decode, StandardSAE.decode, StandardTrainingSAE.decode)


def supports_sparse_decode(sae) -> bool:
    """True when `sae.decode(a)` is `a @ W_dec + b_dec` through identity steps, so gathering active rows is exact."""
    decode = getattr(type(sae), "decode", None)
    if decode is None or decode not in _linear_decoders():
        return False
    normalize = getattr(sae.cfg, "normalize_activations", "none")
    if normalize not in (None, "none"):
        return False
    return not getattr(sae, "hook_z_reshaping_mode", False)


def decode_active(sae, feature_acts: torch.Tensor) -> torch.Tensor:
    """x̂ = feature_acts @ W_dec + b_dec for a [tokens, d_sae] code, reading only the decoder rows that fired.

    Falls back to `sae.decode` for SAEs where that is not the whole decode (`supports_sparse_decode`).
    """
    if feature_acts.dim() != 2 or not supports_sparse_decode(sae):
        return sae.decode(feature_acts)
    n_tokens = feature_acts.shape[0]
    rows, features = feature_acts.nonzero(as_tuple=True)  # row-major: each token's features are contiguous
    weights = feature_acts[rows, features].to(sae.W_dec.dtype)
    counts = torch.bincount(rows, minlength=n_tokens)
    offsets = counts.cumsum(0) - counts
    x_hat = F.embedding_bag(features, sae.W_dec, offsets, mode="sum", per_sample_weights=weights)
    return sae.hook_sae_recons(x_hat + sae.b_dec)


def reconstruct(sae, feature_acts: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """x̂ by the chosen path: "sparse" (`decode_active`), "dense" (`sae.decode`), or "auto" (sparse)."""
    if mode == "dense":
        return sae.decode(feature_acts)
    return decode_active(sae, feature_acts)
