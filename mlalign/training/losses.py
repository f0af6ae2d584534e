"""The activation-aware LoRA objective: LM cross-entropy, SAE activation alignment to English, SAE fidelity, English retention.

Formulas (see docs/training.md). For a layer l with SAE (W_enc, b_enc, θ) and kept tokens t (no BOS, no padding):

    h_tf = (process_sae_in(x_t) @ W_enc + b_enc)_f                 SAE pre-activations
    a_tf = h_tf · 1[h_tf > θ_f]                                    JumpReLU feature activations (= sae.encode)
    m_l  = the analysis metric of a_tf (mean_act: mean_t mean_f a_tf), aggregated like the analysis (token/sentence)

The alignment term's value is computed from m_l itself (the reported metric); a differentiable surrogate supplies only
the gradient (straight-through): level_l = m_l + (s_l − stopgrad(s_l)), with

    pre_relu: s_l = mean_t mean_f softplus(h_tf − θ_f)             (every feature has a gradient)
    ste:      s_l = m_l with sae-lens's JumpReLU straight-through pseudo-derivative
                    ∂/∂h = 1[h > θ] + (θ/ε)·1[|h − θ| < ε/2]   (ε = loss.ste_bandwidth)

With level_T the target language under the adapter and m_R English's on the parallel batch under the frozen base model
(no grad), over the aligned layers L:

    relative_hinge: mean_l relu(1 + margin − level_T,l / m_R,l)
    hinge:          mean_l relu((1 + margin)·m_R,l − level_T,l)
    mse:            mean_l (level_T,l − m_R,l)²                 (two-sided: also pulls an overshoot back)
    log_ratio:      mean_l relu(log(1 + margin) + log m_R,l − log level_T,l)

so margin = 0 means "reach English's level of the reported metric", and at that level loss and gradient are 0.

SAE fidelity keeps the adapted residual stream where the SAE works: with FVU_l(x) = Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖²
over the batch's kept tokens (x̂ = sae.decode(sae.encode(x))),

    L_fid = mean over {target batch, English batch} mean_l relu(FVU_l(x_adapted) / FVU_l(x_base) − 1)

on the same tokens, the base model's FVU (no grad) being the yardstick.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlalign.analysis.registry import REGISTRY, DenseView, SoftView, check_aggregate, get_metric
from mlalign.errors import UserError
from mlalign.saes.surrogates import decoder_norms_of, jumprelu, sae_pre_activations, ste_code, ste_step, threshold_of

ACT_ALIGN_KINDS = ("relative_hinge", "hinge", "mse", "log_ratio")
SURROGATES = ("pre_relu", "ste")
RETAIN_KINDS = ("kl", "act_mse")
LOSS_TERMS = ("ce", "act_align", "sae_fidelity", "en_retain")
EPS = 1e-8


def alignable_metrics() -> tuple[str, ...]:
    """Analysis metrics the alignment term can target: the registry's per-token functions of the SAE code."""
    return tuple(name for name, metric in REGISTRY.items() if metric.alignable)


def check_loss_config(loss_cfg) -> None:
    """Fail before any model loads on a loss config that cannot train."""
    weights = {term: float(loss_cfg[term]) for term in LOSS_TERMS}
    negative = [term for term, w in weights.items() if w < 0]
    if negative:
        raise UserError(f"loss.{negative[0]}={weights[negative[0]]} is negative; loss weights must be >= 0")
    if not any(weights.values()):
        raise UserError("every loss weight is 0 (loss.ce, loss.act_align, loss.sae_fidelity, loss.en_retain): "
                        "nothing to train; "
                        "use loss=plain for plain LoRA or loss=act_align for the activation-aware objective")
    for key, allowed in (("act_align_kind", ACT_ALIGN_KINDS), ("surrogate", SURROGATES), ("retain_kind", RETAIN_KINDS)):
        if str(loss_cfg[key]) not in allowed:
            raise UserError(f"unknown loss.{key}={loss_cfg[key]!r}; use one of: {', '.join(allowed)}")
    if float(loss_cfg.get("margin", 0.0)) < 0:
        raise UserError(f"loss.margin={loss_cfg.margin} is negative; use a margin >= 0 (0 = reach English's level)")
    if str(loss_cfg.surrogate) == "ste" and not float(loss_cfg.get("ste_bandwidth", 0.1)) > 0:
        raise UserError(f"loss.ste_bandwidth={loss_cfg.ste_bandwidth} must be > 0 for surrogate=ste")


