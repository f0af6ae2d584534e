"""compare.definitions -> typed arms: deltas over the loss group, default contrasts of the arms that run."""

from __future__ import annotations

import pytest

from mlalign.compare.arms import compare_settings
from mlalign.errors import UserError
from tests.helpers import compose_cfg


def test_default_arms_are_deltas_over_the_composed_loss_group():
    s = compare_settings(compose_cfg(["task=compare"]))
    assert [a.name for a in s.arms] == ["base", "ce", "ce_kl", "act_align", "placebo", "steer"]
    ce, ce_kl, act, placebo = (s.arm(n) for n in ("ce", "ce_kl", "act_align", "placebo"))
    assert (ce.loss["ce"], ce.loss["act_align"], ce.loss["sae_fidelity"], ce.loss["en_retain"]) == (1.0, 0.0, 0.0, 0.0)
    assert (ce_kl.loss["en_retain"], ce_kl.loss["retain_kind"], ce_kl.loss["act_align"]) == (1.0, "kl", 0.0)
    assert act.loss == placebo.loss and act.sae == "real" and placebo.sae == "placebo"
    assert s.contrasts == ["act_align-ce_kl", "act_align-placebo", "act_align-steer", "ce_kl-base"]
    assert s.seeds == [0, 1, 2] and len(s.lrs) == 3


def test_the_act_align_arm_follows_the_loss_group_and_contrasts_follow_the_arms():
    s = compare_settings(compose_cfg(["task=compare", "loss.act_align=2", "compare.arms=[base,ce_kl,act_align]",
                                      "seed=5", "compare.seeds=2", "compare.contrasts=[act_align-base]"]))
    assert s.arm("act_align").loss["act_align"] == 2.0 and s.arm("ce_kl").loss["act_align"] == 0.0
    assert s.contrasts == ["act_align-ce_kl", "ce_kl-base", "act_align-base"]
    assert s.seeds == [5, 6]


def test_an_arm_with_all_weights_zero_is_a_user_error():
    cfg = compose_cfg(["task=compare", "+compare.definitions.none={kind:lora,loss:{ce:0,act_align:0,sae_fidelity:0,"
                       "en_retain:0}}", "compare.arms=[base,none]"])
    with pytest.raises(UserError, match="every loss weight is 0"):
        compare_settings(cfg)
