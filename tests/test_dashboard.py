"""task=dashboard: the W&B workspace spec of a sweep, checked offline (the panels, their keys, the run filter)."""

import json

import yaml

from tests.helpers import run_cli


def _sweep(root, experiment=None):
    sweep = root / "2026-01-02_03-04-05"
    grid = [(4, "1e-3"), (8, "1e-3"), (16, "3e-3")]
    for num, (rank, lr) in enumerate(grid):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["task=train", f"lora.r={rank}", f"train.optimizer.lr={lr}", "langs=[hi,mr]"]))
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"experiment": experiment or "null", "model": "testbed"}}}}))
        (job / "config.yaml").write_text(yaml.safe_dump(
            {"task": "train", "logger": {"backend": "wandb", "project": "mlalign", "entity": "lab", "group": None}}))
        (job / "metrics.json").write_text(json.dumps({
            "alignment_score": float(num), "dev_activation_gain_pct_mean": 2.0 * num,
            "dev_activation_gain_pct_hi": 3.0 * num, "dev_activation_gain_pct_mr": 1.0 * num,
            "dev_fvu_ratio_hi": 1.0 + num / 10, "dev_fvu_ratio_mr": 1.0, "dev_english_retention_pct": 99.0 - num,
            "final_ce": 3.0 - num / 10}))
        (job / "COMPLETE").write_text("{}")
    return sweep


def test_offline_dashboard_writes_the_spec_the_workspace_and_the_plots(tmp_path):
    sweep = _sweep(tmp_path / "multirun")
    done = run_cli(["task=dashboard", f"sweep_dir={sweep}", "logger=wandb", "logger.mode=offline",
                    f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out" / "dashboard"
    spec = json.loads((out / "spec.json").read_text())
    assert spec["target"] == {"entity": "lab", "project": "mlalign", "group": f"train-{sweep.name}",
                              "logged_to_wandb": True}
    assert spec["langs"] == ["hi", "mr"] and spec["params"] == ["lora.r", "train.optimizer.lr"]
    panels = [panel for section in spec["sections"] for panel in section["panels"]]
    scatters = {panel["y"]: panel["x"] for panel in panels if panel["kind"] == "scatter"}
    assert scatters == {f"summary:{m}": "config:lora.r" for m in (
        "dev_activation_gain_pct_mean", "dev_fvu_ratio_hi", "dev_fvu_ratio_mr", "dev_english_retention_pct")}
    (line,) = [p for p in panels if p["kind"] == "line"]
    assert (line["x"], line["y"]) == ("train/step", ["train/ce"])
    (parallel,) = [p for p in panels if p["kind"] == "parallel_coordinates"]
    assert parallel["columns"] == ["config:lora.r", "config:train.optimizer.lr", "summary:alignment_score",
                                   "summary:dev_activation_gain_pct_mean", "summary:dev_fvu_ratio_hi",
                                   "summary:dev_fvu_ratio_mr", "summary:dev_english_retention_pct"]
    (bars,) = [p for p in panels if p["kind"] == "bar"]
    assert bars["metrics"] == ["summary:dev_activation_gain_pct_hi", "summary:dev_activation_gain_pct_mr"]

    # What wandb-workspaces would save: the same panels in W&B's own keys, runs filtered to the sweep's group.
    view = json.loads((out / "workspace.json").read_text())
    saved = [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    assert [p["viewType"] for p in saved] == ["Scatter Plot"] * 4 + ["Run History Line Plot",
                                                                     "Parallel Coordinates Plot", "Bar Chart"]
    assert saved[0]["config"]["xAxis"] == "config:lora.value.r"  # W&B's key for the nested config value
    assert saved[0]["config"]["yAxis"] == "summary:dev_activation_gain_pct_mean"
    (runset,) = view["spec"]["section"]["runSets"]
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=",
                                             "value": f"train-{sweep.name}", "disabled": False}]
    for name in ("summary.png", "parallel_coordinates.png", "language_bars.png"):
        assert (out / name).stat().st_size > 5000, name
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_panels"] == 7


def test_the_group_follows_the_experiment_and_a_missing_sweep_is_one_error_line(tmp_path):
    from omegaconf import OmegaConf

    from mlalign.dashboard import wandb_target

    sweep = _sweep(tmp_path / "multirun", experiment="paper")
    target = wandb_target(sweep, OmegaConf.create({"project": "other", "entity": None}))
    assert target["group"] == f"paper-{sweep.name}" and target["project"] == "mlalign"
    missing = run_cli(["task=dashboard", f"paths.root_dir={tmp_path}"])
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("error: task=dashboard needs the sweep: add sweep_dir=")
