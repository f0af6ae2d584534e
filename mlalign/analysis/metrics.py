"""The metric math: per-(language, layer) metrics from `SentenceSums`, disparities against the reference language,
paired bootstrap CIs over sentences, and the corpus confounds (tokens per sentence, truncation, position).

Everything here works on the CPU-side `SentenceSums` that `engine.collect_stats` returns; see docs/method.md. The
summary, headline statements and output rows built from these numbers live in `analysis/summary.py`.
"""

from __future__ import annotations

import math

import numpy as np

from mlalign.analysis.bootstrap import percentile_interval, resample_counts
from mlalign.analysis.registry import REGISTRY, check_aggregate, get_metric
from mlalign.analysis.stats import SentenceSums
from mlalign.errors import UserError


def check_metric(metric: str) -> str:
    return get_metric(metric).name


def metric_value(sums: SentenceSums, metric: str, aggregate: str = "token") -> float:
    """One metric of one (language, layer) from its sums (the registered record says how)."""
    spec = get_metric(metric)
    check_aggregate(aggregate)
    if spec.pooled is not None:
        return float(spec.pooled({name: sums.sum_of(name).sum() for name in spec.needs}, sums, None))
    per_sentence = sums.sum_of(spec.sum_name)
    if aggregate == "token":
        return _ratio(per_sentence.sum(), sums.n_tokens.sum())
    valid = sums.n_tokens > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(per_sentence[valid] / sums.n_tokens[valid]))


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def compute_metrics(stats: dict[str, dict[int, SentenceSums]], aggregate: str = "token") -> dict[str, dict[int, dict[str, float]]]:
    """values[lang][layer][metric] for every registered metric."""
    return {
        lang: {layer: {m: metric_value(sums, m, aggregate) for m in REGISTRY} for layer, sums in by_layer.items()}
        for lang, by_layer in stats.items()
    }


def disparity_pct(value: float, reference: float) -> float:
    """100 (M - M_ref) / M_ref; negative = less than the reference. NaN where the reference is 0 or NaN."""
    if not reference or math.isnan(reference):
        return float("nan")
    return 100.0 * (value - reference) / reference


def disparity(values: dict, reference_lang: str, metric: str) -> dict[str, dict[int, float]]:
    """disparity_pct[lang][layer] of `metric` against `reference_lang` (whose own disparity is exactly 0)."""
    check_metric(metric)
    if reference_lang not in values:
        raise UserError(f"reference language {reference_lang!r} was not analysed; add it to langs or set reference_lang")
    ref = values[reference_lang]
    out = {}
    for lang, by_layer in values.items():
        if lang == reference_lang:
            out[lang] = {layer: 0.0 for layer in by_layer}
        else:
            out[lang] = {layer: disparity_pct(v[metric], ref[layer][metric]) for layer, v in by_layer.items()}
    return out


# ---------------------------------------------------------------------------------------------------- bootstrap


def _paired_columns(ids_lang, ids_ref) -> np.ndarray | None:
    """For each sentence of lang, its position in the reference, if the two hold exactly the same unique ids."""
    if ids_lang is None or ids_ref is None:
        return None
    ids_lang, ids_ref = [str(i) for i in ids_lang], [str(i) for i in ids_ref]
    if len(set(ids_ref)) != len(ids_ref) or set(ids_lang) != set(ids_ref) or len(ids_lang) != len(ids_ref):
        return None
    where = {sid: pos for pos, sid in enumerate(ids_ref)}
    return np.array([where[sid] for sid in ids_lang])


def _resampled_metrics(by_layer: dict[int, SentenceSums], counts: np.ndarray, aggregate: str) -> dict[int, dict[str, np.ndarray]]:
    """layer -> metric -> [n_resamples] values of every bootstrappable registered metric under the resample weights
    `counts`.

    All layers' per-sentence columns go through one matrix product (counts [B, S] @ columns [S, layers * k]).
    """
    metrics = [m for m in REGISTRY.values() if m.bootstrappable]
    per_token = [m for m in metrics if m.is_per_token]
    pooled_needs = sorted({name for m in metrics for name in m.needs})
    layers = list(by_layer)
    columns = []
    for layer in layers:
        sums = by_layer[layer]
        n = sums.n_tokens
        valid = n > 0
        columns.append(n)
        columns.append(valid.astype(float))
        for metric in per_token:
            columns.append(sums.sum_of(metric.sum_name))
        for metric in per_token:
            columns.append(np.where(valid, sums.sum_of(metric.sum_name) / np.where(valid, n, 1), 0.0))
        for name in pooled_needs:
            columns.append(sums.sum_of(name))
    k = 2 + 2 * len(per_token) + len(pooled_needs)
    weighted = (counts @ np.stack(columns, axis=1)).reshape(counts.shape[0], len(layers), k)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for j, layer in enumerate(layers):
            w = weighted[:, j, :]
            w_tokens, w_valid = w[:, 0], w[:, 1]
            token_sums = w[:, 2 : 2 + len(per_token)]
            mean_sums = w[:, 2 + len(per_token) : 2 + 2 * len(per_token)]
            totals = {name: w[:, 2 + 2 * len(per_token) + i] for i, name in enumerate(pooled_needs)}
            values = {}
            for i, metric in enumerate(per_token):
                values[metric.name] = token_sums[:, i] / w_tokens if aggregate == "token" else mean_sums[:, i] / w_valid
            for metric in metrics:
                if metric.pooled is not None:
                    # Each resample's FVU is centred on that resample's own mean, exactly (per-sentence residual sums).
                    values[metric.name] = metric.pooled(totals, by_layer[layer], counts)
            out[layer] = values
    return out


