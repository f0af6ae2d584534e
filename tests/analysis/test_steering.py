"""Steering on the testbed: alpha 0 reproduces unsteered greedy generation token for token (and a large alpha does
change it, so the hook is live); the direction is a unit vector; the shares per alpha are counted as defined."""

from __future__ import annotations

import pytest
import torch

from mlalign.analysis.steering import feature_direction, greedy_generate, steering_results
from tests.analysis.testkit import jumprelu_sae

LAYER = 13


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    cfg = compose_cfg(["model=testbed", *bed_overrides(testbed_dir)])
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    prompts = load_corpus(cfg.data, ["en"], "dev")["en"][:6]
    return model, tokenizer, prompts


def test_alpha_zero_reproduces_unsteered_generation_token_for_token(bed):
    model, tokenizer, prompts = bed
    d = model.config.hidden_size
    direction = feature_direction(jumprelu_sae(d, 32, seed=0), [1, 5, 7])
    kwargs = dict(max_length=48, device="cpu", batch_size=4)
    plain = greedy_generate(model, tokenizer, prompts, 10, **kwargs)
    zero = greedy_generate(model, tokenizer, prompts, 10, layer=LAYER, vector=0.0 * direction, **kwargs)
    assert zero == plain and all(len(row) > 0 for row in plain)
    # A vector many residual norms long changes the generations: the hook is applied.
    pushed = greedy_generate(model, tokenizer, prompts, 10, layer=LAYER, vector=200.0 * direction, **kwargs)
    assert pushed != plain


def test_the_direction_is_the_normalised_mean_of_unit_decoder_rows():
    sae = jumprelu_sae(16, 32, seed=3)
    direction = feature_direction(sae, [2, 9])
    rows = sae.W_dec.detach()[[2, 9]]
    expected = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
    torch.testing.assert_close(direction, expected / expected.norm())
    assert torch.equal(feature_direction(sae, []), torch.zeros(16))


def test_shares_per_alpha_with_the_baseline_shared_and_zero_always_first():
    calls = []

    def generate(vector):
        calls.append(None if vector is None else float(vector.norm()))
        if vector is None:
            return ["en"] * 4
        # The language's own direction (x axis) makes half the texts Hindi at alpha 1 and all at alpha 2.
        return ["hi"] * min(4, int(2 * float(vector[0]))) + ["en"] * (4 - min(4, int(2 * float(vector[0]))))

    directions = {"hi": (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))}
    results = steering_results(generate, lambda texts: list(texts), directions, [2.0, 1.0], scale=1.0)
    rows = results["hi"]
    assert [r["alpha"] for r in rows] == [0.0, 1.0, 2.0]
    assert [r["share_in_lang"] for r in rows] == [0.0, 0.5, 1.0]
    assert [r["share_in_lang_random"] for r in rows] == [0.0, 0.0, 0.0]
    assert calls.count(None) == 1  # one unsteered baseline for every language and arm


def test_repetitive_generations_are_counted_and_left_out_of_the_not_repetitive_share():
    """What a large push does on Gemma 3 270M: the identifier still labels a looping decode ("iliiliili...") with a
    language. At alpha 2 the own direction gives 2 fluent and 2 looping Hindi texts: share in the language 1.0, of it
    not repetitive 0.5; the random direction loops in English (repetitive 1.0, not Hindi)."""
    from mlalign.analysis.steering import REPETITIVE_COMPRESSION, compression_ratio

    fluent = "यह एक सामान्य वाक्य है जिसमें कई अलग शब्द हैं"
    looping = "इलि" * 40

    def generate(vector):
        if vector is None:
            return ["The police were not prepared to let the protesters go."] * 4
        if float(vector[0]) > 0:
            return [fluent, fluent, looping, looping]
        return ["the the the the the the the the the the the the the the the the the the"] * 4

    def identify(texts):
        return ["hi" if text[0] in "यइ" else "en" for text in texts]

    directions = {"hi": (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))}
    row = steering_results(generate, identify, directions, [2.0], scale=1.0)["hi"][1]
    assert (row["share_in_lang"], row["share_in_lang_not_repetitive"], row["share_repetitive"]) == (1.0, 0.5, 0.5)
    assert (row["share_in_lang_random"], row["share_repetitive_random"]) == (0.0, 1.0)
    assert row["share_in_lang_not_repetitive_random"] == 0.0
    baseline = steering_results(generate, identify, directions, [2.0], scale=1.0)["hi"][0]
    assert baseline["share_repetitive"] == 0.0 == baseline["share_repetitive_random"]
    assert compression_ratio(looping) > REPETITIVE_COMPRESSION > compression_ratio(fluent)
    assert compression_ratio("") == 0.0


def test_the_alpha_unit_is_the_centred_rms_residual_which_a_constant_offset_does_not_move(bed):
    """A near-constant component (Gemma 3 270M: 93-98% of the norm) must not set steering's unit: the scale equals
    sqrt(mean ||x - x̄||²) from a plain capture, and adding a huge constant vector at the layer leaves it unchanged."""
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions, pad_batch
    from mlalign.analysis.steering import centred_residual_scale

    model, tokenizer, prompts = bed
    scale = centred_residual_scale(model, tokenizer, prompts, LAYER, max_length=48, device="cpu", batch_size=4)
    rows = tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=48)["input_ids"]
    inputs = pad_batch(rows, tokenizer.pad_token_id or 0, "right", torch.device("cpu"))
    keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
    with ResidualCapture(model, [LAYER]) as capture:
        x = capture.forward(**inputs)[LAYER][keep].double()
    assert scale == pytest.approx(float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt()), rel=1e-6)
    uncentred = float(x.norm(dim=1).mean())

    from mlalign.analysis.capture import decoder_layers

    offset = torch.zeros(model.config.hidden_size)
    offset[0] = 50.0 * uncentred  # a constant dimension far larger than anything that varies
    handle = decoder_layers(model)[LAYER].register_forward_hook(
        lambda _m, _i, out: (out[0] + offset, *out[1:]) if isinstance(out, tuple) else out + offset)
    try:
        shifted = centred_residual_scale(model, tokenizer, prompts, LAYER, max_length=48, device="cpu", batch_size=4)
    finally:
        handle.remove()
    assert shifted == pytest.approx(scale, rel=1e-4)
