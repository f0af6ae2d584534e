"""Issue 30 audit: run each reliability case as a new user would (`python run.py ...` on the offline testbed) and
classify what happened. See README.md next to this file.

    nice -n 15 env OMP_NUM_THREADS=1 python experiments/reliability/audit.py [--cache DIR] [--work DIR] [--fresh]
        [--only ID[,ID...]] [--out results.json]

Outcome classes (per case, `observed`):
  one-line error    rc != 0 and exactly one non-progress stderr line, starting `error: `
  correct handling  rc 0 and the case's expected message was said (a resume that says so, a warning on file, ...)
  traceback         a Python traceback on stderr (a bug reached the user)
  silent accept     rc 0 where the input was bad (or the handling was not said)
  other: ...        anything else, named (an error with more stderr lines, a kill without a message, a bad
                    side effect such as COMPLETE left behind or config.yaml rewritten)
A case passes when `observed` is one of its `expected` classes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.testbed.pretrain_steps=30", "model.testbed.sae_train_tokens=4000", "model.testbed.sae_train_steps=100"]
PROGRESS = re.compile(r"\d+%\|")
ERR, OK = "one-line error", "correct handling"


@dataclass
class Case:
    id: str
    klass: int  # the class 1..7
    what: str
    args: list[str]  # {run} {case} {setup} {testbed} are filled in
    expected: tuple[str, ...] = (ERR,)
    said: str | None = None  # regex that must be on the console (stdout+stderr) for `correct handling`
    prepare: Callable[[Path, "Env"], None] | None = None  # builds files under the case dir
    check: Callable[[Path, "Env"], list[str]] | None = None  # extra post-conditions: returns problems
    sigterm_on: str | None = None  # send SIGTERM when a stdout line matches (then `sigterm_delay` s later)
    sigterm_delay: float = 0.0
    fsize_limit: int | None = None  # RLIMIT_FSIZE: stands in for a full disk
    error_file: bool = True  # an error must leave <run>/ERROR (a refused rerun into a finished run writes none)


@dataclass
class Env:
    cache: Path
    work: Path
    testbed: Path = None  # the built small testbed
    setup: Path = None
    extra: dict = field(default_factory=dict)


def base_args(env: Env, root: Path) -> list[str]:
    return ["model=testbed", *SMALL, f"paths.cache_dir={env.cache}", f"paths.root_dir={root}"]


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def run_cli(args: list[str], timeout: int = 900, sigterm_on: str | None = None, sigterm_delay: float = 0.0,
            fsize_limit: int | None = None) -> tuple[int, str, str, bool]:
    """(rc, stdout, stderr, signalled)."""
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    preexec = None
    if fsize_limit:
        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    process = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=preexec)
    err_chunks: list[str] = []
    reader = threading.Thread(target=lambda: err_chunks.append(process.stderr.read()), daemon=True)
    reader.start()
    out, signalled = [], False
    watchdog = threading.Timer(timeout, process.kill)  # a hang ends as a kill (rc -9), classified `other`
    watchdog.start()
    for line in process.stdout:
        out.append(line)
        if sigterm_on and not signalled and re.search(sigterm_on, line):
            time.sleep(sigterm_delay)
            process.send_signal(signal.SIGTERM)
            signalled = True
    process.wait()
    watchdog.cancel()
    reader.join(timeout=30)
    return process.returncode, "".join(out), "".join(err_chunks), signalled


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]


def classify(case: Case, rc: int, out: str, err: str, problems: list[str]) -> str:
    lines = error_lines(err)
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if rc != 0:
        if len(lines) == 1 and lines[0].startswith("error: "):
            return f"other: error, but {'; '.join(problems)}" if problems else ERR
        if any(line.startswith("error: ") for line in lines):
            return f"other: error line plus {len(lines) - 1} more stderr line(s)"
        return f"other: rc {rc} without an error line"
    said = case.said is not None and re.search(case.said, out + err, re.M)
    if OK in case.expected and said:
        return f"other: handled, but {'; '.join(problems)}" if problems else OK
    return "silent accept"


# --- the setup every case shares ------------------------------------------------------------------------------------

TRAIN = ["task=train", "langs=[hi]", "layers=[4]", "train.max_steps=4", "train.save_every=2", "train.eval_every=100",
         "data.max_sentences=16", "analysis.bootstrap=100"]
ANALYZE = ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=16", "analysis.bootstrap=100"]
EVAL = ["task=eval", "eval=bundled", "langs=[hi]", "eval.limit=8", "eval.cache=false"]


def setup(env: Env) -> None:
    """Finished train / analyze / eval runs, an interrupted training copy, and SAE / adapter material."""
    env.setup = env.work / "setup"
    env.setup.mkdir(parents=True, exist_ok=True)
    for name, args in (("train", TRAIN), ("analyze", ANALYZE), ("eval", EVAL)):
        run = env.setup / name
        if not (run / "COMPLETE").is_file():
            shutil.rmtree(run, ignore_errors=True)
            print(f"setup: finished {name} run ...", flush=True)
            rc, out, err, _ = run_cli([*args, f"hydra.run.dir={run}", *base_args(env, env.setup)])
            if rc != 0:
                sys.exit(f"setup of {name} failed:\n{err[-3000:]}")
    built = sorted((env.cache / "testbed").glob("*/COMPLETE"))
    env.testbed = built[0].parent if built else None
    interrupted = env.setup / "interrupted"  # as a run killed after step 4 of 4's last save, before its evaluation
    if not interrupted.is_dir():
        shutil.copytree(env.setup / "train", interrupted)
        for name in ("COMPLETE", "metrics.json", "WARNINGS", "adapter", "train"):
            path = interrupted / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def interrupted_copy(case: Path, env: Env) -> None:
    shutil.copytree(env.setup / "interrupted", case / "run")


def finished_copy(name: str):
    def prepare(case: Path, env: Env) -> None:
        shutil.copytree(env.setup / name, case / "run")
    return prepare


def newest_ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def config_untouched(case: Path, env: Env) -> list[str]:
    original = (env.setup / "interrupted" / "config.yaml").read_text()
    return [] if (case / "run" / "config.yaml").read_text() == original else ["config.yaml rewritten"]


def no_complete(case: Path, env: Env) -> list[str]:
    return ["COMPLETE left"] if (case / "run" / "COMPLETE").exists() else []


def completes(case: Path, env: Env) -> list[str]:
    return [] if (case / "run" / "COMPLETE").is_file() else ["no COMPLETE"]


def finished_untouched(name: str):
    """A refused rerun leaves the finished run as it was: COMPLETE, its config.yaml, no ERROR."""
    def check(case: Path, env: Env) -> list[str]:
        run, original = case / "run", env.setup / name
        problems = completes(case, env) + (["ERROR written"] if (run / "ERROR").exists() else [])
        same = (run / "config.yaml").read_text() == (original / "config.yaml").read_text()
        return problems + ([] if same else ["config.yaml rewritten"])
    return check


def complete_and_warned(case: Path, env: Env) -> list[str]:
    warnings = case / "run" / "WARNINGS"
    return completes(case, env) + ([] if warnings.is_file() and warnings.read_text().strip() else ["no WARNINGS file"])


def sae_copy(damage: Callable[[Path], None]):
    """sae=local folder: the testbed's layer-0 SAE (sae-lens files), damaged by `damage(layer_dir)`."""
    def prepare(case: Path, env: Env) -> None:
        layer = case / "saes" / "layer_0"
        shutil.copytree(env.testbed / "saes" / "layer_0", layer)
        damage(layer)
    return prepare


