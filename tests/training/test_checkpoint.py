"""Checkpoints record the run's settings; a resume compares them, and a damaged newest checkpoint falls back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlalign.errors import UserError
from mlalign.training.checkpoint import (KEEP, STATE_FILE, checkpoints_newest_first, resume_point, run_settings,
                                         save_checkpoint)
from tests.helpers import compose_cfg

ARGS = ["task=train", "model=testbed", "langs=[hi]", "layers=[4]", "train.max_steps=8", "train.optimizer.lr=3e-3"]


def bed(testbed_dir) -> list[str]:
    d = Path(testbed_dir)
    return [f"model.hf_id={d / 'model'}", f"sae.path_template='{d}/saes/layer_{{layer}}'"]


def write_checkpoints(cfg, run_dir: Path, steps, settings="from cfg", model_cfg=None) -> None:
    """Real checkpoints of a LoRA on the testbed, written by save_checkpoint as the training loop writes them, with
    `cfg`'s settings (the model from `model_cfg` if given: a config that points at the built testbed)."""
    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model
    from transformers import get_scheduler

    from mlalign.models import load_model

    model = get_peft_model(load_model(model_cfg or cfg.model), instantiate(cfg.lora, _convert_="all"))
    optimizer = instantiate(cfg.train.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(str(cfg.train.scheduler), optimizer, num_warmup_steps=2, num_training_steps=8)
    accelerator = Accelerator(cpu=True)
    for step in steps:
        save_checkpoint(accelerator, model, optimizer, scheduler, step, run_dir / "checkpoints", {"history": []},
                        settings=run_settings(cfg) if settings == "from cfg" else settings)


@pytest.fixture(scope="module")
def checkpointed(testbed_dir, tmp_path_factory):
    """A run directory holding checkpoints at steps 2, 4 and 6 of `ARGS` (KEEP of them stay)."""
    root = tmp_path_factory.mktemp("checkpointed")
    cfg = compose_cfg([*ARGS, *bed(testbed_dir)], root)
    write_checkpoints(cfg, root / "run", [2, 4, 6])
    return root / "run"


def resume_cfg(testbed_dir, tmp_path, *overrides):
    return compose_cfg([*ARGS, *bed(testbed_dir), "train.resume=true", *overrides], tmp_path)


def copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_the_newest_two_checkpoints_are_kept(checkpointed):
    assert [p.name for p in checkpoints_newest_first(checkpointed)] == ["step-00000006", "step-00000004"][:KEEP]


def test_identical_settings_resume_silently(testbed_dir, checkpointed, tmp_path):
    point = resume_point(resume_cfg(testbed_dir, tmp_path), checkpointed)
    assert point.checkpoint.name == "step-00000006" and point.notes == []


def test_changed_settings_are_one_error_naming_each_key_and_its_recorded_value(testbed_dir, checkpointed, tmp_path):
    cfg = resume_cfg(testbed_dir, tmp_path, "train.optimizer.lr=0.1", "lora.r=4", "seed=1")
    with pytest.raises(UserError) as info:
        resume_point(cfg, checkpointed)
    message = str(info.value)
    assert "\n" not in message
    for shown in ("lora.r=8 (now 4)", "seed=0 (now 1)", "train.optimizer.lr=0.003 (now 0.1)",
                  "type the recorded values (lora.r=8 seed=0 train.optimizer.lr=0.003)", "hydra.run.dir=<new dir>"):
        assert shown in message
    assert "max_steps" not in message  # unchanged keys are not named


def test_max_steps_raised_resumes_and_says_so_lowered_below_the_step_is_refused(testbed_dir, checkpointed, tmp_path):
    point = resume_point(resume_cfg(testbed_dir, tmp_path, "train.max_steps=20"), checkpointed)
    assert point.checkpoint.name == "step-00000006"
    assert len(point.notes) == 1 and "train.max_steps changed from 8 to 20: continuing from step 6" in point.notes[0]
    assert "cosine schedule now spans 20 steps" in point.notes[0]
    with pytest.raises(UserError, match=r"train.max_steps=8 \(now 5\)"):
        resume_point(resume_cfg(testbed_dir, tmp_path, "train.max_steps=5"), checkpointed)


def test_settings_that_do_not_define_the_run_may_change(testbed_dir, checkpointed, tmp_path):
    cfg = resume_cfg(testbed_dir, tmp_path, "train.save_every=1", "train.eval_every=3", "analysis.bootstrap=50",
                     "data.splits.analysis=dev", "logger=wandb")
    assert resume_point(cfg, checkpointed).notes == []


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(testbed_dir, checkpointed, tmp_path):
    run_dir = copy(checkpointed, tmp_path)
    state = run_dir / "checkpoints" / "step-00000006" / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    for resume in ("auto", "true"):
        point = resume_point(resume_cfg(testbed_dir, tmp_path, f"train.resume={resume}"), run_dir)
        assert point.checkpoint.name == "step-00000004"
        assert len(point.notes) == 1 and f"checkpoint file {state} is truncated or damaged" in point.notes[0]
        assert "resuming from the checkpoint before it" in point.notes[0]
    # Asked for by name, a damaged checkpoint is an error, not a silent switch to another one.
    cfg = resume_cfg(testbed_dir, tmp_path, "train.resume=false", f"train.resume_from={state.parent}")
    with pytest.raises(UserError, match=f"checkpoint file {state} is truncated or damaged"):
        resume_point(cfg, tmp_path / "elsewhere")
    older = run_dir / "checkpoints" / "step-00000004" / STATE_FILE
    older.write_bytes(b"")
    with pytest.raises(UserError, match=r"\(and every earlier one\); no readable checkpoint to resume from"):
        resume_point(resume_cfg(testbed_dir, tmp_path), run_dir)


def test_a_checkpoint_without_recorded_settings_resumes_and_says_they_were_not_compared(testbed_dir, tmp_path):
    cfg = compose_cfg([*ARGS, *bed(testbed_dir)], tmp_path)
    write_checkpoints(cfg, tmp_path / "old", [3], settings=None)
    point = resume_point(resume_cfg(testbed_dir, tmp_path), tmp_path / "old")
    assert point.checkpoint.name == "step-00000003" and "records no run settings" in point.notes[0]


def test_run_settings_keep_interpolations_as_typed():
    settings = run_settings(compose_cfg(["task=train", "model=testbed"]))
    assert settings["sae.path_template"].startswith("${")  # the testbed's folder is filled in only at run time
    assert settings["train.optimizer.lr"] == pytest.approx(3e-3) and settings["lora.r"] == 8
    assert "data.splits.analysis" not in settings and "train.save_every" not in settings
