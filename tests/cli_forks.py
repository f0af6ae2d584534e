"""A fork server for the tests' `python run.py ...` command lines: it imports what every run needs once, then forks one
child per command line, which runs run.py as `__main__` exactly as the CLI does, with its own stdout, stderr and exit
status. A fresh `python run.py` spends about 8 s of CPU importing torch, transformers, peft and lm-eval before it
reads its arguments; the suite starts more than a hundred of them.

Protocol (tests/helpers.py:run_cli is the client): one JSON request per line on stdin, {"args": [...], "cwd": DIR,
"out": PREFIX, "timeout": S, "threads": N or null}; the child writes PREFIX.out and PREFIX.err; the server answers one
line on stdout, `@@cli_forks {"rc": N, "timed_out": BOOL}`. The server itself never runs a task, so every child starts
from the same state: imported, not initialised."""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANSWER = "@@cli_forks "


def _preload() -> None:
    """Every mlalign module and the libraries they reach lazily (transformers' model classes, lm-eval, matplotlib), so
    that a child finds them in sys.modules."""
    import importlib
    import pkgutil

    import mlalign

    for module in pkgutil.walk_packages(mlalign.__path__, "mlalign."):
        if not module.name.endswith(".__main__"):  # a package's __main__ runs its program when imported
            importlib.import_module(module.name)
    import accelerate  # noqa: F401
    import lm_eval.evaluator  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import sae_lens  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import wandb  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2ForCausalLM, Gemma3ForCausalLM  # noqa: F401


def _child(args: list[str], cwd: str, prefix: str, threads: int | None = None) -> None:
    """Runs in the fork: stdout/stderr to files, run.py as __main__, then the exit status (never returns). threads:
    torch's intra-op threads, what OMP_NUM_THREADS sets in a new interpreter (torch read it here, at import)."""
    code = 1
    try:
        os.chdir(cwd)
        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))
        with open(f"{prefix}.out", "w") as stdout, open(f"{prefix}.err", "w") as stderr:
            os.dup2(stdout.fileno(), 1)
            os.dup2(stderr.fileno(), 2)
            sys.stdin = open(os.devnull)
            sys.argv = [str(REPO / "run.py"), *args]
            try:
                runpy.run_path(str(REPO / "run.py"), run_name="__main__")
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:  # a bug: the traceback goes to stderr, as the interpreter would print it
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os._exit(code)


def _run(request: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        _child(request["args"], request["cwd"], request["out"], request.get("threads"))
    deadline = time.monotonic() + float(request["timeout"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return {"rc": -9, "timed_out": True}
        time.sleep(0.05)


def main() -> None:
    _preload()
    answers = sys.stdout
    for line in sys.stdin:
        if line.strip():
            answers.write(ANSWER + json.dumps(_run(json.loads(line))) + "\n")
            answers.flush()


if __name__ == "__main__":
    main()
