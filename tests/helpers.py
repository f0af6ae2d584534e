"""Shared test helpers: compose the project's Hydra config exactly as run.py would, and run run.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import mlalign.config  # noqa: F401  (registers the typed config schemas)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def load_experiment_module(relative: str, name: str):
    """An experiment's script (e.g. experiments/x/tables.py, not a package) imported as module `name`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_cfg(overrides: list[str] | None = None, tmp_path: Path | None = None):
    """The job config for `overrides`; with tmp_path, caches and outputs go there (no ${hydra:} lookups left)."""
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.root_dir = str(tmp_path)
            cfg.paths.output_dir = str(tmp_path / "run")
            if not any(o.startswith("paths.cache_dir") for o in overrides):
                cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 1800,
            fresh: bool = False, threads: int | None = None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` from `cwd`: its exit status, stdout and stderr. Without `env` or `fresh`, the command line
    runs in a fork of this worker's fork server (tests/cli_forks.py), which has imported the libraries once; with them,
    in a new interpreter (libraries read some variables only when imported). threads: torch's CPU threads for the run
    (OMP_NUM_THREADS in a new interpreter, torch.set_num_threads in a fork), e.g. 1 for the tiny testbed's matrices,
    where a second thread only spins against the other jobs of a shared box."""
    # `timeout` guards against a hung run; it is not a timing check. Two xdist workers and their subprocesses on a
    # loaded 2-core box took a two-job sweep past the earlier 600 s.
    if env is None and not fresh:
        return _FORK_SERVER.run(args, cwd, timeout, threads)
    threads_env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env={**os.environ, **CLI_ENV,
                                                                                       **threads_env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


class _ForkServer:
    """This process's tests/cli_forks.py, started on first use and ended with this process (its stdin closes)."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.count = 0
        self.scratch: Path | None = None

    def run(self, args: list[str], cwd: Path, timeout: int, threads: int | None = None) -> subprocess.CompletedProcess:
        import json
        import tempfile

        if self.process is None or self.process.poll() is not None:
            import atexit
            import shutil

            self.scratch = Path(tempfile.mkdtemp(prefix="cli-forks-"))  # each run's stdout/stderr files
            atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)
            self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_forks.py")], cwd=REPO,
                                            env={**os.environ, **CLI_ENV}, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, bufsize=1)
        self.count += 1
        prefix = self.scratch / str(self.count)
        self.process.stdin.write(json.dumps({"args": list(map(str, args)), "cwd": str(cwd), "out": str(prefix),
                                             "timeout": timeout, "threads": threads}) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("@@cli_forks "):
                answer = json.loads(line[len("@@cli_forks "):])
                break
        else:
            raise RuntimeError(f"the fork server (tests/cli_forks.py) ended with status {self.process.wait()}")
        out, err = (Path(f"{prefix}.out").read_text(), Path(f"{prefix}.err").read_text())
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(["run.py", *args], timeout, out, err)
        return subprocess.CompletedProcess(["run.py", *args], answer["rc"], out, err)


_FORK_SERVER = _ForkServer()


def write_flores_plus(root: Path, sentences: dict[str, dict[str, list[str]]], iso: dict[str, str] | None = None) -> Path:
    """A local dataset in FLORES+'s layout that `datasets.load_dataset(root, "<flores code>", split=...)` reads:
    `<split>/<code>.parquet` with columns id, iso_639_3, iso_15924, text, and a README whose `configs:` name one
    config per FLORES-200 code. `sentences[code][split]` are the rows; `iso` overrides a config's language columns."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    configs = []
    for code, by_split in sentences.items():
        language, script = (iso or {}).get(code, code).split("_")
        files = []
        for split, texts in by_split.items():
            (root / split).mkdir(exist_ok=True)
            n = len(texts)
            datasets.Dataset.from_dict({"id": list(range(n)), "iso_639_3": [language] * n,
                                        "iso_15924": [script] * n, "text": texts}).to_parquet(root / split / f"{code}.parquet")
            files.append(f"  - split: {split}\n    path: {split}/{code}.parquet\n")
        configs.append(f"- config_name: {code}\n  data_files:\n{''.join(files)}")
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n# A tiny FLORES+-shaped test set\n",
                                    encoding="utf-8")
    return root
