"""Metric math: disparities, the sentence aggregate, paired bootstrap CIs (exact FVU resamples), corpus confounds."""

import numpy as np
import pytest

from mlalign.analysis.metrics import bootstrap_ci, compute_metrics, disparity
from mlalign.analysis.registry import REGISTRY as METRICS
from mlalign.analysis.stats import SentenceSums, per_sentence_sums


def test_disparity_is_relative_difference_and_zero_for_the_reference(reference_stats):
    values = compute_metrics(reference_stats)
    for metric in METRICS:
        disp = disparity(values, "en", metric)
        assert all(v == 0.0 for v in disp["en"].values())
        for layer, v in disp["hi"].items():
            ref, own = values["en"][layer][metric], values["hi"][layer][metric]
            assert v == pytest.approx(100 * (own - ref) / ref)


def test_sentence_aggregate_is_the_mean_of_sentence_means(reference_stats):
    sums = reference_stats["es"][2]
    token = compute_metrics(reference_stats, "token")["es"][2]
    sentence = compute_metrics(reference_stats, "sentence")["es"][2]
    assert sentence["mean_act"] == pytest.approx(np.mean(sums.sum_of('mean_act') / sums.n_tokens))
    assert token["mean_act"] == pytest.approx(sums.sum_of('mean_act').sum() / sums.n_tokens.sum())
    assert sentence["mean_act"] != pytest.approx(token["mean_act"], rel=1e-9)
    assert sentence["fvu"] == token["fvu"] and sentence["feature_coverage"] == token["feature_coverage"]


@pytest.mark.parametrize("aggregate", ["token", "sentence"])
def test_bootstrap_ci_contains_the_point_estimate_and_is_seeded(reference_stats, ids, aggregate):
    values = compute_metrics(reference_stats, aggregate)
    disp = disparity(values, "en", "mean_act")
    boot = bootstrap_ci(reference_stats, "en", "mean_act", aggregate, ids, n_resamples=400, seed=3)
    for lang in reference_stats:
        for layer in reference_stats[lang]:
            for metric in METRICS:
                ci = boot["values_ci"][lang][layer][metric]
                if metric == "feature_coverage":
                    assert ci is None
                    continue
                assert ci[0] < values[lang][layer][metric] < ci[1], (lang, layer, metric)
            low, high = boot["disparity_ci"][lang][layer]
            if lang == "en":
                assert low == high == 0.0
            else:
                assert low < disp[lang][layer] < high
    again = bootstrap_ci(reference_stats, "en", "mean_act", aggregate, ids, n_resamples=400, seed=3)
    assert again["values_ci"] == boot["values_ci"] and again["disparity_ci"] == boot["disparity_ci"]
    other = bootstrap_ci(reference_stats, "en", "mean_act", aggregate, ids, n_resamples=400, seed=4)
    assert other["disparity_ci"] != boot["disparity_ci"]
    assert bootstrap_ci(reference_stats, "en", n_resamples=0) == {"values_ci": None, "disparity_ci": None,
                                                                  "disparity_samples": None}


def _permuted(sums: SentenceSums, order: np.ndarray) -> SentenceSums:
    fields = sums.to_dict()
    for name in (*per_sentence_sums(), "sum_dev", "truncated"):
        fields[name] = fields[name][order]
    return SentenceSums.from_arrays(fields)


def test_paired_bootstrap_matches_sentences_by_id(reference_stats, ids):
    """A 'language' that is English with its rows shuffled (ids shuffled alongside) has disparity exactly 0 in every
    paired resample; resampled independently, its CI has positive width."""
    order = np.random.default_rng(0).permutation(reference_stats["en"][0].n_sentences)
    stats = {"en": reference_stats["en"], "hi": {layer: _permuted(s, order) for layer, s in reference_stats["en"].items()}}
    paired_ids = {"en": ids["en"], "hi": [ids["en"][i] for i in order]}
    paired = bootstrap_ci(stats, "en", n_resamples=200, ids_by_lang=paired_ids)
    independent = bootstrap_ci(stats, "en", n_resamples=200, ids_by_lang=None)
    for layer in stats["hi"]:
        assert paired["disparity_ci"]["hi"][layer] == pytest.approx([0.0, 0.0], abs=1e-9)
        low, high = independent["disparity_ci"]["hi"][layer]
        assert high - low > 1.0


def _tokens_with_sentence_offsets(seed: int = 0, n_sentences: int = 25, d: int = 16):
    """Residual-like tokens: a large common offset plus a per-sentence offset plus noise, so sentence means differ a
    lot from each other and from 0 (the regime where the FVU denominator's centre matters), and an SAE-like x̂."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, n_sentences)
    sentence = np.repeat(np.arange(n_sentences), lengths)
    x = 5.0 + 2.0 * rng.normal(size=(n_sentences, d))[sentence] + rng.normal(size=(len(sentence), d))
    x_hat = x + 0.5 * rng.normal(size=x.shape)
    return x, x_hat, sentence


def _sums_of(x, x_hat, sentence, n_sentences, first_sentence=0):
    import torch

    from mlalign.analysis.stats import LayerStats

    acc = LayerStats(n_sentences, x.shape[1], 4)
    order = np.argsort(sentence != first_sentence, kind="stable")  # the shift is the mean of the first sentence fed
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    acc.update(t(x[order]), torch.zeros(len(x), 4), t(x_hat[order]), t(sentence[order]).long())
    return acc.finalize()


def test_fvu_bootstrap_is_exact_per_resample_whatever_the_centre():
    """Brute force: each resample's FVU recomputed from its tokens (sentences repeated as drawn, centred on the
    resample's own mean) equals the bootstrap's FVU, and the result does not depend on which sentence gave the shift."""
    from mlalign.analysis.bootstrap import resample_counts
    from mlalign.analysis.metrics import _resampled_metrics

    n_sentences = 25
    x, x_hat, sentence = _tokens_with_sentence_offsets(n_sentences=n_sentences)
    counts = resample_counts(n_sentences, 40, np.random.default_rng(1))
    brute = []
    for row in counts:
        take = np.concatenate([np.flatnonzero(sentence == s) for s in range(n_sentences) for _ in range(int(row[s]))])
        xs, hs = x[take], x_hat[take]
        brute.append(((xs - hs) ** 2).sum() / ((xs - xs.mean(axis=0)) ** 2).sum())
    for first in (0, 7):
        sums = _sums_of(x, x_hat, sentence, n_sentences, first_sentence=first)
        got = _resampled_metrics({0: sums}, counts, "token")[0]["fvu"]
        np.testing.assert_allclose(got, brute, rtol=1e-6)
