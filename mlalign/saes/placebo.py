"""The placebo SAE of task=compare: the same features reading a random rotation of the residual stream, recalibrated."""

from __future__ import annotations

from mlalign.errors import UserError


def placebo_sae(sae, calibration, seed: int = 0):
    """The placebo of a JumpReLU/ReLU SAE (task=compare, docs/compare.md#the-placebo-sae): a copy whose features read a
    fixed random rotation of the residual stream about its mean, recalibrated so that on `calibration` (base-model
    residuals [tokens, d_model]) every feature f keeps the real feature's threshold θ_f, fires on exactly as many
    tokens (up to ties: identical residuals, e.g. sentences sharing a prefix, fire together, so a split inside such a
    group moves the whole group) and has the same mean active value. Per-feature firing rates, mean activations, L0
    and the mean_act/l1/l0 levels on those tokens equal the real SAE's; which tokens (directions) fire each feature is
    scrambled.

    With y = μ + (x − μ)Rᵀ (R orthogonal, seeded; μ the calibration mean) and h_f(y) the real pre-activation, the
    placebo's pre-activation is h'_f(x) = θ_f + k_f·(h_f(y) − q_f), where q_f splits the calibration tokens' h_f(y) so
    that exactly as many lie above it as the real feature fires on, and k_f > 0 matches the mean active value. Both
    maps are affine in x, so the placebo is an ordinary SAE of the same class (new W_enc, b_enc; same threshold). The
    decoder maps back through the inverse rotation: x̂ = μ + (f·W_dec + b_dec − μ)R."""
    import copy

    import torch

    if str(getattr(sae.cfg, "normalize_activations", "none")) != "none":
        raise UserError(f"the placebo SAE needs an SAE without run-time input normalisation (this one has "
                        f"normalize_activations={sae.cfg.normalize_activations}); fold it first")
    with torch.no_grad():
        x = calibration.to(device=sae.W_enc.device, dtype=torch.float64)
        n, d = x.shape
        generator = torch.Generator().manual_seed(int(seed))
        q_mat, r_mat = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        rotation = (q_mat * torch.sign(torch.diagonal(r_mat))).to(x.device)  # Haar-distributed
        mu = x.mean(dim=0)
        real_code = sae.encode(x.to(sae.W_enc.dtype)).double()
        gate = getattr(sae, "threshold", None)
        threshold = (gate.double() if gate is not None else torch.zeros((), dtype=torch.float64, device=x.device)
                     ).expand(real_code.shape[1])
        fires = (real_code > 0).sum(dim=0)  # tokens each real feature fires on
        active_mean = real_code.sum(dim=0) / fires.clamp_min(1)

        w_enc, b_enc, b_dec = sae.W_enc.double(), sae.b_enc.double(), sae.b_dec.double()
        apply_b_dec = float(bool(sae.cfg.apply_b_dec_to_input))
        rotated_w = rotation.T @ w_enc  # h(y) = x (Rᵀ W_enc) + c
        offset = (mu - mu @ rotation.T - apply_b_dec * b_dec) @ w_enc + b_enc
        pre = x @ rotated_w + offset  # [n, d_sae]
        ordered = torch.sort(pre, dim=0, descending=True).values
        m = fires.long()
        above = ordered.gather(0, (m - 1).clamp(0, n - 1).unsqueeze(0)).squeeze(0)
        below = ordered.gather(0, m.clamp(0, n - 1).unsqueeze(0)).squeeze(0)
        split = torch.where(m == 0, ordered[0] + 1.0, torch.where(m >= n, ordered[-1] - 1.0, (above + below) / 2))
        excess = ((pre - split) * (pre > split)).sum(dim=0) / m.clamp_min(1)
        scale = torch.where((m > 0) & (excess > 0), (active_mean - threshold).clamp_min(1e-6) / excess.clamp_min(1e-12),
                            torch.ones_like(excess))

        b_dec_new = mu + (b_dec - mu) @ rotation
        w_enc_new = rotated_w * scale
        b_enc_new = scale * (offset - split) + threshold + apply_b_dec * (b_dec_new @ w_enc_new)
        placebo = copy.deepcopy(sae)
        dtype = sae.W_enc.dtype
        placebo.W_enc.copy_(w_enc_new.to(dtype))
        placebo.b_enc.copy_(b_enc_new.to(dtype))
        placebo.W_dec.copy_((sae.W_dec.double() @ rotation).to(dtype))
        placebo.b_dec.copy_(b_dec_new.to(dtype))
    return placebo
