"""task=compare on the testbed: the output contract, identical arms give identical outcomes, steering at alpha 0 is
the base model, units resume from their files, and user mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlalign.errors import UserError
from tests.helpers import compose_cfg

FAST = ["task=compare", "model=testbed", "langs=[hi]", "layers=[15]", "data.max_sentences=24", "data.max_length=32",
        "train.max_length=32", "train.batch_size=4", "train.max_steps=2", "train.warmup_steps=0", "train.save_every=0",
        "analysis.batch_size=24", "analysis.bootstrap=50", "compare.seeds=2", "compare.lrs=[3e-3]",
        "compare.bootstrap=200", "compare.benchmarks=false", "compare.calibration_tokens=2000"]


def bed(testbed_dir) -> list[str]:
    d = Path(testbed_dir)
    return [f"model.hf_id={d / 'model'}", f"sae.path_template='{d}/saes/layer_{{layer}}'"]


def run_compare(cfg):
    from mlalign.tasks import compare
    from mlalign.tasks.common import RunContext

    with RunContext(cfg) as ctx:
        metrics = compare.run(cfg, ctx)
        ctx.finish(metrics)
    return json.loads((ctx.run_dir / "compare" / "results.json").read_text()), ctx.run_dir


@pytest.fixture(scope="module")
def full_run(testbed_dir, tmp_path_factory):
    """Every default arm plus `twin`, a second act_align arm with identical settings."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = compose_cfg([*FAST, *bed(testbed_dir), "compare.steer_alphas=[0,1]",
                       "compare.arms=[base,ce,ce_kl,act_align,twin,placebo,steer]",
                       "+compare.definitions.twin={kind:lora}", "compare.contrasts=[act_align-twin]"], tmp)
    results, run_dir = run_compare(cfg)
    return cfg, results, run_dir


@pytest.mark.slow
def test_results_follow_the_output_contract(full_run):
    _, results, run_dir = full_run
    out = run_dir / "compare"
    assert (out / "results.md").read_text().startswith("# task=compare")
    assert (out / "differences.png").stat().st_size > 0
    arms = results["arms"]
    assert set(arms) == {"base", "ce", "ce_kl", "act_align", "twin", "placebo", "steer"}
    assert arms["act_align"]["lr"] == 3e-3 and arms["base"]["lr"] is None and arms["steer"]["alpha"] in (0.0, 1.0)
    assert set(arms["act_align"]["seeds"]) == {"0", "1"} and set(arms["base"]["seeds"]) == {"na"}
    for lang in ("hi", "en"):
        outcome = arms["ce"]["seeds"]["1"]["per_lang"][lang]
        for key in ("gain_pct", "lm_loss", "spliced_dlm_loss", "topic_transfer_acc", "topic_inlang_acc", "topic_shuffled_acc", "fvu_after"):
            assert isinstance(outcome[key], float), key
    assert 0.0 <= arms["ce"]["seeds"]["1"]["per_lang"]["hi"]["retrieval_at1"] <= 1.0
    assert set(arms["ce"]["seeds"]["1"]["per_lang"]["hi"]["retrieval"]) == {"15", "25"}  # aligned + last layer
    assert set(results["differences"]) == {"act_align-ce_kl", "act_align-placebo", "act_align-steer", "ce_kl-base",
                                           "act_align-twin"}
    d = results["differences"]["act_align-ce_kl"]["hi"]["lm_loss"]
    assert set(d) >= {"estimate", "ci", "n_seeds", "n_sentences", "mde", "verdict"}
    assert d["n_seeds"] == [2, 2] and d["n_sentences"] == 24 and d["ci"][0] <= d["estimate"] <= d["ci"][1]
    assert d["ci_sentences_only"][0] <= d["estimate"] <= d["ci_sentences_only"][1]
    assert "one seed" not in d["verdict"]  # two seeds per trained arm
    assert "| act_align-ce_kl | hi | lm_loss |" in (out / "results.md").read_text()  # seed-vs-sentence CI table
    assert results["differences"]["ce_kl-base"]["hi"]["gain_pct"]["n_seeds"] == [2, 1]
    assert set(arms["ce"]["seeds"]["0"]["per_lang"]["hi"]["spliced_dlm_loss_per_layer"]) == {"15"}
    # The base arm is the base model: no gain, no LM-loss change, against itself.
    base = arms["base"]["seeds"]["na"]["per_lang"]["hi"]
    assert base["gain_pct"] == 0.0 and base["lm_loss_change"] == 0.0
    assert any("no detectable difference (MDE" in line or "than" in line for line in results["verdicts"])
    # How often each arm's activation term pushed: recorded for arms that train on it, not for ce / ce_kl.
    activity = arms["act_align"]["seeds"]["0"]["training"]["act_align_activity"]
    assert activity["steps"] == 2 and 0 <= activity["active_steps"] <= 2
    assert arms["ce_kl"]["seeds"]["0"]["training"]["act_align_activity"] is None
    assert "## The activation term during training" in (out / "results.md").read_text()


@pytest.mark.slow
def test_two_arms_with_identical_settings_and_seed_give_identical_outcomes(full_run):
    _, results, _ = full_run
    a, b = results["arms"]["act_align"]["seeds"], results["arms"]["twin"]["seeds"]
    for seed in ("0", "1"):
        assert a[seed]["per_lang"] == b[seed]["per_lang"]
    assert a["0"]["per_lang"]["hi"]["lm_loss"] != a["1"]["per_lang"]["hi"]["lm_loss"]  # seeds do differ
    for outcome, d in results["differences"]["act_align-twin"]["hi"].items():
        assert d["estimate"] == 0.0 and d["ci"] == [0.0, 0.0], outcome


