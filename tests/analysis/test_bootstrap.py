"""The shared bootstrap pieces: resample counts, percentile and simultaneous intervals, p-values, Holm."""

import numpy as np
import pytest

from mlalign.analysis.bootstrap import (bootstrap_p_value, holm, percentile_interval, resample_counts,
                                        simultaneous_intervals)


def test_resample_counts_draw_n_with_replacement_and_are_seeded():
    counts = resample_counts(7, 50, 3)
    assert counts.shape == (50, 7) and np.all(counts.sum(axis=1) == 7)
    assert np.array_equal(counts, resample_counts(7, 50, np.random.default_rng(3)))
    assert not np.array_equal(counts, resample_counts(7, 50, 4))
    assert resample_counts(5, 0, 0).shape == (0, 5)


def test_simultaneous_interval_of_one_cell_is_the_normal_width_and_widens_with_the_cells_searched():
    rng = np.random.default_rng(0)
    one, q1 = simultaneous_intervals({"a": rng.normal(10, 2, 20000)}, {"a": 10.0}, 0.95)
    assert q1 == pytest.approx(1.96, abs=0.05)
    assert one["a"] == pytest.approx([10 - 1.96 * 2, 10 + 1.96 * 2], abs=0.15)
    # 45 independent cells: the max of |t| needs (1 - 2 Phi(-q))^45 = 0.95, q = 3.25 (Bonferroni gives 3.26).
    many = {k: rng.normal(0, 1, 20000) for k in range(45)}
    intervals, q45 = simultaneous_intervals(many, {k: 0.0 for k in many}, 0.95)
    assert 3.15 < q45 < 3.35
    single = percentile_interval(many[0], 0.95)
    assert intervals[0][0] < single[0] and intervals[0][1] > single[1]
    # Planted: every cell but one is certain; the simultaneous search still covers the uncertain one's spread.
    mixed, _ = simultaneous_intervals({"sure": np.zeros(100), "unsure": rng.normal(0, 1, 100)},
                                      {"sure": 0.0, "unsure": 0.0}, 0.95)
    assert mixed["sure"] is None and mixed["unsure"] is not None


def test_bootstrap_p_value_and_holm_have_their_known_answers():
    assert bootstrap_p_value(np.full(999, 3.0)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.linspace(-1, 1, 1001)) == pytest.approx(1.0)
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["c"] == pytest.approx(0.06)
    assert adjusted["b"] == pytest.approx(0.06)  # monotone: never below an earlier step
    assert np.isnan(adjusted["d"])
