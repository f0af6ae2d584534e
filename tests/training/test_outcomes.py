"""Outcome measures with known answers: a scale-only "adapter", an unchanged model, a +10% English change."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from mlalign.training.outcomes import (PairedSums, alignment_score, language_outcome, measure_paired,
                                       outcome_report, resample_counts, retention_pct)

LAYER = 12


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    cfg = compose_cfg(["model=testbed", *bed_overrides(testbed_dir)])
    from mlalign.saes import load_saes

    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    saes = load_saes(cfg.sae, [LAYER], model.config.hidden_size)
    corpus = load_corpus(cfg.data, ["en", "hi"], "dev")
    texts = {lang: corpus[lang][:40] for lang in ("hi", "en")}
    return model, tokenizer, saes, texts


def scaled_layer(model, layer: int, factor: float):
    """An "adapter" that multiplies decoder layer `layer`'s output by `factor`; returns (handle, adapter_off)."""
    from mlalign.analysis.capture import decoder_layers

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] * factor, *output[1:])
        return output * factor

    block = decoder_layers(model)[layer]
    state = {"handle": block.register_forward_hook(hook)}

    @contextlib.contextmanager
    def adapter_off():
        state["handle"].remove()
        try:
            yield
        finally:
            state["handle"] = block.register_forward_hook(hook)

    return state, adapter_off


def test_scale_only_adapter_is_a_raw_gain_with_no_norm_matched_gain_and_is_not_valid(bed):
    model, tokenizer, saes, texts = bed
    state, adapter_off = scaled_layer(model, LAYER, 1.5)
    try:
        paired = measure_paired(model, adapter_off, tokenizer, saes, texts, "mean_act", batch_size=16, max_length=64,
                                progress=False)
    finally:
        state["handle"].remove()
    report = outcome_report(paired, "en", ["hi"], "token", tolerance=1.25, n_resamples=200)
    hi = report["per_lang"]["hi"]
    assert hi["gain_pct"] > 20.0  # scale alone buys a large raw "gain"
    assert abs(hi["norm_matched_gain_pct"]) < 1e-3  # the direction did not change at all
    assert hi["resid_norm_change_pct"] == pytest.approx(50.0, rel=1e-4)
    assert hi["fvu_after"] > 1.25 * hi["fvu_before"]
    assert hi["valid"] is False and report["valid_activation_gain_pct"]["hi"] is None
    # The same holds for English, whose retention therefore drops.
    assert report["english_retention_pct"] < 80.0
    assert alignment_score(report, floor_pct=90.0) < 0.0


def test_unchanged_model_has_zero_gain_and_retention_100_with_a_zero_width_ci(bed):
    model, tokenizer, saes, texts = bed
    paired = measure_paired(model, contextlib.nullcontext, tokenizer, saes, texts, "mean_act", batch_size=16,
                            max_length=64, progress=False)
    report = outcome_report(paired, "en", ["hi"], "token", n_resamples=200)
    assert report["english_retention_pct"] == pytest.approx(100.0, abs=1e-9)
    low, high = report["english_retention_ci"]
    assert high - low == pytest.approx(0.0, abs=1e-9)
    hi = report["per_lang"]["hi"]
    assert hi["gain_pct"] == pytest.approx(0.0, abs=1e-9)
    assert hi["fvu_after"] == pytest.approx(hi["fvu_before"], rel=1e-9) and hi["valid"]
    assert hi["lm_loss_change"] == pytest.approx(0.0, abs=1e-9)
    assert report["english_code_cosine"] == pytest.approx(1.0, abs=1e-6)


def synthetic(before: np.ndarray, after: np.ndarray, n_tokens: np.ndarray) -> PairedSums:
    """Sums [sentences, layers] with a well-fitting SAE (FVU 0.1 before and after)."""
    n_layers = before.shape[1]
    zeros = np.zeros_like(before)
    d = 3
    return PairedSums(layers=list(range(n_layers)), n_tokens=n_tokens, metric_before=before, metric_after=after,
                      metric_norm_matched=after, resid_norm_before=before, resid_norm_after=after,
                      l0_before=zeros, l0_after=zeros, sq_err_before=np.full_like(before, 0.1),
                      sq_err_after=np.full_like(before, 0.1), code_cosine=n_tokens[:, None] * np.ones(n_layers),
                      sumsq_before=np.full(n_layers, before.shape[0] * 1.0),
                      sumsq_after=np.full(n_layers, before.shape[0] * 1.0),
                      sum_x_before=np.zeros((n_layers, d)), sum_x_after=np.zeros((n_layers, d)),
                      ce_before=n_tokens * 2.0, ce_after=n_tokens * 2.0, ce_tokens=n_tokens)


