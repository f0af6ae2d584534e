"""task=analyze: per-language, per-layer SAE activation statistics and their disparity against the reference language."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from mlalign.analysis.cache import StatsCache, adapter_fingerprint, model_fingerprint, sae_fingerprints
from mlalign.analysis.engine import collect_stats
from mlalign.analysis.metrics import METRICS_CSV_COLUMNS, metrics_rows, summarize
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
    cache = StatsCache(Path(cfg.paths.cache_dir) / "analysis",
                       cache_identity(cfg, ctx.testbed_dir, adapter, split, layers), enabled=bool(acfg.cache))
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
        from mlalign.models import hidden_size, num_layers, resolve_device

        # SAEs first: a missing or mismatched SAE fails before a multi-GB model download, not after it.
        # Where they live: sae.device if set (e.g. cpu to spare accelerator memory), else the CPU while waiting for
        # their chunk (sae_chunk), else the model's device.
        compute_device = resolve_device(cfg.sae.get("device")) if cfg.sae.get("device") else None
        model_device = next(model.parameters()).device if model is not None else resolve_device(cfg.model.device)
        home = compute_device or ("cpu" if acfg.sae_chunk else model_device)
        saes = ctx.load_saes(todo_layers, int(cfg.model.hidden_size) if model is None else hidden_size(model), home)
        if model is None:
            model = ctx.load_model(adapter=adapter)
            tokenizer = ctx.load_tokenizer()
            # A first download fixed the snapshot the key names: store under the key later runs will compute.
            cache.identity = cache_identity(cfg, ctx.testbed_dir, adapter, split, layers)
        ctx.layers(num_layers(model))  # the config's layer count must match the weights
        computed = collect_stats(model, tokenizer, saes, {lang: corpus[lang] for lang in missing},
                                 batch_size=int(acfg.batch_size), max_length=int(cfg.data.max_length),
                                 sae_chunk=acfg.sae_chunk, progress=True,
                                 min_position=int(acfg.get("min_position") or 0),
                                 max_position=acfg.get("max_position"), sae_device=compute_device)
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
                        sae=cfg.sae.name, max_fvu=acfg.get("max_fvu", 1.0),
                        max_truncated_pct=acfg.get("max_truncated_pct", 5.0))
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
    if summary["langs"] == [summary["reference_lang"]]:
        print(f"- reference only ({summary['reference_lang']}): per-layer values and curves, no disparity to report")
    for statement in summary["statements"]:
        print(f"- {statement}")
    print(f"\nresults: {out_dir / 'summary.json'}, {out_dir / 'metrics.csv'}")
    for path in summary.get("plots", {}).values():
        print(f"plot: {path}")
    return scalar_results(summary)
