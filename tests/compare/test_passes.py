"""Steering and pooled residuals on the testbed: alpha 0 is the base model bit for bit; pooling drops BOS and padding."""

from __future__ import annotations

import pytest
import torch

from mlalign.compare.passes import pooled_residuals, residual_tokens, steering, steering_vectors


@pytest.fixture(scope="module")
def model_and_tokenizer(testbed_dir):
    from mlalign.models import load_model, load_tokenizer
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["model=testbed", f"model.hf_id={testbed_dir / 'model'}"])
    return load_model(cfg.model), load_tokenizer(cfg.model, None)


SENTENCES = {"en": ["The cat sat on the mat.", "Rain fell all day over the hills."],
             "hi": ["बिल्ली चटाई पर बैठी।", "पूरे दिन पहाड़ियों पर बारिश होती रही।"]}


def _logits(model, tokenizer, texts):
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


def test_steering_at_alpha_zero_is_the_base_model_exactly(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    layers = [4, 15]
    tokens = {lang: residual_tokens(model, tokenizer, texts, layers) for lang, texts in SENTENCES.items()}
    vectors = steering_vectors(tokens["en"], tokens["hi"])
    assert all(float(v.norm()) > 0 for v in vectors.values())
    base = _logits(model, tokenizer, SENTENCES["hi"])
    with steering(model, vectors, 0.0):
        zero = _logits(model, tokenizer, SENTENCES["hi"])
    with steering(model, vectors, 1.0):
        steered = _logits(model, tokenizer, SENTENCES["hi"])
    assert torch.equal(zero, base)
    assert not torch.allclose(steered, base)
    assert torch.equal(_logits(model, tokenizer, SENTENCES["hi"]), base)  # the hooks are gone afterwards


def test_steering_moves_the_target_mean_residual_by_alpha_times_the_vector(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokens = {lang: residual_tokens(model, tokenizer, texts, [4]) for lang, texts in SENTENCES.items()}
    vectors = steering_vectors(tokens["en"], tokens["hi"])
    with steering(model, vectors, 0.5):
        moved = residual_tokens(model, tokenizer, SENTENCES["hi"], [4])[4]
    shift = moved.double().mean(0) - tokens["hi"][4].double().mean(0)
    assert torch.allclose(shift, 0.5 * vectors[4].double(), atol=1e-4)


def test_pooled_residuals_are_the_mean_over_analysed_tokens_whatever_the_batch(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = SENTENCES["en"] + SENTENCES["hi"]
    one = pooled_residuals(model, tokenizer, texts, [4], batch_size=1)[4]
    four = pooled_residuals(model, tokenizer, texts, [4], batch_size=4)[4]
    assert torch.allclose(torch.from_numpy(one), torch.from_numpy(four), atol=1e-5)
    tokens = residual_tokens(model, tokenizer, texts[:1], [4])[4]  # sentence 0's analysed tokens (no BOS)
    assert torch.allclose(torch.from_numpy(one[0]).float(), tokens.mean(0), atol=1e-5)
