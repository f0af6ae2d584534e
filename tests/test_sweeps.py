"""Sweeps: the summary of a multirun, W&B grouping of its jobs, and the Optuna / SLURM / submitit configs."""

import csv
import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from mlalign.sweeps import collect_rows, summarize_sweep, swept_params
from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import CONF_DIR, run_cli
from tests.wandb_offline import offline_runs


def _fake_job(sweep, num, rank, gain, complete=True):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["task=train", f"lora.r={rank}"]))
    (job / "metrics.json").write_text(json.dumps({"dev_activation_gain_pct_mean": gain, "dev_english_retention_pct": 95.0}))
    if complete:
        (job / "COMPLETE").write_text("{}")


def test_summary_has_one_row_per_job_and_a_plot(tmp_path):
    for num, (rank, gain) in enumerate([(4, 10.0), (16, 30.0), (8, 20.0)]):
        _fake_job(tmp_path, num, rank, gain, complete=num != 2)
    rows = collect_rows(tmp_path)
    assert swept_params(rows) == ["lora.r"]
    path = summarize_sweep(tmp_path)
    with path.open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["lora.r"], float(r["dev_activation_gain_pct_mean"]), r["complete"]) for r in table] == [
        ("4", 10.0, "True"), ("16", 30.0, "True"), ("8", 20.0, "False")]
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_parallel_coordinates_have_one_axis_per_swept_parameter_then_the_outcomes(tmp_path):
    from PIL import Image

    from mlalign.sweeps import PARALLEL_FILE, parallel_axes

    grid = [(4, "1e-3", "0.5"), (8, "1e-3", "1.0"), (4, "3e-3", "1.0"), (8, "3e-3", "0.5")]
    for num, (rank, lr, weight) in enumerate(grid):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            ["task=train", f"lora.r={rank}", f"train.optimizer.lr={lr}", f"loss.act_align={weight}", "langs=[hi]"]))
        (job / "metrics.json").write_text(json.dumps({
            "alignment_score": float(num), "dev_activation_gain_pct_mean": 2.0 * num, "dev_fvu_ratio_hi": 1.0 + num / 10,
            "dev_fvu_ratio_en": 1.0, "dev_english_retention_pct": 99.0 - num, "steps": 20.0}))
        (job / "COMPLETE").write_text("{}")
    failed = tmp_path / "4"  # a failed job has no line (and no axis value) in the plot
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["task=train", "lora.r=16"]))
    (failed / "ERROR").write_text("error: boom\n")

    params, metrics = parallel_axes(collect_rows(tmp_path))
    assert params == ["lora.r", "train.optimizer.lr", "loss.act_align"]  # langs is not swept
    assert metrics == ["alignment_score", "dev_activation_gain_pct_mean", "dev_fvu_ratio_en", "dev_fvu_ratio_hi",
                       "dev_english_retention_pct"]
    summarize_sweep(tmp_path)
    with Image.open(tmp_path / PARALLEL_FILE) as image:
        axes = image.info["Description"].removeprefix("axes: ").split(" | ")
        assert image.size[0] > 800
    assert axes == [*params, *metrics]


def test_no_parallel_coordinates_without_a_swept_parameter(tmp_path):
    from mlalign.sweeps import PARALLEL_FILE

    for num in range(2):
        _fake_job(tmp_path, num, 8, 10.0 + num)
    summarize_sweep(tmp_path)
    assert (tmp_path / "summary.png").is_file() and not (tmp_path / PARALLEL_FILE).exists()


def test_a_failed_job_is_a_row_with_status_failed_and_its_error(tmp_path):
    _fake_job(tmp_path, 0, 4, 10.0)
    failed = tmp_path / "1"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["task=train", "lora.r=0"]))
    (failed / "ERROR").write_text("error: lora.r=0 must be a positive integer\n")
    _fake_job(tmp_path, 2, 8, 20.0, complete=False)  # killed: neither COMPLETE nor ERROR
    with summarize_sweep(tmp_path).open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["job"], r["status"], r["lora.r"]) for r in table] == [("0", "ok", "4"), ("1", "failed", "0"),
                                                                      ("2", "failed", "8")]
    assert table[0]["error"] == "" and table[1]["error"] == "error: lora.r=0 must be a positive integer"
    assert "no COMPLETE marker" in table[2]["error"] and table[1]["dev_activation_gain_pct_mean"] == ""


