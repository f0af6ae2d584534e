"""Cache of evaluation runs: the base model is evaluated once per setting and reused by every later eval, sweep job
and pipeline.

The key is everything that changes a score: the model's files (hub snapshot commit or local folder fingerprint,
tokenizer included) and revision, dtype and attention kernel, the adapter's weights hash, each lm-eval task's config
as indexed (data files by content hash), its few-shot setting, the limit, the seed and the lm-eval version. The batch
size is not in it. An entry is a folder `<paths.cache_dir>/eval/<key>/` holding `run.json` (the `run_plan` result,
per-item scores included), `lm_eval/` (lm-eval's own results and samples files) and `run.sha256`, written last; an
entry whose checksum does not match is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from mlalign.io import write_text_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when what `run_plan` records changes meaning."""


def _normalise(config, digests: dict):
    """A task config with local data files replaced by their content hash and run-specific cache folders dropped."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "cache_dir":
                continue
            if key == "data_files":
                value = {split: _digest_files(files, digests) for split, files in value.items()} \
                    if isinstance(value, dict) else _digest_files(value, digests)
            out[key] = _normalise(value, digests)
        return out
    if isinstance(config, (list, tuple)):
        return [_normalise(value, digests) for value in config]
    if isinstance(config, str) and Path(config).is_absolute() and Path(config).parent.is_dir():
        return _function_source(Path(config), digests)
    return config if isinstance(config, (str, int, float, bool)) or config is None else str(config)


def _function_source(reference: Path, digests: dict) -> dict:
    """A `!function module.name` reference, which lm-eval's index resolves against the YAML's folder: named by
    function and its module's content hash, not by where the YAML happens to be (run folders differ)."""
    import importlib.util

    from mlalign.analysis.cache import file_digest

    module, _, function = reference.name.rpartition(".")
    candidate = reference.parent / (module.replace(".", "/") + ".py")
    if not candidate.is_file():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        candidate = Path(spec.origin) if spec is not None and spec.origin else None
    if candidate is not None and candidate.is_file() and candidate not in digests:
        digests[candidate] = file_digest(candidate)
    return {"function": reference.name, "source": digests.get(candidate) if candidate is not None else None}


def _digest_files(files, digests: dict):
    from mlalign.analysis.cache import file_digest

    if isinstance(files, (list, tuple)):
        return [_digest_files(f, digests) for f in files]
    path = Path(str(files))
    if path.is_file():
        if path not in digests:
            digests[path] = file_digest(path)
        return {"sha256": digests[path]}
    return str(files)


def task_config_fingerprint(task_manager, name: str) -> str:
    """sha256 of a task's (or a group's, with all its members') config as lm-eval indexes it, before anything loads."""
    index = task_manager.task_index
    digests: dict = {}
    seen: set[str] = set()
    configs = []

    def visit(item):
        if isinstance(item, dict):  # an inline task config inside a group
            configs.append(_normalise(item, digests))
            return
        if item in seen:
            return
        seen.add(item)
        entry = index.get(item)
        if entry is None:
            configs.append({"missing": item})
            return
        config = entry.cfg
        if config is None and entry.yaml_path is not None:
            config = {"yaml": hashlib.sha256(Path(entry.yaml_path).read_bytes()).hexdigest()}
        configs.append({"name": item, "kind": str(entry.kind), "config": _normalise(config, digests)})
        if isinstance(entry.cfg, dict) and "group" in entry.cfg:
            members = entry.cfg.get("task") or []
            for member in members if isinstance(members, list) else [members]:
                visit(member)
        if str(entry.kind).endswith("TAG"):
            for member in sorted(n for n, e in index.items() if item in (e.tags or ())):
                visit(member)

    visit(name)
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def eval_identity(model: dict, adapter: str | None, plan) -> dict:
    """The cache key's contents for evaluating `model` (+ `adapter`, a weights hash or None) on `plan`."""
    import lm_eval

    version = getattr(lm_eval, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("lm_eval")
    settings = plan.settings
    return {
        "version": CACHE_VERSION,
        "lm_eval": version,
        "model": model,
        "adapter": adapter,
        "suite": plan.suite,
        "tasks": sorted({(entry.task, -1 if entry.num_fewshot is None else int(entry.num_fewshot),
                          task_config_fingerprint(plan.task_manager, entry.task)) for entry in plan.entries}),
        "limit": settings["limit"],
        "seed": settings["seed"],
    }


def entry_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


class EvalCache:
    """`load(identity)` -> a cached run (its lm-eval files copied into `files_to`) or None; `save` after a run."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def _folder(self, identity: dict) -> Path:
        return self.root / entry_key(identity)

    def load(self, identity: dict, files_to: str | Path | None = None) -> dict | None:
        if not self.enabled:
            return None
        folder = self._folder(identity)
        run_file, checksum = folder / "run.json", folder / "run.sha256"
        if not (run_file.is_file() and checksum.is_file()):
            return None
        text = run_file.read_bytes()
        if hashlib.sha256(text).hexdigest() != checksum.read_text().strip():
            log.warning("evaluation cache entry %s is corrupt; recomputing", folder)
            return None
        if files_to is not None and (folder / "lm_eval").is_dir():
            shutil.copytree(folder / "lm_eval", files_to, dirs_exist_ok=True)
        return json.loads(text)

    def save(self, identity: dict, run: dict, files_from: str | Path | None = None) -> Path | None:
        if not self.enabled:
            return None
        folder = self._folder(identity)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.sha256").unlink(missing_ok=True)
        if files_from is not None and Path(files_from).is_dir():
            shutil.rmtree(folder / "lm_eval", ignore_errors=True)
            shutil.copytree(files_from, folder / "lm_eval")
        text = json.dumps(run, sort_keys=True)
        write_text_atomic(folder / "identity.json", json.dumps(identity, indent=2, sort_keys=True, default=str))
        write_text_atomic(folder / "run.json", text)
        write_text_atomic(folder / "run.sha256", hashlib.sha256(text.encode()).hexdigest())
        return folder
