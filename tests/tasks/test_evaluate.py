"""task=eval on the testbed: lm-eval's own files, a paired test per cell, and the base model from the cache next time."""

import json
import re

import pytest

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import run_cli


def _random_adapter(testbed_dir, folder, seed=0):
    """A LoRA adapter with random (not zero) B matrices on every projection, so base and adapter (and two seeds)
    answer differently: on q/v only, two seeds gave identical accuracies on testbed build 3."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(testbed_dir / "model")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    peft.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_eval_writes_lm_eval_files_tests_every_cell_and_reuses_the_base_model(testbed_dir, testbed_cache_dir,
                                                                               tmp_path):
    adapter = _random_adapter(testbed_dir, tmp_path / "adapter")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")  # this test's eval cache starts empty
    common = ["task=eval", "model=testbed", "eval=bundled", "langs=[hi]", "eval.limit=8", "eval.bootstrap=500",
              "eval.benchmarks=[arc_challenge]",
              "eval.num_fewshot={arc_challenge: 1}", f"paths.cache_dir={tmp_path / 'cache'}",
              f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES]
    first = run_cli([*common, f"adapter={adapter}", f"hydra.run.dir={tmp_path / 'first'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cache hit" not in first.stdout and "evaluating the base model" in first.stdout
    eval_dir = tmp_path / "first" / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    cells = [cell for by_lang in results["results"].values() for cell in by_lang.values()]
    assert len(cells) == 2 and results["has_adapter"]  # arc in en and hi
    for cell in cells:
        assert 0.0 <= cell["p_value"] <= 1.0 and cell["p_value"] <= cell["p_holm"]
        low, high = cell["diff_ci"]
        assert low <= cell["diff"]["acc"] <= high
    assert results["results"]["arc_challenge"]["hi"]["num_fewshot"] == 1
    for side in ("base", "adapter"):
        assert sorted(p.name.split("_")[0] for p in (eval_dir / "lm_eval" / side).glob("results_*.json"))
        samples = {p.name.rsplit("_", 1)[0] for p in (eval_dir / "lm_eval" / side).glob("samples_*.jsonl")}
        assert samples == {f"samples_mlalign_arc_{lang}" for lang in ("en", "hi")}
    assert "p (McNemar)" in (eval_dir / "results.md").read_text()

    # The same settings again: neither side is evaluated, and the numbers and files are the same.
    second = run_cli([*common, f"adapter={adapter}", f"hydra.run.dir={tmp_path / 'second'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cache hit: base" in second.stdout and "cache hit: adapter" in second.stdout
    assert "evaluating" not in second.stdout
    again = json.loads((tmp_path / "second" / "eval" / "results.json").read_text())
    assert again["results"] == results["results"]
    assert list((tmp_path / "second" / "eval" / "lm_eval" / "base").glob("samples_*.jsonl"))
    # A different limit is a different key; eval.cache=false evaluates even with a matching entry.
    third = run_cli([*common, "eval.cache=false", f"hydra.run.dir={tmp_path / 'third'}"])
    assert third.returncode == 0 and "cache hit" not in third.stdout and "evaluating the base model" in third.stdout


@pytest.mark.slow
def test_unknown_task_is_one_error_line_before_the_testbed_loads(tmp_path):
    result = run_cli(["task=eval", "model=testbed", "eval=bundled", "langs=[hi]", "eval.tasks=[mlalign_mmlu_hj]",
                      f"paths.cache_dir={tmp_path / 'empty_cache'}", f"paths.root_dir={tmp_path}"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown lm-eval task 'mlalign_mmlu_hj'")
    assert "mlalign_mmlu_hi" in result.stderr and not (tmp_path / "empty_cache" / "testbed").exists()


@pytest.mark.slow
def test_two_adapters_on_one_base_give_the_numbers_of_two_separate_runs(testbed_dir, testbed_cache_dir, tmp_path):
    from mlalign.tasks.eval_compare import compare_folders

    adapters = [_random_adapter(testbed_dir, tmp_path / f"adapter{k}", seed=k) for k in range(2)]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")
    common = ["task=eval", "model=testbed", "eval=bundled", "langs=[hi]", "eval.limit=8", "eval.bootstrap=500",
              "eval.benchmarks=[arc_challenge]", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}",
              *SMALL_TESTBED_OVERRIDES]
    separate = []
    for k, adapter in enumerate(adapters):  # the first evaluates the base model, the second reuses it from the cache
        done = run_cli([*common, f"adapter={adapter}", f"hydra.run.dir={tmp_path / f'single{k}'}"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("cache hit: base" in done.stdout) == (k > 0)
        separate.append(json.loads((tmp_path / f"single{k}" / "eval" / "results.json").read_text()))
    assert separate[0]["results"] != separate[1]["results"]  # the adapters differ, so the check below can fail

    listed = "[" + ",".join(str(a) for a in adapters) + "]"
    together = run_cli([*common, "eval.cache=false", f"adapters={listed}", f"hydra.run.dir={tmp_path / 'together'}"])
    assert together.returncode == 0, together.stderr[-3000:]
    started = re.findall(r"^(evaluating .*) \.\.\.$", together.stdout, re.M)  # console.stage's start lines
    assert started == ["evaluating the base model on 2 lm-eval task(s)"] + [
        f"evaluating base + adapter {adapter} on 2 lm-eval task(s)" for adapter in adapters]
    assert len(re.findall(r"^loading model testbed: done in", together.stdout, re.M)) == 1  # one base for all three
    eval_dir = tmp_path / "together" / "eval"
    for k in range(2):
        joint = json.loads((eval_dir / f"adapter_{k}" / "results.json").read_text())
        assert joint["results"] == separate[k]["results"]  # scores, items, p-values, CIs, Holm: all identical
    table = (eval_dir / "adapters.md").read_text()
    assert all(str(adapter) in table for adapter in adapters)
    metrics = json.loads((tmp_path / "together" / "metrics.json").read_text())
    assert metrics["adapter_1/mean_diff_acc"] == pytest.approx(
        sum(c["diff"]["acc"] for c in separate[1]["results"]["arc_challenge"].values()) / 2)

    # lm-eval's own sample files of the same run, through task=eval_compare: the same paired p-values.
    folders = compare_folders(eval_dir / "lm_eval" / "base", eval_dir / "lm_eval" / "adapter_1", resamples=500)
    for lang, cell in separate[1]["results"]["arc_challenge"].items():
        other = folders["results"][cell["task"]]["all"]
        assert other["p_value"] == pytest.approx(cell["p_value"]) and other["diff"]["acc"] == pytest.approx(cell["diff"]["acc"])
