"""The centred, norm-matched disparity: each token's residual rescaled about its SAE's b_dec to one centred norm per
layer (the reference language's RMS) before it is encoded, so that what is left of a gap is in the residual's
direction, not its scale (docs/method.md §1c)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mlalign.analysis.stats import SentenceSums

CENTRE = "sae_b_dec"
"""What the residual is centred on: the SAE's b_dec, what its code is read relative to (and, for SAEs trained with a
mean-initialised b_dec, close to the residual's mean: a near-constant component that is most of a real model's
residual norm (Gemma 3 270M: 93-98%) is left out of the rescaling)."""


def sae_centres(saes: dict) -> dict[int, torch.Tensor]:
    """Per layer the centre of the norm-matched control: the SAE's b_dec (what its code is read relative to)."""
    return {int(layer): sae.b_dec.detach().float() for layer, sae in saes.items()}


def norm_matched(x: torch.Tensor, target_norm: torch.Tensor | float, centre: torch.Tensor) -> torch.Tensor:
    """c + (x − c) · r / ‖x − c‖ per token: x with its centred part rescaled to the norm r (a number, or one per
    token), its direction about c kept."""
    centred = x - centre
    scale = target_norm / centred.norm(dim=-1).clamp_min(1e-12)
    return centre + centred * scale.unsqueeze(-1)


def centred_rms(sums: SentenceSums, centre: np.ndarray) -> float:
    """sqrt(mean_t ‖x_t − c‖²) over the analysed tokens of one (language, layer), from its sums:
    Σ‖x − c‖² = Σ‖x‖² − 2 c·Σx + N‖c‖²."""
    c = np.asarray(centre, dtype=np.float64)
    n = float(sums.n_tokens.sum())
    if n == 0:
        return float("nan")
    total = float(sums.sq_norm.sum()) - 2.0 * float(c @ sums.sum_x) + n * float(c @ c)
    return float(np.sqrt(max(total, 0.0) / n))


def reference_targets(stats: dict[str, dict[int, SentenceSums]], reference_lang: str, saes: dict) -> dict[int, float]:
    """Per layer the centred norm every token is rescaled to: the reference language's centred RMS about b_dec."""
    centres = sae_centres(saes)
    return {int(layer): centred_rms(stats[reference_lang][layer], centres[int(layer)].cpu().numpy())
            for layer in stats[reference_lang]}


class NormMatchedSAE(nn.Module):
    """An SAE that reads every residual norm-matched: encode(x) = sae.encode(norm_matched(x, target, b_dec)).

    decode is the SAE's own, so this pass's x̂ reconstructs the rescaled residual, not x: of its statistics only the
    SAE-code metrics (mean_act, l1, l0, ...) are read; its FVU is not the SAE's. Not stackable (the engine runs its
    own encode), so the pass costs a forward plus one encode per layer."""

    def __init__(self, sae: nn.Module, target_norm: float):
        super().__init__()
        self.sae = sae
        self.cfg = sae.cfg
        self.target_norm = float(target_norm)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (sae-lens's name; decoder-weighted metrics read it)
        return self.sae.W_dec

    @property
    def b_dec(self) -> torch.Tensor:
        return self.sae.b_dec

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model's dtype: a bf16 norm of a residual whose constant part is thousands wide
        # would round the small centred part away.
        rescaled = norm_matched(x.float(), self.target_norm, self.sae.b_dec.float())
        return self.sae.encode(rescaled.to(self.sae.W_dec.dtype))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(feature_acts)


def norm_matched_saes(saes: dict, targets: dict[int, float]) -> dict[int, NormMatchedSAE]:
    return {int(layer): NormMatchedSAE(sae, targets[int(layer)]) for layer, sae in saes.items()}
