"""W&B tracking offline: the training curve survives earlier unstepped logs, a resumed run continues the same W&B run,
and the adapter is logged as an artifact."""

from mlalign.tracking import RUN_ID_FILE, WandbTracker
from tests.helpers import compose_cfg
from tests.wandb_offline import offline_history, offline_records, offline_runs


def _flushed(tracker, exit_code=0):
    """Finish the run and stop W&B's service, which writes the offline run log after `finish` returns."""
    import wandb

    tracker.finish(exit_code=exit_code)
    wandb.teardown()


def _tracker(run_dir, *overrides):
    cfg = compose_cfg(["logger=wandb", "logger.mode=offline", *overrides])
    return WandbTracker(cfg, run_dir, "pipeline", name="test", group="test", config={"task": "pipeline"})


def test_training_steps_after_unstepped_logs_are_all_kept(tmp_path):
    """task=pipeline logs its analysis before training starts at step 1: W&B used to drop those first steps."""
    tracker = _tracker(tmp_path)
    for key in ("analysis/a", "analysis/b", "analysis/c"):
        tracker.log({key: 1.0})
    for step in (1, 2, 3, 4):
        tracker.log({"train/total": 1.0 / step}, step=step)
    _flushed(tracker)
    steps = [float(row["train/step"]) for row in offline_history(tmp_path) if "train/total" in row]
    assert steps == [1.0, 2.0, 3.0, 4.0]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    first = _tracker(tmp_path)
    first.log({"train/total": 1.0}, step=1)
    _flushed(first, exit_code=1)
    second = _tracker(tmp_path)  # the same run directory: a requeued or train.resume job
    second.log({"train/total": 0.5}, step=2)
    _flushed(second)
    ids = {run["id"] for run in offline_runs(tmp_path)}
    assert ids == {(tmp_path / RUN_ID_FILE).read_text().strip()}
    assert len(list(tmp_path.rglob("run-*.wandb"))) == 2  # two sessions, one W&B run
    other = tmp_path / "other"
    _flushed(_tracker(other))
    assert (other / RUN_ID_FILE).read_text() != (tmp_path / RUN_ID_FILE).read_text()


def test_the_adapter_is_logged_as_a_model_artifact_unless_switched_off(tmp_path):
    adapter = tmp_path / "on" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 64)
    tracker = _tracker(tmp_path / "on")
    tracker.log_adapter(adapter)
    _flushed(tracker)
    artifacts = offline_records(tmp_path / "on", "artifact")
    assert [(a.type, a.name) for a in artifacts] == [("model", f"adapter-{tracker.run.id}")]
    off = _tracker(tmp_path / "off", "logger.log_adapter=false")
    off.log_adapter(adapter)
    _flushed(off)
    assert offline_records(tmp_path / "off", "artifact") == []
