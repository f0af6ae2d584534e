"""task=analyze: per-language, per-layer SAE activation statistics and their disparity against the reference language."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from mlalign.analysis.sources import (Loaded, base_feature_stats, cached_stats, feature_sentence_sums,
                                      feature_settings, norm_matched_stats)
from mlalign.analysis.summary import METRICS_CSV_COLUMNS, metrics_rows, summarize, summary_markdown
from mlalign.config import AnalysisConfig, FeaturesConfig, typed
from mlalign.data.corpus import load_corpus
from mlalign.io import write_json_atomic, write_text_atomic
from mlalign.languages import target_langs

log = logging.getLogger(__name__)

OBJECTIVE = "mean_disparity_pct"


def analyze_features_step(cfg, ctx, summary: dict, stats, feature_stats, corpus, cache, engine, out_dir: Path,
                          fcfg: FeaturesConfig):
    """features.csv, feature_overlap.json, features_summary.json, features_top.md and the two plots (docs/method.md
    §8); adds `summary["features"]`; returns the plots by name and the feature report."""
    from mlalign.analysis import features as feat
    from mlalign.analysis.features_outputs import (FEATURES_CSV_COLUMNS, feature_rows, features_markdown,
                                                   features_summary, neuronpedia_ids, overlap_json, plot_features)

    acfg = cfg.analysis
    langs = summary["langs"]
    report = feat.analyze_features(feature_stats, cfg.reference_lang, langs, top_k=fcfg.top_k,
                                   min_sentences=fcfg.min_sentences, specific_threshold=fcfg.specific_threshold)
    report.neuronpedia = neuronpedia_ids(cfg.sae, report.layers)
    n_resamples = int(acfg.bootstrap)
    if fcfg.intervals and n_resamples > 0 and len(langs) > 1:
        sentence_sums = feature_sentence_sums(report.needed_features(), corpus, cache, engine)
        n_tokens = {lang: {layer: stats[lang][layer].n_tokens for layer in report.layers} for lang in langs}
        feat.add_intervals(report, sentence_sums, n_tokens, {lang: corpus.ids[lang] for lang in langs},
                           n_resamples=n_resamples, ci=float(acfg.ci), seed=int(cfg.seed))
    bands = {band: [int(layer) for layer in ls] for band, ls in summary["bands"].items()}
    title = f"{cfg.model.name}, {cfg.sae.name}"
    rows = feature_rows(report, fcfg.csv_rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FEATURES_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    files = {"csv": write_text_atomic(out_dir / "features.csv", buffer.getvalue()),
             "overlap": write_json_atomic(out_dir / "feature_overlap.json", overlap_json(report)),
             "summary": write_json_atomic(out_dir / "features_summary.json", features_summary(report, bands)),
             "top": write_text_atomic(out_dir / "features_top.md",
                                      features_markdown(report, bands, title, float(acfg.ci)))}
    images = {}
    if acfg.plots:
        images = {Path(path).stem: Path(path) for path in plot_features(report, bands, out_dir, title)}
    summary["features"] = {name: str(path) for name, path in files.items()}
    ctx.tracker.log_table("analysis/features_listed", [row for row in rows if row["listed"]])
    return images, report


def causal_step(cfg, ctx, acfg: AnalysisConfig, summary: dict, report, engine, out_dir: Path) -> dict[str, Path]:
    """Are the language-specific features causal? (docs/method.md §8c): ablation, steering and dashboards, each where
    `analysis.features.<step>.enabled`; a step whose inputs match the record of an earlier run into `out_dir`
    (`causal.RECORD`: a resumed task=pipeline) keeps that run's files. Adds `summary["causal"]`; returns the plots by
    name."""
    from omegaconf import OmegaConf

    from mlalign.analysis.causal import (STEPS, Causal, ablation_step, dashboard_step, kept_result, record_result,
                                         step_inputs, steering_step, wanted_layers)
    from mlalign.analysis.features_outputs import neuronpedia_ids
    from mlalign.console import headline, note, stage

    fcfg = acfg.features
    ref, title = cfg.reference_lang, f"{cfg.model.name}, {cfg.sae.name}"
    steps = {"ablate": ("ablation", "ablating each language's specific features (and matched random ones)",
                        ablation_step),
             "steer": ("steering", "steering English generation with each language's feature direction",
                       lambda c: steering_step(c, ref)),
             "dashboard": ("dashboard", "feature dashboards",
                           lambda c: dashboard_step(c, neuronpedia_ids(cfg.sae, report.layers)))}
    context = {"title": title, "seed": int(cfg.seed), "reference_lang": ref, "langs": report.langs,
               "layers": report.layers, "data": OmegaConf.to_container(cfg.data, resolve=True),
               "languages": OmegaConf.to_container(cfg.languages, resolve=True) if cfg.get("languages") else None}
    # Before anything loads: the identity the statistics were read or stored under.
    inputs = {name: step_inputs(name, acfg, engine.cache.identity, context)
              for name in STEPS if getattr(fcfg, name).enabled}
    c = None
    out: dict = {}
    for name, fingerprint in inputs.items():
        result_key, what, run_step = steps[name]
        kept = kept_result(out_dir, name, fingerprint) if acfg.cache else None
        if kept is not None:
            note(f"{what}: kept from an earlier run into {out_dir} with the same inputs")
            out[result_key] = kept
            continue
        if c is None:
            model, tokenizer, saes = engine.loaded(wanted_layers(acfg, report.layers))
            c = Causal(report=report, acfg=acfg, data_cfg=cfg.data, model=model, tokenizer=tokenizer, saes=saes,
                       device=next(model.parameters()).device, seed=int(cfg.seed), out_dir=out_dir, title=title,
                       split=summary["corpus"]["split"])
        with stage(what):
            out[result_key] = run_step(c)
        record_result(out_dir, name, fingerprint, out[result_key])
    if "ablation" in out:
        # task=pipeline prints both models' verdicts: say whose the adapted model's are
        who = "base + adapter: " if summary.get("adapter") else ""
        headline(*(f"- {who}{statement}" for statement in out["ablation"]["statements"]))
    summary["causal"] = out
    return {Path(path).stem: Path(path) for step in out.values() for path in step["files"].values()
            if path.endswith(".png")}


def write_feature_changes(cfg, ctx, summary: dict, base: dict, adapted: dict, out_dir: Path) -> dict:
    """The adapter view (docs/method.md §8): feature_changes.json/.md in `out_dir`, which features the adapter raised or
    lowered in the target languages and the reference. Returns the key numbers per language and band (for
    summary.json and report.md). Shared by `task=analyze adapter=...` and `task=pipeline`."""
    from mlalign.analysis.features import adapter_changes, adapter_changes_by_band
    from mlalign.analysis.features_outputs import adapter_changes_markdown, neuronpedia_ids

    fcfg = feature_settings(cfg.analysis)
    langs = [lang for lang in dict.fromkeys([*target_langs(cfg, ctx.langs), cfg.reference_lang]) if lang in base]
    changes = adapter_changes(base, adapted, langs, cfg.reference_lang, top_k=fcfg.top_k,
                              min_sentences=fcfg.min_sentences, specific_threshold=fcfg.specific_threshold)
    json_path = write_json_atomic(out_dir / "feature_changes.json",
                                  {lang: {str(k): v for k, v in by.items()} for lang, by in changes.items()})
    layers = sorted(next(iter(base.values())))
    bands = {band: [int(layer) for layer in ls] for band, ls in summary["bands"].items()}
    md_path = write_text_atomic(out_dir / "feature_changes.md", adapter_changes_markdown(
        changes, bands, fcfg.top_k, neuronpedia_ids(cfg.sae, layers)))
    ctx.tracker.log_table("analysis/feature_changes", [
        {"lang": lang, "layer": layer, "kind": kind, **item}
        for lang, by_layer in changes.items() for layer, cell in by_layer.items() for kind in ("up", "down")
        for item in cell[kind]])
    return {"md": str(md_path), "json": str(json_path), "top_k": fcfg.top_k,
            "by_band": adapter_changes_by_band(changes, bands)}


def analyze_model(cfg, ctx, adapter=None, out_dir: Path | None = None, split: str | None = None, feature_stats_out: dict | None = None, base_features: dict | None = None,
                  recording=None, computed_before=None, loaded: Loaded | None = None) -> dict:
    """Statistics for every (language, layer), from the cache where possible; writes summary.json, metrics.csv and
    plots to `out_dir` (default `<run dir>/analysis`) and returns the summary dict. Reused by task=pipeline.
    With an adapter and `base_features` (the base model's per-feature totals on the same split), also the adapter
    view: feature_changes.json/.md and `summary["feature_changes"]`. recording, computed_before: see `cached_stats`.
    loaded: the model (+ adapter) and tokenizer a caller holds (`sources.Loaded`, no SAEs); one this call loads is
    kept there for the caller's next call (the SAE seeds: one model load for all of them)."""
    out_dir = Path(out_dir or ctx.run_dir / "analysis")
    split = split or cfg.data.splits.analysis
    acfg = typed(cfg.analysis, AnalysisConfig)
    layers = ctx.layers()
    langs = ctx.langs
    corpus = load_corpus(cfg.data, langs, split)
    from mlalign.saes import check_sae_config

    check_sae_config(cfg.sae, layers)
    fcfg = acfg.features
    causal = fcfg.ablate.enabled or fcfg.steer.enabled or fcfg.dashboard.enabled
    if causal:  # a wrong layer, split or k fails before any work
        from mlalign.analysis.causal import check_settings

        check_settings(acfg, layers)
    stats, feature_stats, cache, engine = cached_stats(cfg, ctx, adapter, corpus, split, loaded, recording=recording,
                                                       computed_before=computed_before)

    matched = norm_matched_stats(stats, corpus, cache, engine, cfg.reference_lang, layers) if acfg.norm_matched else None
    summary = summarize(stats, cfg.reference_lang, acfg, ids_by_lang={lang: corpus.ids[lang] for lang in langs},
                        seed=int(cfg.seed), model=cfg.model.name, sae=cfg.sae.name,
                        n_model_layers=cfg.model.num_layers,
                        feature_stats=feature_stats if fcfg.enabled else None, norm_matched=matched)
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
    if fcfg.enabled:
        feature_images, report = analyze_features_step(cfg, ctx, summary, stats, feature_stats, corpus, cache, engine,
                                                       out_dir, fcfg)
        images.update(feature_images)
        if causal:
            images.update(causal_step(cfg, ctx, acfg, summary, report, engine, out_dir))
    engine.release()
    if loaded is not None and engine.model is not None:
        loaded.model, loaded.tokenizer = engine.model, engine.tokenizer
    if adapter and base_features and fcfg.enabled:
        summary["feature_changes"] = write_feature_changes(cfg, ctx, summary, base_features, feature_stats, out_dir)
    if feature_stats_out is not None and fcfg.enabled:
        feature_stats_out.update(feature_stats)
    summary["plots"] = {name: str(path) for name, path in images.items()}
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary))
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
            unfit_here = unfit | {int(layer) for layer in (summary.get("unfit_cells") or {}).get(lang, [])}
            values = [by_layer[int(layer)] for layer in layers
                      if int(layer) not in unfit_here and by_layer.get(int(layer)) is not None
                      and math.isfinite(by_layer[int(layer)])]
            if values:
                out[f"band_{band}_disparity_pct_{lang}"] = sum(values) / len(values)
    return out


