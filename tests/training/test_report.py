"""The training report's record of how often the activation term pushed (mlalign/training/report.py): a relative
hinge is zero once the target reaches English's level, so an adapter can be trained almost entirely by its other terms
(experiments/gemma3_270m_compare: 4-6 of 100 steps). The run must say so, and must not where the term worked."""

from mlalign.training.report import IDLE_ACT_ALIGN_PCT, act_align_activity, idle_act_align_line


def _history(active: int, steps: int, ratio: float) -> list[dict]:
    return [{"step": i + 1, "act_align": 0.1 if i < active else 0.0, "act_ratio": ratio} for i in range(steps)]


def test_a_term_above_zero_on_few_steps_is_idle_and_the_line_says_why_and_what_to_do():
    activity = act_align_activity(_history(5, 100, 1.10), weight=5.0)
    assert activity["active_steps"] == 5 and activity["steps"] == 100 and activity["idle"]
    assert activity["act_ratio_median"] == 1.10
    line = idle_act_align_line(activity)
    assert "above zero on 5 of 100 steps" in line and "ratio 1.10" in line and "loss.layers" in line


def test_a_term_that_pushes_on_most_steps_is_not_idle_and_no_line_is_written():
    activity = act_align_activity(_history(80, 100, 0.85), weight=5.0)
    assert not activity["idle"] and idle_act_align_line(activity) is None
    edge = act_align_activity(_history(int(IDLE_ACT_ALIGN_PCT), 100, 0.9), weight=5.0)
    assert not edge["idle"]  # the bar itself is not idle
    below = act_align_activity(_history(int(IDLE_ACT_ALIGN_PCT) - 1, 100, 0.9), weight=5.0)
    assert below["idle"] and "ratio" not in idle_act_align_line(below)  # a ratio below 1 is not the reason given


def test_no_activation_term_or_no_step_gives_no_record():
    assert act_align_activity(_history(0, 100, 1.1), weight=0.0) is None  # ce / ce_kl: the term is only logged
    assert act_align_activity([], weight=5.0) is None
    assert idle_act_align_line(None) is None
