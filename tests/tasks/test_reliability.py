"""Reliability across tasks: the bad-input matrix, kill -9 then resume, determinism, and no token in any output."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import REPO, run_cli


def _testbed_args(cache: Path, root: Path) -> list[str]:
    return ["model=testbed", f"paths.cache_dir={cache}", f"paths.root_dir={root}", *SMALL_TESTBED_OVERRIDES]


def _write_local_sae(folder: Path, d_in: int, layer: int) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=2 * d_in))
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae.save_model(folder / f"layer_{layer}")


def _bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_text("Hello.\nGood morning.\n", encoding="utf-8")
    (corpus / "hi.txt").write_text("\n\n", encoding="utf-8")
    (corpus / "mr.txt").write_bytes(b"\xff\xfe\x00broken")
    _write_local_sae(tmp / "saes32", d_in=32, layer=0)
    (tmp / "not_an_adapter").mkdir()
    return [
        (["task=analyze", "langs=[xx]"], "unknown language 'xx'"),
        (["task=analyze", "langs=[]"], "langs is empty"),
        (["task=analyze", "langs=[hi]", "layers=[26]"], "layer 26 is out of range"),
        (["task=analyze", "langs=[hi]", "layers=[]"], "layers is empty"),
        (["task=analyze", "langs=[hi]", "layers=[0]", "sae=local", f"sae.path_template={tmp / 'saes32'}"],
         "expects d_in=32 but the model's hidden size is 64"),
        (["task=analyze", "langs=[hi]", "layers=[3]", "sae=gemma2_2b", "sae.id_template='layer_{layer}/width_1m/canonical'"],
         "has no id 'layer_3/width_1m/canonical'"),
        (["task=analyze", "langs=[hi]", "sae=local", f"sae.path_template={tmp / 'nowhere'}"], "no SAE at"),
        (["task=eval", "eval=bundled", "langs=[hi]", f"model.hf_id={tmp / 'no_model'}"], "cannot load a model from"),
        (["task=analyze", "langs=[hi]", "data=text_dir", f"data.path={corpus}"], "holds no sentences"),
        (["task=analyze", "langs=[mr]", "data=text_dir", f"data.path={corpus}"], "is not valid UTF-8"),
        (["task=analyze", "langs=[ml]", "data=text_dir", f"data.path={corpus}"], "has no ml.txt"),
        (["task=train", "langs=[hi]", "lora.r=0"], "lora.r=0 must be a positive integer"),
        (["task=train", "langs=[hi]", "loss.ce=0", "loss.act_align=0", "loss.en_retain=0"], "every loss weight is 0"),
        (["task=analyze", "langs=[hi]", f"adapter={tmp / 'not_an_adapter'}"], "is not a peft adapter"),
        (["task=eval", "eval=bundled", "langs=[hi]", "eval.benchmarks=[piqa]"], "piqa"),
    ]


@pytest.mark.slow
def test_bad_input_matrix_is_one_line_nonzero_and_leaves_nothing_complete(testbed_dir, testbed_cache_dir, tmp_path):
    failures = []
    for num, (args, needle) in enumerate(_bad_input_cases(tmp_path)):
        root = tmp_path / f"case{num}"
        result = run_cli([*args, *_testbed_args(testbed_cache_dir, root)])
        # Progress bars (tqdm: "NN%|") share stderr; everything else must be the one error line.
        lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
        ok = (result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
              and "Traceback" not in result.stderr)
        leftovers = [p for p in root.rglob("*") if p.name in ("COMPLETE", "summary.json", "metrics.json", "results.json")]
        if not ok or leftovers:
            failures.append((args, result.returncode, result.stderr[-600:], leftovers))
    assert not failures, failures


@pytest.mark.slow
def test_uncached_gated_model_offline_says_how_to_log_in(tmp_path):
    result = run_cli(["task=analyze", "model=gemma2_2b", "langs=[hi]", "layers=[0]", f"paths.root_dir={tmp_path}"],
                     env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hf auth login" in result.stderr and "model=testbed" in result.stderr


def _train_args(cache: Path, run_dir: Path) -> list[str]:
    return ["task=train", "langs=[hi]", "layers=[4,12,20]", "train.max_steps=24", "train.save_every=4",
            "train.eval_every=100", f"hydra.run.dir={run_dir}", *_testbed_args(cache, run_dir.parent)]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(testbed_dir, testbed_cache_dir, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run_cli(_train_args(testbed_cache_dir, reference_dir))
    assert reference.returncode == 0, reference.stderr[-2000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), *_train_args(testbed_cache_dir, killed_dir)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed_dir / "checkpoints").glob("step-*00008")):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((killed_dir / "checkpoints").glob("step-*")), "no checkpoint was written before the kill"
    assert not (killed_dir / "COMPLETE").exists() and not (killed_dir / "adapter").exists()

    resumed = run_cli([*_train_args(testbed_cache_dir, killed_dir), "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    expected, got = _adapter(reference_dir), _adapter(killed_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_same_seed_same_analysis_numbers_and_training_curve(testbed_dir, testbed_cache_dir, tmp_path):
    def analyze(num):
        run_dir = tmp_path / f"analyze{num}"
        result = run_cli(["task=analyze", "langs=[hi,zh]", "analysis.cache=false", "data.max_sentences=16",
                          f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)])
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
        return summary["values"], summary["disparity_ci"]

    def train(num):
        run_dir = tmp_path / f"train{num}"
        result = run_cli(["task=train", "langs=[hi]", "layers=[4,20]", "train.max_steps=6", "train.eval_every=100",
                          f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)])
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((run_dir / "train" / "history.json").read_text())

    assert analyze(1) == analyze(2)
    first, second = train(1), train(2)
    assert len(first) == 6 and first == second


@pytest.mark.slow
def test_hf_token_never_reaches_outputs_or_wandb(testbed_dir, testbed_cache_dir, tmp_path):
    token = "hf_FAKEtoken0123456789abcdefSECRET"
    run_dir = tmp_path / "run"
    result = run_cli(["task=train", "langs=[hi]", "layers=[4]", "train.max_steps=2", "logger=wandb",
                      f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)],
                     env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / "config.yaml").is_file()
    leaks = [p for p in files if token.encode() in p.read_bytes()]
    assert not leaks
    assert token not in result.stdout + result.stderr
