"""A command line Hydra cannot compose is one `error:` line, like every other user mistake (mlalign.errors)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlalign.errors import SIGTERM_EXIT_STATUS, one_line
from tests.helpers import REPO, run_cli


def test_hydras_indented_option_lists_continue_their_line():
    text = ("In 'config': Could not find 'model/nope'\n\nAvailable options in 'model':\n\tgemma2_2b\n\ttestbed\n"
            "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf")
    assert one_line(text) == "In 'config': Could not find 'model/nope'; Available options in 'model': gemma2_2b, testbed"


@pytest.mark.parametrize("override, said", [
    # issue 30 audit: each was 6-8 lines of Hydra's report (message, cause, full_key, reference_type, object_type, ...)
    ("lora.alpha=32", "Could not override 'lora.alpha'; To append to your config use +lora.alpha=32 (Key 'alpha' not in"),
    ("lora.lora_alpha=abc", "Error merging override lora.lora_alpha=abc (Value 'abc' of type 'str' could not be "
                            "converted to Integer)"),
    ("model=nope", "Could not find 'model/nope'; Available options in 'model': gemma2_2b, "),
    ("train.max_steps=[", "cannot parse the override 'train.max_steps=['"),
])
def test_a_command_line_hydra_cannot_compose_is_one_error_line(override, said, tmp_path):
    result = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert said in lines[0] and "python run.py --help" in lines[0] and "Traceback" not in result.stderr


def test_hydra_full_error_still_gives_hydras_stack_trace(tmp_path):
    result = run_cli(["lora.alpha=32", f"hydra.run.dir={tmp_path / 'run'}"], env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM installed (Linux: the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")
def test_a_sigterm_while_the_libraries_import_is_one_line_and_status_143(tmp_path):
    """Issue 30's leftover: before the dispatcher's handler exists a SIGTERM killed the run silently (-15). The signal
    is sent as soon as run.py has its first handler, seconds before torch, Hydra and the config are loaded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), "task=analyze", "model=testbed",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, "run.py never installed a SIGTERM handler"
            time.sleep(0.01)
        loaded = set(Path(f"/proc/{process.pid}/maps").read_text().split())
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert not any("libtorch" in name for name in loaded)  # it really was early: torch not loaded yet
    assert process.returncode == SIGTERM_EXIT_STATUS
    assert err.strip().startswith("error: stopped by SIGTERM outside any task") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "COMPLETE").exists()