def analyze_run(cfg, ctx, out_dir: Path | None = None, loaded: Loaded | None = None) -> dict:
    """The run's model (+ `cfg.adapter`) analysed into `out_dir` (default `<run dir>/analysis`); with an adapter and
    the feature lists, the base model's feature statistics first (the adapter view compares with them)."""
    from mlalign.console import stage

    base_features = None
    if cfg.adapter and feature_settings(cfg.analysis).enabled:
        target_langs(cfg, ctx.langs)  # the adapter view's languages: a wrong train.target_langs fails before any work
        with stage("base model's feature statistics (what the adapter changed)"):
            base_features = base_feature_stats(cfg, ctx)
    with stage("analysing the base model" if not cfg.adapter else f"analysing base + adapter {cfg.adapter}"):
        return analyze_model(cfg, ctx, adapter=cfg.adapter, out_dir=out_dir, base_features=base_features,
                             loaded=loaded)


def seed_config(cfg, folder: Path):
    """The run's config with `sae.path_template` at one SAE seed's folder and no `sae.seeds`: what a single-seed run on
    that folder composes (so its numbers and cache entries are that run's)."""
    import copy

    from omegaconf import open_dict

    seeded = copy.deepcopy(cfg)
    with open_dict(seeded):
        seeded.sae.path_template = str(folder)
        seeded.sae.seeds = None
    return seeded