def _edit_json(path: Path, edit: Callable[[dict], dict]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def adapter_copy(damage: Callable[[Path], None]):
    """adapter=: the finished training run's adapter, damaged by `damage(adapter_dir)`."""
    def prepare(case: Path, env: Env) -> None:
        adapter = case / "adapter"
        shutil.copytree(env.setup / "train" / "adapter", adapter)
        damage(adapter)
    return prepare


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def reshape_adapter(adapter: Path) -> None:
    """Weights of a LoRA trained on a base model with hidden size 32 (this one has 64)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({name: torch.zeros([32 if dim == 64 else dim for dim in t.shape]) for name, t in tensors.items()},
              str(adapter / "adapter_model.safetensors"))


def corpus(**files: str):
    def prepare(case: Path, env: Env) -> None:
        folder = case / "corpus"
        folder.mkdir(parents=True)
        for lang, text in files.items():
            (folder / f"{lang}.txt").write_text(text, encoding="utf-8")
    return prepare


EN = ["Good morning.", "The river is wide.", "We eat rice.", "It rains today.", "Come here now.", "Where is the school?",
      "My brother reads books.", "The sun is hot.", "Open the door.", "She sings well.", "They play outside.",
      "I like tea.", "The dog sleeps.", "Close the window.", "We walk home.", "The bus is late."]
HI = ["सुप्रभात।", "नदी चौड़ी है।", "हम चावल खाते हैं।", "आज बारिश हो रही है।", "अभी यहाँ आओ।", "स्कूल कहाँ है?",
      "मेरा भाई किताबें पढ़ता है।", "सूरज गरम है।", "दरवाज़ा खोलो।", "वह अच्छा गाती है।", "वे बाहर खेलते हैं।",
      "मुझे चाय पसंद है।", "कुत्ता सोता है।", "खिड़की बंद करो।", "हम घर चलते हैं।", "बस देर से है।"]


def lines(items: list[str]) -> str:
    return "\n".join(items) + "\n"


def sigterm_checks(case: Path, env: Env) -> list[str]:
    run = case / "run"
    problems = [] if (run / "ERROR").is_file() and "SIGTERM" in (run / "ERROR").read_text() else ["no ERROR naming SIGTERM"]
    return problems + no_complete(case, env)


def full_disk_checks(limit: int):
    def check(case: Path, env: Env) -> list[str]:
        run = case / "run"
        problems = no_complete(case, env)
        if not (run / "ERROR").is_file():
            problems.append("no ERROR file")
        cut = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.stat().st_size == limit]
        return problems + ([f"file(s) cut at the limit: {cut}"] if cut else [])
    return check


def config_has(**values):
    """The run's config.yaml records what the user typed."""
    def check(case: Path, env: Env) -> list[str]:
        import yaml

        cfg = yaml.safe_load((case / "run" / "config.yaml").read_text())
        problems = []
        for dotted, want in values.items():
            node = cfg
            for part in dotted.split("__"):
                node = node.get(part) if isinstance(node, dict) else None
            if node != want:
                problems.append(f"{dotted.replace('__', '.')}={node} in config.yaml, typed {want}")
        return problems + completes(case, env)
    return check


def both(*checks):
    return lambda case, env: [p for check in checks for p in check(case, env)]


RESUMED = r"resumed from step"


def cases() -> list[Case]:
    run = "hydra.run.dir={run}"
    resume = [*TRAIN, run, "train.resume=true"]
    c: list[Case] = []

    def resume_refused(id_, what, *changed):
        c.append(Case(id_, 1, what, [*resume, *changed], prepare=interrupted_copy,
                      check=both(config_untouched, no_complete)))

    # 1. resume with changed settings
    c.append(Case("resume_identical", 1, "resume with the same settings", resume, (OK,), RESUMED,
                  interrupted_copy, completes))
    c.append(Case("resume_auto_identical", 1, "train.resume=auto with the same settings",
                  [*TRAIN, run, "train.resume=auto"], (OK,), RESUMED, interrupted_copy, completes))
    c.append(Case("resume_max_steps_raised", 1, "train.max_steps raised 4 -> 6", [*resume, "train.max_steps=6"],
                  (OK,), r"train\.max_steps changed from 4 to 6", interrupted_copy, completes))
    c.append(Case("resume_save_every_changed", 1, "train.save_every and train.eval_every changed (not run-defining)",
                  [*resume, "train.save_every=1", "train.eval_every=50"], (OK,), RESUMED, interrupted_copy, completes))
    c.append(Case("resume_bootstrap_changed", 1, "analysis.bootstrap changed (measurement only)",
                  [*TRAIN[:-1], "analysis.bootstrap=200", run, "train.resume=true"], (OK,), RESUMED,
                  interrupted_copy, completes))
    resume_refused("resume_max_steps_lowered", "train.max_steps lowered to 2, below the checkpoint's step 4",
                   "train.max_steps=2")
    resume_refused("resume_lora_alpha", "lora.lora_alpha changed", "lora.lora_alpha=32")
    c.append(Case("typo_key_lora_alpha", 4, "lora.alpha=32 (the key is lora.lora_alpha)",
                  [*TRAIN, run, "lora.alpha=32"], error_file=False))  # refused while composing: no run directory
    resume_refused("resume_lora_r", "lora.r changed", "lora.r=4")
    resume_refused("resume_loss_weight", "loss.act_align weight changed", "loss.act_align=2.5")
    resume_refused("resume_loss_ce", "loss.ce weight changed", "loss.ce=0.5")
    resume_refused("resume_max_sentences", "data.max_sentences changed", "data.max_sentences=24")
    resume_refused("resume_langs", "langs changed", "langs=[hi,mr]")
    resume_refused("resume_seed", "seed changed", "seed=1")
    resume_refused("resume_lr", "train.optimizer.lr changed", "train.optimizer.lr=0.01")
    resume_refused("resume_layers", "layers changed", "layers=[4,5]")
    resume_refused("resume_batch_size", "train.batch_size changed", "train.batch_size=4")
    c.append(Case("resume_nothing_there", 1, "train.resume=true in an empty directory", resume))
    c.append(Case("resume_from_other_dir", 1, "train.resume_from=<interrupted run> into a new directory",
                  [*TRAIN, run, "train.resume_from={setup}/interrupted"], (OK,), RESUMED, check=completes))
    c.append(Case("resume_from_missing", 1, "train.resume_from=<a path that does not exist>",
                  [*TRAIN, run, "train.resume_from={case}/nowhere"]))
    c.append(Case("resume_from_changed", 1, "train.resume_from=<interrupted run> with lora.r changed",
                  [*TRAIN, run, "train.resume_from={setup}/interrupted", "lora.r=4"], check=no_complete))

    # 2. a rerun into a finished run's directory
    c.append(Case("rerun_train_finished", 2, "the same training again into its finished directory", [*TRAIN, run],
                  prepare=finished_copy("train"), check=finished_untouched("train"), error_file=False))
    c.append(Case("rerun_analyze_finished", 2, "the same analysis again into its finished directory",
                  [*ANALYZE, run], prepare=finished_copy("analyze"), check=finished_untouched("analyze"), error_file=False))
    c.append(Case("rerun_eval_finished", 2, "the same evaluation again into its finished directory", [*EVAL, run],
                  prepare=finished_copy("eval"), check=finished_untouched("eval"), error_file=False))
    c.append(Case("rerun_analyze_overwrite", 2, "overwrite=true into a finished analysis", [*ANALYZE, run,
                  "overwrite=true"], (OK,), r"overwrite=true", finished_copy("analyze"), completes))
    c.append(Case("rerun_overwrite_bad_value", 2, "overwrite=true with a mistyped language",
                  [*ANALYZE, run, "overwrite=true", "langs=[xx]"], prepare=finished_copy("analyze"),
                  check=no_complete))
    c.append(Case("rerun_train_resume_finished", 2, "train.resume=true into a finished training",
                  [*TRAIN, run, "train.resume=true"], (OK,), r"train\.resume continues it",
                  finished_copy("train"), completes))
    c.append(Case("resume_into_finished_analyze", 2, "task=train train.resume=true into a finished analysis",
                  [*TRAIN, run, "train.resume=true"], prepare=finished_copy("analyze"),
                  check=finished_untouched("analyze"), error_file=False))
    c.append(Case("resume_auto_into_finished_analyze", 2, "task=train train.resume=auto into a finished analysis",
                  [*TRAIN, run, "train.resume=auto"], prepare=finished_copy("analyze"),
                  check=finished_untouched("analyze"), error_file=False))
    c.append(Case("rerun_analyze_into_train_dir", 2, "task=analyze into a finished training's directory",
                  [*ANALYZE, run], prepare=finished_copy("train"), check=finished_untouched("train"), error_file=False))

    # 3. a user's damaged or mismatched files
    sae = ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=16", "sae=local",
           "sae.path_template={case}/saes", run]
    c.append(Case("sae_intact", 3, "sae=local: an intact copy of a testbed SAE (the control)", sae, (OK,),
                  r"task=analyze finished", sae_copy(lambda d: None), completes))

    def sae_case(id_, what, damage):
        c.append(Case(id_, 3, what, sae, prepare=sae_copy(damage), check=no_complete))

    sae_case("sae_cfg_not_json", "SAE cfg.json is not JSON", lambda d: (d / "cfg.json").write_text('{"d_in": 64,'))
    sae_case("sae_cfg_missing_d_in", "SAE cfg.json lacks d_in",
             lambda d: _edit_json(d / "cfg.json", lambda j: {k: v for k, v in j.items() if k != "d_in"}))
    sae_case("sae_cfg_missing_d_sae", "SAE cfg.json lacks d_sae",
             lambda d: _edit_json(d / "cfg.json", lambda j: {k: v for k, v in j.items() if k != "d_sae"}))
    sae_case("sae_cfg_empty", "SAE cfg.json is an empty object", lambda d: (d / "cfg.json").write_text("{}"))
    sae_case("sae_cfg_list", "SAE cfg.json holds a list", lambda d: (d / "cfg.json").write_text("[1, 2]"))
    sae_case("sae_cfg_missing_architecture", "SAE cfg.json lacks architecture",
             lambda d: _edit_json(d / "cfg.json", lambda j: {k: v for k, v in j.items() if k != "architecture"}))
    sae_case("sae_cfg_unknown_architecture", "SAE cfg.json names an unknown architecture",
             lambda d: _edit_json(d / "cfg.json", lambda j: {**j, "architecture": "jumprelu_v9"}))
    sae_case("sae_d_in_mismatch", "SAE cfg.json d_in disagrees with its weights",
             lambda d: _edit_json(d / "cfg.json", lambda j: {**j, "d_in": 32}))
    sae_case("sae_d_sae_mismatch", "SAE cfg.json d_sae disagrees with its weights",
             lambda d: _edit_json(d / "cfg.json", lambda j: {**j, "d_sae": 512}))
    sae_case("sae_weights_missing", "SAE weights file missing", lambda d: (d / "sae_weights.safetensors").unlink())
    sae_case("sae_weights_zero_bytes", "SAE weights file of zero bytes",
             lambda d: (d / "sae_weights.safetensors").write_bytes(b""))
    sae_case("sae_weights_truncated", "SAE weights file cut in half", lambda d: truncate(d / "sae_weights.safetensors"))
    ana_adapter = ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=16", "adapter={case}/adapter", run]

    def adapter_case(id_, what, damage, args=ana_adapter):
        c.append(Case(id_, 3, what, args, prepare=adapter_copy(damage), check=no_complete))

    c.append(Case("adapter_run_dir", 3, "adapter=<a training run's directory> instead of its adapter/ folder",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=16", "adapter={setup}/train", run],
                  check=no_complete))
    adapter_case("adapter_truncated", "adapter weights cut in half",
                 lambda d: truncate(d / "adapter_model.safetensors"))
    adapter_case("adapter_zero_bytes", "adapter weights of zero bytes",
                 lambda d: (d / "adapter_model.safetensors").write_bytes(b""))
    adapter_case("adapter_weights_missing", "adapter folder without its weights",
                 lambda d: (d / "adapter_model.safetensors").unlink())
    adapter_case("adapter_config_not_json", "adapter_config.json is not JSON",
                 lambda d: (d / "adapter_config.json").write_text("{"))
    adapter_case("adapter_other_shape", "an adapter trained on a base model with another hidden size",
                 reshape_adapter)
    adapter_case("adapter_other_shape_eval", "task=eval with an adapter of another base model's shape",
                 reshape_adapter, [*EVAL, "adapter={case}/adapter", run])

    def damaged_checkpoint(damage, which=newest_ckpt):
        def prepare(case: Path, env: Env) -> None:
            interrupted_copy(case, env)
            damage(which(case / "run"))
        return prepare

    fallback = r"resuming from the checkpoint before it"
    c.append(Case("ckpt_truncated_auto", 3, "newest checkpoint's state cut in half, train.resume=auto",
                  [*TRAIN, run, "train.resume=auto"], (OK,), fallback,
                  damaged_checkpoint(lambda d: truncate(d / "training_state.pt")), completes))
    c.append(Case("ckpt_zero_byte_state", 3, "newest checkpoint's training_state.pt is zero bytes, resume=true",
                  resume, (OK,), fallback,
                  damaged_checkpoint(lambda d: (d / "training_state.pt").write_bytes(b"")), completes))
    c.append(Case("ckpt_zero_byte_rng", 3, "newest checkpoint's rng_0.pt is zero bytes, resume=true",
                  resume, (OK,), fallback,
                  damaged_checkpoint(lambda d: (d / "rng_0.pt").write_bytes(b"")), completes))

    def all_damaged(case: Path, env: Env) -> None:
        interrupted_copy(case, env)
        for step in (case / "run" / "checkpoints").glob("step-*"):
            truncate(step / "training_state.pt")

    c.append(Case("ckpt_all_damaged", 3, "every checkpoint truncated, resume=auto",
                  [*TRAIN, run, "train.resume=auto"], prepare=all_damaged, check=both(no_complete, config_untouched)))
    c.append(Case("ckpt_resume_from_damaged", 3, "train.resume_from=<one truncated checkpoint>",
                  [*TRAIN, run, "train.resume_from={case}/ckpt"],
                  prepare=lambda case, env: (shutil.copytree(newest_ckpt(env.setup / "interrupted"), case / "ckpt"),
                                             truncate(case / "ckpt" / "training_state.pt")), check=no_complete))

    # 4. bad values inside instantiated groups, checked at compose time
    train_bad = ["task=train", "langs=[hi]", "layers=[4]", "data.max_sentences=16", run]

    def bad(id_, what, *values, task=train_bad, composing=False):
        c.append(Case(id_, 4, what, [*task, *values], check=no_complete, error_file=not composing))

    bad("lr_text", "train.optimizer.lr=abc", "train.optimizer.lr=abc")
    bad("scheduler_unknown", "train.scheduler=cosine_forever", "train.scheduler=cosine_forever")
    bad("optimizer_target", "train.optimizer._target_ that does not exist", "train.optimizer._target_=torch.optim.Nope")
    bad("weight_decay_negative", "train.optimizer.weight_decay=-1", "train.optimizer.weight_decay=-1")
    bad("lr_negative", "train.optimizer.lr=-0.001", "train.optimizer.lr=-0.001")
    bad("max_steps_zero", "train.max_steps=0", "train.max_steps=0")
    bad("batch_size_zero", "train.batch_size=0", "train.batch_size=0")
    bad("save_every_negative", "train.save_every=-1 (0 is documented: no checkpoints)", "train.save_every=-1",
        "train.max_steps=2")
    bad("grad_accum_zero", "train.grad_accum=0", "train.grad_accum=0")
    bad("mixed_precision_fp8", "train.mixed_precision=fp8", "train.mixed_precision=fp8")
    bad("lora_dropout_2", "lora.lora_dropout=2", "lora.lora_dropout=2")
    bad("lora_alpha_text", "lora.lora_alpha=abc", "lora.lora_alpha=abc", composing=True)
    bad("loss_weight_negative", "loss.act_align=-1", "loss.act_align=-1")
    bad("warmup_negative", "train.warmup_steps=-5", "train.warmup_steps=-5")
    bad("ci_out_of_range", "analysis.ci=1.5 (task=analyze)", "analysis.ci=1.5", task=["task=analyze", "langs=[hi]",
                                                                                    "layers=[0]", run])
    bad("max_sentences_negative", "data.max_sentences=-1 (task=analyze; null means all)", "data.max_sentences=-1",
        task=["task=analyze", "langs=[hi]", "layers=[0]", run])
    bad("max_sentences_zero", "data.max_sentences=0 (task=analyze)", "data.max_sentences=0",
        task=["task=analyze", "langs=[hi]", "layers=[0]", run])

    # 5. atomic writes; a full disk (RLIMIT_FSIZE stands in)
    c.append(Case("full_disk_analyze", 5, "task=analyze with a file-size limit of 12 kB",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=12", "analysis.cache=false", run],
                  fsize_limit=12000, check=full_disk_checks(12000)))
    c.append(Case("full_disk_train", 5, "task=train with a file-size limit of 12 kB", [*TRAIN, run],
                  fsize_limit=12000, check=full_disk_checks(12000)))
    c.append(Case("full_disk_train_ckpt", 5, "task=train with a limit of 200 kB (the corpus fits, a checkpoint not)",
                  [*TRAIN, run], fsize_limit=200000, check=full_disk_checks(200000)))

    c.append(Case("full_disk_train_adapter", 5, "task=train with save_every=0 and a limit of 400 kB (the adapter is "
                  "~850 kB; the final checkpoint, written first, fails)", [*TRAIN, "train.save_every=0", run], fsize_limit=400000,
                  check=full_disk_checks(400000)))
    c.append(Case("full_disk_train_saes", 5, "task=train_saes with a limit of 100 kB (one SAE's weights are ~130 kB)",
                  ["task=train_saes", "langs=[hi]", "layers=[0]", "sae_train.tokens=4000", "data.max_sentences=32", run],
                  fsize_limit=100000, check=full_disk_checks(100000)))

    # 6. too-small runs, presets over typed values
    warned = r"^(warning: |.*warning: ).*"
    c.append(Case("bootstrap_5_analyze", 6, "analysis.bootstrap=5", [*ANALYZE[:-1], "analysis.bootstrap=5", run],
                  (ERR, OK), r"warning: analysis\.bootstrap=5", check=complete_and_warned))
    c.append(Case("bootstrap_5_train", 6, "analysis.bootstrap=5 in training", [*TRAIN[:-1], "analysis.bootstrap=5",
                  run], (ERR, OK), r"warning: analysis\.bootstrap=5", check=complete_and_warned))
    c.append(Case("one_sentence_corpus", 6, "data=text_dir holding one sentence per language",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data=text_dir", "data.path={case}/corpus", run],
                  (ERR, OK), warned, corpus(en="Hello.\n", hi="नमस्ते।\n"), complete_and_warned))
    c.append(Case("five_sentence_corpus", 6, "data=text_dir holding five sentences per language",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data=text_dir", "data.path={case}/corpus", run],
                  (ERR, OK), r"warning: .*fewer than 10 sentences", corpus(en=lines(EN[:5]), hi=lines(HI[:5])),
                  complete_and_warned))
    c.append(Case("one_sentence_no_bootstrap", 6, "one sentence per language and analysis.bootstrap=0",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data=text_dir", "data.path={case}/corpus",
                   "analysis.bootstrap=0", run], (ERR, OK), warned, corpus(en="Hello.\n", hi="नमस्ते।\n"),
                  complete_and_warned))
    c.append(Case("small_corpus_train", 6, "task=train on a 16-sentence text_dir (2 held-out sentences)",
                  ["task=train", "langs=[hi]", "layers=[4]", "train.max_steps=2", "data=text_dir",
                   "data.path={case}/corpus", run], (ERR, OK), r"warning: .*fewer than 10 sentences",
                  corpus(en=lines(EN), hi=lines(HI)), complete_and_warned))
    c.append(Case("max_sentences_5", 6, "data.max_sentences=5 (task=analyze)",
                  ["task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=5", run], (ERR, OK),
                  r"warning: .*fewer than 10 sentences", check=complete_and_warned))
    c.append(Case("preset_typed_bootstrap", 6, "experiment=testbed_demo with analysis.bootstrap=100 and task typed",
                  ["experiment=testbed_demo", "task=analyze", "langs=[hi]", "layers=[0]", "data.max_sentences=16",
                   "analysis.bootstrap=100", run], (OK,), r"task=analyze finished",
                  check=config_has(analysis__bootstrap=100, task="analyze", langs=["hi"])))
    c.append(Case("preset_typed_eval", 6, "experiment=testbed_demo eval=harness: the typed suite is run or said",
                  ["experiment=testbed_demo", "task=eval", "eval=harness", "langs=[hi]", "eval.limit=4", run],
                  (ERR, OK), r"eval=harness: running the harness suite you typed"))

    c.append(Case("compare_bootstrap_5", 6, "task=compare compare.bootstrap=5",
                  ["task=compare", "langs=[hi]", "layers=[4]", "compare.bootstrap=5", run], check=no_complete))
    c.append(Case("eval_limit_2", 6, "task=eval with eval.limit=2 (two items per benchmark and language)",
                  [*EVAL[:3], "eval.limit=2", "eval.cache=false", "adapter={setup}/train/adapter", run], (ERR, OK),
                  r"warning: .*eval\.limit", check=complete_and_warned))

    eval_adapter = [*EVAL[:3], "eval.limit=8", "eval.cache=false", "adapter={setup}/train/adapter", run]
    c.append(Case("eval_bootstrap_5", 6, "task=eval with eval.bootstrap=5", [*eval_adapter, "eval.bootstrap=5"],
                  (ERR, OK), r"warning: .*eval\.bootstrap=5", check=complete_and_warned))
    c.append(Case("eval_bootstrap_0", 4, "task=eval with eval.bootstrap=0", [*eval_adapter, "eval.bootstrap=0"],
                  check=no_complete))
    c.append(Case("eval_ci_out_of_range", 4, "task=eval with eval.ci=1.5", [*eval_adapter, "eval.ci=1.5"],
                  check=no_complete))

    # 7. SIGTERM in every task
    for id_, args, trigger, delay in (
            ("sigterm_train", [*TRAIN[:3], "train.max_steps=40", "train.save_every=10", *TRAIN[5:], run],
             r"training the adapter", 3.0),
            ("sigterm_analyze", ["task=analyze", "langs=[hi,mr]", "data.max_sentences=64", "analysis.cache=false",
                                 run], r"^task=analyze", 6.0),
            ("sigterm_eval", [*EVAL[:3], "eval.limit=40", "eval.cache=false", run], r"^evaluating", 0.5),
            ("sigterm_train_saes", ["task=train_saes", "langs=[hi]", "layers=[0]", "sae_train.tokens=20000",
                                    "sae_train.steps=4000", run], r"^training 1 SAE\(s\)", 0.5),
            ("sigterm_compare", ["task=compare", "langs=[hi]", "layers=[4]", "compare.arms=[base,ce]",
                                 "compare.seeds=1", "compare.lrs=[0.003]", "train.max_steps=20",
                                 "data.max_sentences=16", run], r"^task=compare", 10.0),
    ):
        said = r"stopped by SIGTERM"
        c.append(Case(id_, 7, f"SIGTERM during {id_.split('_', 1)[1]}", args, (ERR,), said, check=sigterm_checks,
                      sigterm_on=trigger, sigterm_delay=delay))
    return c


