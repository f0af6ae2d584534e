"""The loss terms: surrogates carry gradient where JumpReLU does not, penalties are one-sided, bad configs are refused."""

import pytest
import torch
from omegaconf import OmegaConf
from sae_lens import JumpReLUSAE

from mlalign.errors import UserError
from mlalign.training import losses as L
from tests.analysis.testkit import jumprelu_sae


def make_sae(d_in=8, d_sae=32, threshold=0.5, seed=0) -> JumpReLUSAE:
    """The analysis tests' seeded SAE, frozen as in training, with a zero encoder bias."""
    sae = jumprelu_sae(d_in, d_sae, seed, threshold)
    with torch.no_grad():
        sae.b_enc.zero_()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def loss_cfg(**overrides):
    base = dict(ce=1.0, act_align=1.0, en_retain=1.0, act_align_kind="relative_hinge", margin=0.0,
                surrogate="pre_relu", ste_bandwidth=0.1, retain_kind="kl", layers=None)
    return OmegaConf.create({**base, **overrides})


def test_ste_forward_is_the_analysis_metric():
    sae, x = make_sae(), torch.randn(20, 8)
    assert torch.allclose(L.surrogate_activation(sae, x, "ste", 0.1), sae.encode(x).mean(), atol=1e-6)


@pytest.mark.parametrize("surrogate", ["pre_relu", "ste"])
def test_surrogates_give_gradient_where_jumprelu_gives_none(surrogate):
    # Every pre-activation ~0.48, just below the 0.5 threshold (inside the STE window 0.45..0.55): encode() is all
    # zero there and passes no gradient to the input.
    sae = make_sae(threshold=0.5)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(0.48)
    x = (1e-3 * torch.randn(16, 8)).requires_grad_(True)
    assert sae.encode(x).abs().sum() == 0
    grad_jump = torch.autograd.grad(sae.encode(x).mean(), x, allow_unused=True)[0]
    assert grad_jump is None or grad_jump.abs().sum() == 0
    surrogate_value = L.surrogate_activation(sae, x, surrogate, bandwidth=0.1)
    grad = torch.autograd.grad(surrogate_value, x)[0]
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("kind", L.ACT_ALIGN_KINDS)
def test_act_align_penalises_a_target_below_the_reference(kind):
    reference = torch.tensor([2.0, 4.0])
    below = L.act_align_loss(torch.tensor([1.0, 2.0]), reference, kind)
    equal = L.act_align_loss(reference.clone(), reference, kind)
    assert below > 0 and equal == 0
    above = L.act_align_loss(torch.tensor([3.0, 5.0]), reference, kind)
    assert (above > 0) == (kind == "mse")  # only mse is two-sided


def test_margin_moves_the_hinge():
    reference = torch.tensor([1.0])
    assert L.act_align_loss(torch.tensor([1.05]), reference, "relative_hinge", margin=0.1) == pytest.approx(0.05, abs=1e-6)
    assert L.act_align_loss(torch.tensor([1.2]), reference, "relative_hinge", margin=0.1) == 0


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert L.kl_base_to_adapted(logits, logits, mask).abs() < 1e-6
    assert L.kl_base_to_adapted(logits, logits + torch.randn_like(logits), mask) > 0


def test_lm_cross_entropy_ignores_padding():
    logits = torch.randn(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 0]])
    padded = L.lm_cross_entropy(logits, ids, torch.tensor([[1, 1, 1, 0]]))
    changed = logits.clone()
    changed[0, 2] += 100.0  # the prediction made at position 2 is of a padding token
    assert torch.allclose(L.lm_cross_entropy(changed, ids, torch.tensor([[1, 1, 1, 0]])), padded)


@pytest.mark.parametrize("overrides, message", [
    (dict(ce=0.0, act_align=0.0, en_retain=0.0), "every loss weight is 0"),
    (dict(act_align=-1.0), "negative"),
    (dict(act_align_kind="cosine"), "act_align_kind"),
    (dict(surrogate="sigmoid"), "surrogate"),
    (dict(retain_kind="l2"), "retain_kind"),
])
def test_bad_loss_configs_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        L.check_loss_config(loss_cfg(**overrides))
    L.check_loss_config(loss_cfg(ce=0.0, en_retain=0.0))  # one non-zero weight is enough
