"""Disparities, bootstrap CIs, layer bands, headline statements and the summary/CSV shapes."""

import copy
import json

import numpy as np
import pytest

from mlalign.analysis.metrics import (
    METRICS,
    METRICS_CSV_COLUMNS,
    bootstrap_ci,
    compute_metrics,
    disparity,
    headline_statements,
    layer_bands,
    metrics_rows,
    summarize,
)
from mlalign.analysis.stats import PER_SENTENCE_SUMS, SentenceSums
from mlalign.errors import UserError


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
    assert sentence["mean_act"] == pytest.approx(np.mean(sums.mean_act / sums.n_tokens))
    assert token["mean_act"] == pytest.approx(sums.mean_act.sum() / sums.n_tokens.sum())
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
    assert again == boot
    other = bootstrap_ci(reference_stats, "en", "mean_act", aggregate, ids, n_resamples=400, seed=4)
    assert other != boot
    assert bootstrap_ci(reference_stats, "en", n_resamples=0) == {"values_ci": None, "disparity_ci": None}


def _permuted(sums: SentenceSums, order: np.ndarray) -> SentenceSums:
    fields = sums.to_dict()
    for name in (*PER_SENTENCE_SUMS, "sum_dev", "truncated"):
        fields[name] = fields[name][order]
    return SentenceSums(**fields)


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


def test_layer_bands():
    assert layer_bands(list(range(26))) == {"early": list(range(0, 9)), "middle": list(range(9, 18)), "deep": list(range(18, 26))}
    assert layer_bands([0, 1, 2, 3]) == {"early": [0, 1], "middle": [2], "deep": [3]}
    assert layer_bands([5]) == {"early": [5]}
    assert layer_bands([3, 10, 20, 25], {"low": [0, 12], "high": [13, 25]}) == {"low": [3, 10], "high": [20, 25]}
    with pytest.raises(UserError, match="holds none"):
        layer_bands([0, 1], {"deep": [18, 25]})
    with pytest.raises(UserError, match="after last"):
        layer_bands([0, 1], {"early": [1, 0]})
    with pytest.raises(UserError, match="first_layer, last_layer"):
        layer_bands([0, 1], {"early": 3})


def _synthetic(disp_by_lang: dict, resid=None, fvu=None):
    layers = range(6)
    values = {"en": {layer: {"mean_act": 1.0, "resid_norm": 10.0, "fvu": 0.2} for layer in layers}}
    for lang, gaps in disp_by_lang.items():
        values[lang] = {
            layer: {
                "mean_act": 1.0 + gaps[layer] / 100,
                "resid_norm": 10.0 * (1 + (resid or {}).get(lang, 0.0) / 100),
                "fvu": (fvu or {}).get(lang, 0.2),
            }
            for layer in layers
        }
    return values


def test_headline_statements_reproduce_the_numbers():
    values = _synthetic({"es": [-5, -4, -1, 0, 1, 2], "hi": [-10, -30, -15, -12, -8, -12], "mr": [-20, -5, -4, -7, -9, -5]})
    disp = disparity(values, "en", "mean_act")
    bands = layer_bands(list(range(6)))
    statements = headline_statements(values, disp, "en", "mean_act", bands)
    assert statements[0].startswith("High-resource languages (es) receive up to 5.0% lower SAE activations than English in early layers (es, layer 0)")
    low = statements[1]
    assert low.startswith("Medium-to-low resource languages (hi, mr) receive up to 30.0% lower SAE activations than English in early layers (hi, layer 1)")
    assert "a gap of 9.5% persists in middle layers (mean over layers 2-3)" in low  # mean(-15, -12, -4, -7)
    assert "a gap of 8.5% persists in deep layers (mean over layers 4-5)" in low  # mean(-8, -12, -9, -5)
    assert "the SAE fits both languages comparably" in low


