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
    # Every {lang}.txt of a text_dir is part of its corpus, so each broken corpus gets its own directory.
    def corpus(name: str, **files: str | bytes) -> Path:
        folder = tmp / name
        folder.mkdir()
        for lang, text in files.items():
            path = folder / f"{lang}.txt"
            path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
        return folder

    blank = corpus("blank", en="Hello.\nGood morning.\n", hi="\n\n")
    broken = corpus("broken", en="Hello.\nGood morning.\n", mr=b"\xff\xfe\x00broken")
    uneven = corpus("uneven", en="Hello.\nGood morning.\nGood night.\n", hi="नमस्ते।\nसुप्रभात।\n")
    two_lines = corpus("two_lines", en="Hello.\nGood morning.\n", hi="नमस्ते।\nसुप्रभात।\n")
    _write_local_sae(tmp / "saes32", d_in=32, layer=0)
    (tmp / "not_an_adapter").mkdir()
    damaged = _damaged_user_files(tmp)
    return [
        *damaged,
        (["task=train", "langs=[hi]", "train.optimizer.lr=abc"], "train.optimizer.lr=abc is text"),
        (["task=train", "langs=[hi]", "train.scheduler=cosine_forever"], "unknown train.scheduler='cosine_forever'"),
        (["task=analyze", "langs=[hi]", "analysis.bootstrap=-1"], "analysis.bootstrap=-1 must be 0"),
        (["task=analyze", "langs=[hi]", "data.max_sentences=1"], "holds 1 sentence(s) per language"),
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
        (["task=analyze", "langs=[hi]", "data=text_dir", f"data.path={blank}"], "holds no sentences"),
        (["task=analyze", "langs=[mr]", "data=text_dir", f"data.path={broken}"], "is not valid UTF-8"),
        (["task=analyze", "langs=[ml]", "data=text_dir", f"data.path={blank}"], "has no ml.txt"),
        (["task=analyze", "langs=[hi]", "data=text_dir", f"data.path={uneven}"],
         "not parallel: en.txt 3 lines, hi.txt 2 lines"),
        (["task=train", "langs=[hi]", "data=text_dir", f"data.path={two_lines}"],
         "split 'train' of the corpus at"),
        (["task=analyze", "langs=[hi]", "data=text_dir", f"data.path={two_lines}", "data.test_fraction=1.0"],
         "data.test_fraction=1.0 must each be in [0, 1)"),
        (["task=analyze", "langs=[hi]", "data.normalize=NFX"], "is not a Unicode normal form"),
        (["task=analyze", "langs=[hi]", "data.splits.analysis=valid"], "unknown split 'valid'"),
        (["task=pipeline", "langs=[en]"], "needs a language besides en"),
        (["task=train", "langs=[hi]", "lora.r=0"], "lora.r=0 must be a positive integer"),
        (["task=train", "langs=[hi]", "loss.ce=0", "loss.act_align=0", "loss.sae_fidelity=0", "loss.en_retain=0"], "every loss weight is 0"),
        (["task=analyze", "langs=[hi]", f"adapter={tmp / 'not_an_adapter'}"], "is not a peft adapter"),
        (["task=eval", "eval=bundled", "langs=[hi]", "eval.benchmarks=[piqa]"], "piqa"),
    ]


def _damaged_user_files(tmp: Path) -> list[tuple[list[str], str]]:
    """Issue 30's class 3: a user's SAE or adapter files that are corrupt or do not match."""
    import json as json_

    from safetensors.torch import save_file

    cases = []
    for damage, needle in (("not_json", "cfg.json is not valid JSON"), ("d_in", "holds W_enc of shape [64, 128]"),
                           ("no_weights", "sae_weights.safetensors is missing")):
        folder = tmp / f"sae_{damage}"
        _write_local_sae(folder, d_in=64, layer=0)
        layer = folder / "layer_0"
        if damage == "not_json":
            (layer / "cfg.json").write_text('{"d_in": 64,')
        elif damage == "d_in":
            cfg = json_.loads((layer / "cfg.json").read_text())
            (layer / "cfg.json").write_text(json_.dumps({**cfg, "d_in": 32}))
        else:
            (layer / "sae_weights.safetensors").unlink()
        cases.append((["task=analyze", "langs=[hi]", "layers=[0]", "sae=local", f"sae.path_template={folder}"], needle))
    adapter = tmp / "cut_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json_.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"w": torch.zeros(64, 64)}, str(adapter / "adapter_model.safetensors"))
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((["task=analyze", "langs=[hi]", f"adapter={adapter}"], "adapter_model.safetensors is truncated"))
    return cases


