"""Every analysis metric defined once: a registered record read by the statistics, the metric maths, the bootstrap, the
summary's wording and the training loss alike.

A metric is one of two kinds:

- **per-token** (`per_token` or `residual_sum` set): a value per analysed token, kept as per-sentence sums and reported
  as their mean over tokens (`aggregate=token`) or the mean of per-sentence means (`aggregate=sentence`). Metrics of
  the SAE code (`per_token`) are computed from a `CodeView`, so one formula serves the dense code, the sparse code of
  the CPU path, and the loss's differentiable surrogates; those are the metrics the alignment term can target.
- **pooled** (`pooled` set): a ratio of corpus totals (FVU), always over all of a language's tokens, with the exact
  per-resample value for the bootstrap from the same function.

Add a metric with `register_metric(Metric(...))` in this module: the statistics keep its per-sentence sums, the
summary, metrics.csv, the bootstrap and (for an SAE-code metric) the loss pick it up from here. The analysis cache's
identity includes the registered names, so cached statistics computed without it are not reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np
import torch

from mlalign.errors import UserError

AGGREGATES = ("token", "sentence")
"""How a per-token metric is averaged: over all tokens, or over sentences of per-sentence means (docs/method.md)."""


class CodeView(Protocol):
    """What a per-token SAE-code metric may read of a [tokens, d_sae] code: row sums and counts, whatever the code's
    storage (dense tensor, sparse entries, a surrogate)."""

    d_sae: int
    decoder_norms: torch.Tensor | None
    """[layers, d_sae] ||W_dec,f|| of the SAE(s) whose code this is (rows layer-major), None where not known."""

    def row_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[tokens] sum_f a_tf, or sum_f w_f a_tf with per-feature `weights` [layers, d_sae]."""

    def row_abs_sum(self) -> torch.Tensor:
        """[tokens] sum_f |a_tf|."""

    def row_count(self) -> torch.Tensor:
        """[tokens] #{f : a_tf != 0}."""


class DenseView:
    """A dense code [tokens, d_sae] as a `CodeView`; sums in `dtype` (default: the code's own). `fired` (acts != 0),
    when the caller has it already, saves a pass over a code that can be GBs on an accelerator."""

    def __init__(self, acts: torch.Tensor, dtype: torch.dtype | None = None, fired: torch.Tensor | None = None,
                 decoder_norms: torch.Tensor | None = None):
        self.acts, self.dtype, self.d_sae, self.fired = acts, dtype, int(acts.shape[-1]), fired
        self.decoder_norms = decoder_norms

    def row_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return self.acts.sum(dim=-1, dtype=self.dtype)
        # One matrix-vector product per layer block (no [tokens, d_sae] temporary), in the code's dtype.
        blocks = self.acts.view(weights.shape[0], -1, self.d_sae)
        out = torch.bmm(blocks, weights.to(blocks.dtype).unsqueeze(-1)).view(-1)
        return out.to(self.dtype or out.dtype)

    def row_abs_sum(self) -> torch.Tensor:
        return self.acts.abs().sum(dim=-1, dtype=self.dtype)

    def row_count(self) -> torch.Tensor:
        fired = self.acts != 0 if self.fired is None else self.fired
        return fired.sum(dim=-1).to(self.dtype or self.acts.dtype)


class SparseView:
    """`saes.encode.SparseCode` (the non-zero entries) as a `CodeView`: sums cost O(nnz), the row sum is shared."""

    def __init__(self, code, dtype: torch.dtype = torch.float32, decoder_norms: torch.Tensor | None = None):
        self.code, self.dtype, self.d_sae, self.decoder_norms = code, dtype, int(code.d_sae), decoder_norms
        self._row_sum: torch.Tensor | None = None

    def row_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is not None:
            n = self.code.n_tokens // weights.shape[0]  # tokens per layer of a stacked code
            return self.code.per_token(self.code.values * weights.reshape(-1)[self.code.layer_feature(n)],
                                       dtype=self.dtype)
        if self._row_sum is None:
            self._row_sum = self.code.per_token(dtype=self.dtype)
        return self._row_sum

    def row_abs_sum(self) -> torch.Tensor:
        # A ReLU/JumpReLU code has no negative value: its L1 is the plain sum, not computed twice.
        return self.row_sum() if self.code.values_positive else self.code.per_token(self.code.values.abs(),
                                                                                     dtype=self.dtype)

    def row_count(self) -> torch.Tensor:
        return self.code.active_per_token()


class SoftView:
    """A non-negative smooth stand-in for a code (e.g. softplus of the pre-activations above threshold) as a
    `CodeView`: counting becomes summing, so every metric of it has a gradient for every feature."""

    def __init__(self, soft: torch.Tensor, decoder_norms: torch.Tensor | None = None):
        self.soft, self.d_sae, self.decoder_norms = soft, int(soft.shape[-1]), decoder_norms
        self._dense = DenseView(soft)

    def row_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self._dense.row_sum(weights)

    def row_abs_sum(self) -> torch.Tensor:
        return self._dense.row_sum()

    row_count = row_abs_sum


