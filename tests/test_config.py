"""Every group option and experiment composes; model choices pull their own SAE set."""

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, compose_cfg

GROUPS = ["model", "sae", "data", "languages", "analysis", "loss", "lora", "train", "eval", "logger", "paths",
          "experiment", "hparams_search"]
NEEDS = {"data=text_dir": ["data.path=/tmp/corpus"], "sae=local": ["sae.path_template=/tmp/sae"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(override, tmp_path):
    extra = NEEDS.get(override, [])
    cfg = compose_cfg([override, *extra], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["task"] in {"analyze", "train", "eval", "pipeline", "build_testbed", "summarize"}


def test_top_level_defaults():
    cfg = compose_cfg()
    assert cfg.reference_lang == "en" and cfg.layers is None and cfg.seed == 0
    assert list(cfg.langs) == ["zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
    for group in ["model", "sae", "data", "analysis", "loss", "lora", "train", "eval", "logger", "paths"]:
        assert group in cfg


def test_model_selects_its_sae_and_sae_can_be_overridden():
    assert compose_cfg(["model=testbed"]).sae.name == "testbed"
    cfg = compose_cfg(["model=gemma2_2b"])
    assert cfg.sae.release == "gemma-scope-2b-pt-res-canonical"
    assert cfg.sae.id_template.format(layer=7) == "layer_7/width_16k/canonical"
    assert compose_cfg(["model=gemma2_2b", "sae=local", "sae.path_template='/x/sae_{layer}'"]).sae.name == "local"


def test_experiments_state_their_setting():
    paper = compose_cfg(["experiment=paper"])
    assert paper.model.name == "gemma2_2b" and paper.sae.release == "gemma-scope-2b-pt-res-canonical"
    assert paper.model.num_layers == 26 and paper.layers is None and paper.task == "pipeline"
    demo = compose_cfg(["experiment=testbed_demo"])
    assert demo.model.name == "testbed" and demo.sae.name == "testbed" and demo.eval.suite == "bundled"


def test_experiment_files_are_global_deltas():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_help_names_every_task_and_every_option_of_every_group():
    import subprocess
    import sys

    from mlalign.tasks import TASKS
    from tests.helpers import CONF_DIR, REPO

    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "schema" not in text
    for task in TASKS:
        assert f"\n  {task} " in text, task
    for group in ("model", "sae", "data", "languages", "analysis", "loss", "lora", "train", "eval", "logger",
                  "sae_train", "experiment", "hparams_search"):
        assert f"\n  {group} " in text, group
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            if group == "sae" and option not in ("local",):
                continue  # the SAE set follows the model
            assert option in text, (group, option)


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer.lr=abc"], r"train.optimizer \(torch.optim.AdamW\) cannot be built: .*train.optimizer.lr=abc is text"),
    (["train.optimizer._target_=torch.optim.NoSuchOptimizer"], r"train.optimizer \(torch.optim.NoSuchOptimizer\) cannot be built"),
    (["train.optimizer.weight_decay=-1"], r"cannot be built: Invalid weight_decay value: -1"),
    (["train.scheduler=cosine_forever"], r"unknown train.scheduler='cosine_forever'; use one of: linear, cosine"),
    (["analysis.bootstrap=-1"], r"analysis.bootstrap=-1 must be 0 \(no confidence intervals\)"),
    (["analysis.ci=95"], r"analysis.ci=95.0 must be a confidence level in \(0, 1\)"),
    # issue 30 audit: -1 sliced the last sentence off every language without a word; 0 failed later, on the corpus
    (["data.max_sentences=-1"], r"data.max_sentences=-1 must be a positive number .*data.max_sentences=null for all"),
    (["data.max_sentences=0"], r"data.max_sentences=0 must be a positive number"),
])
def test_bad_values_inside_groups_fail_before_anything_loads(overrides, message):
    from mlalign.config import check_values
    from mlalign.errors import UserError

    with pytest.raises(UserError, match=message):
        check_values(compose_cfg(["task=train", *overrides]))


@pytest.mark.parametrize("overrides, message", [
    # issue 30 audit: the paired tests read these only after every benchmark had run, then raised a traceback
    (["eval.bootstrap=0"], r"eval.bootstrap=0 must be a positive number of bootstrap resamples"),
    (["eval.bootstrap=-5"], r"eval.bootstrap=-5 must be a positive number"),
    (["eval.ci=1.5"], r"eval.ci=1.5 must be in \(0, 1\); type e.g. eval.ci=0.95"),
    (["eval.alpha=0"], r"eval.alpha=0.0 must be in \(0, 1\)"),
])
def test_bad_eval_values_fail_before_any_benchmark_runs(overrides, message):
    from mlalign.config import check_values
    from mlalign.errors import UserError

    for task in ("task=eval", "task=pipeline"):
        with pytest.raises(UserError, match=message):
            check_values(compose_cfg([task, "model=testbed", *overrides]))
    assert check_values(compose_cfg(["task=analyze", "model=testbed", *overrides])) == []  # analysis evaluates nothing


def test_few_eval_items_or_resamples_warn():
    from mlalign.config import MIN_EVAL_ITEMS, check_values

    lines = check_values(compose_cfg(["task=eval", "model=testbed", "eval.limit=2", "eval.bootstrap=5"]))
    assert len(lines) == 2 and "eval.bootstrap=5" in lines[0] and f"fewer than {MIN_EVAL_ITEMS} items" in lines[1]
    assert check_values(compose_cfg(["task=eval", "model=testbed", f"eval.limit={MIN_EVAL_ITEMS}"])) == []
    assert check_values(compose_cfg(["task=eval", "model=testbed", "eval.limit=null"])) == []


def test_few_resamples_warn_and_the_defaults_pass_silently():
    from mlalign.config import check_values

    assert check_values(compose_cfg(["task=pipeline", "model=testbed"])) == []
    assert check_values(compose_cfg(["task=analyze", "train.scheduler=nonsense"])) == []  # analysis trains nothing
    (line,) = check_values(compose_cfg(["task=analyze", "analysis.bootstrap=20"]))
    assert "analysis.bootstrap=20" in line and "fewer than 100 resamples" in line


@pytest.mark.parametrize("overrides, suite, said", [
    (["model=testbed", "eval=harness"], "harness", True),  # the testbed's eval file chose bundled; the user's wins
    (["experiment=testbed_demo", "eval=harness"], "harness", True),
    (["model=testbed"], "bundled", False),  # nothing typed: the testbed's offline suite
    (["model=testbed", "eval=harness", "eval.suite=bundled"], "bundled", False),  # the suite typed by name wins
    (["model=gemma2_2b", "eval=bundled"], "bundled", False),
])
def test_an_eval_suite_typed_on_the_command_line_is_honoured(overrides, suite, said):
    from mlalign.config import honour_typed_eval

    cfg = compose_cfg(overrides)
    line = honour_typed_eval(cfg, overrides)
    assert cfg.eval.suite == suite and bool(line) == said
    if said:
        assert line.startswith("eval=harness: running the harness suite you typed") and "chose bundled" in line
