"""`python -m mlalign.bench --quick` runs end to end and writes every number the README and `make bench` promise."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RATIOS = ["analyze_over_forward", "analyze_over_trunk", "naive_over_analyze", "saelens_over_analyze",
          "analyze_over_floor", "floor_over_forward", "saelens_over_floor",
          "act_over_plain_step", "full_over_plain_step", "rss_growth_pct"]
TIMES = ["forward_s", "trunk_s", "analyze_s", "analyze_nowindow_s", "naive_s", "saelens_s", "plain_step_s",
         "act_step_s", "full_step_s"]
CONTEXT = ["date", "device", "torch", "torch_threads", "analysed_tokens", "equality", "settings", "raw", "window_cost_pct",
           "analyze_peak_mb", "saelens_peak_mb", "rss", "train_step_impl", "saelens_error", "minor_page_faults"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(out.parent / "hf")}
    done = subprocess.run([sys.executable, "-m", "mlalign.bench", "--quick", "--out", str(out)], env=env,
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "analyze_over_forward" in done.stdout  # the table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_key_is_written(result):
    missing = [key for key in RATIOS + TIMES + CONTEXT if key not in result]
    assert not missing


@pytest.mark.slow
def test_times_and_ratios_are_finite_and_positive(result):
    # sae-lens is a real dependency here, so its peer must have run (a null would hide a broken comparison).
    assert result["saelens_error"] is None
    for key in TIMES + [r for r in RATIOS if r != "rss_growth_pct"]:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    # Page faults are counted per contender (0 is possible for a warm heap; a negative count is a bug).
    faults = result["minor_page_faults"]
    assert faults.keys() >= {"forward_s", "floor_s", "analyze_s", "saelens_s"}, faults
    assert all(v is None or v >= 0 for v in faults.values()) and result["raw"]["minor_page_faults"]["analyze_s"]
    # Growth may be 0 or slightly negative (allocator noise); it must be a number.
    assert math.isfinite(result["rss_growth_pct"])
    assert result["rss"]["large"]["sentences"] > result["rss"]["small"]["sentences"]


@pytest.mark.slow
def test_analysis_equals_the_unoptimised_reference(result):
    equality = result["equality"]
    assert equality["passed"], equality
    assert equality["max_rel_diff"] <= 1e-5


@pytest.mark.slow
def test_training_steps_ran_the_real_objective(result):
    impl = result["train_step_impl"]
    assert impl["act"].startswith("mlalign.training.loop.ObjectiveFn"), impl
    assert "forward passes" in impl["act"]
