"""task=analyze: per-language, per-layer SAE activation statistics and their disparity against the reference language."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from mlalign.analysis.cache import StatsCache, adapter_fingerprint, model_fingerprint, sae_fingerprints
from mlalign.analysis.engine import collect_listed_sums, collect_stats
from mlalign.analysis.features import FeatureSums
from mlalign.analysis.summary import METRICS_CSV_COLUMNS, metrics_rows, summarize
from mlalign.data.corpus import corpus_fingerprint, load_corpus
from mlalign.io import write_json_atomic, write_text_atomic
from mlalign.models import model_source

log = logging.getLogger(__name__)

OBJECTIVE = "mean_disparity_pct"


def cache_identity(cfg, testbed_dir, adapter, split: str, layers=None) -> dict:
    """Everything that changes a (language, layer) statistic; batch size, sae_chunk, sae.device and padding do not.

    The model's files (hub snapshot commit or local folder fingerprint, tokenizer included) and each layer's SAE
    source (release repo + snapshot + path, or local files) are part of it, so a new snapshot is a new entry.
    """
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
        "adapter": adapter_fingerprint(adapter),
        "sae": {k: cfg.sae.get(k) for k in ("release", "id_template", "path_template", "dtype")},
        "corpus": {"source": data.source, "path": data.path, "split": split,
                   "max_sentences": data.get("max_sentences"), "max_length": data.max_length,
                   "fingerprint": corpus_fingerprint(data)},
        "per_layer": sae_fingerprints(cfg.sae, layers) if layers is not None else {},
    }


FEATURE_TOTALS = ("n_tokens", "n_sentences", "act_sum", "fire_count", "sentences_fired")
"""The per-feature totals cached per (language, layer) as the "features" entry kind."""
SENTENCE_FEATURES = ("feature_ids", "sentence_sums")
"""The second pass's per-sentence sums of listed features, cached as the "sentence_features" entry kind."""


def feature_settings(acfg) -> dict:
    """analysis.features with its defaults (configs composed without the key, e.g. older experiment files)."""
    fcfg = acfg.get("features") or {}
    return {"enabled": bool(fcfg.get("enabled", True)), "top_k": int(fcfg.get("top_k", 10)),
            "min_sentences": int(fcfg.get("min_sentences", 5)),
            "specific_threshold": float(fcfg.get("specific_threshold", 0.5)),
            "intervals": bool(fcfg.get("intervals", True)), "csv_rows": str(fcfg.get("csv_rows", "fired"))}


class _LazyEngine:
    """Loads the SAEs (first: a missing SAE fails before a multi-GB model download) and the model only when something
    must be computed, once per analyze_model call, and runs `collect_stats` with the analysis settings."""

    def __init__(self, cfg, ctx, adapter, model, tokenizer, cache, split, layers):
        self.cfg, self.ctx, self.adapter, self.model, self.tokenizer = cfg, ctx, adapter, model, tokenizer
        self.cache, self.split, self.layers = cache, split, layers
        self.saes: dict = {}

    def collect(self, texts_by_lang: dict, layers: list[int], **kwargs):
        """`collect_stats` over `layers`: the per-layer sums (and per-feature totals with `feature_stats=`)."""
        saes, settings = self._prepare(layers)
        return collect_stats(self.model, self.tokenizer, saes, texts_by_lang, decode=str(self.cfg.analysis.get("decode") or "auto"),
                             **settings, **kwargs)

    def collect_listed(self, texts_by_lang: dict, feature_ids: dict[str, dict[int, list[int]]]):
        """`collect_listed_sums`: the second pass, per-sentence sums of the listed features only."""
        layers = sorted({layer for by_layer in feature_ids.values() for layer in by_layer})
        saes, settings = self._prepare(layers)
        return collect_listed_sums(self.model, self.tokenizer, saes, texts_by_lang, feature_ids, **settings)

    def _prepare(self, layers: list[int]) -> tuple[dict, dict]:
        """The SAEs of `layers` and the model loaded; the engine settings both passes share (the same tokens)."""
        from mlalign.models import hidden_size, num_layers, resolve_device

        cfg, acfg = self.cfg, self.cfg.analysis
        # Where SAEs live: sae.device if set (e.g. cpu to spare accelerator memory), else the CPU while waiting for
        # their chunk (sae_chunk), else the model's device.
        compute_device = resolve_device(cfg.sae.get("device")) if cfg.sae.get("device") else None
        model_device = next(self.model.parameters()).device if self.model is not None else resolve_device(cfg.model.device)
        home = compute_device or ("cpu" if acfg.sae_chunk else model_device)
        todo = [layer for layer in layers if layer not in self.saes]
        if todo:
            hidden = int(cfg.model.hidden_size) if self.model is None else hidden_size(self.model)
            self.saes.update(self.ctx.load_saes(todo, hidden, home))
        if self.model is None:
            self.model = self.ctx.load_model(adapter=self.adapter)
            self.tokenizer = self.ctx.load_tokenizer()
            # A first download fixed the snapshot the key names: store under the key later runs will compute.
            self.cache.identity = cache_identity(cfg, self.ctx.testbed_dir, self.adapter, self.split, self.layers)
        self.ctx.layers(num_layers(self.model))  # the config's layer count must match the weights
        settings = dict(batch_size=int(acfg.batch_size), max_length=int(cfg.data.max_length), sae_chunk=acfg.sae_chunk,
                        progress=True, min_position=int(acfg.get("min_position") or 0),
                        max_position=acfg.get("max_position"), sae_device=compute_device)
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