PooledFn = Callable[[Mapping[str, np.ndarray], "object", "np.ndarray | None"], "np.ndarray | float"]


@dataclass(frozen=True)
class Metric:
    """One analysis metric (docs/method.md)."""

    name: str
    """The key in summary.json, metrics.csv and `analysis.metric`."""
    words: str
    """What statements and plot titles call it ("SAE activations")."""
    per_token: Callable[[CodeView], torch.Tensor] | None = None
    """SAE-code metrics: [tokens] value of each token from its code."""
    residual_sum: str | None = None
    """Per-token metrics of the residual itself: the `SentenceSums` field whose token mean it is."""
    pooled: PooledFn | None = None
    """Pooled metrics: (totals of the `needs` sums under the weights, the language-layer's `SentenceSums`, the
    bootstrap counts [B, n_sentences] or None for the point estimate) -> the value(s)."""
    needs: tuple[str, ...] = ()
    """Pooled metrics: the per-sentence sums `pooled` reads from `totals`."""
    bootstrappable: bool = True
    """False where a resample cannot be computed from per-sentence sums (feature coverage needs per-sentence sets)."""
    lower_is_better: bool = False
    """A larger value means a worse SAE fit, not "more activation" (statements word it so)."""

    @property
    def is_per_token(self) -> bool:
        """Averaged over tokens or sentences (`aggregate`); pooled metrics are always over all tokens."""
        return self.per_token is not None or self.residual_sum is not None

    @property
    def sum_name(self) -> str | None:
        """The per-sentence sum this per-token metric is the mean of."""
        return self.name if self.per_token is not None else self.residual_sum

    @property
    def alignable(self) -> bool:
        """The alignment loss can target it: it is a per-token function of the SAE code."""
        return self.per_token is not None


REGISTRY: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add `metric` to the registry (names are unique; order of registration is the order of reports)."""
    if metric.name in REGISTRY:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    if sum(x is not None for x in (metric.per_token, metric.residual_sum, metric.pooled)) != 1:
        raise ValueError(f"metric {metric.name!r}: give exactly one of per_token, residual_sum, pooled")
    REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric `name`; a user's unknown name is one clear error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown metric {name!r}; use analysis.metric=one of {', '.join(REGISTRY)}") from None


def code_metrics() -> tuple[Metric, ...]:
    """The SAE-code metrics, whose per-sentence sums the statistics keep."""
    return tuple(m for m in REGISTRY.values() if m.per_token is not None)


def check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise UserError(f"unknown aggregate {aggregate!r}; use analysis.aggregate=token or analysis.aggregate=sentence")
    return aggregate


def _ratio(numerator, denominator):
    with np.errstate(invalid="ignore", divide="ignore"):
        if np.ndim(numerator) == 0:
            return float(numerator / denominator) if denominator > 0 else float("nan")
        return numerator / denominator


# ---------------------------------------------------------------------------------------------------- the metrics

register_metric(Metric("mean_act", "SAE activations", per_token=lambda code: code.row_sum() / code.d_sae))
register_metric(Metric("l1", "L1 SAE activation", per_token=lambda code: code.row_abs_sum()))
register_metric(Metric("l0", "active SAE features per token", per_token=lambda code: code.row_count()))

def _decoder_weighted(code: CodeView) -> torch.Tensor:
    if code.decoder_norms is None:  # a code without its SAE (hand-built in a test): not computable, not a guess
        count = code.row_count()
        return torch.full(count.shape, float("nan"), device=count.device)
    return code.row_sum(weights=code.decoder_norms)


# sum_f a_tf ||W_dec,f||: each feature's activation in units of the residual it writes, so features whose decoder rows
# are long or short (their scale is a free choice of the SAE's training) count by what they add to the residual.
register_metric(Metric("dec_weighted_act", "decoder-norm-weighted SAE activation", per_token=_decoder_weighted))
# A position window keeps no feature set (`SentenceSums.position_matched`): its coverage is undefined, not 0.
register_metric(Metric("feature_coverage", "SAE feature coverage", bootstrappable=False,
                       pooled=lambda totals, sums, counts: float(sums.features_fired.mean())
                       if sums.features_fired.size else float("nan")))
# FVU is centred on the language's (or the resample's own) mean residual: sum ||x - x̂||² / sum ||x - x̄||².
register_metric(Metric("fvu", "fraction of variance unexplained", lower_is_better=True, needs=("sq_err",),
                       pooled=lambda totals, sums, counts: _ratio(
                           totals["sq_err"],
                           sums.total_sq_dev_from_mean() if counts is None else sums.sq_dev_from_mean(counts))))
register_metric(Metric("resid_norm", "residual-stream norm", residual_sum="resid_norm"))
# Uncentred: the same denominator form for every language (sum ||x||²), so a constant component cannot hide a gap.
register_metric(Metric("fvu_raw", "fraction of residual energy unexplained", lower_is_better=True,
                       needs=("sq_err", "sq_norm"),
                       pooled=lambda totals, sums, counts: _ratio(totals["sq_err"], totals["sq_norm"])))
