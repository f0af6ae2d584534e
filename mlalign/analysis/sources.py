"""Where a run's analysis statistics come from: the cache, an earlier pass of the same pipeline, or one engine run
that loads the SAEs and the model only if something is missing. Shared by task=analyze, task=train's pipeline
measurement and task=pipeline, below all of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlalign.analysis.cache import StatsCache, cache_identity
from mlalign.analysis.engine import EngineSettings, collect_listed_sums, collect_stats, position_cap
from mlalign.analysis.features import FeatureSums
from mlalign.analysis.stats import SentenceSums
from mlalign.config import AnalysisConfig, FeaturesConfig, typed
from mlalign.data.corpus import load_corpus

FEATURE_TOTALS = ("n_tokens", "n_sentences", "act_sum", "fire_count", "sentences_fired")
"""The per-feature totals cached per (language, layer) as the "features" entry kind."""
SENTENCE_FEATURES = ("feature_ids", "sentence_sums")
"""The second pass's per-sentence sums of listed features, cached as the "sentence_features" entry kind."""


def feature_settings(acfg) -> FeaturesConfig:
    """analysis.features as its schema's dataclass (`config.typed`: the schema's defaults for keys a hand-built or
    older config lacks)."""
    return typed(acfg, AnalysisConfig).features


class LazyEngine:
    """Loads the SAEs (first: a missing SAE fails before a multi-GB model download) and the model only when something
    must be computed, once per analyze_model call, and runs `collect_stats` with the analysis settings.
    reference_texts: the reference language's sentences, whose 90th-percentile position caps the position-matched
    window of every language (`engine.position_cap`), whichever languages this run computes."""

    def __init__(self, cfg, ctx, adapter, model, tokenizer, cache, split, layers, reference_texts=None):
        self.cfg, self.ctx, self.adapter, self.model, self.tokenizer = cfg, ctx, adapter, model, tokenizer
        self.cache, self.split, self.layers = cache, split, layers
        self.reference_texts = reference_texts
        self.saes: dict = {}

    def collect(self, texts_by_lang: dict, layers: list[int], **kwargs):
        """`collect_stats` over `layers`: the per-layer sums (and per-feature totals with `feature_stats=`), with the
        position-matched window's sums kept in the same pass."""
        saes, settings = self._prepare(layers)
        cap = None
        if self.reference_texts is not None:
            cap = position_cap(self.tokenizer, self.reference_texts, settings.max_length, settings.min_position,
                               settings.max_position)
        return collect_stats(self.model, self.tokenizer, saes, texts_by_lang, settings, position_cap=cap, **kwargs)

    def collect_listed(self, texts_by_lang: dict, feature_ids: dict[str, dict[int, list[int]]]):
        """`collect_listed_sums`: the second pass, per-sentence sums of the listed features only."""
        layers = sorted({layer for by_layer in feature_ids.values() for layer in by_layer})
        saes, settings = self._prepare(layers)
        return collect_listed_sums(self.model, self.tokenizer, saes, texts_by_lang, feature_ids, settings)

    def loaded(self, layers: list[int]) -> tuple:
        """(model, tokenizer, {layer: SAE}) for `layers`, loading whatever is not loaded yet."""
        saes, _ = self._prepare(layers)
        return self.model, self.tokenizer, saes

    def load_saes(self, layers: list[int]) -> dict:
        """The SAEs of `layers`, loaded where they wait for their chunk; the model is not loaded."""
        from mlalign.models import hidden_size, resolve_device

        cfg, acfg = self.cfg, typed(self.cfg.analysis, AnalysisConfig)
        # Where SAEs live: sae.device if set (e.g. cpu to spare accelerator memory), else the CPU while waiting for
        # their chunk (sae_chunk), else the model's device.
        compute_device = resolve_device(cfg.sae.device) if cfg.sae.device else None
        model_device = next(self.model.parameters()).device if self.model is not None else resolve_device(cfg.model.device)
        home = compute_device or ("cpu" if acfg.sae_chunk else model_device)
        todo = [layer for layer in layers if layer not in self.saes]
        if todo:
            hidden = int(cfg.model.hidden_size) if self.model is None else hidden_size(self.model)
            self.saes.update(self.ctx.load_saes(todo, hidden, home, cfg.sae))
        return {layer: self.saes[layer] for layer in layers}

    def collect_norm_matched(self, texts_by_lang: dict, layers: list[int], targets: dict[int, float]):
        """`collect_stats` with every layer's SAE reading norm-matched residuals (`norm_matched.NormMatchedSAE`):
        the same tokens as `collect`, no position window."""
        from mlalign.analysis.norm_matched import norm_matched_saes

        saes, settings = self._prepare(layers)
        return collect_stats(self.model, self.tokenizer, norm_matched_saes(saes, targets), texts_by_lang, settings)

    def _prepare(self, layers: list[int]) -> tuple[dict, EngineSettings]:
        """The SAEs of `layers` and the model loaded; the engine settings both passes share (the same tokens)."""
        from mlalign.models import num_layers, resolve_device

        cfg, acfg = self.cfg, typed(self.cfg.analysis, AnalysisConfig)
        compute_device = resolve_device(cfg.sae.device) if cfg.sae.device else None
        self.load_saes(layers)
        if self.model is None:
            self.model = self.ctx.load_model(adapter=self.adapter)
            self.tokenizer = self.ctx.load_tokenizer()
            # A first download fixed the snapshot the key names: store under the key later runs will compute.
            self.cache.identity = cache_identity(cfg, self.ctx.testbed_dir, self.adapter, self.split, self.layers)
        self.ctx.layers(num_layers(self.model))  # the config's layer count must match the weights
        settings = EngineSettings(batch_size=acfg.batch_size, max_length=int(cfg.data.max_length),
                                  sae_chunk=acfg.sae_chunk, progress=True, min_position=acfg.min_position,
                                  max_position=acfg.max_position, sae_device=compute_device, decode=acfg.decode)
        return {layer: self.saes[layer] for layer in layers}, settings

    def release(self, model: bool = False) -> None:
        """Drop the SAEs (and with model=True the model it loaded) so the next model fits beside nothing."""
        self.saes = {}
        if model:
            self.model = self.tokenizer = None


