"""Streaming per-(language, layer) statistics of SAE activations: per-sentence sums plus a few corpus totals.

Memory is O(sentences + d_model + d_sae) per (language, layer) and does not grow with the number of tokens. Sums
live on the model's device while a corpus streams through and move to the CPU once, in `finalize()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

PER_SENTENCE_SUMS = ("n_tokens", "mean_act", "l1", "l0", "resid_norm", "sq_err", "sq_dev")
"""Per-sentence sums over the sentence's analysed tokens (BOS and padding excluded):

n_tokens    number of tokens
mean_act    sum_t mean_f a_tf           (mean feature activation of a token)
l1          sum_t sum_f |a_tf|
l0          sum_t #{f : a_tf != 0}
resid_norm  sum_t ||x_t||_2
sq_err      sum_t ||x_t - x̂_t||²       (x̂ = sae.decode(sae.encode(x)))
sq_dev      sum_t ||x_t - c||²          (c = `shift`, see `SentenceSums.shift`)
"""


@dataclass
class SentenceSums:
    """Finalized statistics of one (language, layer), as numpy arrays on the CPU.

    Each `PER_SENTENCE_SUMS` field is an array [n_sentences] in the order of the texts given to the engine.
    """

    n_tokens: np.ndarray
    mean_act: np.ndarray
    l1: np.ndarray
    l0: np.ndarray
    resid_norm: np.ndarray
    sq_err: np.ndarray
    sq_dev: np.ndarray
    sum_x: np.ndarray
    """[d_model] sum of the residual over all analysed tokens of the language."""
    shift: np.ndarray
    """[d_model] the centre c of `sq_dev`: the mean residual of the first sentence processed (length-sorted order).
    Centring near the mean keeps the FVU denominator numerically stable (shifted-data variance) and lets the
    bootstrap resample it per sentence; any c gives the same point estimate."""
    features_fired: np.ndarray
    """[d_sae] bool: the feature was non-zero on at least one analysed token."""

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

    def to_dict(self) -> dict[str, np.ndarray]:
        """Arrays by field name, e.g. for `np.savez` caching; `SentenceSums(**d)` restores it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LayerStats:
    """Streaming accumulator for one (language, layer).

    Feed it every batch's analysed tokens with `update()`; `finalize()` returns a `SentenceSums`. Nothing is
    synchronised with the host until `finalize()`.
    """

    def __init__(self, n_sentences: int, d_model: int, d_sae: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        # float64 sums make results independent of batch composition to ~1e-12; MPS has no float64.
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.device = device
        self.sums = {name: torch.zeros(n_sentences, dtype=self.dtype, device=device) for name in PER_SENTENCE_SUMS}
        self.sum_x = torch.zeros(d_model, dtype=self.dtype, device=device)
        self.shift: torch.Tensor | None = None
        self.features_fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, feature_acts: torch.Tensor, x_hat: torch.Tensor, sentence_index: torch.Tensor) -> None:
        """Add one batch.

        x: [n, d_model] residuals of the analysed tokens (BOS and padding already removed);
        feature_acts: [n, d_sae] = sae.encode(x); x_hat: [n, d_model] = sae.decode(feature_acts);
        sentence_index: [n] long, the sentence (position in the language's text list) each token belongs to.
        """
        if x.shape[0] == 0:
            return
        x = x.to(self.dtype)
        if self.shift is None:
            first = sentence_index == sentence_index[0]
            self.shift = x[first].mean(dim=0)
        acts = feature_acts.to(torch.float32)
        fired = acts != 0  # one [n, d_sae] pass shared by l0 and features_fired
        per_token = {
            "n_tokens": torch.ones(x.shape[0], dtype=self.dtype, device=x.device),
            "mean_act": acts.mean(dim=-1),
            "l1": acts.abs().sum(dim=-1),
            "l0": fired.sum(dim=-1),
            "resid_norm": torch.linalg.vector_norm(x, dim=-1),
            "sq_err": (x - x_hat.to(self.dtype)).pow(2).sum(dim=-1),
            "sq_dev": (x - self.shift).pow(2).sum(dim=-1),
        }
        for name, values in per_token.items():
            self.sums[name].index_add_(0, sentence_index, values.to(self.dtype))
        self.sum_x += x.sum(dim=0)
        self.features_fired |= fired.any(dim=0)

    def finalize(self) -> SentenceSums:
        """Move everything to the CPU once and return it as numpy arrays."""
        shift = self.shift if self.shift is not None else torch.zeros_like(self.sum_x)
        return SentenceSums(
            **{name: values.double().cpu().numpy() for name, values in self.sums.items()},
            sum_x=self.sum_x.double().cpu().numpy(),
            shift=shift.double().cpu().numpy(),
            features_fired=self.features_fired.cpu().numpy(),
        )
