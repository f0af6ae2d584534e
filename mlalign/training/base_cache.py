"""The base model's side of task=train's paired outcome pass, cached: a second run with the same base settings (every
job of a sweep, a rerun, task=pipeline after task=train) computes only the adapted side.

One entry per (split, language, layer) under `paths.cache_dir/paired_base`, keyed like the analysis cache (model
files, SAE files, corpus split and settings, max_length) plus what the paired pass does differently: every position
but BOS (no `analysis.min_position` / `max_position` window) and train's mixed precision. Each entry holds exactly what
the adapted side is compared against (`outcomes.BaseLayer`: per-token residual norms and non-zero SAE code entries,
per-sentence reconstruction error, residual totals) and the language's per-sentence token counts and base LM loss.
The metric is not in the key: the metric before comes from the stored code. `analysis.cache=false` recomputes.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np

from mlalign.analysis.cache import StatsCache
from mlalign.training.outcomes import BaseLayer, BaseSide, measure_base

KIND = "paired_base"
VERSION = 1
"""Bump when what `measure_base` computes changes meaning."""
LAYER_FIELDS = tuple(f.name for f in fields(BaseLayer))
LANG_FIELDS = ("n_tokens", "ce", "ce_tokens")
"""Stored with every layer's entry (a few numbers per sentence), so each entry stands alone."""


def base_identity(cfg, testbed_dir, split: str, layers: list[int], mixed_precision: str) -> dict:
    """What changes the base side of the paired pass on `split`; batch size and devices do not (float rounding)."""
    from mlalign.tasks.analyze import cache_identity

    identity = cache_identity(cfg, testbed_dir, None, split, layers)
    identity.update(positions="all but BOS", mixed_precision=str(mixed_precision), paired_base_version=VERSION)
    return identity


def open_cache(cfg, testbed_dir, split: str, layers: list[int], mixed_precision: str) -> StatsCache:
    return StatsCache(Path(cfg.paths.cache_dir) / KIND, base_identity(cfg, testbed_dir, split, layers, mixed_precision),
                      enabled=bool(cfg.analysis.cache))


def load(cache: StatsCache, langs: list[str], layers: list[int]) -> tuple[dict[str, BaseSide], dict[str, list[int]]]:
    """(what the cache holds, language -> the layers it lacks)."""
    found: dict[str, BaseSide] = {}
    missing: dict[str, list[int]] = {}
    for lang in langs:
        for layer in layers:
            arrays = cache.load_arrays(lang, layer, KIND, (*LAYER_FIELDS, *LANG_FIELDS))
            if arrays is None:
                missing.setdefault(lang, []).append(layer)
                continue
            side = found.setdefault(lang, BaseSide(**{name: arrays[name] for name in LANG_FIELDS}, layers={}))
            side.layers[layer] = BaseLayer(**{name: arrays[name] for name in LAYER_FIELDS})
    return found, missing


def save(cache: StatsCache, sides: dict[str, BaseSide]) -> None:
    for lang, side in sides.items():
        for layer, base in side.layers.items():
            cache.save_arrays(lang, layer, KIND, {**{name: np.asarray(getattr(base, name)) for name in LAYER_FIELDS},
                                                  **{name: getattr(side, name) for name in LANG_FIELDS}})


def base_sides(cache: StatsCache, model, tokenizer, saes: dict, texts_by_lang: dict[str, list[str]], batch_size: int,
               max_length: int, progress: bool = True, write: bool = True) -> dict[str, BaseSide]:
    """Every language's `BaseSide` over the layers of `saes`: from the cache where it holds them (the console says
    `cache hit`), else measured with `model` as it runs (the caller turns any adapter off) and cached (`write`: the
    main process only)."""
    from mlalign.console import note, stage

    layers = sorted(int(layer) for layer in saes)
    found, missing = load(cache, list(texts_by_lang), layers)
    if not missing:
        note(f"base model: cache hit ({len(found)} language(s) x {len(layers)} layer(s) from {cache.directory}; "
             "analysis.cache=false recomputes)")
        return found
    todo_layers = sorted({layer for ls in missing.values() for layer in ls})
    cached = sum(len(side.layers) for side in found.values())
    with stage(f"base model: measuring {len(missing)} language(s) x {len(todo_layers)} layer(s)"
               + (f" ({cached} (language, layer) entries from the cache)" if cached else "")
               + (", cached for later runs" if cache.enabled else "")):
        measured = measure_base(model, tokenizer, {layer: saes[layer] for layer in todo_layers},
                                {lang: texts_by_lang[lang] for lang in missing}, batch_size, max_length, progress)
    if write:
        save(cache, measured)
    for lang, side in measured.items():
        if lang in found:  # the rest of its layers came from the cache
            found[lang].layers.update(side.layers)
        else:
            found[lang] = side
    return found
