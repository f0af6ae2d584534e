"""The loss's differentiable SAE code against sae-lens's own encode: the same values, and gradient where it should be."""

from __future__ import annotations

import torch

from mlalign.saes.surrogates import (decoder_norms_of, feature_activations, jumprelu, sae_pre_activations, ste_code,
                                     ste_step, threshold_of)
from tests.analysis.testkit import identity_sae, jumprelu_sae


def test_jumprelu_of_the_pre_activations_is_saelens_encode():
    sae, x = jumprelu_sae(8, 32, seed=0, threshold=0.2), torch.randn(20, 8)
    code = jumprelu(sae_pre_activations(sae, x), threshold_of(sae))
    assert (code != 0).any() and (code == 0).any()
    torch.testing.assert_close(code, sae.encode(x))
    torch.testing.assert_close(feature_activations(sae, x), sae.encode(x))


def test_an_sae_without_a_threshold_gates_at_zero():
    sae, x = identity_sae(4), torch.randn(10, 4)
    assert float(threshold_of(sae)) == 0.0
    torch.testing.assert_close(jumprelu(sae_pre_activations(sae, x), threshold_of(sae)), sae.encode(x))


def test_decoder_norms_are_one_row_of_the_decoders_row_norms():
    sae = jumprelu_sae(8, 32, seed=1)
    norms = decoder_norms_of(sae)
    assert norms.shape == (1, 32) and not norms.requires_grad
    torch.testing.assert_close(norms[0], sae.W_dec.detach().norm(dim=1))


def test_the_straight_through_code_has_the_exact_values_and_a_gradient_just_below_the_threshold():
    threshold = torch.full((3,), 0.5)
    pre = torch.tensor([[0.48, 0.9, -1.0]], requires_grad=True)  # inside the 0.45..0.55 window, above, far below
    code = ste_code(pre, threshold, 0.1)
    torch.testing.assert_close(code.detach(), jumprelu(pre.detach(), threshold))
    grad = torch.autograd.grad(code.sum(), pre)[0][0]
    assert grad[0] > 0 and grad[1] == 1 and grad[2] == 0
    count = ste_step(pre, threshold, 0.1)
    assert count.detach().tolist() == [[0.0, 1.0, 0.0]]
    assert torch.autograd.grad(count.sum(), pre)[0][0, 0] > 0
