"""Topic probes: random labels score chance within their CI; a separable signal is found."""

from __future__ import annotations

import numpy as np

from mlalign.analysis.probes import chance_accuracy, probe_correct
from mlalign.compare.stats import Outcome, hierarchical_difference


def _data(n, rng, signal):
    labels = rng.integers(0, 7, size=n)
    x = rng.standard_normal((n, 24))
    x[np.arange(n), labels] += signal
    return x, labels


def test_a_probe_on_random_labels_scores_chance_within_its_ci():
    """Each draw of random labels is one 'seed': which cluster gets which label moves the accuracy far more than the
    test sentences do, so the interval must resample draws first (the hierarchical bootstrap), then sentences."""
    rng = np.random.default_rng(0)
    x_train, _ = _data(700, rng, 3.0)
    x_test, y_test = _data(400, rng, 3.0)
    draws = [probe_correct(x_train, rng.integers(0, 7, size=700), x_test, y_test, seed=s) for s in range(6)]
    correct = np.stack(draws)
    chance = np.full_like(correct, 1.0 / 7.0)
    d = hierarchical_difference(Outcome(correct, np.ones_like(correct)), Outcome(chance, np.ones_like(chance)), 2000)
    assert d["ci"][0] <= 0.0 <= d["ci"][1], d  # accuracy - chance: zero inside the CI
    assert d["ci"][1] - d["ci"][0] < 0.2  # and the interval is narrow enough to mean something
    assert abs(chance_accuracy(rng.integers(0, 7, size=7000)) - 1 / 7) < 0.02


def test_a_probe_finds_a_planted_topic_signal():
    rng = np.random.default_rng(1)
    x_train, y_train = _data(700, rng, 3.0)
    x_test, y_test = _data(300, rng, 3.0)
    assert probe_correct(x_train, y_train, x_test, y_test).mean() > 0.8
