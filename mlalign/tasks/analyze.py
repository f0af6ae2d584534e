"""task=analyze: per-language, per-layer SAE activation statistics and their disparity against the reference language."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from mlalign.analysis.cache import StatsCache, adapter_fingerprint
from mlalign.analysis.engine import collect_stats
from mlalign.analysis.metrics import METRICS_CSV_COLUMNS, metrics_rows, summarize
from mlalign.data.corpus import load_corpus
from mlalign.io import write_json_atomic, write_text_atomic
from mlalign.models import model_source

log = logging.getLogger(__name__)

OBJECTIVE = "mean_disparity_pct"


def cache_identity(cfg, testbed_dir, adapter, split: str) -> dict:
    """Everything that changes a (language, layer) statistic; batch size, sae_chunk and padding do not."""
    data = cfg.data
    return {
        "model": model_source(cfg.model, testbed_dir),
        "revision": cfg.model.get("revision"),
        "dtype": cfg.model.dtype,
        "adapter": adapter_fingerprint(adapter),
        "sae": {k: cfg.sae.get(k) for k in ("release", "id_template", "path_template", "dtype")},
        "corpus": {"source": data.source, "path": data.path, "split": split,
                   "max_sentences": data.get("max_sentences"), "max_length": data.max_length},
    }


def analyze_model(cfg, ctx, adapter=None, model=None, tokenizer=None, out_dir: Path | None = None,
                  split: str | None = None) -> dict:
    """Statistics for every (language, layer), from the cache where possible; writes summary.json, metrics.csv and
    plots to `out_dir` (default `<run dir>/analysis`) and returns the summary dict. Reused by task=pipeline."""
    out_dir = Path(out_dir or ctx.run_dir / "analysis")
    split = split or cfg.data.splits.analysis
    acfg = cfg.analysis
    layers = ctx.layers()
    langs = ctx.langs
    corpus = load_corpus(cfg.data, langs, split)
    from mlalign.saes import check_sae_config

    check_sae_config(cfg.sae, layers)
    cache = StatsCache(Path(cfg.paths.cache_dir) / "analysis", cache_identity(cfg, ctx.testbed_dir, adapter, split),
                       enabled=bool(acfg.cache))
    stats = {lang: {} for lang in langs}
    missing: dict[str, list[int]] = {}
    for lang in langs:
        for layer in layers:
            hit = cache.load(lang, layer)
            if hit is None:
                missing.setdefault(lang, []).append(layer)
            else:
                stats[lang][layer] = hit
    if missing:
        todo_layers = sorted({layer for ls in missing.values() for layer in ls})
        n_cached = sum(len(v) for v in stats.values())
        print(f"analyzing {len(missing)} language(s) x {len(todo_layers)} layer(s)"
              + (f" ({n_cached} (language, layer) results from the cache)" if n_cached else ""))
        if model is None:
            model = ctx.load_model(adapter=adapter)
            tokenizer = ctx.load_tokenizer()
        from mlalign.models import hidden_size, num_layers

        ctx.layers(num_layers(model))  # the config's layer count must match the weights
        device = next(model.parameters()).device
        sae_device = "cpu" if acfg.sae_chunk else device
        saes = ctx.load_saes(todo_layers, hidden_size(model), sae_device)
        computed = collect_stats(model, tokenizer, saes, {lang: corpus[lang] for lang in missing},
                                 batch_size=int(acfg.batch_size), max_length=int(cfg.data.max_length),
                                 sae_chunk=acfg.sae_chunk, progress=True)
        for lang, by_layer in computed.items():
            for layer, sums in by_layer.items():
                cache.save(lang, layer, sums)
                if layer in layers:
                    stats[lang][layer] = sums
        del saes
    else:
        print(f"all {len(langs)} x {len(layers)} (language, layer) results come from the cache")

    summary = summarize(stats, cfg.reference_lang, metric=acfg.metric, aggregate=acfg.aggregate,
                        ids_by_lang={lang: corpus.ids[lang] for lang in langs}, bootstrap=int(acfg.bootstrap),
                        ci=float(acfg.ci), seed=int(cfg.seed), bands=acfg.bands, model=cfg.model.name,
                        sae=cfg.sae.name)
    summary["adapter"] = str(adapter) if adapter else None
    summary["corpus"] = {"source": cfg.data.source, "split": split}
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
    return out


def run(cfg, ctx) -> dict[str, float]:
    summary = analyze_model(cfg, ctx, adapter=cfg.adapter)
    out_dir = ctx.run_dir / "analysis"
    print()
    for statement in summary["statements"]:
        print(f"- {statement}")
    print(f"\nresults: {out_dir / 'summary.json'}, {out_dir / 'metrics.csv'}")
    for path in summary.get("plots", {}).values():
        print(f"plot: {path}")
    return scalar_results(summary)
