"""Feature ablation on the testbed, against known answers: a feature built to fire on Hindi only raises Hindi's loss
when ablated and leaves English's exactly unchanged; ablating no feature changes nothing, bit for bit; the matrix
calls a planted language-specific effect causal and a planted shared one not; bad inputs are one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

from mlalign.analysis.ablation import (ablated_dlm_loss, ablation_matrix, ablation_statements, check_k,
                                       matched_random_features)
from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.analysis.engine import lm_loss_per_row
from mlalign.analysis.spliced import token_batches
from mlalign.errors import UserError

LAYER = 13


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    cfg = compose_cfg(["model=testbed", *bed_overrides(testbed_dir)])
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    corpus = load_corpus(cfg.data, ["en", "hi"], "dev")
    texts = {lang: corpus[lang][:10] for lang in ("en", "hi")}
    batches = {lang: token_batches(tokenizer, texts[lang], batch_size=4, max_length=48) for lang in texts}
    return model, tokenizer, batches


def _residuals(model, batches) -> torch.Tensor:
    out = []
    with ResidualCapture(model, [LAYER], stop_after_last=True) as capture:
        for batch in batches:
            hidden = capture.forward(**batch.inputs("cpu"), use_cache=False)[LAYER]
            out.append(hidden[batch.keep])
    return torch.cat(out)


def _loss_gradient_direction(model, batches, w: torch.Tensor, shift: float) -> torch.Tensor:
    """The unit direction d along which removing a(x) d from layer LAYER's residual (a = relu(x.w - shift), at every
    analysed position, as the ablation does) raises the summed per-sentence mean loss fastest: d = g / |g| with g the
    loss's gradient w.r.t. d at d = 0. To first order the ablation then raises the loss by |g| times the scale."""
    d = torch.zeros(w.shape[0], requires_grad=True)
    block = decoder_layers(model)[LAYER]
    total = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        keep = batch.keep

        def hook(_module, _inputs, output, keep=keep):
            hidden = output[0] if isinstance(output, tuple) else output
            a = (hidden @ w - shift).clamp_min(0) * keep
            moved = hidden - a.unsqueeze(-1) * d
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        handle = block.register_forward_hook(hook)
        try:
            inputs = batch.inputs("cpu")
            summed, predicted = lm_loss_per_row(model(**inputs, use_cache=False).logits, inputs)
        finally:
            handle.remove()
        total = total + (summed / predicted).sum()
    (g,) = torch.autograd.grad(total, d)
    return g / g.norm()


@pytest.fixture(scope="module")
def hindi_only_sae(bed):
    """A 4-feature JumpReLU SAE whose feature 0 reads the Hindi-minus-English mean direction w, shifted so that it is
    positive only above every English token's projection (a = relu(x.w - max_en x.w), never firing on English), and
    writes the direction along which removing it raises Hindi's loss fastest (`_loss_gradient_direction`), scaled so
    that a typical activation writes a tenth of a residual norm. The answer is known by construction on any build of
    the testbed: a random direction would leave the sign of the loss change to the weights (the build's numerics
    differ across CPUs), the loss gradient fixes it. Features 1-3 never fire."""
    model, _, batches = bed
    x_en, x_hi = _residuals(model, batches["en"]), _residuals(model, batches["hi"])
    w = x_hi.mean(0) - x_en.mean(0)
    w = w / w.norm()
    shift = float((x_en @ w).max()) + 1e-3
    acts = (x_hi @ w - shift).clamp_min(0)
    assert (acts > 0).float().mean() > 0.5  # it fires on most Hindi tokens
    u = _loss_gradient_direction(model, batches["hi"], w, shift)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=x_en.shape[1], d_sae=4))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = w
        sae.b_enc.zero_()
        sae.b_enc[0] = -shift
        sae.W_dec.zero_()
        sae.W_dec[0] = u * 0.1 * x_hi.norm(dim=1).mean() / acts[acts > 0].mean()
        sae.b_dec.zero_()
        sae.threshold.fill_(1e6)
        sae.threshold[0] = 1e-6
    return sae


def test_ablating_a_hindi_only_feature_raises_hindi_loss_and_leaves_english_exactly_unchanged(bed, hindi_only_sae):
    model, _, batches = bed
    hi = ablated_dlm_loss(model, hindi_only_sae, LAYER, batches["hi"], {"f0": [0]}, device="cpu")["f0"]
    en = ablated_dlm_loss(model, hindi_only_sae, LAYER, batches["en"], {"f0": [0]}, device="cpu")["f0"]
    assert np.array_equal(en, np.zeros_like(en))  # it never fires on English: not a bit changes
    assert hi.mean() > 0.01 and (hi > 0).mean() >= 0.8, hi


