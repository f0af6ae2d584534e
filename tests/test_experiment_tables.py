"""The real comparison's table generator (experiments/gemma3_270m_compare/tables.py) reads a results.json the way its
README says: which way a difference goes (a CI that holds 0 is no difference; for a loss, lower is better), the
tally, the seed mean ± SD and the seconds per step. Checked on a small results.json whose answers are known."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_experiment_module


@pytest.fixture(scope="module")
def tables():
    return load_experiment_module("experiments/gemma3_270m_compare/tables.py", "compare_tables")


def _diff(estimate, low, high, verdict="v"):
    return {"estimate": estimate, "ci": [low, high], "mde": 0.1, "n_seeds": [3, 3], "verdict": verdict}


def _seed(lm_loss, retrieval, s_per_step):
    per_lang = {"gain_pct": 1.0, "lm_loss": lm_loss, "spliced_dlm_loss": 0.5, "retrieval_at1": retrieval,
                "topic_transfer_acc": 0.4}
    return {"per_lang": {"hi": per_lang, "en": per_lang}, "training": {"s_per_step": s_per_step}}


@pytest.fixture
def results(tmp_path):
    differences = {"a-b": {"hi": {
        "lm_loss": _diff(-0.2, -0.3, -0.1, "hi lm_loss: a lower"),        # a loss that fell: better
        "spliced_dlm_loss": _diff(0.2, 0.1, 0.3, "hi spliced: a higher"),  # a loss that rose: worse
        "retrieval_at1": _diff(0.05, 0.01, 0.09, "hi retrieval: a higher"),  # a score that rose: better
        "topic_transfer_acc": _diff(0.01, -0.02, 0.04, "hi topic: none"),  # CI holds 0: none
        "gain_pct": _diff(9.0, 8.0, 10.0),                                  # optimised: not in the tally
    }}}
    arms = {"a": {"setting": "lr_0.001", "seeds": {"0": _seed(4.0, 0.5, 2.0), "1": _seed(4.2, 0.7, 4.0)}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"targets": ["hi"], "reference_lang": "en", "differences": differences, "arms": arms}))
    return path


def test_a_ci_holding_zero_reads_as_none_and_a_loss_that_falls_reads_as_better(tables):
    assert tables.direction("lm_loss", _diff(-1, -2, -0.5)) == "better"
    assert tables.direction("lm_loss", _diff(1, 0.5, 2)) == "worse"
    assert tables.direction("retrieval_at1", _diff(1, 0.5, 2)) == "better"
    assert tables.direction("retrieval_at1", _diff(-1, -2, -0.5)) == "worse"
    assert tables.direction("retrieval_at1", _diff(0, 0, 0)) == "none"
    assert tables.direction("lm_loss", _diff(0.3, -0.1, 0.6)) == "none"


def test_the_tally_counts_only_unoptimised_outcomes(tables, results):
    assert tables.tally("a-b", results) == ("a is better in 2, worse in 1 and not detectably different in 1 of 4 "
                                            "(language, outcome) cells")
    assert tables.verdicts("a-b", results).splitlines() == [
        "- hi lm_loss: a lower", "- hi spliced: a higher", "- hi retrieval: a higher", "- hi topic: none"]


def test_the_arms_table_gives_the_seed_mean_and_sd_and_the_step_time_is_the_seed_mean(tables, results):
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in
            tables.arms_table(results).splitlines()[2:]}
    hi = rows[("hi", "a")]
    assert "4.1000 ± 0.1414" in hi and "0.6000 ± 0.1414" in hi and "| lr_0.001 | 2 |" in hi
    assert tables.s_per_step("a", results) == "3.0"
    assert tables.chosen("a", results) == "lr_0.001"
    table = tables.differences_table(results)
    assert "| a-b | hi | lm_loss | -0.2000 | [-0.3000, -0.1000] | 0.1000 | a better | 3 vs 3 |" in table
    assert "| a-b | hi | topic_transfer_acc | +0.0100 | [-0.0200, +0.0400] | 0.1000 | no detectable difference |" in table


def test_inline_numbers_are_the_seed_mean_the_contrast_with_its_ci_and_the_step_time_range(tables, results):
    assert tables.mean("a", "hi", "retrieval_at1", path=results) == "0.600"
    assert tables.estimate("a-b", "hi", "retrieval_at1", path=results) == "+0.050 [+0.010, +0.090]"
    assert tables.estimate("a-b", "hi", "gain_pct", "+.1f", path=results) == "+9.0 [+8.0, +10.0]"
    assert tables.s_per_step_range("a", results) == "2.0-4.0"


def test_posthoc_diagnostics_read_the_step_one_ratio_over_every_unit_and_tabulate_each_unit(tables, tmp_path,
                                                                                             monkeypatch):
    def history(step1, median, active):
        return {"steps": 100, "act_align_active_steps": active, "sae_fidelity_active_steps": 0,
                "act_ratio_step1": step1, "act_ratio_median": median, "act_ratio_min": 0.9, "act_ratio_max": 1.2}

    row = {"hi": {"retrieval_at1_L17": 0.5, "retrieval_at1_L3": 0.25, "spliced_dlm_loss": 0.8},
           "ml": {"retrieval_at1_L17": 0.1, "retrieval_at1_L3": 0.05, "spliced_dlm_loss": 0.7},
           "en": {"spliced_dlm_loss": 0.9}}
    path = tmp_path / "posthoc.json"
    path.write_text(json.dumps({"histories": {"ce/lr_0.001/seed_0": history(0.95, 1.07, 9),
                                              "act_align/lr_0.0005/seed_0": history(1.04, 1.10, 5),
                                              "ce_kl/lr_0.001/seed_1": history(1.01, 1.08, 7)},
                                "dev": {"base": row, "ce_kl/lr_0.001": row}}))
    monkeypatch.setattr(tables, "POSTHOC", path)
    assert tables.base_ratio_step1() == "0.95-1.04"  # every unit, act_align's included
    assert tables.untrained_ratio_median() == "1.07-1.08"  # ce and ce_kl only: their ratio is the exact metric's
    assert tables.posthoc_value("ce_kl/lr_0.001", "ml", "retrieval_at1_L3") == "0.050"
    lines = tables.posthoc_table().splitlines()
    assert len(lines) == 4 and lines[3] == "| ce_kl/lr_0.001 | 0.500 | 0.100 | 0.250 | 0.050 | 0.800 | 0.700 | 0.900 |"
