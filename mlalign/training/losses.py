"""The activation-aware LoRA objective: LM cross-entropy, SAE activation alignment to English, and English retention.

Formulas (see docs/training.md). For a layer l with SAE (W_enc, b_enc, θ) and kept tokens t (no BOS, no padding):

    h_tf = (process_sae_in(x_t) @ W_enc + b_enc)_f                 SAE pre-activations
    metric:   a_l = mean_t mean_f  h_tf · 1[h_tf > θ_f]              (= analysis `mean_act`)
    pre_relu: â_l = mean_t mean_f  softplus(h_tf − θ_f)              (smooth, every feature has a gradient)
    ste:      â_l = a_l in the forward pass; backward: sae-lens's JumpReLU straight-through estimator
                    ∂/∂h = 1[h > θ] + (θ/ε)·1[|h − θ| < ε/2]   (ε = loss.ste_bandwidth)

With a_T the target language's surrogate under the adapter and a_R English's on the parallel batch under the frozen
base model (no grad), averaged over the aligned layers L:

    relative_hinge: mean_l relu(1 + margin − â_T,l / â_R,l)
    hinge:          mean_l relu((1 + margin)·â_R,l − â_T,l)
    mse:            mean_l (â_T,l − â_R,l)²                 (two-sided: also pulls an overshoot back)
    log_ratio:      mean_l relu(log(1 + margin) + log â_R,l − log â_T,l)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlalign.errors import UserError

ACT_ALIGN_KINDS = ("relative_hinge", "hinge", "mse", "log_ratio")
SURROGATES = ("pre_relu", "ste")
RETAIN_KINDS = ("kl", "act_mse")
LOSS_TERMS = ("ce", "act_align", "en_retain")
EPS = 1e-8


def check_loss_config(loss_cfg) -> None:
    """Fail before any model loads on a loss config that cannot train."""
    weights = {term: float(loss_cfg[term]) for term in LOSS_TERMS}
    negative = [term for term, w in weights.items() if w < 0]
    if negative:
        raise UserError(f"loss.{negative[0]}={weights[negative[0]]} is negative; loss weights must be >= 0")
    if not any(weights.values()):
        raise UserError("every loss weight is 0 (loss.ce, loss.act_align, loss.en_retain): nothing to train; "
                        "use loss=plain for plain LoRA or loss=act_align for the activation-aware objective")
    for key, allowed in (("act_align_kind", ACT_ALIGN_KINDS), ("surrogate", SURROGATES), ("retain_kind", RETAIN_KINDS)):
        if str(loss_cfg[key]) not in allowed:
            raise UserError(f"unknown loss.{key}={loss_cfg[key]!r}; use one of: {', '.join(allowed)}")
    if float(loss_cfg.get("margin", 0.0)) < 0:
        raise UserError(f"loss.margin={loss_cfg.margin} is negative; use a margin >= 0 (0 = reach English's level)")
    if str(loss_cfg.surrogate) == "ste" and not float(loss_cfg.get("ste_bandwidth", 0.1)) > 0:
        raise UserError(f"loss.ste_bandwidth={loss_cfg.ste_bandwidth} must be > 0 for surrogate=ste")


def sae_pre_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """[tokens, d_sae] pre-activations `x @ W_enc + b_enc` after the SAE's own input processing (b_dec, norm)."""
    sae_in = sae.process_sae_in(x)
    return sae_in @ sae.W_enc + sae.b_enc


def threshold_of(sae) -> torch.Tensor:
    """JumpReLU threshold; SAEs without one (ReLU) gate at 0."""
    threshold = getattr(sae, "threshold", None)
    return threshold if threshold is not None else torch.zeros((), device=sae.W_enc.device, dtype=sae.W_enc.dtype)


def surrogate_activation(sae, x: torch.Tensor, surrogate: str, bandwidth: float = 0.1) -> torch.Tensor:
    """Differentiable stand-in for the mean SAE feature activation over the tokens `x` [tokens, d_model] (a scalar)."""
    pre = sae_pre_activations(sae, x)
    threshold = threshold_of(sae).to(pre.dtype)
    if surrogate == "pre_relu":
        return F.softplus(pre - threshold).mean()
    if surrogate == "ste":
        from sae_lens.saes.jumprelu_sae import JumpReLU

        # ste_to_input=True: the pseudo-derivative near the threshold reaches the pre-activations (and so the LoRA
        # weights), not just the threshold, which is frozen here anyway.
        gated = JumpReLU.apply(F.relu(pre), threshold, float(bandwidth), True)
        return gated.mean()
    raise UserError(f"unknown loss.surrogate={surrogate!r}; use one of: {', '.join(SURROGATES)}")


def feature_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's own (JumpReLU) feature activations [tokens, d_sae]; gradient flows through active features."""
    return sae.encode(x)


def act_align_loss(target: torch.Tensor, reference: torch.Tensor, kind: str, margin: float = 0.0) -> torch.Tensor:
    """Penalty for the target language's per-layer activation levels `target` [layers] being below `reference`."""
    reference = reference.detach()
    if kind == "relative_hinge":
        return F.relu(1.0 + margin - target / reference.clamp_min(EPS)).mean()
    if kind == "hinge":
        return F.relu((1.0 + margin) * reference - target).mean()
    if kind == "mse":
        return (target - reference).pow(2).mean()
    if kind == "log_ratio":
        gap = math.log1p(margin) + reference.clamp_min(EPS).log() - target.clamp_min(EPS).log()
        return F.relu(gap).mean()
    raise UserError(f"unknown loss.act_align_kind={kind!r}; use one of: {', '.join(ACT_ALIGN_KINDS)}")


def lm_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-padding) target tokens."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def lm_cross_entropy_sum(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(summed cross-entropy, number of predicted tokens) for token-weighted averages over many batches."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return float(total), int((labels != -100).sum())


def kl_base_to_adapted(base_logits: torch.Tensor, adapted_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_adapted) of next-token distributions, averaged over real tokens (`mask` [batch, seq])."""
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    adapted_logp = F.log_softmax(adapted_logits.float(), dim=-1)
    per_token = (base_logp.exp() * (base_logp - adapted_logp)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def relative_act_mse(adapted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """||f_adapted − f_base||² / ||f_base||² over tokens and features: scale-free across layers and SAE widths."""
    base = base.detach()
    return (adapted - base).pow(2).sum() / base.pow(2).sum().clamp_min(EPS)
