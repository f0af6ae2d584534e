"""The centred, norm-matched disparity against known answers: a language that is the reference scaled about the SAE's
centre has a raw gap and no norm-matched one; a language whose residuals point where the SAE does not read keeps its
gap; the rescaling and the centred RMS from sums are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from mlalign.analysis.norm_matched import (NormMatchedSAE, centred_rms, norm_matched, norm_matched_saes,
                                           reference_targets)
from mlalign.analysis.stats import LayerStats
from mlalign.analysis.summary import summarize
from mlalign.config import AnalysisConfig

D, N_SENTENCES, PER_SENTENCE = 8, 20, 6


def one_feature_sae(centre: torch.Tensor) -> JumpReLUSAE:
    """Feature 0 reads e0 about the centre (a = relu((x - c) . e0)); feature 1 never fires."""
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=2))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.W_dec[0, 0] = 1.0
        sae.b_dec.copy_(centre)
        sae.threshold.copy_(torch.tensor([1e-6, 1e6]))
    return sae


def sums_of(x: torch.Tensor, sae) -> "object":
    """The engine's streaming sums of one language's tokens x [N_SENTENCES * PER_SENTENCE, D] under `sae`."""
    acc = LayerStats(N_SENTENCES, D, 2)
    with torch.no_grad():
        f = sae.encode(x)
        acc.update(x, f, sae.decode(f), torch.arange(N_SENTENCES).repeat_interleave(PER_SENTENCE))
    return acc.finalize()


@pytest.fixture(scope="module")
def languages():
    """en: residuals along e0 about c with random lengths and a little noise; hi ("scaled"): en's, 0.6x about c (a
    pure scale gap); es ("turned"): en's with the same centred norms but their e0 part turned 53 degrees towards e2
    (0.6 e0 + 0.8 e2, a gap in direction). Real codes of two tiers, so each is its tier's headline."""
    g = torch.Generator().manual_seed(0)
    centre = 5.0 * torch.randn(D, generator=g)  # far from 0, like a real model's near-constant component
    n = N_SENTENCES * PER_SENTENCE
    length = 1.0 + 2.0 * torch.rand(n, generator=g)
    noise = 0.05 * torch.randn(n, D, generator=g)
    noise[:, 0] = 0
    noise[:, 2] = 0
    e0, e2 = torch.eye(D)[0], torch.eye(D)[2]
    en = centre + length[:, None] * e0 + noise
    scaled = centre + 0.6 * (en - centre)
    turned = centre + length[:, None] * (0.6 * e0 + 0.8 * e2) + noise
    return centre, {"en": en, "hi": scaled, "es": turned}


def test_norm_matched_sets_every_tokens_centred_norm_and_keeps_its_direction():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(50, D, generator=g), torch.randn(D, generator=g)
    out = norm_matched(x, 3.0, c)
    torch.testing.assert_close((out - c).norm(dim=-1), torch.full((50,), 3.0))
    cosine = torch.nn.functional.cosine_similarity(out - c, x - c, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(50))
    per_token = torch.rand(50, generator=g) + 0.5  # one target per token (task=train's paired control)
    torch.testing.assert_close((norm_matched(x, per_token, c) - c).norm(dim=-1), per_token)


def test_centred_rms_from_the_sums_equals_the_direct_value(languages):
    centre, langs = languages
    sae = one_feature_sae(centre)
    for x in langs.values():
        direct = float(((x - centre).double().norm(dim=-1) ** 2).mean().sqrt())
        assert centred_rms(sums_of(x, sae), centre.numpy()) == pytest.approx(direct, rel=1e-9)
    other = torch.ones(D)  # any centre, not only the SAE's
    x = langs["en"]
    assert centred_rms(sums_of(x, sae), other.numpy()) == pytest.approx(
        float(((x - other).double().norm(dim=-1) ** 2).mean().sqrt()), rel=1e-9)