def analyze_sae_seeds(cfg, ctx, folders: dict[int, Path]) -> dict[str, float]:
    """sae.seeds (docs/method.md §9): the whole analysis once per SAE seed into `analysis/sae_seed_<s>/`, each what a
    single-seed run on `<dir>/seed_<s>` writes (its own cache entries: the folder is part of their key), the model
    loaded once for all; then their spread: `analysis/sae_seeds.json`, `.md` and `sae_seeds_heatmap.png`. Returns
    each seed's scalars averaged over seeds, and the sign-stable count."""
    import statistics

    from mlalign.analysis.sae_seeds import write_seed_spread
    from mlalign.console import headline, output, stage

    out_dir = ctx.run_dir / "analysis"
    loaded = Loaded()
    summaries, analyses = {}, {}
    # One forward pass per seed (all layers each), not one shared by every seed's SAEs: the engine keys SAEs, stacks,
    # recorders, the listed-feature pass and the cache by layer, and a (seed, layer) key through all of them would buy
    # back only the forwards, while this way each seed's outputs are a single-seed run's by construction.
    for seed, folder in folders.items():
        analyses[seed] = out_dir / f"sae_seed_{seed}"
        with stage(f"SAE seed {seed} ({folder})"):
            summaries[seed] = analyze_run(seed_config(cfg, folder), ctx, analyses[seed], loaded)
    spread = write_seed_spread(summaries, {seed: path / "summary.json" for seed, path in analyses.items()}, out_dir,
                               plots=bool(cfg.analysis.plots))
    ctx.tracker.log_table("analysis/sae_seeds", [
        {"lang": lang, "layer": int(layer), **{k: cell[k] for k in ("mean_disparity_pct", "seed_sd", "sign_stable",
                                                                     "ci_sign_stable", "fit")}}
        for lang, by_layer in spread["cells"].items() for layer, cell in by_layer.items()])
    if "heatmap" in spread["files"]:
        ctx.tracker.log_images({"analysis/sae_seeds_heatmap": Path(spread["files"]["heatmap"])})
    headline(*(f"- {statement}" for statement in spread["statements"]))
    output("SAE seeds", f"{spread['files']['md']}, {spread['files']['json']}")
    per_seed = [scalar_results(summary) for summary in summaries.values()]
    results = {key: statistics.mean(r[key] for r in per_seed) for key in per_seed[0] if all(key in r for r in per_seed)}
    return {**results, "sae_seeds_n_cells": spread["n_cells"], "sae_seeds_n_sign_stable": spread["n_sign_stable"]}


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output
    from mlalign.saes import check_sae_seeds

    folders = check_sae_seeds(cfg.sae, ctx.layers())  # every seed's folder and layer, before any work
    if folders:
        return analyze_sae_seeds(cfg, ctx, folders)
    summary = analyze_run(cfg, ctx)
    out_dir = ctx.run_dir / "analysis"
    # The closing block (mlalign.console) prints these once, at the end of the run, with the plots.
    if summary["langs"] == [summary["reference_lang"]]:
        headline(f"- reference only ({summary['reference_lang']}): per-layer values and curves, no disparity to report")
    headline(*(f"- {statement}" for statement in summary["statements"]))
    output("results", f"{out_dir / 'summary.json'}, {out_dir / 'summary.md'}, {out_dir / 'metrics.csv'}")
    if summary.get("features"):
        output("features", f"{summary['features']['top']}, {summary['features']['csv']}")
    if summary.get("feature_changes"):
        output("feature changes", summary["feature_changes"]["md"])
    return scalar_results(summary)
