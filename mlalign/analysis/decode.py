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

from dataclasses import dataclass

import torch
from torch.nn import functional as F

DECODE_MODES = ("auto", "sparse", "dense")


@dataclass
class SparseCode:
    """The non-zero entries of a [tokens, d_sae] SAE code in row-major order, found once per (batch, layer) and shared
    by the decode and the statistics, which then cost O(nnz) instead of O(tokens x d_sae) each."""

    rows: torch.Tensor
    """[nnz] long: the token of each entry (non-decreasing)."""
    features: torch.Tensor
    """[nnz] long: the feature of each entry."""
    values: torch.Tensor
    """[nnz]: the activation."""
    n_tokens: int
    d_sae: int

    @classmethod
    def from_dense(cls, feature_acts: torch.Tensor) -> "SparseCode":
        rows, features = feature_acts.nonzero(as_tuple=True)
        return cls(rows, features, feature_acts[rows, features], feature_acts.shape[0], feature_acts.shape[1])

    def per_token(self, values: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[n_tokens]: the sum over each token's active entries of `values` (default: the activations)."""
        out = torch.zeros(self.n_tokens, dtype=dtype, device=self.rows.device)
        return out.index_add_(0, self.rows, (self.values if values is None else values).to(dtype))

    def active_per_token(self) -> torch.Tensor:
        """[n_tokens] long: the number of active features of each token (L0)."""
        return torch.bincount(self.rows, minlength=self.n_tokens)


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


def _hooks_free(sae) -> bool:
    return not any(getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
                   for name, module in sae.named_modules() if name.startswith("hook_"))


def supports_fused_encode(sae) -> bool:
    """True for sae-lens JumpReLU SAEs without activation normalisation, hook_z reshaping or hooks on their hook
    points: their encode is exactly relu(pre) * (pre > threshold), pre = (x - b_dec·apply_b_dec) @ W_enc + b_enc."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUTrainingSAE

    if type(sae).encode not in (JumpReLUSAE.encode, JumpReLUTrainingSAE.encode):
        return False
    if getattr(sae.cfg, "normalize_activations", "none") not in (None, "none"):
        return False
    return not getattr(sae, "hook_z_reshaping_mode", False) and _hooks_free(sae)


def encode_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
    """(sae.encode(x), its SparseCode) for a [tokens, d_in] input, in the fewest passes over [tokens, d_sae].

    For JumpReLU SAEs (`supports_fused_encode`): one addmm, one comparison with max(threshold, 0) (relu then the jump:
    a feature is active iff pre > threshold and pre > 0), an in-place mask, and the non-zero entries found from the
    boolean mask; sae-lens's encode makes ~4 more full passes (relu, float mask, product, dtype casts). Any other SAE
    goes through `sae.encode`. Same numbers either way (tests/analysis/test_decode.py).
    """
    if x.dim() != 2 or not supports_fused_encode(sae):
        feature_acts = sae.encode(x)
        return feature_acts, SparseCode.from_dense(feature_acts)
    sae_in = x.to(sae.dtype)
    if sae.cfg.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec
    pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)
    active = pre > sae.threshold.clamp_min(0)
    rows, features = active.nonzero(as_tuple=True)
    values = pre[rows, features]
    feature_acts = pre.mul_(active)
    return feature_acts, SparseCode(rows, features, values, pre.shape[0], pre.shape[1])


def decode_active(sae, feature_acts: torch.Tensor, code: SparseCode | None = None) -> torch.Tensor:
    """x̂ = feature_acts @ W_dec + b_dec for a [tokens, d_sae] code, reading only the decoder rows that fired
    (`code`: the code's non-zero entries, if already found).

    Falls back to `sae.decode` for SAEs where that is not the whole decode (`supports_sparse_decode`).
    """
    if feature_acts.dim() != 2 or not supports_sparse_decode(sae):
        return sae.decode(feature_acts)
    code = SparseCode.from_dense(feature_acts) if code is None else code
    counts = code.active_per_token()  # row-major entries: each token's features are contiguous, a bag each
    offsets = counts.cumsum(0) - counts
    x_hat = F.embedding_bag(code.features, sae.W_dec, offsets, mode="sum",
                            per_sample_weights=code.values.to(sae.W_dec.dtype))
    return sae.hook_sae_recons(x_hat + sae.b_dec)


def reconstruct(sae, feature_acts: torch.Tensor, mode: str = "auto",
                code: SparseCode | None = None) -> torch.Tensor:
    """x̂ by the chosen path: "sparse" (`decode_active`), "dense" (`sae.decode`), or "auto": sparse on the CPU, dense on
    an accelerator, where a dense bf16 matmul beat the gather (H100, Gemma-2-2B widths: analysis 1.68 s dense vs
    2.48 s sparse; experiments/performance/README.md)."""
    if mode == "dense" or (mode == "auto" and feature_acts.device.type != "cpu"):
        return sae.decode(feature_acts)
    return decode_active(sae, feature_acts, code)
