"""The SAE arithmetic of the analysis, in the fewest passes: a fused JumpReLU/ReLU encode, the code's non-zero
entries (`SparseCode`), a decode from the active features only, and all of a group of layers in one batched step.

Why not `sae.encode` / `sae.decode` per layer: a JumpReLU SAE fires on a few percent of its features per token, yet
sae-lens's encode makes ~4 extra full passes over [tokens, d_sae] (relu, float mask, product, dtype casts) and its
decode multiplies the whole code by the whole decoder. Here the encode is one matmul + one comparison + a write-back
of the active entries (an in-place masked_fill where no SparseCode is wanted); the decode gathers only the active rows
of `W_dec` (`embedding_bag` in "sum" mode, a fused gather + weighted sum on CPU and GPU) or, on an accelerator, one
dense batched matmul; and `StackedSAEs` runs every layer of a group as one `baddbmm`, so an accelerator launches a few
kernels per batch instead of a few per layer.

Only SAEs whose encode is relu(pre)[* (pre > threshold)] feature by feature and whose decode is `acts @ W_dec + b_dec`
through identity steps take these paths (sae-lens JumpReLU and standard SAEs without activation normalisation,
hook_z reshaping or hooks on their hook points). Any other SAE goes through its own `encode`/`decode`, so numbers
never depend on the path (tests/saes/test_encode.py: equal to sae-lens within 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DECODE_MODES = ("auto", "sparse", "dense")


@dataclass
class SparseCode:
    """The non-zero entries of a [tokens, d_sae] SAE code in row-major order, found once per (batch, layer group) and
    shared by the decode and the statistics, which then cost O(nnz) instead of O(tokens x d_sae) each. For a stacked
    group of L layers the rows are layer-major: row r = layer_position * n + token."""

    rows: torch.Tensor
    """[nnz] long: the row (token) of each entry (non-decreasing)."""
    features: torch.Tensor
    """[nnz] long: the feature of each entry."""
    values: torch.Tensor
    """[nnz]: the activation."""
    n_tokens: int
    """Rows of the code (L x n for a stacked group)."""
    d_sae: int
    values_positive: bool = False
    """Every value is > 0 (a ReLU/JumpReLU code): the L1 sum is then the plain sum, not computed twice."""
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Index tensors derived from rows/features, computed once and shared by the decode and the statistics."""

    @classmethod
    def from_dense(cls, feature_acts: torch.Tensor) -> "SparseCode":
        rows, features = feature_acts.nonzero(as_tuple=True)
        return cls(rows, features, feature_acts[rows, features], feature_acts.shape[0], feature_acts.shape[1])

    def per_token(self, values: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[n_tokens]: the sum over each row's active entries of `values` (default: the activations)."""
        out = torch.zeros(self.n_tokens, dtype=dtype, device=self.rows.device)
        return out.index_add_(0, self.rows, (self.values if values is None else values).to(dtype))

    def active_per_token(self) -> torch.Tensor:
        """[n_tokens] long: the number of active features of each row (L0)."""
        if "active" not in self._derived:
            self._derived["active"] = torch.bincount(self.rows, minlength=self.n_tokens)
        return self._derived["active"]

    def layer_position(self, n: int) -> torch.Tensor:
        """[nnz] long: each entry's layer position in a stacked code of n tokens per layer (row // n)."""
        if ("layer", n) not in self._derived:
            self._derived[("layer", n)] = torch.div(self.rows, n, rounding_mode="floor")
        return self._derived[("layer", n)]

    def layer_feature(self, n: int) -> torch.Tensor:
        """[nnz] long: layer position x d_sae + feature, each entry's column in the group's [L * d_sae] features."""
        if ("column", n) not in self._derived:
            self._derived[("column", n)] = self.layer_position(n) * self.d_sae + self.features
        return self._derived[("column", n)]

    def column_counts(self, n: int) -> torch.Tensor:
        """[L * d_sae] long: how many rows each (layer position, feature) fired on, for a stacked code of n tokens per
        layer (shared by the firing flags of `LayerStats` and the firing counts of `FeatureStats`)."""
        if ("counts", n) not in self._derived:
            self._derived[("counts", n)] = torch.bincount(self.layer_feature(n),
                                                          minlength=self.n_tokens // n * self.d_sae)
        return self._derived[("counts", n)]


def _hooks_free(sae) -> bool:
    return not any(getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
                   for name, module in sae.named_modules() if name.startswith("hook_"))


def elementwise_encoder(sae) -> str | None:
    """"jumprelu" / "relu" when `sae.encode` is that activation of pre = (x - b_dec·apply_b_dec) @ W_enc + b_enc, feature
    by feature (sae-lens JumpReLU and Standard SAEs without activation normalisation, hook_z reshaping or hooks on their
    hook points), else None (TopK: a feature's activation depends on the others)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUTrainingSAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardTrainingSAE

    if getattr(sae.cfg, "normalize_activations", "none") not in (None, "none") or getattr(sae, "hook_z_reshaping_mode", False):
        return None
    if not _hooks_free(sae) or not isinstance(getattr(sae, "activation_fn", None), nn.ReLU):
        return None
    encode = type(sae).encode
    if encode in (JumpReLUSAE.encode, JumpReLUTrainingSAE.encode):
        return "jumprelu"
    if encode in (StandardSAE.encode, StandardTrainingSAE.encode):
        return "relu"
    return None


def supports_sparse_decode(sae) -> bool:
    """True when `sae.decode(a)` is `a @ W_dec + b_dec` through identity steps, so gathering active rows is exact."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUTrainingSAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardTrainingSAE

    if type(sae).decode not in (JumpReLUSAE.decode, JumpReLUTrainingSAE.decode, StandardSAE.decode,
                                StandardTrainingSAE.decode):
        return False
    if getattr(sae.cfg, "normalize_activations", "none") not in (None, "none"):
        return False
    return not getattr(sae, "hook_z_reshaping_mode", False) and _hooks_free(sae)


def _active_threshold(sae, kind: str) -> torch.Tensor | float:
    """A feature is active iff pre > this: relu then the jump, i.e. pre > max(threshold, 0); pre > 0 for ReLU."""
    return sae.threshold.clamp_min(0) if kind == "jumprelu" else 0.0


def decode_active(sae, feature_acts: torch.Tensor, code: SparseCode | None = None) -> torch.Tensor:
    """x̂ = feature_acts @ W_dec + b_dec for a [tokens, d_sae] code, reading only the decoder rows that fired
    (`code`: the code's non-zero entries, if already found). Falls back to `sae.decode` (`supports_sparse_decode`)."""
    if feature_acts.dim() != 2 or not supports_sparse_decode(sae):
        return sae.decode(feature_acts)
    code = SparseCode.from_dense(feature_acts) if code is None else code
    return _bag_decode(code, sae.W_dec, code.features) + sae.b_dec


def _bag_decode(code: SparseCode, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row of `code`: sum over its entries of value x weight[index]. Rows are contiguous runs, one bag each."""
    counts = code.active_per_token()
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(index, weight, offsets, mode="sum", per_sample_weights=code.values.to(weight.dtype))


def sparse_decode_wanted(mode: str, device: torch.device) -> bool:
    """Decode from the active features (`sparse`), or densely: "auto" = sparse on the CPU, dense on an accelerator,
    where a dense bf16 matmul beat the gather (H100, Gemma-2-2B widths: 1.68 s dense vs 2.48 s sparse)."""
    return mode == "sparse" or (mode == "auto" and torch.device(device).type == "cpu")


def _sparse_code(pre: torch.Tensor, threshold: torch.Tensor, layer_by_layer: bool | None = None) -> SparseCode:
    """The entries of pre [L, n, d_sae] with pre > threshold ([L, 1, d_sae]) as a layer-major `SparseCode` (its rows
    l * n + token), with each entry's column (`layer_feature`) already derived.

    On the CPU layer by layer (`_cpu_layer_entries`): a layer's [n, d_sae] mask is small enough for the allocator to
    recycle, where a fresh [L, n, d_sae] one costs more in page faults than the comparison itself, and the indices
    derived from a layer's few entries stay in cache. On an accelerator in one piece: each `nonzero` waits for the
    device. `layer_by_layer` overrides the choice (both give the same code; the tests compare them)."""
    n_layers, n, d_sae = pre.shape
    if layer_by_layer is None:
        layer_by_layer = pre.device.type == "cpu"
    if not layer_by_layer:
        flat = (pre > threshold).view(-1).nonzero().squeeze(1)
        rows = torch.div(flat, d_sae, rounding_mode="floor")
        return SparseCode(rows, flat - rows * d_sae, pre.view(-1).index_select(0, flat), n_layers * n, d_sae,
                          values_positive=True)
    parts = [_cpu_layer_entries(pre[layer], threshold[layer], layer) for layer in range(n_layers)]
    rows, features, columns = (torch.from_numpy(np.concatenate(arrays)) for arrays in zip(*(part[:3] for part in parts)))
    code = SparseCode(rows, features, torch.cat([part[3] for part in parts]), n_layers * n, d_sae,
                      values_positive=True)
    code._derived[("column", n)] = columns
    return code


def _cpu_layer_entries(pre: torch.Tensor, threshold: torch.Tensor, layer: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """One layer position of a stacked CPU code: (rows, features, columns, values) of pre [n, d_sae] > threshold, rows
    offset by layer * n and columns by layer * d_sae. The indices in numpy, on the layer's few entries: a handful of
    cache-resident array operations instead of integer division over the whole group's entries."""
    n, d_sae = pre.shape
    local = _cpu_nonzero(pre > threshold)  # token * d_sae + feature
    values = pre.reshape(-1).index_select(0, local)  # in torch: any dtype (numpy has no bfloat16)
    local = local.numpy()
    if d_sae & (d_sae - 1) == 0:  # a power of two (every sae-lens width in use): shift and mask, no division
        rows, features = local >> (d_sae.bit_length() - 1), local & (d_sae - 1)
    else:
        rows, features = np.divmod(local, d_sae)
    return rows + layer * n, features, features + layer * d_sae, values


def _cpu_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """`mask.view(-1).nonzero().squeeze(1)` for a contiguous CPU bool tensor. With one thread numpy's `flatnonzero` is
    ~1.7x faster than torch's `nonzero` (3% of 64M flags set: 18.7 ms against 31.8 ms); torch's parallel scan
    catches up from two threads on."""
    if torch.get_num_threads() == 1:
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.view(-1).nonzero().squeeze(1)


class StackedSAEs:
    """A group of layers' SAEs as stacked tensors, so that one batched matmul encodes (and one decodes) every layer.

    Inputs and outputs are layer-major flattened: x is [L * n, d_in] (layer position l's n tokens at rows l*n ...),
    the code [L * n, d_sae]. A group of one layer uses views of its SAE's own weights; larger groups hold a stacked
    copy (2 x L x d_in x d_sae values), which `stack_groups` sizes.
    """

    def __init__(self, saes: list):
        kinds = [elementwise_encoder(sae) for sae in saes]
        if not saes or None in kinds or not all(supports_sparse_decode(sae) for sae in saes):
            raise ValueError("StackedSAEs needs elementwise-encoder SAEs with a linear decode (see `stackable`)")
        self.n_layers = len(saes)
        self.d_sae = saes[0].cfg.d_sae
        self.dtype = saes[0].dtype
        with torch.no_grad():
            def stack(tensors):
                tensors = [t.detach() for t in tensors]
                return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

            self.W_enc = stack([sae.W_enc for sae in saes])  # [L, d_in, d_sae]
            self.W_dec = stack([sae.W_dec for sae in saes])  # [L, d_sae, d_in]
            self.b_enc = stack([sae.b_enc for sae in saes]).unsqueeze(1)  # [L, 1, d_sae]
            self.b_dec = stack([sae.b_dec for sae in saes]).unsqueeze(1)  # [L, 1, d_in]
            applied = [bool(sae.cfg.apply_b_dec_to_input) for sae in saes]
            # None where no SAE subtracts b_dec from its input (Gemma Scope): no [L, n, d_in] subtraction per batch.
            self.b_in = None if not any(applied) else self.b_dec * torch.tensor(
                applied, dtype=self.dtype, device=self.b_dec.device).view(-1, 1, 1)
            self.threshold = stack([_active_threshold(sae, kind) if kind == "jumprelu"
                                    else torch.zeros_like(sae.b_enc) for sae, kind in zip(saes, kinds)]).unsqueeze(1)

    @staticmethod
    def stackable(saes: list) -> bool:
        """Every SAE encodes feature by feature and decodes linearly, with one width, input size, dtype and device."""
        if not all(elementwise_encoder(sae) and supports_sparse_decode(sae) for sae in saes):
            return False
        keys = {(sae.cfg.d_in, sae.cfg.d_sae, sae.dtype, sae.W_enc.device) for sae in saes}
        return len(keys) == 1

    def encode(self, x: torch.Tensor, with_code: bool, out: torch.Tensor | None = None, dense: bool = True
               ) -> tuple[torch.Tensor | None, SparseCode | None]:
        """([L * n, d_sae] codes of every layer, their SparseCode or None) for x [L * n, d_in].

        dense=False (with_code only): no dense code (None), for callers that read only the SparseCode; it saves
        rewriting the whole [L, n, d_sae] tensor.

        out: a flat work buffer of at least L * n * d_sae elements (this stack's dtype and device) to write the codes
        into instead of a new tensor; the returned codes are then a view of it, valid until the buffer's next use. On
        the CPU (no caching allocator) a fresh [L, n, d_sae] tensor per batch costs page faults of the order of the
        matmul's bias copy."""
        n = x.shape[0] // self.n_layers
        sae_in = x.view(self.n_layers, n, -1).to(self.dtype)
        if self.b_in is not None:
            sae_in = sae_in - self.b_in
        if out is None:
            pre = torch.baddbmm(self.b_enc, sae_in, self.W_enc)
        else:
            pre = torch.baddbmm(self.b_enc, sae_in, self.W_enc,
                                out=out[: self.n_layers * n * self.d_sae].view(self.n_layers, n, self.d_sae))
        if not with_code:
            return pre.masked_fill_((pre > self.threshold).logical_not_(), 0).view(-1, self.d_sae), None
        code = _sparse_code(pre, self.threshold)
        if not dense:
            return None, code
        # Zeroing the whole code and writing back its few active entries is ~3x faster than masking the inactive ones.
        flat = code.rows * self.d_sae + code.features
        return pre.zero_().view(-1).index_copy_(0, flat, code.values).view(-1, self.d_sae), code

    def decode(self, feature_acts: torch.Tensor | None, code: SparseCode | None) -> torch.Tensor:
        """x̂ [L * n, d_in]: from the active features when `code` is given (`feature_acts` may then be None), else one
        dense batched matmul."""
        n = (code.n_tokens if code is not None else feature_acts.shape[0]) // self.n_layers
        if code is None:
            return torch.baddbmm(self.b_dec, feature_acts.view(self.n_layers, n, -1), self.W_dec).view(self.n_layers * n, -1)
        x_hat = _bag_decode(code, self.W_dec.view(self.n_layers * self.d_sae, -1), code.layer_feature(n))
        return x_hat.view(self.n_layers, n, -1).add_(self.b_dec).view(self.n_layers * n, -1)


def stack_groups(layers: list[int], saes: dict, max_tokens: int, device: torch.device) -> list[list[int]]:
    """Split `layers` into groups that run as one `StackedSAEs` step: all in one group where the per-batch work
    tensor [L, max_tokens, d_sae] stays under ~256 MB (CPU) / ~2 GB (accelerator) and, on an accelerator, the stacked
    weight copy fits in half of the free memory; single layers otherwise or when the SAEs cannot be stacked."""
    if not layers or not StackedSAEs.stackable([saes[layer] for layer in layers]):
        return [[layer] for layer in layers]
    sae = saes[layers[0]]
    itemsize = torch.empty((), dtype=sae.dtype).element_size()
    accelerator = torch.device(device).type != "cpu"
    budget = (2 << 30 if accelerator else 256 << 20) // itemsize
    size = max(1, min(len(layers), budget // max(1, max_tokens * sae.cfg.d_sae)))
    if accelerator and size > 1 and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        copy_bytes = 2 * len(layers) * sae.cfg.d_in * sae.cfg.d_sae * itemsize
        if copy_bytes > free // 2:
            size = 1
    return [layers[i : i + size] for i in range(0, len(layers), size)]
