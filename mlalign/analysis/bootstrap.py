"""The percentile bootstrap's two pieces, shared by the analysis CIs and the training outcome report: resample weights
over sentences and the percentile interval of a statistic's resampled values."""

from __future__ import annotations

import numpy as np


def resample_counts(n: int, n_resamples: int, rng) -> np.ndarray:
    """[n_resamples, n] how often each of n sentences is drawn in each resample (n draws with replacement).

    `rng`: a `np.random.Generator` or anything `np.random.default_rng` takes as a seed; the same seed gives the same
    counts. Weighting per-sentence sums by a row gives that resample's totals exactly.
    """
    rng = np.random.default_rng(rng)
    draws = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n), draws.ravel()), 1.0)
    return counts


def percentile_interval(samples: np.ndarray, ci: float) -> list[float] | None:
    """The central `ci` percentile interval of the finite resampled values; None if none is finite."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    low, high = np.percentile(samples, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(low), float(high)]
