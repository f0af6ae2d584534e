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
VERSION = 2
"""Bump when what `measure_base` computes changes meaning (2: `token_centred_norm`, the centred norm-matched control)."""
LAYER_FIELDS = tuple(f.name for f in fields(BaseLayer))
LANG_FIELDS = ("n_tokens", "ce", "ce_tokens")
"""Stored with every layer's entry (a few numbers per sentence), so each entry stands alone."""


def base_identity(cfg, testbed_dir, split: str, layers: list[int], mixed_precision: str) -> dict:
    """What changes the base side of the paired pass on `split`; batch size and devices do not (float rounding)."""
    from mlalign.analysis.cache import cache_identity

    identity = cache_identity(cfg, testbed_dir, None, split, layers)
    identity.update(positions="all but BOS", mixed_precision=str(mixed_precision), paired_base_version=VERSION)
    return identity


def open_cache(cfg, testbed_dir, split: str, layers: list[int], mixed_precision: str) -> StatsCache:
    return StatsCache(Path(cfg.paths.cache_dir) / KIND, base_identity(cfg, testbed_dir, split, layers, mixed_precision),
                      enabled=bool(cfg.analysis.cache))


def load(cache: StatsCache, langs: list[str], layers: list[int], known: dict[str, BaseSide] | None = None
         ) -> tuple[dict[str, BaseSide], dict[str, list[int]]]:
    """(what `known` (measured earlier in this process) and the cache hold, language -> the layers both lack)."""
    found: dict[str, BaseSide] = {}
    missing: dict[str, list[int]] = {}
    for lang in langs:
        for layer in layers:
            if known and lang in known and layer in known[lang].layers:
                side = known[lang]
                found.setdefault(lang, BaseSide(n_tokens=side.n_tokens, ce=side.ce, ce_tokens=side.ce_tokens,
                                                layers={})).layers[layer] = side.layers[layer]
                continue
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
               max_length: int, progress: bool = True, write: bool = True,
               recorded=None) -> dict[str, BaseSide]:
    """Every language's `BaseSide` over the layers of `saes`: what this pipeline's analysis pass recorded of these very
    sentences (`recorded`, a `training.shared_pass.BasePassRecording`), then what the cache holds (the console says `cache hit`), and the rest measured with `model` as it
    runs (the caller turns any adapter off) and cached (`write`: the main process only)."""
    from mlalign.console import note, stage

    layers = sorted(int(layer) for layer in saes)
    known = recorded.sides_for(texts_by_lang) if recorded is not None else {}
    found, missing = load(cache, list(texts_by_lang), layers, known)
    from_pass = {lang for lang in known if all(layer in known[lang].layers for layer in layers)}
    if known:
        note(f"base model: recorded in step 1's analysis pass over the same sentences ({len(from_pass)} language(s) "
             f"x {len(layers)} layer(s)), not measured again")
    if not missing and len(from_pass) < len(found):
        note(f"base model: cache hit ({len(found) - len(from_pass)} language(s) x {len(layers)} layer(s) from "
             f"{cache.directory}; analysis.cache=false recomputes)")
    if not missing:
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

