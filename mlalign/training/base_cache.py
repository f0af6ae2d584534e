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
               recorded: "AnalysisPassRecording | None" = None) -> dict[str, BaseSide]:
    """Every language's `BaseSide` over the layers of `saes`: what this pipeline's analysis pass `recorded` of these
    very sentences, then what the cache holds (the console says `cache hit`), and the rest measured with `model` as it
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


class AnalysisPassRecording:
    """task=pipeline's step 1 records, in its analysis pass over the held-out split, the paired pass's base side of
    the languages training measures, so step 2 does not run the base model over those sentences again
    (docs/training.md#what-is-measured-where). `for_pipeline` says when that is the same measurement.

    The recorded sides are written to the base-side cache (under the key task=train computes) and kept in memory,
    keyed by a hash of each language's sentences, for `base_sides(recorded=...)` (so `analysis.cache=false` works
    too, and different sentences are never mixed up)."""

    def __init__(self, cfg, testbed_dir, split: str, langs: list[str], precision: str):
        self.cfg, self.testbed_dir, self.split, self.langs, self.precision = cfg, testbed_dir, split, langs, precision
        self._recorders: dict = {}
        self._text_hash: dict[str, str] = {}
        self.sides: dict[str, BaseSide] = {}

    @classmethod
    def for_pipeline(cls, cfg, ctx, langs: list[str]) -> "AnalysisPassRecording | None":
        """A recording when step 1's analysis pass sees the held-out tokens exactly as the paired pass does (same
        split, every position but BOS, no mixed precision), else None and a log line saying why."""
        import logging

        from mlalign.training.loop import resolve_mixed_precision

        precision = resolve_mixed_precision(cfg.train.mixed_precision, str(cfg.model.device) == "cpu")
        acfg = cfg.analysis
        reasons = []
        if str(cfg.data.splits.analysis) != str(cfg.data.splits.heldout):
            reasons.append(f"data.splits.analysis={cfg.data.splits.analysis} is not the held-out split "
                           f"{cfg.data.splits.heldout}")
        if int(acfg.get("min_position") or 0) != 0 or acfg.get("max_position") is not None:
            reasons.append("analysis.min_position/max_position narrow the analysed positions")
        if precision != "no":
            reasons.append(f"training measures under mixed precision {precision}")
        if reasons:
            logging.getLogger(__name__).info("the held-out base side is measured in training, not in the analysis "
                                             "pass: %s", "; ".join(reasons))
            return None
        return cls(cfg, ctx.testbed_dir, str(cfg.data.splits.heldout), list(langs), precision)

    def recorders(self, texts_by_lang: dict[str, list[str]], layers: list[int]) -> dict:
        """{lang: BaseSideRecorder} for the engine's pass over `texts_by_lang` at `layers` (the languages it records)."""
        from mlalign.training.outcomes import BaseSideRecorder

        self._recorders = {lang: BaseSideRecorder(len(texts), layers, "cpu")
                           for lang, texts in texts_by_lang.items() if lang in self.langs}
        self._text_hash.update({lang: _text_hash(texts_by_lang[lang]) for lang in self._recorders})
        return self._recorders

    def finish(self, d_model: int, layers: list[int], write: bool = True) -> None:
        """Finalise what the pass recorded; cache it under task=train's key for `layers` (the analysed layers)."""
        sides = {lang: recorder.finalize(d_model) for lang, recorder in self._recorders.items()}
        self._recorders = {}
        for lang, side in sides.items():
            if lang in self.sides:
                self.sides[lang].layers.update(side.layers)
            else:
                self.sides[lang] = side
        if write and sides:
            save(open_cache(self.cfg, self.testbed_dir, self.split, layers, self.precision), sides)

    def sides_for(self, texts_by_lang: dict[str, list[str]]) -> dict[str, BaseSide]:
        """The recorded sides of the languages whose sentences are exactly `texts_by_lang`'s."""
        return {lang: self.sides[lang] for lang, texts in texts_by_lang.items()
                if lang in self.sides and self._text_hash.get(lang) == _text_hash(texts)}


def _text_hash(texts: list[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()
