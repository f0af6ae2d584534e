"""run.py end to end: config printing, user errors as one line with a non-zero exit, the testbed cache."""

import json
import time

import pytest

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import run_cli


def test_cfg_job_shows_every_group():
    result = run_cli(["--cfg", "job"])
    assert result.returncode == 0, result.stderr
    for group in ["model:", "sae:", "data:", "analysis:", "loss:", "lora:", "train:", "eval:", "logger:", "paths:"]:
        assert f"\n{group}" in result.stdout
    assert "gemma-scope-2b-pt-res-canonical" in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["task=nonsense"], "unknown task 'nonsense'; choose one of: task=analyze"),
    (["langs=[xx]"], "unknown language 'xx'"),
    (["langs=[]"], "langs is empty"),
    (["task=summarize"], "task=summarize needs the multirun directory"),
])
def test_user_errors_are_one_line_and_exit_nonzero(args, needle, tmp_path):
    result = run_cli([*args, f"paths.root_dir={tmp_path}"])
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("COMPLETE")), "a failed run must not look complete"


@pytest.mark.slow
def test_build_testbed_twice_second_is_a_cache_hit(testbed_dir, testbed_cache_dir, tmp_path):
    args = ["task=build_testbed", "model=testbed", f"paths.cache_dir={testbed_cache_dir}",
            f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES]
    started = time.time()
    # Each run its own directory: the default one is named by the second, and two fast runs share a second.
    first = run_cli([*args, f"hydra.run.dir={tmp_path / 'first'}"])
    assert first.returncode == 0, first.stderr
    assert str(testbed_dir) in first.stdout  # found the session's testbed: same spec, same hash
    second = run_cli([*args, f"hydra.run.dir={tmp_path / 'second'}"])
    assert second.returncode == 0 and str(testbed_dir) in second.stdout
    marker = testbed_dir / "COMPLETE"
    assert marker.stat().st_mtime < started, "the cache hit rebuilt the testbed"
    runs = [tmp_path / name / "metrics.json" for name in ("first", "second")]
    assert all(json.loads(p.read_text())["num_layers"] == 26 for p in runs)


@pytest.mark.slow
def test_layer_out_of_range_on_the_testbed(testbed_dir, testbed_cache_dir, tmp_path):
    result = run_cli(["task=analyze", "model=testbed", "langs=[hi]", "layers=[26]",
                      f"paths.cache_dir={testbed_cache_dir}", f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 1
    assert "layer 26 is out of range: this model has 26 layers (0..25)" in result.stderr
    assert not list(tmp_path.rglob("summary.json"))
