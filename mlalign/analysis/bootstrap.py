"""The percentile bootstrap's two pieces, shared by the analysis CIs and the training outcome report: resample weights
over sentences and the percentile interval of a statistic's resampled values."""

from __future__ import annotations

import numpy as np


def resample_counts(n: int, n_resamples: int, seed) -> np.ndarray:
    """[n_resamples, n] how often each of n sentences is drawn in each resample (n draws with replacement).

    `seed`: a `np.random.Generator` or anything `np.random.default_rng` takes; the same seed gives the same counts.
    Weighting per-sentence sums by a row gives that resample's totals exactly.
    """
    rng = np.random.default_rng(seed)
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


def simultaneous_intervals(samples: dict, points: dict, ci: float) -> tuple[dict, float]:
    """Intervals that hold for every cell at once (max-t over the cells searched), for a headline chosen as the most
    extreme of many cells: "up to X%" over 45 cells needs the width of the whole search, not of one cell.

    samples: cell -> [B] resampled values; points: cell -> point estimate. Each cell's spread is its bootstrap
    standard error se_c; q is the `ci` quantile over resamples of max_c |sample_bc - point_c| / se_c; the interval is
    point_c ± q se_c. Returns ({cell: [low, high] or None}, q). Cells with no finite spread get None and are left out
    of the maximum.
    """
    keys = [k for k in samples if np.isfinite(points.get(k, np.nan))]
    se = {k: float(np.nanstd(samples[k])) for k in keys}
    keys = [k for k in keys if np.isfinite(se[k]) and se[k] > 0]
    if not keys:
        return {k: None for k in samples}, float("nan")
    deviations = np.stack([np.abs(samples[k] - points[k]) / se[k] for k in keys])  # [cells, B]
    q = float(np.nanpercentile(np.nanmax(deviations, axis=0), 100 * ci))
    out = {k: None for k in samples}
    out.update({k: [float(points[k] - q * se[k]), float(points[k] + q * se[k])] for k in keys})
    return out, q


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the statistic is 0": twice the smaller share of resamples on either side of 0
    (with the +1 that keeps it above 0 for a finite number of resamples)."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan")
    below, above = np.sum(samples <= 0), np.sum(samples >= 0)
    return float(min(1.0, 2 * (min(below, above) + 1) / (samples.size + 1)))


def holm(p_values: dict) -> dict:
    """Holm-adjusted p-values (family-wise error over the cells given; NaN stays NaN and is not counted)."""
    finite = sorted((p, k) for k, p in p_values.items() if np.isfinite(p))
    m, running, out = len(finite), 0.0, {k: float("nan") for k in p_values}
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out