@pytest.mark.slow
def test_a_rerun_in_the_same_directory_trains_and_measures_nothing_again(full_run):
    cfg, results, run_dir = full_run
    trained = sorted(run_dir.glob("compare/units/*/*/seed_*/TRAINED"))
    measured = sorted(run_dir.glob("compare/units/*/*/seed_*/test.json"))
    stamps = {p: p.stat().st_mtime_ns for p in [*trained, *measured]}
    assert len(trained) == 10 and len(measured) == 12  # 5 trained arms x 2 seeds; + base + steer
    again, _ = run_compare(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["differences"] == results["differences"]


@pytest.mark.slow
def test_a_unit_stopped_by_sigterm_says_to_rerun_the_comparison_which_resumes_it(testbed_dir, tmp_path, monkeypatch):
    from mlalign.tasks import compare
    from mlalign.training.loop import TrainingStopped
    from tests.tasks.test_train import SigtermAt

    cfg = compose_cfg([*FAST, *bed(testbed_dir), "compare.arms=[base,ce]", "compare.seeds=1", "train.max_steps=4",
                       "train.save_every=2", "compare.contrasts=[ce-base]"], tmp_path)
    monkeypatch.setattr(compare, "_tracker", lambda *args, **kwargs: SigtermAt(3))
    with pytest.raises(TrainingStopped, match="run the same task=compare command again") as stopped:
        run_compare(cfg)
    assert "train.resume" not in str(stopped.value)  # task=train's advice would start a different run
    monkeypatch.undo()
    _, run_dir = run_compare(cfg)
    trained = json.loads(next(run_dir.glob("compare/units/ce/*/seed_0/TRAINED")).read_text())
    assert (trained["resumed_from_step"], trained["steps"]) == (3, 4)


@pytest.mark.slow
def test_steer_at_alpha_zero_equals_the_base_arm_exactly(testbed_dir, tmp_path):
    cfg = compose_cfg([*FAST, *bed(testbed_dir), "compare.arms=[base,steer]", "compare.steer_alphas=[0]",
                       "compare.contrasts=[steer-base]"], tmp_path)
    results, _ = run_compare(cfg)
    steer, base = results["arms"]["steer"]["seeds"]["na"], results["arms"]["base"]["seeds"]["na"]
    assert steer["per_lang"] == base["per_lang"]
    assert all(d["estimate"] == 0.0 for d in results["differences"]["steer-base"]["hi"].values())


@pytest.mark.parametrize("override, message", [
    ("compare.arms=[base,nope]", "compare.definitions does not define"),
    ("compare.contrasts=[ce-nope]", "write ARM-ARM"),
    ("compare.lrs=[]", "non-empty list of positive learning rates"),
    ("compare.seeds=0", "must be at least 1"),
    ("eval.benchmarks=[arc_chalenge]", "unknown benchmark"),
    ("+compare.definitions.bad={kind:lora,loss:{act_allign:1}}", "not a loss setting"),
])
def test_user_mistakes_are_one_clear_error(override, message, tmp_path):
    from mlalign.tasks.compare import check_config

    cfg = compose_cfg(["task=compare", "model=testbed", override, *(["compare.arms=[base,bad]"]
                                                                     if "definitions.bad" in override else [])], tmp_path)
    with pytest.raises(UserError, match=message):
        check_config(cfg)


@pytest.mark.slow
def test_benchmarks_are_compared_item_by_item(testbed_dir, tmp_path):
    cfg = compose_cfg([*FAST, *bed(testbed_dir), "compare.arms=[base,ce_kl]", "compare.seeds=1",
                       "compare.contrasts=[ce_kl-base]", "compare.benchmarks=true", "eval.limit=6",
                       "eval.benchmarks=[arc_challenge]"], tmp_path)
    results, _ = run_compare(cfg)
    for arm in ("base", "ce_kl"):
        outcome = next(iter(results["arms"][arm]["seeds"].values()))["per_lang"]["hi"]
        assert outcome["bench_arc_challenge_n_items"] == 6 and 0.0 <= outcome["bench_arc_challenge_acc"] <= 1.0
    d = results["differences"]["ce_kl-base"]["hi"]["bench_arc_challenge_acc"]
    assert d["n_sentences"] == 6 and d["n_seeds"] == [1, 1]
    assert "MDE" in d["verdict"] or "than" in d["verdict"]
    assert "one seed: the CI covers sentences" in d["verdict"]  # compare.seeds=1 and ce_kl is trained


def test_results_md_says_which_arm_s_activation_term_was_nearly_idle():
    from mlalign.tasks.compare import _activity_lines

    def seed(active):
        return {"training": {"act_align_activity": {"active_steps": active, "steps": 100, "active_pct": active,
                                                    "act_ratio_median": 1.1, "idle": active < 25}}}

    results = {"arms": {"ce_kl": {"seeds": {"0": {"training": {"act_align_activity": None}}}},
                        "act_align": {"seeds": {"0": seed(5), "1": seed(6)}},
                        "pushing": {"seeds": {"0": seed(90)}}, "base": {"seeds": {"na": {"training": None}}}}}
    lines = _activity_lines(results)
    assert lines[:3] == ["", "## The activation term during training", ""] and len(lines) == 5
    assert lines[3].startswith("- act_align: activation term above zero on seed 0: 5 of 100, seed 1: 6 of 100 steps")
    assert "**Nearly idle**" in lines[3] and "**Nearly idle**" not in lines[4]
