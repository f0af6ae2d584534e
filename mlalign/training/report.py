"""Before/after numbers on held-out text: SAE activation gain per language and layer, English retention, LM loss.

Activation levels come from the analysis engine (`collect_stats` + `compute_metrics`), so `task=train` and
`task=analyze` measure exactly the same quantity.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mlalign.analysis.engine import collect_stats, pad_batch
from mlalign.analysis.metrics import compute_metrics, layer_bands
from mlalign.training.data import tokenize
from mlalign.training.losses import lm_cross_entropy_sum


def activation_levels(model, tokenizer, saes: dict, texts_by_lang: dict[str, list[str]], metric: str, aggregate: str,
                      batch_size: int, max_length: int, sae_chunk=None, cache=None) -> dict[str, dict[int, float]]:
    """levels[lang][layer] of the analysis metric on `texts_by_lang`.

    `cache`: the analysis task's `StatsCache` for this model and split; (language, layer) results found there are
    reused and new ones stored, so a sweep of training runs (and task=pipeline) measures the base model once.
    """
    stats = {lang: {} for lang in texts_by_lang}
    missing = set()
    for lang in texts_by_lang:
        for layer in saes:
            hit = cache.load(lang, layer) if cache is not None else None
            if hit is None:
                missing.add(lang)
            else:
                stats[lang][layer] = hit
    if missing:
        todo = {lang: texts_by_lang[lang] for lang in texts_by_lang if lang in missing}
        computed = collect_stats(model, tokenizer, saes, todo, batch_size=batch_size, max_length=max_length,
                                 sae_chunk=sae_chunk, progress=False)
        for lang, by_layer in computed.items():
            for layer, sums in by_layer.items():
                stats[lang][layer] = sums
                if cache is not None:
                    cache.save(lang, layer, sums)
    values = compute_metrics(stats, aggregate)
    return {lang: {int(layer): float(v[metric]) for layer, v in by_layer.items()} for lang, by_layer in values.items()}


@torch.no_grad()
def lm_loss(model, tokenizer, texts_by_lang: dict[str, list[str]], batch_size: int, max_length: int) -> dict[str, float]:
    """Token-weighted next-token cross-entropy per language (nats)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for lang, texts in texts_by_lang.items():
            ids = tokenize(tokenizer, texts, max_length)
            total, count = 0.0, 0
            for start in range(0, len(ids), batch_size):
                inputs = pad_batch(ids[start:start + batch_size], pad_id, "right", device)
                logits = model(**inputs, use_cache=False).logits
                s, n = lm_cross_entropy_sum(logits, inputs["input_ids"], inputs["attention_mask"])
                total, count = total + s, count + n
            out[lang] = total / max(count, 1)
    finally:
        model.train(was_training)
    return out


def _gain_pct(after: float, before: float) -> float:
    if not before or not math.isfinite(before) or not math.isfinite(after):
        return float("nan")
    return 100.0 * (after / before - 1.0)


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def before_after_report(before: dict, after: dict, reference_lang: str, targets: list[str], layers: list[int],
                        bands: dict | None, loss_before: dict, loss_after: dict, metric: str) -> dict:
    """The train task's metrics.json: gains per language (per layer, per band, mean), English retention, LM losses."""
    band_layers = layer_bands(layers, bands)
    gains = {}
    for lang in targets:
        per_layer = {layer: _gain_pct(after[lang][layer], before[lang][layer]) for layer in layers}
        gains[lang] = {
            "mean": _mean(per_layer.values()),
            "bands": {name: _mean(per_layer[layer] for layer in members) for name, members in band_layers.items()},
            "per_layer": per_layer,
        }
    retention_per_layer = {
        layer: (100.0 * after[reference_lang][layer] / before[reference_lang][layer]
                if before[reference_lang][layer] else float("nan"))
        for layer in layers
    }
    return {
        "metric": metric,
        "reference_lang": reference_lang,
        "layers": layers,
        "bands": band_layers,
        "activation_gain_pct": {lang: g["mean"] for lang, g in gains.items()},
        "activation_gain_pct_mean": _mean(g["mean"] for g in gains.values()),
        "activation_gain_pct_by_band": {lang: g["bands"] for lang, g in gains.items()},
        "activation_gain_pct_per_layer": {lang: g["per_layer"] for lang, g in gains.items()},
        "english_retention_pct": _mean(retention_per_layer.values()),
        "english_retention_pct_per_layer": retention_per_layer,
        "activation_before": before,
        "activation_after": after,
        "lm_loss_before": loss_before,
        "lm_loss_after": loss_after,
        "lm_loss_change": {lang: loss_after[lang] - loss_before[lang] for lang in loss_before},
    }


def plot_before_after(report: dict, path: Path) -> Path:
    """Per-layer activation level before (dashed) and after (solid) training, one colour per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    before, after = report["activation_before"], report["activation_after"]
    langs = [report["reference_lang"], *report["activation_gain_pct"]]
    fig, (ax_level, ax_gain) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, lang in enumerate(langs):
        colour = f"C{i}"
        ax_level.plot(layers, [before[lang][layer] for layer in layers], "--", color=colour, alpha=0.7)
        ax_level.plot(layers, [after[lang][layer] for layer in layers], "-", color=colour, label=lang)
        if lang == report["reference_lang"]:
            change = [report["english_retention_pct_per_layer"][layer] - 100.0 for layer in layers]
        else:
            change = [report["activation_gain_pct_per_layer"][lang][layer] for layer in layers]
        ax_gain.plot(layers, change, "-o", color=colour, markersize=3, label=lang)
    ax_level.set(xlabel="layer", ylabel=report["metric"], title="held-out SAE activation: before (dashed) / after")
    ax_gain.axhline(0.0, color="grey", lw=0.8)
    ax_gain.set(xlabel="layer", ylabel="change after training (%)", title="activation gain per layer")
    ax_level.legend(fontsize=8)
    ax_gain.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