def bootstrap_ci(
    stats: dict[str, dict[int, SentenceSums]],
    reference_lang: str,
    metric: str = "mean_act",
    aggregate: str = "token",
    ids_by_lang: dict[str, list] | None = None,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Percentile bootstrap over sentences.

    Returns {"values_ci": [lang][layer][metric] -> [low, high] (None for a metric the registry marks not
    bootstrappable: feature_coverage needs per-sentence feature sets), "disparity_ci": [lang][layer] -> [low, high] for
    `metric`, "disparity_samples": [lang][layer] -> [n_resamples] resampled disparities of the non-reference languages
    (for simultaneous intervals and p-values; not JSON)}. All None when n_resamples == 0.

    Each resample draws a language's sentence indices with replacement. Where `ids_by_lang` shows a language holds
    exactly the reference's sentence ids (a parallel corpus), it reuses the reference's draw by id (paired
    bootstrap), so the disparity's CI reflects sentence difficulty once, not twice; otherwise the draw is
    independent. Seeded: the same inputs give the same intervals.
    """
    check_metric(metric)
    check_aggregate(aggregate)
    if n_resamples <= 0:
        return {"values_ci": None, "disparity_ci": None, "disparity_samples": None}
    if not 0 < ci < 1:
        raise UserError(f"analysis.ci must lie strictly between 0 and 1, got {ci}")
    ids_by_lang = ids_by_lang or {}
    for lang, lang_ids in ids_by_lang.items():
        if lang in stats and len(lang_ids) != next(iter(stats[lang].values())).n_sentences:
            raise ValueError(f"ids_by_lang[{lang!r}] has {len(lang_ids)} ids for {next(iter(stats[lang].values())).n_sentences} sentences")
    ref_n = next(iter(stats[reference_lang].values())).n_sentences
    ref_counts = resample_counts(ref_n, n_resamples, np.random.default_rng([seed, 0]))

    samples: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for k, (lang, by_layer) in enumerate(stats.items()):
        n_sent = next(iter(by_layer.values())).n_sentences
        columns = None if lang == reference_lang else _paired_columns(ids_by_lang.get(lang), ids_by_lang.get(reference_lang))
        if lang == reference_lang:
            counts = ref_counts
        elif columns is not None:
            counts = ref_counts[:, columns]
        else:
            counts = resample_counts(n_sent, n_resamples, np.random.default_rng([seed, k + 1]))
        samples[lang] = _resampled_metrics(by_layer, counts, aggregate)

    values_ci = {
        lang: {
            layer: {m: (percentile_interval(s[m], ci) if m in s else None) for m in REGISTRY}
            for layer, s in by_layer.items()
        }
        for lang, by_layer in samples.items()
    }
    disparity_ci, disparity_samples = {}, {}
    for lang, by_layer in samples.items():
        disparity_ci[lang], disparity_samples[lang] = {}, {}
        for layer, s in by_layer.items():
            if lang == reference_lang:
                disparity_ci[lang][layer] = [0.0, 0.0]
            elif metric not in s:  # not bootstrappable
                disparity_ci[lang][layer] = None
            else:
                ref = samples[reference_lang][layer][metric]
                with np.errstate(invalid="ignore", divide="ignore"):
                    resampled = 100.0 * (s[metric] - ref) / ref
                disparity_samples[lang][layer] = resampled
                disparity_ci[lang][layer] = percentile_interval(resampled, ci)
    return {"values_ci": values_ci, "disparity_ci": disparity_ci, "disparity_samples": disparity_samples}


def corpus_stats(stats: dict[str, dict[int, SentenceSums]]) -> dict[str, dict[str, float]]:
    """Per language: analysed tokens per sentence, % of sentences cut at max_length, mean token position (0 = the
    row's first token). Position and truncation confound cross-language comparisons: a language tokenised into more
    pieces has more tokens at late positions and more sentences cut short."""
    out = {}
    for lang, by_layer in stats.items():
        sums = next(iter(by_layer.values()))
        n = sums.n_tokens.sum()
        out[lang] = {
            "tokens_per_sentence": float(sums.n_tokens.mean()) if sums.n_sentences else float("nan"),
            "truncated_pct": 100.0 * float(np.mean(sums.truncated)) if sums.n_sentences else float("nan"),
            "mean_position": float(sums.position.sum() / n) if n > 0 else float("nan"),
        }
    return out
