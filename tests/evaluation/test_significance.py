"""Paired base-vs-adapter tests on hand-made per-item results: McNemar's exact p, the paired bootstrap CI, Holm."""

import numpy as np
import pytest
from scipy.stats import binomtest

from mlalign.evaluation.report import compare_results, results_markdown
from mlalign.evaluation.significance import holm, mcnemar_exact, paired_bootstrap_ci, paired_test


def _items(scores, prefix="t"):
    return {"ids": [f"{prefix}/{i}" for i in range(len(scores))], "acc": [float(s) for s in scores]}


def test_mcnemar_counts_only_discordant_items_and_matches_the_binomial_test():
    base = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 8     # 30 both right, 10 both wrong, then 2 vs 8 discordant
    adapter = [1] * 30 + [0] * 10 + [0] * 2 + [1] * 8
    p, b, c = mcnemar_exact(np.array(base), np.array(adapter))
    assert (b, c) == (2, 8)
    assert p == pytest.approx(binomtest(2, 10, 0.5).pvalue)   # 0.109: 8 of 10 flips one way is not enough
    assert mcnemar_exact(np.array(base), np.array(base)) == (1.0, 0, 0)
    # Concordant items change nothing: the same flips among 1000 agreeing items give the same p.
    p_many, _, _ = mcnemar_exact(np.array(base + [1] * 1000), np.array(adapter + [1] * 1000))
    assert p_many == pytest.approx(p)


def test_paired_bootstrap_ci_covers_the_difference_and_shrinks_with_items():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.5
    adapter = base.copy()
    adapter[np.flatnonzero(~base)[:45]] = True   # 45 items fixed, 15 broken: +0.075
    adapter[np.flatnonzero(base)[:15]] = False
    diff = adapter.mean() - base.mean()
    low, high = paired_bootstrap_ci(base, adapter, resamples=5000, seed=1)
    assert low < diff < high and low > 0
    wide = paired_bootstrap_ci(base[:40], adapter[:40], resamples=5000, seed=1)
    assert wide[1] - wide[0] > high - low
    assert paired_bootstrap_ci(base, adapter, resamples=5000, seed=1) == (low, high)  # seeded


def test_holm_is_monotone_and_never_below_the_raw_p():
    raw = [0.01, 0.04, 0.03, 0.5]
    adjusted = holm(raw)
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert all(a >= r for a, r in zip(adjusted, raw))


def test_paired_test_pairs_items_by_id_not_by_position():
    base = _items([1, 0, 1, 0])
    shuffled = {"ids": ["t/3", "t/2", "t/1", "t/0"], "acc": [0.0, 1.0, 0.0, 1.0]}  # the same answers, reordered
    test = paired_test(base, shuffled, resamples=200)
    assert test["discordant"] == [0, 0] and test["p_value"] == 1.0 and test["diff_ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="different items"):
        paired_test(base, _items([1, 0, 1], prefix="u"))


def _run(scores):
    n = len(scores)
    acc = sum(scores) / n
    return {"results": {"mmlu": {"hi": {"task": "m", "acc": acc, "acc_stderr": 0.01, "acc_norm": None,
                                        "acc_norm_stderr": None, "n_samples": n, "items": _items(scores)}}},
            "skipped": [], "settings": {}}


def test_a_small_difference_on_few_items_is_reported_not_significant():
    # The example: -0.025 on 40 items (one item flipped) is no result.
    base = [1] * 20 + [0] * 20
    adapter = [1] * 19 + [0] * 21
    cell = compare_results(_run(base), _run(adapter))["results"]["mmlu"]["hi"]
    assert cell["diff"]["acc"] == pytest.approx(-0.025)
    assert cell["p_value"] == 1.0 and cell["significant"] is False
    low, high = cell["diff_ci"]
    assert low < 0 < high or high == 0
    markdown = results_markdown(compare_results(_run(base), _run(adapter)))
    assert "| n.s. |" in markdown and "0 of 1 differences are significant" in markdown


def test_a_large_consistent_gain_is_significant():
    base = [0] * 150 + [1] * 50
    adapter = [1] * 60 + [0] * 90 + [1] * 50   # 60 items fixed, none broken
    comparison = compare_results(_run(base), _run(adapter))
    cell = comparison["results"]["mmlu"]["hi"]
    assert cell["significance"]["discordant"] == [0, 60]
    assert cell["p_value"] < 1e-15 and cell["significant"] is True
    assert cell["diff_ci"][0] > 0.2
    assert "1 of 1 differences are significant" in results_markdown(comparison)