def analyze_features_step(cfg, ctx, summary: dict, stats, feature_stats, corpus, cache, engine, out_dir: Path,
                          fcfg: dict) -> dict[str, Path]:
    """features.csv, feature_overlap.json, features_summary.json, features_top.md and the two plots (docs/method.md
    §8); adds `summary["features"]`; returns the plots by name."""
    from mlalign.analysis import features as feat

    acfg = cfg.analysis
    langs = summary["langs"]
    report = feat.analyze_features(feature_stats, cfg.reference_lang, langs, top_k=fcfg["top_k"],
                                   min_sentences=fcfg["min_sentences"], specific_threshold=fcfg["specific_threshold"])
    report.neuronpedia = feat.neuronpedia_ids(cfg.sae, report.layers)
    n_resamples = int(acfg.bootstrap)
    if fcfg["intervals"] and n_resamples > 0 and len(langs) > 1:
        sentence_sums = feature_sentence_sums(report.needed_features(), corpus, cache, engine)
        n_tokens = {lang: {layer: stats[lang][layer].n_tokens for layer in report.layers} for lang in langs}
        feat.add_intervals(report, sentence_sums, n_tokens, {lang: corpus.ids[lang] for lang in langs},
                           n_resamples=n_resamples, ci=float(acfg.ci), seed=int(cfg.seed))
    bands = {band: [int(layer) for layer in ls] for band, ls in summary["bands"].items()}
    title = f"{cfg.model.name}, {cfg.sae.name}"
    rows = feat.feature_rows(report, fcfg["csv_rows"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(feat.FEATURES_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    files = {"csv": write_text_atomic(out_dir / "features.csv", buffer.getvalue()),
             "overlap": write_json_atomic(out_dir / "feature_overlap.json", feat.overlap_json(report)),
             "summary": write_json_atomic(out_dir / "features_summary.json", feat.features_summary(report, bands)),
             "top": write_text_atomic(out_dir / "features_top.md",
                                      feat.features_markdown(report, bands, title, float(acfg.ci)))}
    images = {}
    if acfg.plots:
        images = {Path(path).stem: Path(path) for path in feat.plot_features(report, bands, out_dir, title)}
    summary["features"] = {name: str(path) for name, path in files.items()}
    ctx.tracker.log_table("analysis/features_listed", [row for row in rows if row["listed"]])
    return images


def cached_stats(cfg, ctx, adapter, corpus, split: str, fcfg: dict, model=None, tokenizer=None, label: str = "",
                 recording=None, saes: dict | None = None, computed_before=None):
    """Every (language, layer)'s `SentenceSums` and (features on) `FeatureSums` for the model (+ adapter): from
    `computed_before` (an `AdaptedPassRecording` of this pipeline: the same model, split and settings) or the cache
    where they hold both, the rest computed in one engine run and cached. Returns (stats, feature_stats, cache,
    engine); the engine loads the model only if something was missing. recording: a `training.shared_pass`
    recording whose recorders the same engine run feeds (task=pipeline: the paired outcome pass's base or adapted
    side). saes: SAEs already loaded (layer -> SAE), used instead of loading them again."""
    from mlalign.console import note, stage

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
            if layer in before_stats.get(lang, {}) and (not fcfg["enabled"] or layer in before_features.get(lang, {})):
                stats[lang][layer] = before_stats[lang][layer]
                if fcfg["enabled"]:
                    feature_stats[lang][layer] = before_features[lang][layer]
                continue
            hit = cache.load(lang, layer)
            features_hit = cache.load_arrays(lang, layer, "features", FEATURE_TOTALS) if fcfg["enabled"] else {}
            if hit is None or features_hit is None:
                missing.setdefault(lang, []).append(layer)
            else:
                stats[lang][layer] = hit
                if fcfg["enabled"]:
                    feature_stats[lang][layer] = FeatureSums(**features_hit)
    engine = _LazyEngine(cfg, ctx, adapter, model, tokenizer, cache, split, layers)
    engine.saes.update(saes or {})
    if missing:
        todo_layers = sorted({layer for ls in missing.values() for layer in ls})
        n_cached = sum(len(v) for v in stats.values())
        computed_features = {} if fcfg["enabled"] else None
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
    fcfg = feature_settings(cfg.analysis)
    corpus = load_corpus(cfg.data, ctx.langs, split)
    _, feature_stats, _, engine = cached_stats(cfg, ctx, None, corpus, split, fcfg, label="base model: ")
    engine.release(model=True)
    return feature_stats


def write_feature_changes(cfg, ctx, summary: dict, base: dict, adapted: dict, out_dir: Path) -> dict:
    """The adapter view (docs/method.md §8): feature_changes.json/.md in `out_dir`, which features the adapter raised or
    lowered in the target languages and the reference. Returns the key numbers per language and band (for
    summary.json and report.md). Shared by `task=analyze adapter=...` and `task=pipeline`."""
    from mlalign.analysis.features import adapter_changes, adapter_changes_by_band, adapter_changes_markdown, neuronpedia_ids
    from mlalign.tasks import train

    fcfg = feature_settings(cfg.analysis)
    langs = [lang for lang in dict.fromkeys([*train.target_langs(cfg, ctx.langs), cfg.reference_lang]) if lang in base]
    changes = adapter_changes(base, adapted, langs, cfg.reference_lang, top_k=fcfg["top_k"],
                              min_sentences=fcfg["min_sentences"], specific_threshold=fcfg["specific_threshold"])
    json_path = write_json_atomic(out_dir / "feature_changes.json",
                                  {lang: {str(k): v for k, v in by.items()} for lang, by in changes.items()})
    layers = sorted(next(iter(base.values())))
    bands = {band: [int(layer) for layer in ls] for band, ls in summary["bands"].items()}
    md_path = write_text_atomic(out_dir / "feature_changes.md", adapter_changes_markdown(
        changes, bands, fcfg["top_k"], neuronpedia_ids(cfg.sae, layers)))
    ctx.tracker.log_table("analysis/feature_changes", [
        {"lang": lang, "layer": layer, "kind": kind, **item}
        for lang, by_layer in changes.items() for layer, cell in by_layer.items() for kind in ("up", "down")
        for item in cell[kind]])
    return {"md": str(md_path), "json": str(json_path), "top_k": fcfg["top_k"],
            "by_band": adapter_changes_by_band(changes, bands)}


def analyze_model(cfg, ctx, adapter=None, model=None, tokenizer=None, out_dir: Path | None = None,
                  split: str | None = None, feature_stats_out: dict | None = None, base_features: dict | None = None,
                  recording=None, computed_before=None) -> dict:
    """Statistics for every (language, layer), from the cache where possible; writes summary.json, metrics.csv and
    plots to `out_dir` (default `<run dir>/analysis`) and returns the summary dict. Reused by task=pipeline.
    With an adapter and `base_features` (the base model's per-feature totals on the same split), also the adapter
    view: feature_changes.json/.md and `summary["feature_changes"]`. recording, computed_before: see `cached_stats`."""
    out_dir = Path(out_dir or ctx.run_dir / "analysis")
    split = split or cfg.data.splits.analysis
    acfg = cfg.analysis
    layers = ctx.layers()
    langs = ctx.langs
    corpus = load_corpus(cfg.data, langs, split)
    from mlalign.saes import check_sae_config

    check_sae_config(cfg.sae, layers)
    fcfg = feature_settings(acfg)
    stats, feature_stats, cache, engine = cached_stats(cfg, ctx, adapter, corpus, split, fcfg, model, tokenizer,
                                                       recording=recording, computed_before=computed_before)

    summary = summarize(stats, cfg.reference_lang, metric=acfg.metric, aggregate=acfg.aggregate,
                        ids_by_lang={lang: corpus.ids[lang] for lang in langs}, bootstrap=int(acfg.bootstrap),
                        ci=float(acfg.ci), seed=int(cfg.seed), bands=acfg.bands, model=cfg.model.name,
                        sae=cfg.sae.name, max_fvu=acfg.get("max_fvu", 1.0),
                        max_truncated_pct=acfg.get("max_truncated_pct", 5.0),
                        n_model_layers=cfg.model.get("num_layers"),
                        feature_stats=feature_stats if fcfg["enabled"] else None,
                        dense_threshold=float(acfg.dense_threshold))
    summary["adapter"] = str(adapter) if adapter else None
    report = ctx.run_dir / "corpus.json"
    summary["corpus"] = {"source": cfg.data.source, "split": split, "n_sentences": len(corpus.ids[cfg.reference_lang]),
                         "report": str(report) if report.is_file() else None}
    rows = metrics_rows(summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(METRICS_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out_dir / "metrics.csv", buffer.getvalue())
    images = {}
    if acfg.plots:
        from mlalign.analysis.plots import make_plots

        images = {Path(path).stem: Path(path) for path in make_plots(summary, out_dir)}
    if fcfg["enabled"]:
        feature_images = analyze_features_step(cfg, ctx, summary, stats, feature_stats, corpus, cache, engine, out_dir, fcfg)
        images.update(feature_images)
    engine.release()
    if adapter and base_features and fcfg["enabled"]:
        summary["feature_changes"] = write_feature_changes(cfg, ctx, summary, base_features, feature_stats, out_dir)
    if feature_stats_out is not None and fcfg["enabled"]:
        feature_stats_out.update(feature_stats)
    summary["plots"] = {name: str(path) for name, path in images.items()}
    write_json_atomic(out_dir / "summary.json", summary)
    ctx.tracker.log_table("analysis/metrics", rows)
    ctx.tracker.log_images({f"analysis/{k}": v for k, v in images.items()})
    return summary


def scalar_results(summary: dict) -> dict[str, float]:
    """Flat numbers for the tracker and sweepers: mean disparity per language and per band."""
    ref = summary["reference_lang"]
    out = {}
    means = []
    for lang in summary["langs"]:
        if lang == ref:
            continue
        values = [v for v in summary["disparity_pct"][lang].values() if v is not None]
        if values:
            out[f"disparity_pct_{lang}"] = sum(values) / len(values)
            means.append(out[f"disparity_pct_{lang}"])
    if means:
        out["mean_disparity_pct"] = sum(means) / len(means)
    for band, info in (summary.get("band_summary") or {}).items():
        value = info.get("mean_disparity_pct") if isinstance(info, dict) else None
        if value is not None:
            out[f"band_{band}_mean_disparity_pct"] = value
    # Per band and language (`band_<band>_disparity_pct_<lang>`, the mean over the band's layers the SAE fits): what a
    # W&B runs table or parallel-coordinates panel compares across runs.
    unfit = {int(layer) for layer in summary.get("unfit_layers") or []}
    for band, layers in (summary.get("bands") or {}).items():
        for lang in summary["langs"]:
            if lang == ref:
                continue
            by_layer = {int(layer): v for layer, v in summary["disparity_pct"][lang].items()}
            values = [by_layer[int(layer)] for layer in layers
                      if int(layer) not in unfit and by_layer.get(int(layer)) is not None
                      and math.isfinite(by_layer[int(layer)])]
            if values:
                out[f"band_{band}_disparity_pct_{lang}"] = sum(values) / len(values)
    return out


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output, stage

    base_features = None
    if cfg.adapter and feature_settings(cfg.analysis)["enabled"]:
        from mlalign.tasks.train import target_langs

        target_langs(cfg, ctx.langs)  # the adapter view's languages: a wrong train.target_langs fails before any work
        # The adapter view compares with the base model's per-feature statistics on the same sentences.
        with stage("base model's feature statistics (what the adapter changed)"):
            base_features = base_feature_stats(cfg, ctx)
    with stage("analysing the base model" if not cfg.adapter else f"analysing base + adapter {cfg.adapter}"):
        summary = analyze_model(cfg, ctx, adapter=cfg.adapter, base_features=base_features)
    out_dir = ctx.run_dir / "analysis"
    # The closing block (mlalign.console) prints these once, at the end of the run, with the plots.
    if summary["langs"] == [summary["reference_lang"]]:
        headline(f"- reference only ({summary['reference_lang']}): per-layer values and curves, no disparity to report")
    headline(*(f"- {statement}" for statement in summary["statements"]))
    output("results", f"{out_dir / 'summary.json'}, {out_dir / 'metrics.csv'}")
    if summary.get("features"):
        output("features", f"{summary['features']['top']}, {summary['features']['csv']}")
    if summary.get("feature_changes"):
        output("feature changes", summary["feature_changes"]["md"])
    return scalar_results(summary)
