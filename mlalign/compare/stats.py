"""Differences between arms with a hierarchical bootstrap: seeds first, then sentences (items) paired by id.

An outcome of one arm, seed and language is a ratio of per-sentence sums, f(Σ_i num_i / Σ_i den_i) with f affine
(LM loss: summed nats / predicted tokens; accuracy: hits / 1; activation gain: 100·(after / before − 1)). An arm's
value is the mean over its seeds. For a contrast A − B, one bootstrap resample draws seeds with replacement (the same
seed index for both arms: seed s gives both the same data order and initialisation; an arm with one run, `base` or
`steer`, uses it for every draw), then, within each drawn seed, sentences with replacement with one weight vector for
both arms (the same sentences are compared). The CI is the percentile interval of A − B over resamples; the minimum
detectable effect (MDE) at 80% power and the CI's level is (z_{1-α/2} + z_{0.8}) x the bootstrap standard error.
Beside it, `ci_sentences_only` keeps every seed in every resample and draws sentences only: the interval a
sentences-only bootstrap would report, so the gap between the two is the run-to-run spread's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POWER = 0.8
"""Power at which the minimum detectable effect is stated."""


@dataclass
class Outcome:
    """One arm's per-sentence sums for one language and outcome: num, den [seeds, sentences], value = f(Σnum/Σden)."""

    num: np.ndarray
    den: np.ndarray
    scale: float = 1.0
    """f(r) = scale · r + shift."""
    shift: float = 0.0

    def __post_init__(self):
        self.num = np.atleast_2d(np.asarray(self.num, dtype=float))
        self.den = np.atleast_2d(np.asarray(self.den, dtype=float))
        if self.num.shape != self.den.shape:
            raise ValueError(f"num {self.num.shape} and den {self.den.shape} differ")

    @property
    def n_seeds(self) -> int:
        return int(self.num.shape[0])

    @property
    def n_sentences(self) -> int:
        return int(self.num.shape[1])

    def values(self, seed_index: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """[resamples] the arm's value: mean over drawn seeds [R, S] of f(weighted ratio) with weights [R, S, n]."""
        index = np.minimum(seed_index, self.n_seeds - 1) if self.n_seeds > 1 else np.zeros_like(seed_index)
        num = np.einsum("rsn,rsn->rs", weights, self.num[index])
        den = np.einsum("rsn,rsn->rs", weights, self.den[index])
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.scale * num / den + self.shift).mean(axis=1)

    def point(self) -> float:
        """f(ratio) per seed over all sentences, averaged over seeds."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.mean(self.scale * self.num.sum(axis=1) / self.den.sum(axis=1) + self.shift))


def mde(standard_error: float, ci: float = 0.95, power: float = POWER) -> float:
    """Smallest true difference a two-sided test at level 1 − ci detects with probability `power`."""
    from scipy.stats import norm

    return float((norm.ppf(1.0 - (1.0 - ci) / 2.0) + norm.ppf(power)) * standard_error)


def hierarchical_difference(a: Outcome, b: Outcome, n_resamples: int = 1000, ci: float = 0.95,
                            seed: int = 0) -> dict:
    """A − B with its hierarchical-bootstrap CI: {estimate, ci, se, mde, n_seeds, n_sentences}."""
    if a.n_sentences != b.n_sentences:
        raise ValueError(f"the arms were measured on different sentences ({a.n_sentences} vs {b.n_sentences})")
    n = a.n_sentences
    n_seeds = max(a.n_seeds, b.n_seeds)
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(0, n_seeds, size=(n_resamples, n_seeds)) if n_seeds > 1 else \
        np.zeros((n_resamples, 1), dtype=int)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=(n_resamples, seed_index.shape[1])).astype(float)
    diffs = a.values(seed_index, weights) - b.values(seed_index, weights)
    # The same sentence draws with every seed kept, once each: the interval a sentences-only bootstrap would give,
    # reported beside the hierarchical one so that a reader sees how much of the width is run-to-run spread.
    every_seed = np.tile(np.arange(seed_index.shape[1]), (n_resamples, 1))
    sentence_diffs = a.values(every_seed, weights) - b.values(every_seed, weights)
    low, high = _percentile_ci(diffs, ci)
    se = float(diffs[np.isfinite(diffs)].std(ddof=1)) if np.isfinite(diffs).sum() > 1 else float("nan")
    return {"estimate": a.point() - b.point(), "ci": [low, high], "se": se, "mde": mde(se, ci),
            "ci_sentences_only": list(_percentile_ci(sentence_diffs, ci)),
            "n_seeds": [a.n_seeds, b.n_seeds], "n_sentences": n}


def _percentile_ci(resampled: np.ndarray, ci: float) -> tuple[float, float]:
    finite = resampled[np.isfinite(resampled)]
    if not finite.size:
        return float("nan"), float("nan")
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


ONE_SEED_NOTE = "one seed: the CI covers sentences, not run-to-run spread"
"""What a verdict adds when a trained arm of the contrast ran once (compare.seeds=1)."""


def verdict(contrast: str, lang: str, outcome: str, diff: dict, unit: str = "", lower_is_better: bool = False,
            one_seed: bool = False) -> str:
    """One line: which way the difference came out (and whether that is better, for outcomes where lower is better),
    or 'no detectable difference (MDE x)'; `one_seed`: a trained arm of the contrast rests on one run, and the line
    says so."""
    low, high = diff["ci"]
    first, second = contrast.split("-", 1)
    shown = f"{diff['estimate']:+.4g}{unit} [{low:+.4g}, {high:+.4g}]"
    caveat = f" ({ONE_SEED_NOTE})" if one_seed else ""
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{contrast} {lang} {outcome}: undefined (no finite resample)"
    if diff["se"] == 0.0 and low == high == diff["estimate"] == 0.0:
        # No resample moves the difference: the arms agree on every sentence, and no MDE can be read off this sample.
        return (f"{contrast} {lang} {outcome}: no difference on any of the {diff['n_sentences']} sentences/items "
                f"(identical outcomes; MDE not estimable from this sample){caveat}")
    worse, better = (" (worse)", " (better)") if lower_is_better else ("", "")
    if low > 0:
        return f"{contrast} {lang} {outcome}: {first} higher{worse} than {second} by {shown}{caveat}"
    if high < 0:
        return f"{contrast} {lang} {outcome}: {first} lower{better} than {second} by {shown}{caveat}"
    return (f"{contrast} {lang} {outcome}: no detectable difference (MDE {diff['mde']:.3g}{unit}); "
            f"estimate {shown}{caveat}")
