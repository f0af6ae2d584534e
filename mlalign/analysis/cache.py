"""Per-(language, layer) cache of analysis statistics: adding a language recomputes only that language.

An entry is `<key>.npz` plus `<key>.sha256` written after it; an entry whose checksum does not match (an interrupted
or corrupted write) is ignored and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import fields
from pathlib import Path

import numpy as np

from mlalign.analysis.stats import SentenceSums
from mlalign.io import write_text_atomic

log = logging.getLogger(__name__)

# Bump when the statistics the engine computes change meaning. 2: per-sentence residual sums (exact FVU bootstrap),
# sq_norm, positions and truncation flags.
CACHE_VERSION = 2


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_fingerprint(adapter: str | Path | None) -> str | None:
    """Content hash of a peft adapter's weights, so a retrained adapter at the same path is a new cache entry."""
    if not adapter:
        return None
    adapter = Path(adapter)
    weights = sorted(adapter.glob("adapter_model.*"))
    return file_digest(weights[0]) if weights else str(adapter.resolve())


def entry_key(identity: dict, lang: str, layer: int) -> str:
    payload = json.dumps({**identity, "lang": lang, "layer": int(layer), "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class StatsCache:
    def __init__(self, directory: str | Path, identity: dict, enabled: bool = True):
        self.directory = Path(directory)
        self.identity = identity
        self.enabled = enabled

    def _paths(self, lang: str, layer: int) -> tuple[Path, Path]:
        key = entry_key(self.identity, lang, layer)
        return self.directory / f"{key}.npz", self.directory / f"{key}.sha256"

    def load(self, lang: str, layer: int) -> SentenceSums | None:
        if not self.enabled:
            return None
        data_path, sum_path = self._paths(lang, layer)
        if not (data_path.is_file() and sum_path.is_file()):
            return None
        if file_digest(data_path) != sum_path.read_text().strip():
            log.warning("cache entry %s (%s, layer %d) is corrupt; recomputing it", data_path.name, lang, layer)
            return None
        with np.load(data_path) as arrays:
            expected = {f.name for f in fields(SentenceSums)}
            if set(arrays.files) != expected:
                log.warning("cache entry %s (%s, layer %d) holds other fields than this version computes; recomputing it",
                            data_path.name, lang, layer)
                return None
            return SentenceSums(**{name: arrays[name] for name in arrays.files})

    def save(self, lang: str, layer: int, sums: SentenceSums) -> None:
        if not self.enabled:
            return
        data_path, sum_path = self._paths(lang, layer)
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **sums.to_dict())
        tmp = data_path.with_suffix(".npz.tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(data_path)
        write_text_atomic(sum_path, file_digest(data_path))