def feature_sentence_sums(needed: dict[str, dict[int, list[int]]], corpus, cache, engine) -> dict:
    """[lang][layer] -> per-sentence sums of (at least) the `needed` features: from the cache where it holds them,
    else from a second pass over those languages that keeps only these k features per sentence (O(sentences x k);
    forward + encode only, `engine.collect_listed_sums`).
    A recomputed entry keeps the cached features too, so the entry only grows as languages are added."""
    from types import SimpleNamespace

    from mlalign.console import stage

    out: dict = {lang: {} for lang in needed}
    todo: dict[str, dict[int, list[int]]] = {}
    for lang, by_layer in needed.items():
        for layer, features in by_layer.items():
            hit = cache.load_arrays(lang, layer, "sentence_features", SENTENCE_FEATURES)
            have = set(hit["feature_ids"].tolist()) if hit is not None else set()
            if hit is not None and set(features) <= have:
                out[lang][layer] = SimpleNamespace(**hit)
            else:
                todo.setdefault(lang, {})[layer] = sorted(have | set(features))
    if todo:
        layers = sorted({layer for by_layer in todo.values() for layer in by_layer})
        n_features = sum(len(fs) for by_layer in todo.values() for fs in by_layer.values())
        with stage(f"feature CIs: a second pass over {len(todo)} language(s) x {len(layers)} layer(s) keeping "
                   f"per-sentence sums of {n_features} listed (language, layer, feature)s"):
            computed = engine.collect_listed({lang: corpus[lang] for lang in todo}, todo)
        for lang, by_layer in todo.items():
            for layer in by_layer:
                sums = computed[lang][layer]
                arrays = {"feature_ids": sums.feature_ids, "sentence_sums": sums.sentence_sums}
                cache.save_arrays(lang, layer, "sentence_features", arrays)
                out[lang][layer] = SimpleNamespace(**arrays)
    return out


@dataclass
class Loaded:
    """What a caller already holds of the model whose statistics are wanted (the engine loads whatever is None, and
    only if something must be computed): the model (+ adapter), its tokenizer, SAEs by layer."""

    model: object = None
    tokenizer: object = None
    saes: dict | None = None