def test_ablating_no_feature_or_features_that_never_fire_changes_nothing_exactly(bed, hindi_only_sae):
    model, _, batches = bed
    out = ablated_dlm_loss(model, hindi_only_sae, LAYER, batches["hi"], {"none": [], "silent": [1, 2, 3]},
                           device="cpu")
    for name in ("none", "silent"):
        assert np.array_equal(out[name], np.zeros(len(out[name]))), name


def test_several_sets_in_one_stacked_forward_equal_each_set_alone(bed, hindi_only_sae):
    model, _, batches = bed
    together = ablated_dlm_loss(model, hindi_only_sae, LAYER, batches["hi"], {"a": [0], "b": [1]}, device="cpu")
    alone = ablated_dlm_loss(model, hindi_only_sae, LAYER, batches["hi"], {"a": [0]}, device="cpu")
    np.testing.assert_allclose(together["a"], alone["a"], rtol=1e-5, atol=1e-6)


def test_matched_random_features_avoid_the_chosen_ones_and_match_their_firing_rates():
    rate = np.concatenate([np.full(50, 1e-3), np.full(50, 1e-1), np.zeros(10)])
    chosen = [0, 1, 60]
    picked = matched_random_features(rate, chosen, seed=0, pool=5)
    assert len(picked) == 3 and len(set(picked)) == 3 and not set(picked) & set(chosen)
    assert [rate[f] for f in picked] == [1e-3, 1e-3, 1e-1]
    assert picked == matched_random_features(rate, chosen, seed=0, pool=5)  # seeded
    assert matched_random_features(rate, [], seed=0) == []


def _planted(n=40, seed=0):
    rng = np.random.default_rng(seed)
    noise = lambda: 0.01 * rng.standard_normal(n)  # noqa: E731
    # hi's features raise hi's loss by 0.2, nothing else; es's raise every language's loss by 0.2 alike.
    deltas = {"hi": {"en": noise(), "es": noise(), "hi": 0.2 + noise()},
              "es": {"en": 0.2 + noise(), "es": 0.2 + noise(), "hi": 0.2 + noise()}}
    random = {a: {e: noise() for e in ("en", "es", "hi")} for a in deltas}
    from mlalign.analysis.bootstrap import resample_counts

    counts = resample_counts(n, 200, 0)
    return deltas, random, {lang: counts for lang in ("en", "es", "hi")}


def test_the_matrix_calls_a_language_specific_effect_causal_and_a_shared_one_not():
    deltas, random, counts = _planted()
    result = ablation_matrix(deltas, random, counts, 0.95)
    assert result["comparisons"]["hi"]["causal"] is True
    assert result["comparisons"]["es"]["causal"] is False
    cell = result["matrix"]["hi"]["hi"]
    assert cell["ci"][0] <= cell["dlm_loss"] <= cell["ci"][1] and cell["dlm_loss"] == pytest.approx(0.2, abs=0.01)
    statements = ablation_statements(result, {"hi": "Hindi", "es": "Spanish"}, {"hi": 3, "es": 3}, 7, 0.95)
    assert "these are Hindi's features" in statements[1] or "these are Hindi's features" in statements[0]
    spanish = next(s for s in statements if s.startswith("Spanish"))
    assert "Not shown to be Spanish's features" in spanish and "not larger than in en, hi" in spanish


def test_bad_inputs_are_one_clear_line(bed):
    from mlalign.analysis.causal import resolve_layer
    from mlalign.analysis.features import FeatureSums, analyze_features, specific_features

    with pytest.raises(UserError, match=">= 1"):
        check_k(0, "analysis.features.ablate.k")
    with pytest.raises(UserError, match="not an analysed layer"):
        resolve_layer(5, [3, 13], "analysis.features.ablate.layer")
    assert resolve_layer(None, [13, 3, 20], "x") == 13
    rng = np.random.default_rng(0)

    def sums():
        return FeatureSums(n_tokens=np.asarray(100.0), n_sentences=np.asarray(10.0), act_sum=rng.random(8) * 10,
                           fire_count=np.full(8, 50.0), sentences_fired=np.full(8, 10.0))

    report = analyze_features({"en": {3: sums()}, "hi": {3: sums()}}, "en")
    for k in (0, -2):
        with pytest.raises(UserError, match="k must be >= 1"):
            specific_features(report, "hi", 3, k)
    with pytest.raises(UserError, match="language 'xx' was not analysed"):
        specific_features(report, "xx", 3, 5)
    with pytest.raises(UserError, match="layer 4 was not analysed"):
        specific_features(report, "hi", 4, 5)