def test_statements_tell_a_model_level_gap_from_an_sae_artefact():
    gaps = {"hi": [-20.0] * 6}
    model_level = _synthetic(gaps, resid={"hi": -15.0})
    artefact = _synthetic(gaps, fvu={"hi": 0.5})
    bands = layer_bands(list(range(6)))
    for values, phrase in ((model_level, "model-level"), (artefact, "SAE artefact")):
        disp = disparity(values, "en", "mean_act")
        (statement,) = headline_statements(values, disp, "en", "mean_act", bands)
        assert phrase in statement


def test_summary_is_strict_json_with_the_documented_keys(reference_stats, ids):
    summary = summarize(reference_stats, "en", ids_by_lang=ids, bootstrap=50, model="tiny", sae="rand")
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    for key in ("model", "sae", "reference_lang", "metric", "aggregate", "layers", "langs", "values", "disparity_pct",
                "disparity_ci", "bands", "band_summary", "statements", "n_tokens", "n_sentences"):
        assert key in summary, key
    assert summary["layers"] == [0, 1, 2, 3]
    assert summary["langs"] == ["en", "es", "hi"]
    assert set(summary["values"]["hi"]["2"]) == set(METRICS)
    assert summary["disparity_pct"]["en"] == {str(layer): 0.0 for layer in range(4)}
    assert summary["n_sentences"] == {"en": 30, "es": 30, "hi": 30}
    assert summary["n_tokens"]["hi"] == int(reference_stats["hi"][0].n_tokens.sum())

    rows = metrics_rows(summary)
    assert len(rows) == 3 * 4 * (len(METRICS) + 1)
    assert all(tuple(row) == METRICS_CSV_COLUMNS for row in rows)
    disparity_rows = [r for r in rows if r["metric"] == "disparity_pct" and r["lang"] == "hi" and r["layer"] == 1]
    assert disparity_rows[0]["value"] == summary["disparity_pct"]["hi"]["1"]
    assert [disparity_rows[0]["ci_low"], disparity_rows[0]["ci_high"]] == summary["disparity_ci"]["hi"]["1"]


def test_summary_with_bootstrap_off_and_a_dead_reference_layer(reference_stats):
    stats = copy.deepcopy(reference_stats)
    dead = stats["en"][1]
    for name in ("mean_act", "l1", "l0"):
        getattr(dead, name)[:] = 0.0
    summary = summarize(stats, "en", bootstrap=0)
    assert summary["values_ci"] is None and summary["disparity_ci"] is None
    assert summary["disparity_pct"]["hi"]["1"] is None  # 0 reference: undefined, not infinite
    json.dumps(summary, allow_nan=False)


def test_bad_metric_or_aggregate_is_a_user_error(reference_stats):
    with pytest.raises(UserError, match="unknown metric"):
        summarize(reference_stats, "en", metric="activation")
    with pytest.raises(UserError, match="aggregate"):
        summarize(reference_stats, "en", aggregate="tokens")
    with pytest.raises(UserError, match="reference language"):
        summarize(reference_stats, "ru")


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
    from mlalign.analysis.metrics import _resample_counts, _resampled_metrics

    n_sentences = 25
    x, x_hat, sentence = _tokens_with_sentence_offsets(n_sentences=n_sentences)
    counts = _resample_counts(n_sentences, 40, np.random.default_rng(1))
    brute = []
    for row in counts:
        take = np.concatenate([np.flatnonzero(sentence == s) for s in range(n_sentences) for _ in range(int(row[s]))])
        xs, hs = x[take], x_hat[take]
        brute.append(((xs - hs) ** 2).sum() / ((xs - xs.mean(axis=0)) ** 2).sum())
    for first in (0, 7):
        sums = _sums_of(x, x_hat, sentence, n_sentences, first_sentence=first)
        got = _resampled_metrics({0: sums}, counts, "token")[0]["fvu"]
        np.testing.assert_allclose(got, brute, rtol=1e-6)


