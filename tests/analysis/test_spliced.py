"""Spliced-in LM loss on the testbed: an exact reconstruction costs exactly 0, a zero reconstruction costs loss, and
the per-sentence values match a spliced forward built by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sae_lens import StandardSAE, StandardSAEConfig

from mlalign.analysis.capture import decoder_layers
from mlalign.analysis.spliced import (clean_and_spliced_loss, clean_lm_loss, spliced_dlm_loss, token_batches)
from tests.analysis.testkit import identity_sae

LAYERS = [2, 13]


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from mlalign.saes import load_saes
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    cfg = compose_cfg(["model=testbed", *bed_overrides(testbed_dir)])
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    saes = load_saes(cfg.sae, LAYERS, model.config.hidden_size, progress=False)
    texts = load_corpus(cfg.data, ["hi"], "dev")["hi"][:12]
    # Batches of 5 leave a short last batch and padding in every batch (sentences differ in length).
    return model, tokenizer, saes, texts, token_batches(tokenizer, texts, batch_size=5, max_length=48)


def zero_sae(d_in: int) -> StandardSAE:
    """Reconstructs every residual as the zero vector."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def test_an_exact_reconstruction_costs_exactly_zero(bed):
    model, _, _, texts, batches = bed
    d = model.config.hidden_size
    delta = spliced_dlm_loss(model, {layer: identity_sae(d) for layer in LAYERS}, batches, LAYERS, device="cpu")
    assert set(delta) == set(LAYERS)
    for layer in LAYERS:
        assert delta[layer].shape == (len(texts),)
        assert np.array_equal(delta[layer], np.zeros(len(texts)))


def test_a_zero_reconstruction_costs_loss(bed):
    model, _, _, texts, batches = bed
    d = model.config.hidden_size
    delta = spliced_dlm_loss(model, {layer: zero_sae(d) for layer in LAYERS}, batches, LAYERS, device="cpu")
    clean = clean_lm_loss(model, batches, device="cpu")
    assert np.all(np.isfinite(clean)) and np.all(clean > 0)
    for layer in LAYERS:
        # The small testbed is pretrained for 30 steps and leans little on context, so the cost is small (0.01-0.06
        # nats/token) yet positive on average and in most sentences.
        assert delta[layer].mean() > 0.005, (layer, delta[layer])
        assert (delta[layer] > 0).mean() >= 0.8, (layer, delta[layer])


def hand_spliced_loss(model, tokenizer, sae, layer: int, text: str) -> tuple[float, float]:
    """(clean, spliced) mean next-token loss of one unpadded sentence, with decoder layer `layer`'s output at every
    position but BOS (position 0) replaced by sae.decode(sae.encode(.)) inside the hook."""
    ids = torch.tensor([tokenizer(text, truncation=True, max_length=48)["input_ids"]])
    assert ids[0, 0].item() == tokenizer.bos_token_id

    def loss(logits):
        return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rest = sae.decode(sae.encode(hidden[:, 1:].float())).to(hidden.dtype)
        spliced = torch.cat([hidden[:, :1], rest], dim=1)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    with torch.no_grad():
        clean = loss(model(input_ids=ids).logits)
        handle = decoder_layers(model)[layer].register_forward_hook(hook)
        try:
            spliced = loss(model(input_ids=ids).logits)
        finally:
            handle.remove()
    return clean, spliced


def test_per_sentence_values_match_a_hand_built_spliced_forward(bed):
    model, tokenizer, saes, texts, batches = bed
    clean, spliced = clean_and_spliced_loss(model, saes, batches, LAYERS, device="cpu")
    delta = spliced_dlm_loss(model, saes, batches, LAYERS, device="cpu")
    for i in (0, 3, 7, 11):
        for layer in LAYERS:
            hand_clean, hand_spliced = hand_spliced_loss(model, tokenizer, saes[layer], layer, texts[i])
            assert clean[i] == pytest.approx(hand_clean, abs=1e-5)
            assert spliced[layer][i] == pytest.approx(hand_spliced, abs=1e-5)
            assert delta[layer][i] == pytest.approx(hand_spliced - hand_clean, abs=1e-5)
    # The testbed's SAEs are imperfect, so the matches above are not of zeros: the values are 100x the tolerance on
    # average. Their sign is left to the build (its weights' numerics differ across CPUs: a mean cost > 0 held on one
    # CPU and not on another); the known positive cost of a zero reconstruction is the test above.
    assert all(np.abs(delta[layer]).mean() > 1e-3 for layer in LAYERS), delta


def test_layers_spliced_in_one_stacked_forward_match_one_layer_at_a_time(bed, monkeypatch):
    """The testbed's small vocabulary lets several layers' spliced passes share one forward over stacked copies of
    the batch; each copy must be spliced at its own layer only: the same values as one forward per layer."""
    from mlalign.analysis import spliced

    model, _, saes, _, batches = bed
    stacked = spliced_dlm_loss(model, saes, batches, LAYERS, device="cpu")
    assert len(spliced.copy_groups(LAYERS, 5, 48, model.config.vocab_size)) == 1  # both layers in one forward
    monkeypatch.setattr(spliced, "LOGITS_BUDGET_BYTES", 1)
    one_by_one = spliced_dlm_loss(model, saes, batches, LAYERS, device="cpu")
    for layer in LAYERS:
        np.testing.assert_allclose(stacked[layer], one_by_one[layer], rtol=1e-5, atol=1e-6)
        assert np.any(stacked[layer] != 0)