def alignable_metric(metric: str):
    """The registered metric `metric`, if the alignment term can aim at it."""
    spec = get_metric(metric)
    if not spec.alignable:
        raise UserError(f"loss alignment supports analysis.metric in {', '.join(alignable_metrics())}, got {metric!r}")
    return spec


def per_token_metric(acts: torch.Tensor, metric: str, sae=None) -> torch.Tensor:
    """[tokens] the analysis metric's per-token value from feature activations [tokens, d_sae] (docs/method.md);
    `sae`: the SAE that made them, for metrics that weight features by their decoder rows."""
    norms = None if sae is None else decoder_norms_of(sae)
    return alignable_metric(metric).per_token(DenseView(acts, decoder_norms=norms))


class SteView:
    """JumpReLU's straight-through code (sae-lens's pseudo-derivative) as a `CodeView`: the exact code's values, and
    a gradient near each threshold; counting uses the step function's own estimator."""

    def __init__(self, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float,
                 decoder_norms: torch.Tensor | None = None):
        self.pre, self.threshold, self.bandwidth, self.d_sae = pre, threshold, float(bandwidth), int(pre.shape[-1])
        self.decoder_norms = decoder_norms

    def _gated(self) -> torch.Tensor:
        return ste_code(self.pre, self.threshold, self.bandwidth)

    def row_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        return DenseView(self._gated()).row_sum(weights)

    def row_abs_sum(self) -> torch.Tensor:
        return self._gated().abs().sum(dim=-1)

    def row_count(self) -> torch.Tensor:
        return ste_step(self.pre, self.threshold, self.bandwidth).sum(dim=-1)


def _surrogate_per_token(pre: torch.Tensor, threshold: torch.Tensor, metric: str, surrogate: str,
                         bandwidth: float, decoder_norms: torch.Tensor | None = None) -> torch.Tensor:
    """[tokens] a differentiable stand-in for `per_token_metric` (only its gradient is used): the same registered
    formula, read from a smooth view of the code."""
    if surrogate == "pre_relu":
        view = SoftView(F.softplus(pre - threshold), decoder_norms=decoder_norms)
    elif surrogate == "ste":
        view = SteView(pre, threshold, bandwidth, decoder_norms=decoder_norms)
    else:
        raise UserError(f"unknown loss.surrogate={surrogate!r}; use one of: {', '.join(SURROGATES)}")
    return alignable_metric(metric).per_token(view)


def aggregate_tokens(values: torch.Tensor, sentence_of_token: torch.Tensor | None, aggregate: str) -> torch.Tensor:
    """Mean over tokens (`token`) or mean over sentences of per-sentence means (`sentence`), as the analysis does."""
    if check_aggregate(aggregate) == "token" or sentence_of_token is None:
        return values.mean()
    _, inverse = torch.unique(sentence_of_token, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, inverse, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, inverse, torch.ones_like(values))
    return (sums / counts).mean()


def metric_level(sae, x: torch.Tensor, metric: str = "mean_act", aggregate: str = "token",
                 sentence_of_token: torch.Tensor | None = None, surrogate: str | None = None,
                 bandwidth: float = 0.1) -> torch.Tensor:
    """The analysis metric of the SAE code of `x` [tokens, d_model], aggregated over tokens (a scalar).

    surrogate=None: the exact value (gradient only through active features, as JumpReLU has it).
    surrogate='pre_relu'|'ste': the same value in the forward pass, the surrogate's gradient in the backward pass
    (straight-through), so a loss on it aims at exactly the reported number.
    """
    pre = sae_pre_activations(sae, x)
    threshold = threshold_of(sae).to(pre.dtype)
    exact = aggregate_tokens(per_token_metric(jumprelu(pre, threshold), metric, sae), sentence_of_token, aggregate)
    if surrogate is None:
        return exact
    smooth = aggregate_tokens(_surrogate_per_token(pre, threshold, metric, surrogate, bandwidth, decoder_norms_of(sae)),
                              sentence_of_token, aggregate)
    return exact.detach() + (smooth - smooth.detach())


def batch_fvu(sae, x: torch.Tensor) -> torch.Tensor:
    """Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖² over the tokens `x` [tokens, d_model] (the analysis FVU, on one batch)."""
    x_hat = sae.decode(sae.encode(x))
    err = (x - x_hat).pow(2).sum()
    dev = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return err / dev.clamp_min(EPS)


def fidelity_loss(adapted_fvu: torch.Tensor, base_fvu: torch.Tensor) -> torch.Tensor:
    """mean_l relu(FVU_adapted,l / FVU_base,l − 1): zero while the SAE explains the adapted residual as well as the base."""
    return F.relu(adapted_fvu / base_fvu.detach().clamp_min(EPS) - 1.0).mean()


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
