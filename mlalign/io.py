"""Result files written atomically (temp file in the same folder, then rename: a crash never leaves a half file), and
users' files read with a one-line error naming the file and what is wrong with it."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

COMPLETE_MARKER = "COMPLETE"
ERROR_FILE = "ERROR"
"""Written in a run directory whose task failed: one line, the error (what `summary.csv`'s `error` column shows)."""


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` on a sibling temp file (same suffix, so e.g. matplotlib picks the format), then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_dir_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_dir)` on a sibling temp folder (e.g. peft's `save_pretrained`, sae-lens's `save_model`), then
    put it in place of `path`: a full disk or a kill mid-save leaves the previous folder (or none), never a folder
    holding a cut weights file under the final name."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(tmp)
        if path.exists():  # replaced whole: nothing of an older save stays beside the new files
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def mark_complete(folder: str | Path, info: dict | None = None) -> Path:
    """Written last: a folder without it is an interrupted run's, whatever else it holds."""
    return write_json_atomic(Path(folder) / COMPLETE_MARKER, info or {})


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """`fig.savefig` through `write_atomic`: a full disk or a kill leaves no truncated image under the final name."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, **savefig_kwargs))


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_full_error(err: BaseException) -> OSError | str | None:
    """The out-of-space error behind `err` (itself, its cause or context, or one whose message a library such as
    torch or safetensors copied from it), or None: a full disk, a quota or a file-size limit."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        if any(words in str(err) for words in _DISK_FULL_WORDS):
            return str(err).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None


def read_json_file(path: str | Path, what: str, fix: str):
    """The JSON in `path`, or a UserError naming the file and what is wrong with it (`what`: e.g. "SAE config";
    `fix`: what to type or do instead)."""
    from mlalign.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not text (byte {err.start} is not UTF-8); {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                        f"{fix}") from None


def safetensors_shapes(path: str | Path, what: str, fix: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file, read from its header and checked against the file's size (a copy
    or save cut short by a crash or a full disk), or a UserError naming the file and what is wrong with it."""
    from mlalign.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; {fix}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"the file has {size} bytes, too few for its header")
            header = json.loads(handle.read(header_len))
        entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((int(entry["data_offsets"][1]) for entry in entries.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} {path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                        f"{fix}") from None
    if 8 + header_len + end != size:
        raise UserError(f"{what} {path} is truncated or damaged: its header describes {8 + header_len + end} bytes, "
                        f"the file has {size}; {fix}")
    return {name: list(entry["shape"]) for name, entry in entries.items()}


ADAPTER_FIX = "pass adapter=DIR written by task=train (its run directory's adapter/ folder), or train it again"


def check_adapter_files(adapter: Path) -> dict:
    """A peft adapter folder's config, with its safetensors weights (where present; peft reports a folder without
    any) checked complete, a copy or save cut short by a crash or a full disk, before any model loads."""
    config = read_json_file(adapter / "adapter_config.json", "adapter config", ADAPTER_FIX)
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        safetensors_shapes(weights, "adapter weights", ADAPTER_FIX)
    return config

def json_safe(obj):
    """NaN/inf -> None (recursively, keys as strings, numpy scalars and arrays as Python values) so a result file is
    strict JSON."""
    import math

    if hasattr(obj, "tolist"):  # numpy scalar or array
        return json_safe(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
