"""The arms of task=compare as typed settings: what each arm is (no adapter, LoRA on a loss, steering), composed from
`compare.definitions` (named deltas over the `loss` group) and checked before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from mlalign.errors import UserError

KINDS = ("base", "lora", "steer")
SAE_CHOICES = ("real", "placebo")
DEFAULT_CONTRASTS = ("act_align-ce_kl", "act_align-placebo", "act_align-steer", "ce_kl-base")


@dataclass
class Arm:
    name: str
    kind: str
    """base (no adapter), lora (trained with `loss`), steer (a fixed vector at the aligned layers, x alpha)."""
    loss: dict = field(default_factory=dict)
    """The composed `loss` group with this arm's deltas applied (lora only)."""
    sae: str = "real"
    """Which SAEs the loss reads: real, or placebo (docs/compare.md#the-placebo-sae)."""


@dataclass
class CompareSettings:
    arms: list[Arm]
    seeds: list[int]
    lrs: list[float]
    steer_alphas: list[float]
    contrasts: list[str]
    placebo_seed: int
    calibration_tokens: int
    benchmarks: bool
    bootstrap: int

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)

    @property
    def trained(self) -> list[Arm]:
        return [arm for arm in self.arms if arm.kind == "lora"]


def compare_settings(cfg) -> CompareSettings:
    """The typed settings of task=compare from the composed config; every user mistake is one UserError."""
    from mlalign.training.losses import check_loss_config

    c = cfg.compare
    definitions = OmegaConf.to_container(c.definitions, resolve=True) or {}
    names = [str(name) for name in c.arms]
    if not names:
        raise UserError("compare.arms is empty; type e.g. compare.arms=[base,ce,act_align]")
    arms = []
    base_loss = OmegaConf.to_container(cfg.loss, resolve=True)
    for name in names:
        if name not in definitions:
            raise UserError(f"compare.arms has {name!r}, which compare.definitions does not define (it defines "
                            f"{', '.join(definitions)}); add +compare.definitions.{name}={{kind:lora,loss:{{...}}}}")
        spec = definitions[name] or {}
        kind = str(spec.get("kind", "lora"))
        if kind not in KINDS:
            raise UserError(f"compare.definitions.{name}.kind={kind!r}; use one of: {', '.join(KINDS)}")
        sae = str(spec.get("sae", "real"))
        if sae not in SAE_CHOICES:
            raise UserError(f"compare.definitions.{name}.sae={sae!r}; use one of: {', '.join(SAE_CHOICES)}")
        deltas = dict(spec.get("loss") or {})
        unknown = [key for key in deltas if key not in base_loss]
        if unknown:
            raise UserError(f"compare.definitions.{name}.loss has {unknown[0]!r}, which is not a loss setting "
                            f"({', '.join(base_loss)})")
        loss = {**base_loss, **deltas}
        if kind == "lora":
            check_loss_config(OmegaConf.create(loss))
        arms.append(Arm(name, kind, loss, sae))
    seeds = int(c.seeds)
    if seeds < 1:
        raise UserError(f"compare.seeds={seeds} must be at least 1 (runs per trained arm; 3 or more for a spread)")
    lrs = [float(lr) for lr in c.lrs]
    if not lrs or any(not lr > 0 for lr in lrs):
        raise UserError(f"compare.lrs={list(c.lrs)} must be a non-empty list of positive learning rates, e.g. "
                        "compare.lrs=[1e-4,3e-4,1e-3]")
    alphas = [float(a) for a in c.steer_alphas]
    if any(arm.kind == "steer" for arm in arms) and not alphas:
        raise UserError("compare.steer_alphas is empty; the steer arm picks its alpha from it on dev, e.g. "
                        "compare.steer_alphas=[0,0.5,1,2]")
    contrasts = list(dict.fromkeys([*[x for x in DEFAULT_CONTRASTS if set(x.split("-")) <= set(names)],
                                    *[str(x) for x in (c.contrasts or [])]]))
    for contrast in contrasts:
        parts = contrast.split("-")
        if len(parts) != 2 or any(part not in names for part in parts) or parts[0] == parts[1]:
            raise UserError(f"compare.contrasts has {contrast!r}; write ARM-ARM with two different arms of "
                            f"compare.arms ({', '.join(names)}), e.g. compare.contrasts=[ce-base]")
    if int(c.bootstrap) < 100:
        raise UserError(f"compare.bootstrap={c.bootstrap} is too few resamples for a 95% interval; use >= 1000")
    return CompareSettings(arms=arms, seeds=list(range(int(cfg.seed), int(cfg.seed) + seeds)), lrs=lrs,
                           steer_alphas=alphas, contrasts=contrasts, placebo_seed=int(c.placebo_seed),
                           calibration_tokens=int(c.calibration_tokens), benchmarks=bool(c.benchmarks),
                           bootstrap=int(c.bootstrap))