def test_artefact_verdict_compares_raw_fvus_with_the_same_denominator():
    """The centred FVU divides by each language's own variance; the verdict reads the raw FVU ||x-x̂||²/||x||²."""
    gaps = {"hi": [-20.0] * 6}
    bands = layer_bands(list(range(6)))
    centred_only = _synthetic(gaps, fvu={"hi": 0.5})  # 2.5x English's centred FVU ...
    for layer in range(6):
        centred_only["en"][layer]["fvu_raw"] = 0.05
        centred_only["hi"][layer]["fvu_raw"] = 0.05  # ... but the same share of residual energy unexplained
    disp = disparity(centred_only, "en", "mean_act")
    (statement,) = headline_statements(centred_only, disp, "en", "mean_act", bands)
    assert "SAE artefact" not in statement and "raw FVU" in statement
    for layer in range(6):
        centred_only["hi"][layer]["fvu_raw"] = 0.1
    (statement,) = headline_statements(centred_only, disp, "en", "mean_act", bands)
    assert "SAE artefact" in statement


def test_layers_where_the_sae_does_not_fit_the_reference_are_not_findings(reference_stats):
    from mlalign.analysis.metrics import band_summary, unfit_layers

    values = _synthetic({"hi": [-40, -5, -6, -7, -8, -9]})
    values["en"][0]["fvu"] = 1.26  # worse than predicting the mean: layer 0's -40% is no finding
    values["en"][3]["fvu"] = 5.06
    disp = disparity(values, "en", "mean_act")
    bands = layer_bands(list(range(6)))
    unfit = unfit_layers(values, "en")
    assert unfit == [0, 3]
    statements = headline_statements(values, disp, "en", "mean_act", bands, unfit)
    assert "up to 9.0% lower" in statements[0] and "40.0" not in statements[0]
    assert "does not reconstruct this model's residual stream at layers 0, 3" in statements[-1]
    assert band_summary(values, disp, "en", bands, unfit)["early"]["most_negative"]["layer"] == 1
    assert unfit_layers(values, "en", max_fvu=10.0) == []

    summary = summarize(reference_stats, "en", bootstrap=0, max_fvu=0.0)  # every layer flagged
    assert summary["unfit_layers"] == [0, 1, 2, 3] and summary["sae_fits"] == {str(k): False for k in range(4)}
    assert any("does not reconstruct" in w for w in summary["warnings"])
    assert "does not reconstruct" in summary["statements"][-1]
    # The fixture's SAEs are random (FVU > 1 everywhere): flagged by default, not when the check is off.
    assert summarize(reference_stats, "en", bootstrap=0)["unfit_layers"] == [0, 1, 2, 3]
    off = summarize(reference_stats, "en", bootstrap=0, max_fvu=None)
    assert off["unfit_layers"] == [] and not any("does not reconstruct" in s for s in off["statements"] + off["warnings"])


def test_corpus_stats_report_length_truncation_and_position(reference_stats):
    summary = summarize(reference_stats, "en", bootstrap=0, max_truncated_pct=0.0)
    for lang, sums in ((lang, reference_stats[lang][0]) for lang in reference_stats):
        entry = summary["corpus_stats"][lang]
        assert set(entry) == {"tokens_per_sentence", "truncated_pct", "mean_position"}
        assert entry["tokens_per_sentence"] == pytest.approx(sums.n_tokens.mean())
        assert entry["truncated_pct"] == pytest.approx(100 * sums.truncated.mean())
        # Every sentence of n analysed tokens holds positions 1..n (BOS at 0 is dropped).
        assert entry["mean_position"] == pytest.approx((sums.n_tokens * (sums.n_tokens + 1) / 2).sum() / sums.n_tokens.sum())
    truncated = [lang for lang in summary["langs"] if summary["corpus_stats"][lang]["truncated_pct"] > 0]
    assert truncated, "the fixture's max_length should cut some sentences"
    assert sum("cut at max_length" in w for w in summary["warnings"]) == len(truncated)