def fill(args: list[str], case_dir: Path, env: Env) -> list[str]:
    return [a.format(run=case_dir / "run", case=case_dir, setup=env.setup, testbed=env.testbed) for a in args]


def run_case(case: Case, env: Env) -> dict:
    case_dir = env.work / "cases" / case.id
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    if case.prepare:
        case.prepare(case_dir, env)
    args = fill(case.args, case_dir, env)
    started = time.time()
    rc, out, err, signalled = run_cli([*args, *base_args(env, case_dir)], sigterm_on=case.sigterm_on,
                                      sigterm_delay=case.sigterm_delay, fsize_limit=case.fsize_limit)
    problems = case.check(case_dir, env) if case.check else []
    run = case_dir / "run"
    if rc != 0 and case.error_file:  # a failure: no COMPLETE, and an ERROR file holding the line (a refused rerun
        if (run / "COMPLETE").exists() and "COMPLETE left" not in problems:  # into a finished run keeps that run's)
            problems.append("COMPLETE left")
        if not (run / "ERROR").is_file():
            problems.append("no ERROR file")
    # a finished run's post-conditions (COMPLETE, WARNINGS) do not apply to a refused one
    problems = [p for p in problems if not (rc != 0 and p in ("no COMPLETE", "no WARNINGS file"))]
    if case.sigterm_on and not signalled:
        problems.append("the trigger line never came (SIGTERM not sent)")
    observed = classify(case, rc, out, err, problems)
    lines_ = error_lines(err)
    return {"id": case.id, "class": case.klass, "what": case.what, "args": args, "expected": list(case.expected),
            "observed": observed, "pass": observed in case.expected, "rc": rc,
            "first_stderr_line": lines_[0][:500] if lines_ else "", "stderr_lines": len(lines_),
            "said": bool(case.said and re.search(case.said, out + err, re.M)), "problems": problems,
            "seconds": round(time.time() - started, 1),
            "traceback_tail": err[-1500:] if "Traceback" in err else None}


