"""Settings a training run cannot start with fail before any model loads (mlalign.training.checks)."""

import pytest

from mlalign.errors import UserError
from mlalign.training.checks import check_train_config
from tests.helpers import compose_cfg


@pytest.mark.parametrize("override, message", [
    # issue 30 audit: torch's Dropout raised a traceback after the model had loaded
    ("lora.lora_dropout=2", r"lora.lora_dropout=2.0 must be a probability in \[0, 1\); type e.g. lora.lora_dropout=0.05"),
    ("lora.lora_dropout=-0.1", r"lora.lora_dropout=-0.1 must be a probability"),
    # ... and lora_alpha=0 trained an adapter whose updates are all scaled to nothing
    ("lora.lora_alpha=0", r"lora.lora_alpha=0 must be > 0"),
    ("lora.r=0", r"lora.r=0 must be a positive integer"),
    ("train.save_every=-1", r"train.save_every must be >= 0"),
])
def test_lora_and_train_values_that_cannot_train_are_one_user_error(override, message):
    with pytest.raises(UserError, match=message):
        check_train_config(compose_cfg(["task=train", "model=testbed", override]))


def test_the_defaults_and_documented_edge_values_pass():
    for overrides in ([], ["lora.lora_dropout=0"], ["train.save_every=0"]):
        check_train_config(compose_cfg(["task=train", "model=testbed", *overrides]))


def test_task_train_checks_its_settings_before_the_run_directory_is_touched():
    """dispatch calls a task's check_config before RunContext writes config.yaml, builds the testbed or loads a
    tokenizer; task=train had none (pipeline and compare did), so a bad lora value cost a model load first."""
    from mlalign.tasks import train

    with pytest.raises(UserError, match="lora.lora_dropout"):
        train.check_config(compose_cfg(["task=train", "model=testbed", "lora.lora_dropout=1.5"]))