@pytest.mark.slow
def test_bad_input_matrix_is_one_line_nonzero_and_leaves_nothing_complete(testbed_dir, testbed_cache_dir, tmp_path):
    failures = []
    cases = _bad_input_cases(tmp_path)
    # run_cli forks its command lines from a server that imported the libraries once (tests/cli_forks.py); the first
    # case, run in a fresh interpreter as well, gives the same status and the same stderr.
    fresh = run_cli([*cases[0][0], *_testbed_args(testbed_cache_dir, tmp_path / "fresh")], fresh=True)
    forked = run_cli([*cases[0][0], *_testbed_args(testbed_cache_dir, tmp_path / "forked")])
    assert (fresh.returncode, fresh.stderr) == (forked.returncode, forked.stderr) and fresh.returncode == 1
    for num, (args, needle) in enumerate(cases):
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
def test_reference_only_analysis_of_a_users_corpus_with_bom_crlf_and_a_blank_line(testbed_dir, testbed_cache_dir,
                                                                                   tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    en = ["Good morning.", "", "The river is wide.", "Hello.", "Hello.", "We eat rice.", "It rains.", "Come here."]
    hi = ["सुप्रभात।", "तुम कहाँ हो?", "नदी चौड़ी है।", "नमस्ते।", "नमस्कार।", "हम चावल खाते हैं।", "बारिश हो रही है।", "यहाँ आओ।"]
    (corpus / "en.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(en).encode() + b"\r\n")
    (corpus / "hi.txt").write_text("\n".join(hi) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    result = run_cli(["task=analyze", "langs=[en]", "layers=[0,12,25]", "analysis.bootstrap=20", "data=text_dir",
                      f"data.path={corpus}", f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["langs"] == ["en"] and not any("than English" in x for x in summary["statements"]) and summary["n_sentences"] == {"en": 7}
    assert all(summary["values"]["en"][str(layer)]["mean_act"] is not None for layer in (0, 12, 25))
    assert (run_dir / "analysis" / "layer_curves.png").is_file()
    assert not (run_dir / "analysis" / "disparity_heatmap.png").exists() and (run_dir / "COMPLETE").is_file()
    report = json.loads((run_dir / "corpus.json").read_text())
    assert report["lines_read"] == 8 and report["kept"] == 7 and report["dropped"]["blank_in"] == {"en": ["2"]}
    assert report["langs"]["en"]["duplicates"]["first"] == [["5", "4"]]
    assert report["langs"]["en"]["dropped"] == {"blank_here": 1, "blank_in_another_language": 0}
    assert report["langs"]["hi"]["dropped"] == {"blank_here": 0, "blank_in_another_language": 1}
    assert report["langs"]["en"]["tokens_per_sentence"]["max"] > 1 and "tokens_per_sentence" not in report["langs"]["hi"]
    assert report["splits_used"] == {"analysis": "all"}
    splits = {name: set(entry["ids"]) for name, entry in report["splits"].items()}
    assert not (splits["train"] & splits["dev"] or splits["train"] & splits["test"] or splits["dev"] & splits["test"])
    assert "dropped 1 line(s) in every language" in result.stdout + result.stderr
    assert "\ufeff" not in (run_dir / "corpus.json").read_text(encoding="utf-8")


@pytest.mark.slow
def test_uncached_gated_model_offline_says_how_to_log_in(tmp_path):
    result = run_cli(["task=analyze", "model=gemma2_2b", "langs=[hi]", "layers=[0]", f"paths.root_dir={tmp_path}"],
                     env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hf auth login" in result.stderr and "model=testbed" in result.stderr


def _train_args(cache: Path, run_dir: Path) -> list[str]:
    # Small on purpose (this test runs a training three times): one layer, 8 steps saved every 2, few sentences.
    return ["task=train", "langs=[hi]", "layers=[4]", "train.max_steps=8", "train.save_every=2",
            "train.eval_every=100", "data.max_sentences=16", "analysis.bootstrap=20", f"hydra.run.dir={run_dir}",
            *_testbed_args(cache, run_dir.parent)]


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
    while time.time() < deadline and not list((killed_dir / "checkpoints").glob("step-*00004")):
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
        # Three layers (first, middle, last) and a short bootstrap: the test is about run-to-run identity, which
        # does not need all 26 layers (they took most of this test's 8 minutes on a loaded 2-core box).
        result = run_cli(["task=analyze", "langs=[hi,zh]", "analysis.cache=false", "data.max_sentences=16",
                          "layers=[0,12,25]", "analysis.bootstrap=200",
                          f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)])
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
        return summary["values"], summary["disparity_ci"]

    def train(num):
        run_dir = tmp_path / f"train{num}"
        result = run_cli(["task=train", "langs=[hi]", "layers=[4,20]", "train.max_steps=6", "train.eval_every=100",
                          "data.max_sentences=16", "analysis.bootstrap=100",
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
                      "data.max_sentences=8", "analysis.bootstrap=50",
                      f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)],
                     env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / "config.yaml").is_file()
    leaks = [p for p in files if token.encode() in p.read_bytes()]
    assert not leaks
    assert token not in result.stdout + result.stderr


# --- issue 30: resume, rerun, damaged files, full disk, SIGTERM -----------------------------------------------------

def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow
def test_resume_with_changed_settings_is_one_error_and_leaves_config_yaml_alone(testbed_dir, testbed_cache_dir,
                                                                                tmp_path):
    """Before: a changed lr trained silently at the checkpoint's rate, a changed lora.r crashed, and config.yaml
    was rewritten with the failed settings."""
    from tests.helpers import compose_cfg
    from tests.training.test_checkpoint import bed, write_checkpoints

    run_dir = tmp_path / "killed"
    args = ["task=train", "langs=[hi]", "layers=[4]", "train.max_steps=8", *_testbed_args(testbed_cache_dir, tmp_path)]
    write_checkpoints(compose_cfg(args), run_dir, [4],
                      model_cfg=compose_cfg([*args, *bed(testbed_dir)]).model)  # as a run killed after step 4
    (run_dir / "config.yaml").write_text("# the interrupted run's settings\n")
    result = run_cli([*args, f"hydra.run.dir={run_dir}", "train.resume=auto", "train.optimizer.lr=0.1", "lora.r=4"])
    line = _one_error_line(result)
    assert "cannot resume from" in line and "lora.r=8 (now 4)" in line and "train.optimizer.lr=0.003 (now 0.1)" in line
    assert (run_dir / "config.yaml").read_text() == "# the interrupted run's settings\n"
    assert not (run_dir / "COMPLETE").exists() and (run_dir / "ERROR").read_text().startswith("error: cannot resume")


@pytest.mark.slow
def test_a_rerun_into_a_finished_run_directory_is_refused_unless_asked_to_overwrite(testbed_cache_dir, tmp_path):
    """The rule: a finished run's directory (COMPLETE) is not reused by accident. Before: a failing rerun left
    COMPLETE and ERROR side by side."""
    from mlalign.io import mark_complete

    run_dir = tmp_path / "finished"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("# the finished run\n")
    mark_complete(run_dir, {"task": "analyze"})
    args = ["task=analyze", f"hydra.run.dir={run_dir}", *_testbed_args(testbed_cache_dir, tmp_path)]
    for langs in ("langs=[hi]", "langs=[xx]"):  # a good rerun and a mistyped one are both refused
        line = _one_error_line(run_cli([*args, langs]))
        assert "holds a finished run (COMPLETE)" in line and "overwrite=true" in line
        assert (run_dir / "COMPLETE").is_file() and not (run_dir / "ERROR").exists()
        assert (run_dir / "config.yaml").read_text() == "# the finished run\n"
    result = run_cli([*args, "langs=[xx]", "overwrite=true"])
    assert "unknown language 'xx'" in _one_error_line(result)
    assert not (run_dir / "COMPLETE").exists() and (run_dir / "ERROR").is_file()  # never both


@pytest.mark.slow
def test_a_full_disk_is_one_error_an_error_file_and_no_complete(testbed_dir, testbed_cache_dir, tmp_path):
    """A real failing write: the file-size limit (RLIMIT_FSIZE, EFBIG) stands in for a full disk (ENOSPC); both reach
    the same handler. Before: a traceback, and a file cut at the limit under its final name."""
    import resource

    limit = 12000  # above what Hydra itself writes first (.hydra/*.yaml), below corpus.json and the plots
    run_dir = tmp_path / "run"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "task=analyze", "langs=[hi]", "layers=[0]",
                             "data.max_sentences=12", "analysis.cache=false", f"hydra.run.dir={run_dir}",
                             *_testbed_args(testbed_cache_dir, tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600, preexec_fn=small_files)
    line = _one_error_line(result)
    assert "no room to write" in line and "File too large" in line
    assert (run_dir / "ERROR").read_text().startswith("error: no room to write") and not (run_dir / "COMPLETE").exists()
    cut = [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == limit]
    assert not cut  # nothing truncated at the limit under its final name


@pytest.mark.slow
def test_a_full_disk_at_a_training_checkpoint_is_an_error_line_of_its_own(testbed_dir, testbed_cache_dir, tmp_path):
    """Issue 30 audit: the checkpoint's write failed inside the training loop and the error line was printed on the
    end of the open progress bar's line, and the adapter was saved straight into adapter/ (a cut file there)."""
    import resource

    limit = 200000  # above corpus.json and config.yaml, below a checkpoint (~1.7 MB of LoRA weights and Adam state)
    run_dir = tmp_path / "run"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *_train_args(testbed_cache_dir, run_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, preexec_fn=small_files)
    assert "no room to write" in _one_error_line(result)
    assert (run_dir / "ERROR").is_file() and not (run_dir / "COMPLETE").exists()
    assert not [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == limit]


@pytest.mark.slow
def test_sigterm_during_evaluation_ends_with_a_message_and_an_error_file(testbed_dir, testbed_cache_dir, tmp_path):
    """Before: rc 143, no message, no ERROR file (training alone said where it stopped)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(REPO / "run.py"), "task=eval", "eval=bundled", "langs=[hi]",
                                    "eval.limit=20", "eval.cache=false", f"hydra.run.dir={run_dir}",
                                    *_testbed_args(testbed_cache_dir, tmp_path)],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in process.stdout:
            if line.startswith("evaluating"):  # the evaluation stage has started
                process.send_signal(signal.SIGTERM)
                break
        process.stdout.read()
        process.wait(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "error: stopped by SIGTERM during task=eval" in err
    assert (run_dir / "ERROR").read_text().startswith("error: stopped by SIGTERM") and not (run_dir / "COMPLETE").exists()


def test_a_tiny_split_warns_without_intervals_too(tmp_path):
    """Issue 30 audit: a one-sentence corpus with analysis.bootstrap=0 finished without a word (the check of tiny
    splits returned early when no interval was asked for)."""
    from mlalign.tasks import _check_ci_splits
    from tests.helpers import compose_cfg

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "en.txt").write_text("Hello.\n", encoding="utf-8")
    (corpus / "hi.txt").write_text("नमस्ते।\n", encoding="utf-8")
    cfg = compose_cfg(["task=analyze", "langs=[hi]", "data=text_dir", f"data.path={corpus}", "analysis.bootstrap=0"])
    warnings = []
    _check_ci_splits(cfg, ["en", "hi"], warnings)
    assert len(warnings) == 1 and "holds 1 sentence(s) per language" in warnings[0]
    assert "not to be reported" in warnings[0]


@pytest.mark.parametrize("resume", ["true", "auto"])
def test_resuming_into_a_finished_run_without_checkpoints_is_refused_and_leaves_it_whole(resume, tmp_path):
    """Issue 30 audit: task=train train.resume=true aimed at a finished analysis removed its COMPLETE (as if continuing
    a training) and then failed for want of a checkpoint; train.resume=auto trained afresh among the analysis' files."""
    from mlalign.io import mark_complete
    from mlalign.tasks import FinishedRunDirectory, _claim_run_dir
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["task=train", f"train.resume={resume}"], tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mark_complete(run_dir, {"task": "analyze"})
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(FinishedRunDirectory, match="holds a finished run \\(COMPLETE\\) and no training checkpoint to "
                                                   "resume; .*overwrite=true to replace it$"):
        _claim_run_dir(cfg)
    assert (run_dir / "COMPLETE").is_file() and (run_dir / "metrics.json").is_file()