def test_a_failed_job_does_not_end_the_sweep_and_the_sweep_exits_1(tmp_path):
    """The second job runs after the first failed, the summary is written, and only then does the sweep exit 1."""
    done = tmp_path / "done"
    _fake_job(done, 0, 4, 10.0)
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "task=summarize", f"sweep_dir={tmp_path / 'missing'},{done}", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert (sweep / "0" / "ERROR").read_text().startswith("error: sweep_dir") and not (sweep / "0" / "COMPLETE").exists()
    assert (sweep / "1" / "COMPLETE").is_file() and not (sweep / "1" / "ERROR").exists()
    with (sweep / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["job"], r["status"]) for r in table] == [("0", "failed"), ("1", "ok")]
    assert "does not exist" in table[0]["error"] and float(table[1]["n_jobs"]) == 1.0
    assert "1 job(s) of the sweep failed" in result.stderr and "Traceback" not in result.stderr


def test_a_single_run_still_prints_one_error_line_and_exits_1(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["task=summarize", f"sweep_dir={tmp_path / 'missing'}", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: sweep_dir") and (run_dir / "ERROR").read_text() == result.stderr


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_optuna_search_space_composes():
    cfg = _hydra_cfg(["hparams_search=lora_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"lora.r", "lora.lora_alpha", "train.optimizer.lr", "loss.act_align",
                                   "loss.sae_fidelity", "loss.en_retain"}
    assert cfg.task == "train"
    # Batches of n_jobs=1 trial fail at rate 0 or 1: only 1.0 lets a search survive its failed trials.
    assert sweeper.n_jobs == 1 and sweeper.max_failure_rate == 1.0
    assert _hydra_cfg([]).hydra.sweeper._target_.endswith("KeepGoingSweeper")


def test_slurm_and_local_launchers_compose():
    slurm = _hydra_cfg(["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.partition == "gpu"
    assert slurm.array_parallelism == 8 and slurm.max_num_timeout == 3
    local = _hydra_cfg(["hydra/launcher=local_cpu"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher")
    assert _hydra_cfg(["hydra/launcher=joblib"]).hydra.launcher._target_.endswith("JoblibLauncher")


@pytest.mark.slow
def test_multirun_over_lora_rank_logs_grouped_wandb_runs_and_a_summary(testbed_dir, testbed_cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    # One layer: the test is about the sweep's runs, groups and summary (all 26 layers took 9 minutes).
    # Sixteen sentences per split: the jobs' before/after measurement on whole splits was most of this test's time.
    result = run_cli(["-m", "task=train", "model=testbed", "langs=[hi]", "layers=[4]", "train.max_steps=3",
                      "lora.r=2,4", "logger=wandb", "analysis.bootstrap=0", "data.max_sentences=16",
                      f"paths.cache_dir={testbed_cache_dir}",
                      f"hydra.sweep.dir={sweep}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2 and all((job / "adapter" / "adapter_config.json").is_file() for job in jobs)
    all_runs = offline_runs(sweep)
    runs = [r for r in all_runs if r["job_type"] == "train"]
    assert len(runs) == 2
    assert runs[0]["group"] == runs[1]["group"] == f"train-{sweep.name}"
    summary_runs = [r for r in all_runs if r["job_type"] == "summarize"]
    assert len(summary_runs) == 1 and summary_runs[0]["group"] == f"train-{sweep.name}"
    names = sorted(r["name"] for r in runs)
    assert names[0] != names[1] and "lora.r=2" in names[0] and "lora.r=4" in names[1]
    with (sweep / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert sorted(r["lora.r"] for r in table) == ["2", "4"]
    assert all(r["complete"] == "True" and float(r["dev_english_retention_pct"]) > 0 for r in table)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(testbed_dir, testbed_cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=local_cpu", "task=build_testbed", "model=testbed", "seed=1,2",
                      f"paths.cache_dir={testbed_cache_dir}", f"hydra.sweep.dir={sweep}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep.glob("*/COMPLETE"))) == 2
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    assert (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_reports_the_best(testbed_dir, testbed_cache_dir, tmp_path):
    sweep = tmp_path / "optuna"
    result = run_cli(["-m", "hparams_search=lora_optuna", "model=testbed", "langs=[hi]", "layers=[4]",
                      "train.max_steps=2", "hydra.sweeper.n_trials=2", "data.max_sentences=16", "analysis.bootstrap=0",
                      f"paths.cache_dir={testbed_cache_dir}",
                      f"hydra.sweep.dir={sweep}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    with (sweep / "summary.csv").open() as handle:
        scores = [float(r["alignment_score"]) for r in csv.DictReader(handle)]
    assert len(scores) == 2 and best["best_value"] == pytest.approx(max(scores))
    assert set(best["best_params"]) == {"lora.r", "lora.lora_alpha", "train.optimizer.lr", "loss.act_align",
                                        "loss.sae_fidelity", "loss.en_retain"}


@pytest.mark.slow
def test_optuna_marks_a_failed_trial_failed_and_goes_on(testbed_dir, testbed_cache_dir, tmp_path):
    sweep = tmp_path / "optuna"
    # lora_optuna's sweeper settings over lora.r alone; this seed draws lora.r=2 (trains), then lora.r=0 (fails).
    result = run_cli(["-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
                      "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra.sweeper.max_failure_rate=1.0",
                      "hydra.sweeper.direction=maximize", "task=train", "lora.r=choice(0,2)", "model=testbed",
                      "langs=[hi]", "layers=[4]", "train.max_steps=2", "data.max_sentences=24", "data.max_length=48",
                      "train.max_length=48", "analysis.batch_size=48", "analysis.bootstrap=0", "train.eval_every=0",
                      f"paths.cache_dir={testbed_cache_dir}", f"hydra.sweep.dir={sweep}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 1 and (sweep / "summary.csv").is_file(), result.stderr[-3000:]
    with (sweep / "summary.csv").open() as handle:
        table = {r["lora.r"]: r for r in csv.DictReader(handle)}
    assert table["0"]["status"] == "failed" and "lora.r=0" in table["0"]["error"]
    assert table["2"]["status"] == "ok" and table["2"]["complete"] == "True"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"lora.r": 2} and best["best_value"] == pytest.approx(float(table["2"]["alignment_score"]))
    assert "Failed experiment" in result.stderr + result.stdout


def test_summarize_takes_a_list_or_glob_of_run_directories(tmp_path):
    # Two single runs side by side (e.g. plain LoRA and activation-aware), not a multirun folder.
    for name, gain in (("plain", 3.0), ("aligned", 12.0)):
        run = tmp_path / "outputs" / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["task=train", f"loss={name}"]))
        (run / "metrics.json").write_text(json.dumps({"dev_activation_gain_pct_mean": gain, "alignment_score": gain}))
        (run / "COMPLETE").write_text("{}")
    out = tmp_path / "summary_run"
    result = run_cli(["task=summarize", f"runs=['{tmp_path}/outputs/*']", f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    with (out / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["loss"], float(r["alignment_score"]), r["status"]) for r in table] == [
        ("aligned", 12.0, "ok"), ("plain", 3.0, "ok")]
    assert (out / "summary.png").stat().st_size > 1000
    closing = result.stdout[result.stdout.index("task=summarize finished in"):]
    assert str(out / "summary.csv") in closing and str(out / "parallel_coordinates.png") in closing
    missing = run_cli(["task=summarize", f"runs=[{tmp_path}/nowhere]", f"hydra.run.dir={tmp_path / 'x'}"])
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "matches no directory" not in missing.stderr
    assert "is not a directory" in missing.stderr


_TRIAL_APP = '''
import hydra

import mlalign.config  # noqa: F401


@hydra.main(config_path={conf!r}, config_name="config", version_base="1.3")
def main(cfg):  # the project's config and sweeper; a trial's value is a known function of its parameters
    return float(cfg.lora.r) + float(cfg.train.optimizer.lr)


main()
'''


def test_optuna_study_resumes_from_its_sqlite_storage(tmp_path):
    """The storage lora_optuna.yaml suggests works with the pinned optuna / SQLAlchemy (SQLAlchemy 2.x made optuna
    2.10 raise AssertionError): a second launch with the same storage and study name continues the first one's study."""
    import os
    import subprocess
    import sys

    import optuna

    from tests.helpers import REPO

    app = tmp_path / "trial_app.py"
    app.write_text(_TRIAL_APP.format(conf=str(CONF_DIR)))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outputs = []
    for launch in range(2):
        result = subprocess.run(
            [sys.executable, str(app), "-m", "hparams_search=lora_optuna", "hydra.sweeper.n_trials=2",
             f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / f'launch{launch}'}",
             f"paths.root_dir={tmp_path}", "~hydra.callbacks.sweep_summary"],  # not mlalign jobs: no metrics.json
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    assert "Using an existing study" not in outputs[0] and "Using an existing study" in outputs[1]
    study = optuna.load_study(study_name="lora_activation_alignment", storage=storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    for trial in trials:  # each stored value is the one its own parameters give
        assert trial.value == pytest.approx(trial.params["lora.r"] + trial.params["train.optimizer.lr"])
