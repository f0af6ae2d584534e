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


def run_cli(args: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    # `timeout` guards against a hung subprocess; it is not a timing check. Two xdist workers and their subprocesses
    # on a loaded 2-core box took a two-job sweep past the earlier 600 s.
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


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
