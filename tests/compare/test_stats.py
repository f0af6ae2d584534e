"""The hierarchical bootstrap of task=compare: known answers, and a CI that widens when seeds disagree."""

from __future__ import annotations

import numpy as np

from mlalign.compare.stats import Outcome, hierarchical_difference, mde, verdict


def _arm(per_seed_means, n=200, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    num = np.stack([m + noise * rng.standard_normal(n) for m in per_seed_means])
    return Outcome(num, np.ones_like(num))


def test_identical_arms_differ_by_exactly_zero():
    a = _arm([0.3, 0.5, 0.4])
    d = hierarchical_difference(a, a, 500)
    assert d["estimate"] == 0.0 and d["ci"] == [0.0, 0.0]
    assert "identical outcomes; MDE not estimable" in verdict("a-a", "hi", "x", d)  # never "MDE 0"


def test_a_planted_difference_is_found_and_its_ci_covers_it():
    b = _arm([0.0, 0.0, 0.0], seed=1)
    a = Outcome(b.num + 0.5, b.den)
    d = hierarchical_difference(a, b, 1000)
    assert abs(d["estimate"] - 0.5) < 1e-12
    assert d["ci"][0] > 0.49 and d["ci"][1] < 0.51  # paired by sentence and seed: the noise cancels
    assert "higher than" in verdict("a-b", "hi", "x", d)
    assert "higher (worse) than" in verdict("a-b", "hi", "lm_loss", d, lower_is_better=True)


def test_the_ci_widens_when_seeds_disagree():
    b = _arm([0.0, 0.0, 0.0], seed=3)
    agree = _arm([0.2, 0.2, 0.2], seed=4)
    disagree = Outcome(agree.num + np.array([[-1.5], [0.0], [1.5]]), agree.den)  # same mean, spread across seeds
    narrow = hierarchical_difference(agree, b, 2000, seed=7)
    wide = hierarchical_difference(disagree, b, 2000, seed=7)
    assert abs(narrow["estimate"] - wide["estimate"]) < 1e-9
    width = lambda d: d["ci"][1] - d["ci"][0]  # noqa: E731
    assert width(wide) > 3 * width(narrow)
    assert wide["ci"][0] < 0 < wide["ci"][1]  # with seeds this far apart the effect is not detectable ...
    assert "no detectable difference (MDE" in verdict("a-b", "hi", "x", wide)
    assert narrow["ci"][0] > 0  # ... which a sentences-only interval would have called


def test_a_single_run_arm_is_used_for_every_seed_draw():
    base = _arm([0.1], seed=5)
    trained = _arm([0.3, 0.4, 0.5], seed=6)
    d = hierarchical_difference(trained, base, 500)
    assert d["n_seeds"] == [3, 1]
    assert abs(d["estimate"] - (trained.point() - base.point())) < 1e-12


def test_ratio_outcomes_and_the_transform():
    num = np.array([[2.0, 4.0]])
    den = np.array([[1.0, 1.0]])
    gain = Outcome(num, den, 100.0, -100.0)  # 100 (Σnum/Σden - 1)
    assert abs(gain.point() - 200.0) < 1e-12


def test_mde_is_2_8_standard_errors_at_95_and_80_percent():
    assert abs(mde(1.0) - 2.8016) < 1e-3


def test_the_sentences_only_interval_is_reported_beside_and_misses_the_seed_spread():
    b = _arm([0.0, 0.0, 0.0], seed=3)
    agree = _arm([0.2, 0.2, 0.2], seed=4)
    disagree = Outcome(agree.num + np.array([[-1.5], [0.0], [1.5]]), agree.den)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    wide = hierarchical_difference(disagree, b, 2000, seed=7)
    # Seeds -1.5, 0, +1.5 apart: the hierarchical CI holds that spread, the sentences-only one (every seed kept in
    # every resample) cannot see it and stays as narrow as when the seeds agree.
    assert width(wide["ci"]) > 3 * width(wide["ci_sentences_only"])
    narrow = hierarchical_difference(agree, b, 2000, seed=7)
    assert abs(width(narrow["ci_sentences_only"]) - width(wide["ci_sentences_only"])) < 0.02
    assert wide["ci_sentences_only"][0] > 0  # what a sentences-only report would have called a win


def test_a_verdict_resting_on_one_seed_says_so():
    b = _arm([0.0], seed=1)
    a = Outcome(b.num + 0.5, b.den)
    d = hierarchical_difference(a, b, 500)
    assert "one seed" in verdict("act_align-base", "hi", "x", d, one_seed=True)
    assert "one seed" not in verdict("act_align-base", "hi", "x", d)
