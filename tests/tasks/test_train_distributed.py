"""Data-parallel training on two CPU processes (gloo), the closest this CPU-only CI gets to `accelerate launch`."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import REPO
from tests.wandb_offline import offline_runs


@pytest.mark.slow
def test_two_process_ddp_trains_checkpoints_and_writes_once(testbed_dir, testbed_cache_dir, tmp_path):
    """Both processes train; only the main one writes the run files and opens a W&B run (logger=wandb, offline)."""
    run_dir = tmp_path / "ddp"
    # Sixteen sentences per split and no bootstrap: the test is about the two processes (gradients, checkpoints, who
    # writes), not the numbers; measuring base vs adapter on the whole dev and test splits, in both processes, was
    # most of its time (as in tests/test_sweeps.py's multirun).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "run.py"), "task=train",
         "model=testbed", "langs=[hi]", "layers=[4,20]", "train.max_steps=4", "train.save_every=2", "logger=wandb",
         "data.max_sentences=16", "analysis.bootstrap=0",
         f"paths.cache_dir={testbed_cache_dir}", f"hydra.run.dir={run_dir}", *SMALL_TESTBED_OVERRIDES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["num_processes"] == 2 and state["step"] == 4
    assert (checkpoint / "rng_0.pt").is_file() and (checkpoint / "rng_1.pt").is_file()
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "COMPLETE").is_file()
    assert (result.stdout + result.stderr).count("split, reported once") == 1  # only the main process reports
    runs = offline_runs(run_dir)
    assert len(runs) == 1 and runs[0]["job_type"] == "train", runs
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
