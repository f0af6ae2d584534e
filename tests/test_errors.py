"""A command line Hydra cannot compose is one `error:` line, like every other user mistake (mlalign.errors)."""

import pytest

from mlalign.errors import one_line
from tests.helpers import run_cli


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