def test_a_scale_gap_vanishes_norm_matched_and_a_direction_gap_stays(languages):
    centre, langs = languages
    sae = one_feature_sae(centre)
    stats = {lang: {0: sums_of(x, sae)} for lang, x in langs.items()}
    targets = reference_targets(stats, "en", {0: sae})
    assert targets[0] == pytest.approx(float(((langs["en"] - centre).norm(dim=-1) ** 2).mean().sqrt()), rel=1e-6)
    wrapped = norm_matched_saes({0: sae}, targets)[0]
    assert isinstance(wrapped, NormMatchedSAE)
    matched = {lang: {0: sums_of(x, wrapped)} for lang, x in langs.items()}
    summary = summarize(stats, "en", AnalysisConfig(bootstrap=200, max_fvu=None), norm_matched=(targets, matched))
    raw, nm = summary["disparity_pct"], summary["disparity_pct_norm_matched"]
    # The feature reads (x - c) . e0: 0.6x the length gives 0.6x the activation, the turned e0 part 0.6x too.
    assert raw["hi"]["0"] == pytest.approx(-40.0, abs=0.01)
    assert raw["es"]["0"] == pytest.approx(-40.0, abs=0.5)
    # Norm-matched, the scaled language's tokens are en's exactly; the turned one's still read 0.6 of their length.
    assert abs(nm["hi"]["0"]) < 1e-4  # float32 rounding about a centre of norm ~14
    assert nm["es"]["0"] == pytest.approx(-40.0, abs=1.0)
    low, high = summary["disparity_ci_norm_matched"]["es"]["0"]
    assert low <= nm["es"]["0"] <= high and high < -30
    assert nm["en"]["0"] == 0 and summary["norm_matched_target"] == {"0": pytest.approx(targets[0])}
    assert summary["norm_matched_centre"] == "sae_b_dec"
    # Each tier's headline says what the norm-matched pass makes of its gap.
    by_lang = {h["lang"]: h for h in summary["headlines"]}
    assert by_lang["hi"]["value_norm_matched"] == nm["hi"]["0"]
    assert "the gap is the residual's scale, not what its features represent" in by_lang["hi"]["text"]
    assert "the gap is in the residual's direction, beyond its scale" in by_lang["es"]["text"]
    assert "Norm-matched" in by_lang["es"]["text"] and "against -40.0%" in by_lang["es"]["text"]


def test_a_metric_that_is_not_read_from_the_code_gets_no_norm_matched_disparity(languages):
    centre, langs = languages
    sae = one_feature_sae(centre)
    stats = {lang: {0: sums_of(x, sae)} for lang, x in langs.items()}
    targets = reference_targets(stats, "en", {0: sae})
    matched = {lang: {0: sums_of(x, norm_matched_saes({0: sae}, targets)[0])} for lang, x in langs.items()}
    summary = summarize(stats, "en", AnalysisConfig(metric="fvu", bootstrap=0, max_fvu=None),
                        norm_matched=(targets, matched))
    assert summary["disparity_pct_norm_matched"] is None  # the pass's x̂ is of the rescaled residual


def test_without_the_pass_the_keys_are_null(languages):
    centre, langs = languages
    sae = one_feature_sae(centre)
    summary = summarize({lang: {0: sums_of(x, sae)} for lang, x in langs.items()}, "en",
                        AnalysisConfig(bootstrap=0, max_fvu=None))
    assert summary["disparity_pct_norm_matched"] is None and summary["norm_matched_target"] is None


def test_a_bf16_residual_is_rescaled_in_float32(languages):
    centre, langs = languages
    sae = one_feature_sae(centre)
    wrapped = NormMatchedSAE(sae, 2.0)
    x = langs["en"][:10]
    expected = sae.encode(norm_matched(x.bfloat16().float(), 2.0, centre))
    torch.testing.assert_close(wrapped.encode(x.bfloat16()), expected)
