"""Atomic result files: write to a temp file in the same folder, then rename, so a crash never leaves a half file."""

from __future__ import annotations

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