def tally(results: list[dict]) -> dict:
    counts = {"cases": len(results), ERR: 0, OK: 0, "traceback": 0, "silent accept": 0, "other": 0,
              "passed": sum(r["pass"] for r in results)}
    for r in results:
        key = r["observed"] if r["observed"] in counts else "other"
        counts[key] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rel30audit/cache"),
                        help="paths.cache_dir holding (or to build) the small testbed; reused by every case")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rel30audit/work"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--only", default=None, help="comma-separated case ids (others keep their stored results)")
    parser.add_argument("--fresh", action="store_true", help="rerun every case (default: skip those in --out)")
    opts = parser.parse_args()
    env = Env(cache=opts.cache.resolve(), work=opts.work.resolve())
    env.work.mkdir(parents=True, exist_ok=True)
    stored = {} if opts.fresh or not opts.out.is_file() else {r["id"]: r for r in json.loads(opts.out.read_text())["cases"]}
    chosen = set(opts.only.split(",")) if opts.only else None
    all_cases = cases()
    unknown = (chosen or set()) - {case.id for case in all_cases}
    if unknown:
        sys.exit(f"unknown case id(s): {sorted(unknown)}")
    setup(env)
    results = dict(stored)
    by_id = {case.id: case for case in all_cases}
    todo = ([by_id[id_] for id_ in dict.fromkeys(opts.only.split(","))] if chosen  # in the order given
            else [case for case in all_cases if case.id not in stored])
    for num, case in enumerate(todo, 1):
        print(f"[{num}/{len(todo)}] class {case.klass} {case.id}: {case.what} ...", end=" ", flush=True)
        result = run_case(case, env)
        results[case.id] = result
        print(f"{result['observed']} ({'ok' if result['pass'] else 'FAIL'}, {result['seconds']} s)", flush=True)
        if not result["pass"]:
            print(f"    {result['first_stderr_line'][:300]}  {result['problems']}", flush=True)
        ordered = [results[c.id] for c in all_cases if c.id in results]
        opts.out.write_text(json.dumps({"tally": tally(ordered), "cases": ordered}, indent=1, ensure_ascii=False) + "\n")
    ordered = [results[c.id] for c in all_cases if c.id in results]
    print(json.dumps(tally(ordered)))
    for r in ordered:
        if not r["pass"]:
            print(f"FAIL {r['id']}: expected {r['expected']}, observed {r['observed']}: {r['first_stderr_line'][:200]}")


if __name__ == "__main__":
    main()