@pytest.mark.parametrize("change", [1.10, 0.90])
def test_english_change_of_ten_percent_either_way_gives_retention_90(change):
    rng = np.random.default_rng(0)
    before = rng.uniform(0.5, 2.0, size=(30, 4))
    n_tokens = rng.integers(3, 20, size=30).astype(float)
    sums = synthetic(before, change * before, n_tokens)
    out = language_outcome(sums, "token", 1.25, resample_counts(30, 100, 0), 0.95, is_reference=True)
    assert out["retention_pct"] == pytest.approx(90.0, abs=1e-9)
    assert out["gain_pct"] == pytest.approx(100.0 * (change - 1.0), abs=1e-9)  # the signed change beside it
    assert out["retention_ci"] == pytest.approx([90.0, 90.0], abs=1e-9)


def test_gain_is_the_ratio_of_summed_levels_over_layers():
    # Layer 0 doubles from a small level, layer 1 stays: the summed-level ratio is +10%, not the +50% mean of ratios.
    before = np.array([[1.0, 9.0]] * 4)
    after = np.array([[2.0, 9.0]] * 4)
    sums = synthetic(before, after, np.ones(4))
    out = language_outcome(sums, "token", 1.25, resample_counts(4, 50, 0), 0.95, is_reference=False)
    assert out["gain_pct"] == pytest.approx(10.0)
    assert out["per_layer"]["0"]["gain_pct"] == pytest.approx(100.0)
    assert out["per_layer"]["1"]["gain_pct"] == pytest.approx(0.0)


def test_paired_bootstrap_ci_contains_the_estimate_and_narrows_with_pairing():
    rng = np.random.default_rng(1)
    difficulty = rng.lognormal(0.0, 1.0, size=(200, 2))  # sentences differ a lot ...
    after = difficulty * (1.2 + 0.01 * rng.standard_normal((200, 2)))  # ... the adapter adds ~20% to each
    out = language_outcome(synthetic(difficulty, after, np.ones(200)), "token", 1.25, resample_counts(200, 500, 0),
                           0.95, is_reference=False)
    low, high = out["gain_ci"]
    assert low <= out["gain_pct"] <= high
    assert high - low < 1.0  # paired: sentence difficulty cancels


def test_retention_formula():
    assert retention_pct(np.array([1.1, 0.9]), np.array([1.0, 1.0])) == pytest.approx(90.0)
    assert retention_pct(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(100.0)


def test_alignment_score_prefers_no_gain_to_an_sae_artefact():
    def split(gain, fvu_ratio, retention=100.0):
        lang = {"fvu_ratio": fvu_ratio}
        return {"per_lang": {"hi": lang, "en": {"fvu_ratio": 1.0}}, "english_retention_pct": retention,
                "activation_gain_pct_mean": gain}

    nothing = alignment_score(split(0.0, 1.0), 90.0)
    artefact = alignment_score(split(60.0, 136.0), 90.0)
    honest = alignment_score(split(10.0, 1.05), 90.0)
    assert artefact < nothing < honest
    assert alignment_score(split(10.0, 1.0, retention=95.0), 90.0) < alignment_score(split(10.0, 1.0), 90.0)
    assert alignment_score(split(10.0, float("nan")), 90.0) == -1.0e6


def test_vectorised_paired_bootstrap_equals_a_brute_force_loop_over_resamples():
    rng = np.random.default_rng(2)
    before = rng.lognormal(0.0, 0.5, size=(25, 3))
    after = before * rng.lognormal(0.1, 0.2, size=(25, 3))
    n_tokens = rng.integers(2, 30, size=25).astype(float)
    counts = resample_counts(25, 64, seed=3)
    for aggregate in ("token", "sentence"):
        out = language_outcome(synthetic(before, after, n_tokens), aggregate, 1.25, counts, 0.95, is_reference=True)
        gains, retentions = [], []
        for row in counts:
            draw = np.repeat(np.arange(25), row.astype(int))  # the resample as a list of sentence ids
            if aggregate == "token":
                b = before[draw].sum(0) / n_tokens[draw].sum()
                a = after[draw].sum(0) / n_tokens[draw].sum()
            else:
                b = (before[draw] / n_tokens[draw, None]).mean(0)
                a = (after[draw] / n_tokens[draw, None]).mean(0)
            gains.append(100 * (a.sum() / b.sum() - 1))
            retentions.append(100 - 100 * np.abs(a / b - 1).mean())
        assert out["gain_ci"] == pytest.approx(list(np.percentile(gains, [2.5, 97.5])), rel=1e-9)
        assert out["retention_ci"] == pytest.approx(list(np.percentile(retentions, [2.5, 97.5])), rel=1e-9)
