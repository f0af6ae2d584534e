"""Per-(language, layer) cache of analysis statistics: adding a language recomputes only that language.

An entry is `<key>.npz` plus `<key>.sha256` written after it; an entry whose checksum does not match (an interrupted
or corrupted write) is ignored and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from mlalign.analysis.stats import POSITION_CAP_QUANTILE, SentenceSums
from mlalign.data.corpus import corpus_fingerprint
from mlalign.io import write_text_atomic

log = logging.getLogger(__name__)

# Bump when the statistics the engine computes change meaning. 2: per-sentence residual sums (exact FVU bootstrap),
# sq_norm, positions and truncation flags. 3: per-feature statistics (features.FeatureSums) as a second entry kind.
# 4: the position-matched window's sums (SentenceSums.within_cap), capped at the reference language's positions.
CACHE_VERSION = 4


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


SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "cfg.json")
"""Files hashed by content: configs and tokenizers. Weights (GBs) are identified by their hub blob name (the blob's
sha256) or, in a local folder, by size and modification time."""


def folder_fingerprint(directory: str | Path) -> dict:
    """What identifies the files of a model or SAE folder: sha256 of configs/tokenizer files, and for each weight file
    its hub blob (content hash) if it is a hub-cache symlink, else (size, mtime_ns)."""
    directory = Path(directory)
    out: dict = {"files": {}, "weights": {}}
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if path.name in SMALL_FILES:
            out["files"][path.name] = file_digest(path)
        elif path.suffix in (".safetensors", ".bin", ".pt", ".npz", ".gguf"):
            real = path.resolve()
            stat = real.stat()
            blob = real.parent.name == "blobs"
            out["weights"][path.name] = real.name if blob else [stat.st_size, stat.st_mtime_ns]
    return out


def hub_snapshot(repo_id: str, revision: str | None = None, filename: str = "config.json") -> str | None:
    """The commit of the locally cached snapshot of a hub repo (offline: read from the cache, never downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        path = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # HFValidationError: not a repo id (e.g. a local path that does not exist); loading says so
        return None
    if isinstance(path, str) and Path(path).parent.parent.name == "snapshots":
        return Path(path).parent.name
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def model_fingerprint(source: str, revision: str | None = None) -> dict:
    """A local model folder's file fingerprint, or a hub id's cached snapshot commit and file fingerprint (which
    covers the tokenizer, loaded from the same source). A new snapshot or retokenised folder gives a new key."""
    if Path(source).is_dir():
        return folder_fingerprint(source)
    snapshot = hub_snapshot(source, revision)
    out: dict = {"snapshot": snapshot}
    if snapshot:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(source, "config.json", revision=snapshot)
        if isinstance(config, str):
            out.update(folder_fingerprint(Path(config).parent))
    return out


def sae_fingerprints(sae_cfg, layers) -> dict[int, dict]:
    """layer -> where its SAE's weights resolve: the release's repo, cached snapshot and path in the registry, or the
    local folder's file fingerprint."""
    from mlalign.saes import local_sae_path, pretrained_release, sae_id_for

    out = {}
    if sae_cfg.get("release"):
        release = pretrained_release(sae_cfg.release)
        repo_id = getattr(release, "repo_id", None)
        snapshot = hub_snapshot(repo_id) if repo_id else None
        paths = dict(release.saes_map) if release is not None else {}
        for layer in layers:
            out[int(layer)] = {"repo_id": repo_id, "snapshot": snapshot, "path": paths.get(sae_id_for(sae_cfg, layer))}
    elif sae_cfg.get("path_template"):
        for layer in layers:
            path = local_sae_path(sae_cfg.path_template, layer)
            out[int(layer)] = folder_fingerprint(path) if path.is_dir() else {"missing": str(path)}
    return out


def entry_key(identity: dict, lang: str, layer: int) -> str:
    """identity["per_layer"][layer] (e.g. that layer's SAE files) joins only its own layer's key."""
    per_layer = identity.get("per_layer") or {}
    base = {k: v for k, v in identity.items() if k != "per_layer"}
    own = per_layer.get(int(layer), per_layer.get(str(layer)))
    payload = json.dumps({**base, "layer_source": own, "lang": lang, "layer": int(layer), "version": CACHE_VERSION},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class StatsCache:
    def __init__(self, directory: str | Path, identity: dict, enabled: bool = True):
        self.directory = Path(directory)
        self.identity = identity
        self.enabled = enabled

    def _paths(self, lang: str, layer: int, kind: str = "") -> tuple[Path, Path]:
        key = entry_key(self.identity, lang, layer) + (f".{kind}" if kind else "")
        return self.directory / f"{key}.npz", self.directory / f"{key}.sha256"

    def load_arrays(self, lang: str, layer: int, kind: str, names) -> dict[str, np.ndarray] | None:
        """The arrays of one entry of a (language, layer): kind "" is its SentenceSums, others (e.g. "features") sit
        beside it. None (recompute) unless the checksum matches and it holds exactly `names`."""
        if not self.enabled:
            return None
        data_path, sum_path = self._paths(lang, layer, kind)
        if not (data_path.is_file() and sum_path.is_file()):
            return None
        if file_digest(data_path) != sum_path.read_text().strip():
            log.warning("cache entry %s (%s, layer %d) is corrupt; recomputing it", data_path.name, lang, layer)
            return None
        with np.load(data_path) as arrays:
            if set(arrays.files) != set(names):
                log.warning("cache entry %s (%s, layer %d) holds other fields than this version computes; "
                            "recomputing it", data_path.name, lang, layer)
                return None
            return {name: arrays[name] for name in arrays.files}

    def save_arrays(self, lang: str, layer: int, kind: str, arrays: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        self._write(*self._paths(lang, layer, kind), arrays)

    def load(self, lang: str, layer: int) -> SentenceSums | None:
        # An entry computed before a metric was registered lacks its sums: recomputed, not half-read.
        arrays = self.load_arrays(lang, layer, "", SentenceSums.array_names())
        return None if arrays is None else SentenceSums.from_arrays(arrays)

    def save(self, lang: str, layer: int, sums: SentenceSums) -> None:
        if not self.enabled:
            return
        self._write(*self._paths(lang, layer), sums.to_dict())

    def _write(self, data_path: Path, sum_path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        tmp = data_path.with_suffix(".npz.tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(data_path)
        write_text_atomic(sum_path, file_digest(data_path))


def cache_identity(cfg, testbed_dir, adapter, split: str, layers=None) -> dict:
    """Everything that changes a (language, layer) statistic; batch size, sae_chunk, sae.device and padding do not.

    The model's files (hub snapshot commit or local folder fingerprint, tokenizer included) and each layer's SAE
    source (release repo + snapshot + path, or local files) are part of it, so a new snapshot is a new entry.
    """
    from mlalign.models import model_source

    data = cfg.data
    source = model_source(cfg.model, testbed_dir)
    acfg = cfg.analysis
    return {
        "model": source,
        "revision": cfg.model.get("revision"),
        "model_files": model_fingerprint(source, cfg.model.get("revision")),
        "attn_implementation": cfg.model.get("attn_implementation"),
        "dtype": cfg.model.dtype,
        "positions": [int(acfg.get("min_position") or 0), acfg.get("max_position")],
        # Every language's position-matched window ends at the reference's 90th-percentile position.
        "position_cap_from": [cfg.reference_lang, POSITION_CAP_QUANTILE],
        "adapter": adapter_fingerprint(adapter),
        "sae": {k: cfg.sae.get(k) for k in ("release", "id_template", "path_template", "dtype")},
        "corpus": {"source": data.source, "path": data.path, "split": split,
                   "max_sentences": data.get("max_sentences"), "max_length": data.max_length,
                   "fingerprint": corpus_fingerprint(data)},
        "per_layer": sae_fingerprints(cfg.sae, layers) if layers is not None else {},
    }
