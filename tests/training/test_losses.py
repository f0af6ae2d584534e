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
    base = dict(ce=1.0, act_align=1.0, sae_fidelity=1.0, en_retain=1.0, act_align_kind="relative_hinge", margin=0.0,
                surrogate="pre_relu", ste_bandwidth=0.1, retain_kind="kl", layers=None)
    return OmegaConf.create({**base, **overrides})


@pytest.mark.parametrize("surrogate", [None, "pre_relu", "ste"])
@pytest.mark.parametrize("metric", L.alignable_metrics())
def test_level_value_is_the_analysis_metric_whatever_the_surrogate(surrogate, metric):
    sae, x = make_sae(threshold=0.2), torch.randn(20, 8)
    acts = sae.encode(x)
    expected = {"mean_act": acts.mean(), "l1": acts.abs().sum(-1).mean(), "l0": (acts != 0).sum(-1).float().mean(),
                "dec_weighted_act": (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()}
    assert torch.allclose(L.metric_level(sae, x, metric, "token", None, surrogate), expected[metric], atol=1e-6)


def test_sentence_aggregate_is_the_mean_of_sentence_means():
    sae, x = make_sae(threshold=0.2), torch.randn(5, 8)
    sentence = torch.tensor([0, 0, 0, 0, 1])
    per_token = sae.encode(x).mean(-1)
    expected = (per_token[:4].mean() + per_token[4]) / 2
    assert torch.allclose(L.metric_level(sae, x, "mean_act", "sentence", sentence), expected, atol=1e-7)


@pytest.mark.parametrize("surrogate", ["pre_relu", "ste"])
@pytest.mark.parametrize("kind", L.ACT_ALIGN_KINDS)
def test_at_parity_the_alignment_loss_and_its_gradient_are_zero(surrogate, kind):
    sae = make_sae(threshold=0.2)
    x = torch.randn(30, 8, requires_grad=True)
    reference = L.metric_level(sae, x.detach(), "mean_act")  # English exactly at the target's level
    level = L.metric_level(sae, x, "mean_act", surrogate=surrogate)
    loss = L.act_align_loss(level.unsqueeze(0), reference.unsqueeze(0), kind)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    assert loss.item() == 0.0
    assert grad is None or grad.abs().max() == 0


@pytest.mark.parametrize("surrogate", ["pre_relu", "ste"])
def test_below_parity_one_gradient_step_raises_the_exact_metric(surrogate):
    sae = make_sae(threshold=0.2)
    x = torch.randn(30, 8, requires_grad=True)
    before = L.metric_level(sae, x.detach(), "mean_act")
    level = L.metric_level(sae, x, "mean_act", surrogate=surrogate)
    loss = L.act_align_loss(level.unsqueeze(0), 1.5 * before.unsqueeze(0), "relative_hinge")
    assert loss.item() == pytest.approx(1.0 - 1.0 / 1.5, rel=1e-5)  # the hinge reads the metric, not a surrogate
    (grad,) = torch.autograd.grad(loss, x)
    after = L.metric_level(sae, (x - 0.05 * grad).detach(), "mean_act")
    assert after > before


def test_fidelity_loss_is_zero_at_or_below_the_base_fvu_and_grows_with_the_rise():
    base = torch.tensor([0.1, 0.2])
    assert L.fidelity_loss(torch.tensor([0.1, 0.1]), base) == 0
    assert L.fidelity_loss(torch.tensor([0.2, 0.2]), base) == pytest.approx(0.5)


def test_batch_fvu_matches_its_definition():
    sae = make_sae(threshold=0.2)
    x = torch.randn(50, 8)
    x_hat = sae.decode(sae.encode(x))
    expected = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert torch.allclose(L.batch_fvu(sae, x), expected)


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
    surrogate_value = L.metric_level(sae, x, "mean_act", surrogate=surrogate, bandwidth=0.1)
    assert surrogate_value.item() == 0.0  # the value is still the exact metric
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
    (dict(ce=0.0, act_align=0.0, sae_fidelity=0.0, en_retain=0.0), "every loss weight is 0"),
    (dict(act_align=-1.0), "negative"),
    (dict(act_align_kind="cosine"), "act_align_kind"),
    (dict(surrogate="sigmoid"), "surrogate"),
    (dict(retain_kind="l2"), "retain_kind"),
])
def test_bad_loss_configs_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        L.check_loss_config(loss_cfg(**overrides))
    L.check_loss_config(loss_cfg(ce=0.0, en_retain=0.0))  # one non-zero weight is enough