def cached_stats(cfg, ctx, adapter, corpus, split: str, loaded: Loaded | None = None, *, label: str = "",
                 recording=None, computed_before=None):
    """Every (language, layer)'s `SentenceSums` and (analysis.features.enabled) `FeatureSums` for the model
    (+ adapter): from `computed_before` (an `AdaptedPassRecording` of this pipeline: the same model, split and
    settings) or the cache where they hold both, the rest computed in one engine run and cached. Returns (stats,
    feature_stats, cache, engine); the engine loads the model only if something was missing (`loaded`: what the caller
    already holds). recording: a `training.shared_pass` recording whose recorders the same engine run feeds
    (task=pipeline: the paired outcome pass's base or adapted side)."""
    from mlalign.console import note, stage

    loaded = loaded or Loaded()
    fcfg = feature_settings(cfg.analysis)
    layers = ctx.layers()
    langs = ctx.langs
    cache = StatsCache(Path(cfg.paths.cache_dir) / "analysis",
                       cache_identity(cfg, ctx.testbed_dir, adapter, split, layers), enabled=bool(cfg.analysis.cache))
    stats = {lang: {} for lang in langs}
    feature_stats = {lang: {} for lang in langs}
    missing: dict[str, list[int]] = {}
    before_stats = computed_before.stats if computed_before is not None else {}
    before_features = computed_before.feature_stats if computed_before is not None else {}
    for lang in langs:
        for layer in layers:
            if layer in before_stats.get(lang, {}) and (not fcfg.enabled or layer in before_features.get(lang, {})):
                stats[lang][layer] = before_stats[lang][layer]
                if fcfg.enabled:
                    feature_stats[lang][layer] = before_features[lang][layer]
                continue
            hit = cache.load(lang, layer)
            features_hit = cache.load_arrays(lang, layer, "features", FEATURE_TOTALS) if fcfg.enabled else {}
            if hit is None or features_hit is None:
                missing.setdefault(lang, []).append(layer)
            else:
                stats[lang][layer] = hit
                if fcfg.enabled:
                    feature_stats[lang][layer] = FeatureSums(**features_hit)
    engine = LazyEngine(cfg, ctx, adapter, loaded.model, loaded.tokenizer, cache, split, layers,
                        reference_texts=corpus[cfg.reference_lang])
    engine.saes.update(loaded.saes or {})
    if missing:
        todo_layers = sorted({layer for ls in missing.values() for layer in ls})
        n_cached = sum(len(v) for v in stats.values())
        computed_features = {} if fcfg.enabled else None
        with stage(f"{label}analyzing {len(missing)} language(s) x {len(todo_layers)} layer(s)"
                   + (f" ({n_cached} (language, layer) results from the cache)" if n_cached else "")):
            texts = {lang: corpus[lang] for lang in missing}
            recorders = recording.recorders(texts, todo_layers) if recording is not None else None
            computed = engine.collect(texts, todo_layers, feature_stats=computed_features,
                                      token_recorders=recorders)
            if recording is not None:
                from mlalign.models import hidden_size

                recording.finish(hidden_size(engine.model), layers, write=bool(ctx.is_main_process))
        for lang, by_layer in computed.items():
            for layer, sums in by_layer.items():
                cache.save(lang, layer, sums)
                if computed_features is not None:
                    totals = computed_features[lang][layer]
                    cache.save_arrays(lang, layer, "features", {k: getattr(totals, k) for k in FEATURE_TOTALS})
                    if layer in layers:
                        feature_stats[lang][layer] = totals
                if layer in layers:
                    stats[lang][layer] = sums
    elif computed_before is not None and all(layer in before_stats.get(lang, {}) for lang in langs for layer in layers):
        note(f"{label}all {len(langs)} x {len(layers)} (language, layer) results were computed in step 2's pass over "
             "the same sentences")
    else:
        note(f"{label}all {len(langs)} x {len(layers)} (language, layer) results come from the cache")
    if recording is not None:
        recording.keep_analysis(stats, feature_stats)
    return stats, feature_stats, cache, engine


def base_feature_stats(cfg, ctx, split: str | None = None) -> dict[str, dict[int, FeatureSums]]:
    """The base model's (no adapter) per-feature totals for every analysed (language, layer), from the analysis cache
    where present (e.g. an earlier `task=analyze` without the adapter), computed and cached otherwise: what the
    adapter view compares against. The base model is loaded only for what is missing, and released after."""
    split = split or cfg.data.splits.analysis
    corpus = load_corpus(cfg.data, ctx.langs, split)
    _, feature_stats, _, engine = cached_stats(cfg, ctx, None, corpus, split, label="base model: ")
    engine.release(model=True)
    return feature_stats


NORM_MATCHED = "norm_matched"
"""The cache's entry kind of a (language, layer)'s norm-matched statistics: its `SentenceSums` and the target norm."""


def norm_matched_stats(stats: dict, corpus, cache, engine: LazyEngine, reference_lang: str, layers: list[int]
                       ) -> tuple[dict[int, float], dict]:
    """(targets, [lang][layer] -> `SentenceSums` of the norm-matched pass): each layer's target is the reference
    language's centred RMS about the SAE's b_dec (`norm_matched.reference_targets`, from `stats`); the statistics
    come from the cache where it holds them for the same target, the rest from one more engine pass (forward + one
    encode per layer) over the languages missing, cached."""
    from mlalign.analysis.norm_matched import reference_targets
    from mlalign.console import note, stage

    targets = reference_targets({reference_lang: stats[reference_lang]}, reference_lang, engine.load_saes(layers))
    names = SentenceSums.array_names() | {"target"}
    out: dict = {lang: {} for lang in stats}
    missing: dict[str, list[int]] = {}
    for lang in stats:
        for layer in layers:
            hit = cache.load_arrays(lang, layer, NORM_MATCHED, names)
            if hit is not None and np.isclose(float(hit.pop("target")), targets[layer], rtol=1e-9, atol=0.0):
                out[lang][layer] = SentenceSums.from_arrays(hit)
            else:
                missing.setdefault(lang, []).append(layer)
    if not missing:
        note(f"norm-matched: all {len(stats)} x {len(layers)} (language, layer) results come from the cache")
        return targets, out
    todo_layers = sorted({layer for ls in missing.values() for layer in ls})
    with stage(f"norm-matched pass: {len(missing)} language(s) x {len(todo_layers)} layer(s), every token's centred "
               "residual rescaled to the reference's centred RMS before its SAE"):
        computed = engine.collect_norm_matched({lang: corpus[lang] for lang in missing}, todo_layers, targets)
    for lang, by_layer in computed.items():
        for layer, sums in by_layer.items():
            cache.save_arrays(lang, layer, NORM_MATCHED, {**sums.to_dict(), "target": np.array(targets[layer])})
            if layer in missing[lang]:
                out[lang][layer] = sums
    return targets, out
