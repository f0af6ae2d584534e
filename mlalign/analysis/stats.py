"""Streaming per-(language, layer) statistics of SAE activations: per-sentence sums plus a few corpus totals.

Memory is O(sentences x d_model + d_sae) per (language, layer) and does not grow with the number of tokens (the
[sentences, d_model] term is the per-sentence residual sum that makes FVU's bootstrap exact; twice that with a
position cap, whose window keeps its own). Sums live on the device while a corpus streams through and move to the CPU
once, in `finalize()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from mlalign.analysis.registry import DenseView, SparseView, code_metrics
from mlalign.saes.encode import SparseCode

RESIDUAL_SUMS = ("n_tokens", "resid_norm", "sq_err", "sq_dev", "sq_norm", "position")
"""Per-sentence sums of the residual kept for every analysis, over the sentence's analysed tokens (BOS and padding
excluded):

n_tokens    number of tokens
resid_norm  sum_t ||x_t||_2
sq_err      sum_t ||x_t - x̂_t||²       (x̂ = sae.decode(sae.encode(x)))
sq_dev      sum_t ||x_t - c||²          (c = `shift`, see `SentenceSums.shift`)
sq_norm     sum_t ||x_t||²              (denominator of the uncentred `fvu_raw`)
position    sum_t pos_t                 (pos_t = the token's position in its row, 0 = the first token, BOS if any)

Beside them, one per-sentence sum of every registered SAE-code metric (`analysis.registry.code_metrics()`: mean_act,
l1, l0, ...), the sum over the sentence's tokens of the metric's per-token value.
"""


POSITION_CAP_QUANTILE = 0.9
"""The position-matched window ends at this quantile of the reference language's analysed positions
(`engine.position_cap`): the positions that 90% of the reference's tokens reach."""


def code_sum_names() -> tuple[str, ...]:
    """The per-sentence sums of the registered SAE-code metrics."""
    return tuple(m.name for m in code_metrics())


def per_sentence_sums() -> tuple[str, ...]:
    """Every per-sentence sum a `SentenceSums` holds."""
    return ("n_tokens", *code_sum_names(), *RESIDUAL_SUMS[1:])


def within_cap_names() -> tuple[str, ...]:
    """What `SentenceSums.within_cap` holds: every per-sentence sum, the per-sentence residual sum and the total."""
    return (*per_sentence_sums(), "sum_dev", "sum_x")


WITHIN_CAP_PREFIX = "within_cap."
"""`SentenceSums.to_dict`'s names of the `within_cap` arrays."""


@dataclass
class SentenceSums:
    """Finalized statistics of one (language, layer), as numpy arrays on the CPU.

    Each per-sentence sum (`RESIDUAL_SUMS` fields, and `code_sums` by metric name) is an array [n_sentences] in the
    order of the texts given to the engine.
    """

    n_tokens: np.ndarray
    resid_norm: np.ndarray
    sq_err: np.ndarray
    sq_dev: np.ndarray
    sq_norm: np.ndarray
    position: np.ndarray
    sum_x: np.ndarray
    """[d_model] sum of the residual over all analysed tokens of the language."""
    shift: np.ndarray
    """[d_model] the centre c of `sq_dev`: the mean residual of the first sentence processed (length-sorted order).
    Centring near the mean keeps the FVU denominator numerically stable (shifted-data variance) and lets the
    bootstrap resample it per sentence; any c gives the same point estimate."""
    features_fired: np.ndarray
    """[d_sae] bool: the feature was non-zero on at least one analysed token."""
    sum_dev: np.ndarray
    """[n_sentences, d_model] float32: per sentence sum_t (x_t - c), c = `shift`. With it the FVU denominator of any
    weighting of sentences (a bootstrap resample) is exact: sum_w ||x - mean_w||² = sum_w sq_dev - ||sum_w dev||² / N_w.
    float32 is enough because c is close to the mean (the subtracted term is small); 4 bytes x d_model per sentence
    (9 MB for 997 sentences at d_model 2304)."""
    truncated: np.ndarray
    """[n_sentences] bool: the sentence was cut at `max_length` tokens."""
    code_sums: dict[str, np.ndarray] = field(default_factory=dict)
    """metric name -> [n_sentences] per-sentence sum of that registered SAE-code metric's per-token values."""
    position_cap: int | None = None
    """The last position (inclusive, counted as in `engine.analysed_positions`) of the position-matched window whose
    statistics `within_cap` holds; None where no window was kept."""
    within_cap: dict[str, np.ndarray] = field(default_factory=dict)
    """The same statistics over only the analysed tokens at positions <= `position_cap` (`within_cap_names()`: each
    per-sentence sum [n_sentences], `sum_dev` [n_sentences, d_model], `sum_x` [d_model]), from the same pass;
    `position_matched()` reads them as a `SentenceSums`. Empty where no window was kept."""

    def sum_of(self, name: str) -> np.ndarray:
        """The per-sentence sum `name`: a `RESIDUAL_SUMS` field or a registered SAE-code metric."""
        return self.code_sums[name] if name in self.code_sums else getattr(self, name)

    @property
    def n_sentences(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.n_tokens.sum())

    def total_sq_dev_from_mean(self) -> float:
        """sum_t ||x_t - mean(x)||² over all tokens = sum_t ||x_t - c||² - N ||mean(x) - c||²."""
        n = self.n_tokens.sum()
        if n == 0:
            return float("nan")
        offset = self.sum_x / n - self.shift
        return float(self.sq_dev.sum() - n * offset @ offset)

    def sq_dev_from_mean(self, weights: np.ndarray) -> np.ndarray:
        """sum_t ||x_t - mean_w(x)||² of sentence weightings `weights` [..., n_sentences] (e.g. bootstrap counts),
        each centred on its own weighted mean: sum_w ||x - c||² - ||sum_w (x - c)||² / N_w. Exact for any c."""
        weights = np.asarray(weights, dtype=np.float64)
        n = weights @ self.n_tokens
        dev = weights @ self.sum_dev.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, weights @ self.sq_dev - np.einsum("...d,...d->...", dev, dev) / np.where(n > 0, n, 1), np.nan)

    def position_matched(self) -> "SentenceSums | None":
        """The statistics of only the tokens at positions <= `position_cap` (None where no window was kept), as a
        `SentenceSums` every metric, the bootstrap and the summary read as they read the whole. Which features fired
        is not kept per window (it would cost a pass over the code): `features_fired` is empty, so
        `feature_coverage` is undefined (NaN) there."""
        if self.position_cap is None:
            return None
        w = self.within_cap
        return SentenceSums(
            **{name: w[name] for name in RESIDUAL_SUMS}, sum_x=w["sum_x"], shift=self.shift,
            features_fired=np.zeros(0, dtype=bool), sum_dev=w["sum_dev"], truncated=self.truncated,
            code_sums={name: w[name] for name in code_sum_names()})

    def to_dict(self) -> dict[str, np.ndarray]:
        """Arrays by name (the code metrics' sums by metric name, the window's under `WITHIN_CAP_PREFIX`, no window
        as position_cap -1 and empty arrays), e.g. for `np.savez` caching; `from_arrays` restores it."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_PLAIN}
        window = {WITHIN_CAP_PREFIX + name: self.within_cap.get(name, np.zeros(0)) for name in within_cap_names()}
        cap = np.array(-1 if self.position_cap is None else self.position_cap, dtype=np.int64)
        return {**plain, **self.code_sums, "position_cap": cap, **window}

    @classmethod
    def array_names(cls) -> set[str]:
        """The names `to_dict` writes under the registered metrics."""
        return ({f.name for f in fields(cls) if f.name not in _NOT_PLAIN} | set(code_sum_names()) | {"position_cap"}
                | {WITHIN_CAP_PREFIX + name for name in within_cap_names()})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "SentenceSums":
        """The inverse of `to_dict`."""
        arrays = dict(arrays)
        code = {name: arrays.pop(name) for name in code_sum_names()}
        window = {name: arrays.pop(WITHIN_CAP_PREFIX + name) for name in within_cap_names()}
        cap = int(arrays.pop("position_cap"))
        if cap < 0:
            return cls(**arrays, code_sums=code)
        return cls(**arrays, code_sums=code, position_cap=cap, within_cap=window)


_NOT_PLAIN = ("code_sums", "position_cap", "within_cap")
"""`SentenceSums` fields that `to_dict` writes in their own way."""


def layers_per_block(device: torch.device, n_layers: int) -> int:
    """How many layers of a group `LayerStats.update` takes at a time for its [tokens, d_model] work: one on the CPU,
    where one layer's temporaries are small enough for the allocator to recycle and fresh ones of the whole group cost
    more in page faults than the arithmetic (0.6 s -> 0.35 s for 26 layers x 15k tokens); all of them on an
    accelerator, where each block adds kernel launches."""
    return 1 if torch.device(device).type == "cpu" else n_layers


class LayerStats:
    """Streaming accumulator for one language and a group of `n_layers` layers (1 by default).

    Feed it every batch's analysed tokens with `update()`; `finalize()` returns a `SentenceSums` (one layer) and
    `finalize_layers()` one per layer of the group. Inputs of a group are layer-major flattened ([L * n, ...], layer
    position l's n tokens at rows l*n ... (l+1)*n - 1), so a group costs a few tensor operations per batch, not a few
    per layer. Nothing is synchronised with the host until finalizing (except the first batch's centre).
    """

    def __init__(self, n_sentences: int, d_model: int, d_sae: int, device: torch.device | str = "cpu",
                 truncated=None, n_layers: int = 1, decoder_norms: torch.Tensor | None = None,
                 position_cap: int | None = None):
        device = torch.device(device)
        # float64 sums make results independent of batch composition to ~1e-12; MPS has no float64.
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.device = device
        self.n_layers, self.n_sentences, self.d_sae = int(n_layers), int(n_sentences), int(d_sae)
        if position_cap is not None and int(position_cap) < 0:
            raise ValueError(f"position_cap must be a position (>= 0) or None, got {position_cap}")
        self.position_cap = None if position_cap is None else int(position_cap)
        """Keep the statistics of tokens at positions <= position_cap apart (`SentenceSums.within_cap`): every
        per-sentence accumulator has a second half for the tokens beyond it, so the window costs one index offset
        per batch, not a second set of sums, and the halves add up to the whole."""
        self.halves = 1 if self.position_cap is None else 2
        size = self.halves * self.n_layers * self.n_sentences
        self.sums = {name: torch.zeros(size, dtype=self.dtype, device=device) for name in per_sentence_sums()}
        self.sum_x = torch.zeros(self.n_layers, d_model, dtype=self.dtype, device=device)
        self.sum_dev = torch.zeros(size, d_model, dtype=self.dtype, device=device)
        self.shift: torch.Tensor | None = None
        self.features_fired = torch.zeros(self.n_layers * self.d_sae, dtype=torch.bool, device=device)
        self.truncated = np.zeros(n_sentences, dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool)
        self.decoder_norms = decoder_norms
        """[n_layers, d_sae] ||W_dec,f|| of the group's SAEs, for metrics that weight features by what they write."""

    @torch.no_grad()
    def update(self, x: torch.Tensor, feature_acts: torch.Tensor, x_hat: torch.Tensor, sentence_index: torch.Tensor,
               positions: torch.Tensor | None = None, code: SparseCode | None = None) -> None:
        """Add one batch.

        x: [L * n, d_model] residuals of the analysed tokens (BOS and padding already removed), layer-major;
        feature_acts: [L * n, d_sae] = sae.encode(x); x_hat: [L * n, d_model] = sae.decode(feature_acts);
        sentence_index: [n] long, the sentence (position in the language's text list) each token belongs to;
        positions: [n] the token's position in its row (0 = first token), None = not tracked (sums stay 0);
        code: `feature_acts`'s non-zero entries if already found: the activation sums then cost O(nnz), not
        O(n x d_sae), and feature_acts is not read (it may be None); without it they are dense passes with no host
        synchronisation (what an accelerator wants).
        """
        n = sentence_index.shape[0]
        if n == 0:
            return
        L = self.n_layers
        if self.shift is None:
            first = sentence_index == sentence_index[0]
            self.shift = x.view(L, n, -1)[:, first].to(self.dtype).mean(dim=1)
        if self.position_cap is not None:
            if positions is None:
                raise ValueError("a position cap needs each token's position")
            # Tokens past the cap land in the accumulators' second half (rows L * n_sentences and up).
            sentence_index = sentence_index + (positions > self.position_cap).to(sentence_index.dtype) * (
                L * self.n_sentences)
        # Each layer position's sentences live in their own block of the flat accumulators.
        index = sentence_index if L == 1 else (
            sentence_index.unsqueeze(0) + self.n_sentences * torch.arange(L, device=sentence_index.device).unsqueeze(1)
        ).view(-1)
        block = layers_per_block(x.device, L)
        sq_err = torch.empty(L * n, dtype=torch.float32, device=x.device)
        resid_norm = torch.empty(L * n, dtype=self.dtype, device=x.device)
        sq_dev = torch.empty(L * n, dtype=self.dtype, device=x.device)
        for first_layer in range(0, L, block):
            layers, rows = slice(first_layer, first_layer + block), slice(first_layer * n, (first_layer + block) * n)
            # Per-token squares of the reconstruction error in float32 (relative error ~1e-7 per token, summed in
            # float64).
            err = x[rows].to(torch.float32) - x_hat[rows].to(torch.float32)
            torch.sum(err.mul_(err), dim=-1, out=sq_err[rows])
            # The residual's own sums in float64, where the shifted-variance identity needs them: one float64 copy
            # whose norm and sum are taken before it is centred in place.
            x64 = x[rows].to(self.dtype, copy=True).view(-1, n, x.shape[-1])
            torch.linalg.vector_norm(x64, dim=-1, out=resid_norm[rows].view(-1, n))
            self.sum_x[layers] += x64.sum(dim=1)
            dev = x64.sub_(self.shift[layers].unsqueeze(1)).view(-1, x.shape[-1])
            torch.linalg.vector_norm(dev, dim=-1, out=sq_dev[rows])
            self.sum_dev.index_add_(0, index[rows], dev)
        if code is not None:
            view = SparseView(code, dtype=self.dtype, decoder_norms=self.decoder_norms)
            self.features_fired |= code.column_counts(n) > 0
        else:  # sums accumulate in float32 without a float32 copy of a bf16 code (GBs on an accelerator)
            fired = feature_acts != 0
            view = DenseView(feature_acts, dtype=torch.float32, fired=fired, decoder_norms=self.decoder_norms)
            self.features_fired |= fired.view(L, n, -1).any(dim=1).view(-1)
        activation = {metric.name: metric.per_token(view) for metric in code_metrics()}
        per_token = {
            "n_tokens": torch.ones(L * n, dtype=self.dtype, device=x.device),
            **activation,
            "resid_norm": resid_norm,
            "sq_err": sq_err,
            "sq_dev": sq_dev.square_(),
            "sq_norm": resid_norm.square(),
        }
        if positions is not None:
            per_token["position"] = positions.repeat(L)
        for name, values in per_token.items():
            self.sums[name].index_add_(0, index, values.to(self.dtype))

    def finalize_layers(self) -> list[SentenceSums]:
        """Move everything to the CPU once; one `SentenceSums` per layer of the group, in its order."""
        L, S = self.n_layers, self.n_sentences
        shift = self.shift if self.shift is not None else torch.zeros_like(self.sum_x)
        halves = {name: values.double().cpu().numpy().reshape(self.halves, L, S) for name, values in self.sums.items()}
        sums = {name: values.sum(axis=0) for name, values in halves.items()}  # within the cap + beyond it
        sum_dev_halves = self.sum_dev.view(self.halves, L, S, -1)
        whole_dev = sum_dev_halves[0] if self.halves == 1 else sum_dev_halves.sum(dim=0)
        sum_x, shift64 = self.sum_x.double().cpu().numpy(), shift.double().cpu().numpy()
        fired = self.features_fired.cpu().numpy().reshape(L, -1)
        sum_dev = whole_dev.to(torch.float32).cpu().numpy()
        window = [{WITHIN_CAP_PREFIX + name: np.zeros(0) for name in within_cap_names()} for _ in range(L)]
        if self.position_cap is not None:
            within = sum_dev_halves[0]
            # The window's residual total from its per-sentence sums around the centre: sum_t x_t = sum_s D_s + N c.
            n_within = self.sums["n_tokens"].view(self.halves, L, S)[0].sum(dim=1)
            within_x = (within.sum(dim=1) + n_within.unsqueeze(1) * shift).double().cpu().numpy()
            within_dev = within.to(torch.float32).cpu().numpy()
            window = [{**{WITHIN_CAP_PREFIX + name: values[0, i].copy() for name, values in halves.items()},
                       WITHIN_CAP_PREFIX + "sum_dev": within_dev[i].copy(), WITHIN_CAP_PREFIX + "sum_x": within_x[i].copy()}
                      for i in range(L)]
        cap = np.array(-1 if self.position_cap is None else self.position_cap, dtype=np.int64)
        return [
            SentenceSums.from_arrays({**{name: values[i].copy() for name, values in sums.items()},
                                      "sum_x": sum_x[i].copy(), "shift": shift64[i].copy(),
                                      "features_fired": fired[i].copy(), "sum_dev": sum_dev[i].copy(),
                                      "truncated": self.truncated.copy(), "position_cap": cap, **window[i]})
            for i in range(L)
        ]

    def finalize(self) -> SentenceSums:
        """The `SentenceSums` of a one-layer accumulator."""
        if self.n_layers != 1:
            raise ValueError("finalize() is for one layer; use finalize_layers() for a group")
        return self.finalize_layers()[0]
