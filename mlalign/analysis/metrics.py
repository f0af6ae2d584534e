"""Metrics, disparities against the reference language, bootstrap CIs, layer bands and the study's headline numbers.

Everything here works on the CPU-side `SentenceSums` that `engine.collect_stats` returns; see docs/method.md.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from mlalign.analysis.stats import SentenceSums
from mlalign.errors import UserError
from mlalign.languages import LANGUAGES

log = logging.getLogger(__name__)

METRICS = ("mean_act", "l1", "l0", "feature_coverage", "fvu", "resid_norm", "fvu_raw")
PER_TOKEN_METRICS = ("mean_act", "l1", "l0", "resid_norm")
"""Metrics that are means over tokens and so follow `aggregate`; fvu and feature_coverage are always pooled over
all of a language's tokens (a per-sentence FVU of a 5-token sentence is not meaningful)."""
AGGREGATES = ("token", "sentence")
TIER_ORDER = ("reference", "high", "medium_low")
TIER_WORDS = {"high": "High-resource languages", "medium_low": "Medium-to-low resource languages"}
METRIC_WORDS = {
    "mean_act": "SAE activations",
    "l1": "L1 SAE activation",
    "l0": "active SAE features per token",
    "feature_coverage": "SAE feature coverage",
    "fvu": "fraction of variance unexplained",
    "resid_norm": "residual-stream norm",
    "fvu_raw": "fraction of residual energy unexplained",
}
LOWER_IS_BETTER = ("fvu", "fvu_raw")
"""Metrics where a larger value means a worse SAE fit, not "more activation"."""
FVU_ARTEFACT_RATIO = 1.25
"""A language's raw FVU (`fvu_raw`, same denominator form for every language) this many times the reference's marks
the SAE as fitting it markedly worse."""
MAX_FVU = 1.0
"""Default `analysis.max_fvu`: a layer where the reference language's FVU reaches this is flagged as unfit (the SAE
reconstructs worse than predicting the mean residual), and none of its numbers is read as a finding."""
MAX_TRUNCATED_PCT = 5.0
"""Default `analysis.max_truncated_pct`: a language with more of its sentences cut at max_length gets a warning."""
MODEL_LEVEL_FRACTION = 0.5
"""A residual-norm gap at least this fraction of the metric's gap (same sign) marks the gap as model-level."""


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; use analysis.metric=one of {', '.join(METRICS)}")
    return metric


def check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise UserError(f"unknown aggregate {aggregate!r}; use analysis.aggregate=token or analysis.aggregate=sentence")
    return aggregate


def metric_value(sums: SentenceSums, metric: str, aggregate: str = "token") -> float:
    """One metric of one (language, layer) from its sums."""
    check_metric(metric)
    check_aggregate(aggregate)
    if metric == "feature_coverage":
        return float(sums.features_fired.mean())
    if metric == "fvu":
        return _ratio(sums.sq_err.sum(), sums.total_sq_dev_from_mean())
    if metric == "fvu_raw":
        return _ratio(sums.sq_err.sum(), sums.sq_norm.sum())
    per_sentence = getattr(sums, metric)
    if aggregate == "token":
        return _ratio(per_sentence.sum(), sums.n_tokens.sum())
    valid = sums.n_tokens > 0
    if not valid.any():
        return float("nan")
    return float(np.mean(per_sentence[valid] / sums.n_tokens[valid]))


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def compute_metrics(stats: dict[str, dict[int, SentenceSums]], aggregate: str = "token") -> dict[str, dict[int, dict[str, float]]]:
    """values[lang][layer][metric] for every metric in `METRICS`."""
    return {
        lang: {layer: {m: metric_value(sums, m, aggregate) for m in METRICS} for layer, sums in by_layer.items()}
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


def _resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n] how often each sentence is drawn in each resample (n draws with replacement)."""
    draws = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.repeat(np.arange(n_resamples), n), draws.ravel()), 1.0)
    return counts


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
    """layer -> metric -> [n_resamples] values of every bootstrappable metric under the resample weights `counts`.

    All layers' per-sentence columns go through one matrix product (counts [B, S] @ columns [S, layers * k]).
    """
    layers = list(by_layer)
    columns = []
    for layer in layers:
        sums = by_layer[layer]
        n = sums.n_tokens
        valid = n > 0
        columns.append(n)
        columns.append(valid.astype(float))
        for metric in PER_TOKEN_METRICS:
            columns.append(getattr(sums, metric))
        for metric in PER_TOKEN_METRICS:
            columns.append(np.where(valid, getattr(sums, metric) / np.where(valid, n, 1), 0.0))
        columns.append(sums.sq_err)
        columns.append(sums.sq_norm)
    k = 2 + 2 * len(PER_TOKEN_METRICS) + 2
    weighted = (counts @ np.stack(columns, axis=1)).reshape(counts.shape[0], len(layers), k)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for j, layer in enumerate(layers):
            sums = by_layer[layer]
            w = weighted[:, j, :]
            w_tokens, w_valid = w[:, 0], w[:, 1]
            token_sums = w[:, 2 : 2 + len(PER_TOKEN_METRICS)]
            mean_sums = w[:, 2 + len(PER_TOKEN_METRICS) : 2 + 2 * len(PER_TOKEN_METRICS)]
            values = {}
            for i, metric in enumerate(PER_TOKEN_METRICS):
                values[metric] = token_sums[:, i] / w_tokens if aggregate == "token" else mean_sums[:, i] / w_valid
            # Each resample's FVU is centred on that resample's own mean, exactly (per-sentence residual sums).
            values["fvu"] = w[:, -2] / sums.sq_dev_from_mean(counts)
            values["fvu_raw"] = w[:, -2] / w[:, -1]
            out[layer] = values
    return out


def percentile_interval(samples: np.ndarray, ci: float) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    low, high = np.percentile(samples, [50 * (1 - ci), 50 * (1 + ci)])
    return [float(low), float(high)]


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

    Returns {"values_ci": [lang][layer][metric] -> [low, high] (None for feature_coverage, which needs per-sentence
    feature sets), "disparity_ci": [lang][layer] -> [low, high] for `metric`}. Both are None when n_resamples == 0.

    Each resample draws a language's sentence indices with replacement. Where `ids_by_lang` shows a language holds
    exactly the reference's sentence ids (a parallel corpus), it reuses the reference's draw by id (paired
    bootstrap), so the disparity's CI reflects sentence difficulty once, not twice; otherwise the draw is
    independent. Seeded: the same inputs give the same intervals.
    """
    check_metric(metric)
    check_aggregate(aggregate)
    if n_resamples <= 0:
        return {"values_ci": None, "disparity_ci": None}
    if not 0 < ci < 1:
        raise UserError(f"analysis.ci must lie strictly between 0 and 1, got {ci}")
    ids_by_lang = ids_by_lang or {}
    for lang, lang_ids in ids_by_lang.items():
        if lang in stats and len(lang_ids) != next(iter(stats[lang].values())).n_sentences:
            raise ValueError(f"ids_by_lang[{lang!r}] has {len(lang_ids)} ids for {next(iter(stats[lang].values())).n_sentences} sentences")
    ref_n = next(iter(stats[reference_lang].values())).n_sentences
    ref_counts = _resample_counts(ref_n, n_resamples, np.random.default_rng([seed, 0]))

    samples: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for k, (lang, by_layer) in enumerate(stats.items()):
        n_sent = next(iter(by_layer.values())).n_sentences
        columns = None if lang == reference_lang else _paired_columns(ids_by_lang.get(lang), ids_by_lang.get(reference_lang))
        if lang == reference_lang:
            counts = ref_counts
        elif columns is not None:
            counts = ref_counts[:, columns]
        else:
            counts = _resample_counts(n_sent, n_resamples, np.random.default_rng([seed, k + 1]))
        samples[lang] = _resampled_metrics(by_layer, counts, aggregate)

    values_ci = {
        lang: {
            layer: {m: (None if m == "feature_coverage" else percentile_interval(s[m], ci)) for m in METRICS}
            for layer, s in by_layer.items()
        }
        for lang, by_layer in samples.items()
    }
    disparity_ci = {}
    for lang, by_layer in samples.items():
        disparity_ci[lang] = {}
        for layer, s in by_layer.items():
            if lang == reference_lang:
                disparity_ci[lang][layer] = [0.0, 0.0]
            elif metric == "feature_coverage":
                disparity_ci[lang][layer] = None
            else:
                ref = samples[reference_lang][layer][metric]
                with np.errstate(invalid="ignore", divide="ignore"):
                    disparity_ci[lang][layer] = percentile_interval(100.0 * (s[metric] - ref) / ref, ci)
    return {"values_ci": values_ci, "disparity_ci": disparity_ci}


# ---------------------------------------------------------------------------------------------------- layer bands


def layer_bands(layers: list[int], bands: dict | None = None) -> dict[str, list[int]]:
    """band -> the analysed layers in it.

    Default: early/middle/deep = thirds of the sorted analysed layers (the first bands get the remainder, so 26
    layers split 9/9/8 = [0-8], [9-17], [18-25]); bands left empty (fewer than 3 layers) are dropped.
    `bands` = {name: [first, last]} (inclusive, in model layer numbers) overrides this, in the given order.
    """
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        raise UserError("no layers to analyse; set layers=null (all) or e.g. layers=[0,5,10]")
    if bands is None:
        parts = np.array_split(np.array(layers), 3)
        return {name: [int(x) for x in part] for name, part in zip(("early", "middle", "deep"), parts) if len(part)}
    out = {}
    for name, bounds in dict(bands).items():
        try:
            first, last = (int(b) for b in bounds)
        except (TypeError, ValueError):
            raise UserError(f"band {name!r} must be [first_layer, last_layer], got {bounds!r}; e.g. analysis.bands={{early: [0, 8]}}") from None
        if first > last:
            raise UserError(f"band {name!r} has first layer {first} after last layer {last}; write it as [{last}, {first}]")
        members = [layer for layer in layers if first <= layer <= last]
        if not members:
            raise UserError(
                f"band {name!r} [{first}, {last}] holds none of the analysed layers {layers}; "
                f"adjust analysis.bands or set analysis.bands=null for thirds"
            )
        out[str(name)] = members
    return out


# ---------------------------------------------------------------------------------------------------- headlines


def tier_of(lang: str) -> str:
    return LANGUAGES[lang].tier if lang in LANGUAGES else "unknown"


def order_by_tier(langs: list[str]) -> list[str]:
    """Reference first, then high, then medium-to-low resource languages, keeping the given order inside a tier."""
    rank = {tier: i for i, tier in enumerate(TIER_ORDER)}
    return sorted(langs, key=lambda lang: rank.get(tier_of(lang), len(rank)))


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _gap_context(values, disp, reference_lang, lang, layer) -> dict:
    """What the residual stream and the SAE's fit do at a gap: to tell a model-level gap from an SAE artefact."""
    ref, own = values[reference_lang][layer], values[lang][layer]
    return {
        "lang": lang,
        "layer": int(layer),
        "disparity_pct": disp[lang][layer],
        "resid_norm_disparity_pct": disparity_pct(own["resid_norm"], ref["resid_norm"]),
        "fvu": own["fvu"],
        "fvu_reference": ref["fvu"],
        "fvu_raw": own.get("fvu_raw"),
        "fvu_raw_reference": ref.get("fvu_raw"),
    }


def _verdict(context: dict) -> str:
    gap, resid = context["disparity_pct"], context["resid_norm_disparity_pct"]
    # Raw FVU: every language's error over its own energy sum ||x||², not over variance around its own mean (which
    # gives each language a different denominator); the centred FVU is the fallback for older value tables.
    fvu, fvu_ref = context.get("fvu_raw"), context.get("fvu_raw_reference")
    if not (_finite(fvu) and _finite(fvu_ref)):
        fvu, fvu_ref = context["fvu"], context["fvu_reference"]
    if _finite(fvu) and _finite(fvu_ref) and fvu_ref > 0 and fvu > FVU_ARTEFACT_RATIO * fvu_ref:
        return "the SAE reconstructs this language markedly worse, so part of the gap may be an SAE artefact"
    if _finite(resid) and _finite(gap) and gap != 0 and resid * gap > 0 and abs(resid) >= MODEL_LEVEL_FRACTION * abs(gap):
        return "the raw residual stream differs in the same direction, so the gap is (at least partly) model-level"
    return "the SAE fits both languages comparably and the residual norm does not explain the gap"


def unfit_layers(values, reference_lang: str, max_fvu: float | None = MAX_FVU) -> list[int]:
    """Layers where the reference language's FVU is >= `max_fvu`: the SAE reconstructs this model's residual stream
    no better than its mean (an SAE for another model or layer, or uncalibrated), so no number there is a finding."""
    if max_fvu is None:
        return []
    return [layer for layer, v in values[reference_lang].items() if _finite(v.get("fvu")) and v["fvu"] >= max_fvu]


def band_summary(values, disp, reference_lang: str, bands: dict[str, list[int]], unfit=()) -> dict[str, dict]:
    """Per band: mean disparity over the non-reference languages (overall and per tier) and the most negative
    (lang, layer) with its residual-norm disparity and FVUs; layers in `unfit` are left out (listed as unfit_layers)."""
    others = [lang for lang in disp if lang != reference_lang]
    out = {}
    for band, layers in bands.items():
        entry: dict = {"layers": layers, "unfit_layers": [layer for layer in layers if layer in unfit]}
        cells = [(disp[lang][layer], lang, layer) for lang in others for layer in layers
                 if layer not in unfit and _finite(disp[lang][layer])]
        entry["mean_disparity_pct"] = float(np.mean([c[0] for c in cells])) if cells else None
        entry["mean_disparity_pct_by_tier"] = {}
        for tier in TIER_ORDER[1:]:
            tier_cells = [c[0] for c in cells if tier_of(c[1]) == tier]
            if tier_cells:
                entry["mean_disparity_pct_by_tier"][tier] = float(np.mean(tier_cells))
        entry["most_negative"] = _gap_context(values, disp, reference_lang, *min(cells)[1:]) if cells else None
        out[band] = entry
    return out


def headline_statements(values, disp, reference_lang: str, metric: str, bands: dict[str, list[int]], unfit=()) -> list[str]:
    """The study's sentences, per resource tier, reproduced from the numbers, e.g.

    "Medium-to-low resource languages (id, ca, mr, ml, hi) receive up to 27.1% lower SAE activations than English
    in early layers (hi, layer 3); a gap of 12.3% persists in deep layers (mean over layers 18-25). At hi, layer 3
    the residual norm differs by -2.0% and the FVU is 0.31 vs 0.30 for English: <verdict>."

    Layers in `unfit` (the SAE does not reconstruct the reference there, see `unfit_layers`) give no finding: they are
    left out of every number and named in a last statement instead.
    """
    ref_name = LANGUAGES[reference_lang].name if reference_lang in LANGUAGES else reference_lang
    what = METRIC_WORDS[metric]
    statements = []
    band_of = {layer: band for band, layers in bands.items() for layer in layers}
    band_names = list(bands)
    for tier in TIER_ORDER[1:]:
        langs = [lang for lang in disp if lang != reference_lang and tier_of(lang) == tier]
        cells = [(disp[lang][layer], lang, layer) for lang in langs for layer in disp[lang]
                 if layer in band_of and layer not in unfit and _finite(disp[lang][layer])]
        if not cells:
            continue
        gap, lang, layer = min(cells)
        where = band_of[layer]
        head = f"{TIER_WORDS[tier]} ({', '.join(langs)})"
        if gap >= 0:
            statements.append(f"{head} receive no lower {what} than {ref_name} in any analysed layer (smallest difference {gap:+.1f}%, {lang}, layer {layer}).")
            continue
        parts = [f"{head} receive up to {-gap:.1f}% lower {what} than {ref_name} in {where} layers ({lang}, layer {layer})"]
        for band in band_names:
            if band == where:
                continue
            band_cells = [c[0] for c in cells if band_of[c[2]] == band]
            if not band_cells:
                continue
            mean = float(np.mean(band_cells))
            span = f"layer {bands[band][0]}" if len(bands[band]) == 1 else f"mean over layers {bands[band][0]}-{bands[band][-1]}"
            if mean < 0:
                verb = "persists" if band_names.index(band) > band_names.index(where) else "is already present"
                parts.append(f"a gap of {-mean:.1f}% {verb} in {band} layers ({span})")
            else:
                parts.append(f"no gap remains on average in {band} layers ({mean:+.1f}%, {span})")
        context = _gap_context(values, disp, reference_lang, lang, layer)
        check = (
            f"At {lang}, layer {layer} the residual norm differs by {context['resid_norm_disparity_pct']:+.1f}% and the "
            f"FVU is {context['fvu']:.2f} vs {context['fvu_reference']:.2f} for {ref_name}{_raw_fvu_words(context)}: "
            f"{_verdict(context)}."
        )
        statements.append("; ".join(parts) + ". " + check)
    if unfit:
        statements.append(unfit_statement(values, reference_lang, sorted(unfit)))
    return statements


def _raw_fvu_words(context: dict) -> str:
    if not (_finite(context.get("fvu_raw")) and _finite(context.get("fvu_raw_reference"))):
        return ""
    return f" (raw FVU ||x-x̂||²/||x||² {context['fvu_raw']:.3f} vs {context['fvu_raw_reference']:.3f})"


def unfit_statement(values, reference_lang: str, layers: list[int]) -> str:
    ref_name = LANGUAGES[reference_lang].name if reference_lang in LANGUAGES else reference_lang
    worst = max(layers, key=lambda layer: values[reference_lang][layer]["fvu"])
    return (f"The SAE does not reconstruct this model's residual stream at layer{'s' if len(layers) > 1 else ''} "
            f"{', '.join(str(layer) for layer in layers)} ({ref_name} FVU up to {values[reference_lang][worst]['fvu']:.2f} "
            f"at layer {worst}, worse than predicting the mean): no number of these layers is a finding, and they are "
            f"left out of the statements above; use the SAE set trained on this model.")


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


# ---------------------------------------------------------------------------------------------------- outputs


def _json_float(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _clean(obj):
    """NaN/inf -> None and numpy scalars -> Python, so the summary is strict JSON."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, (int, np.integer)) else k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _json_float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def summarize(
    stats: dict[str, dict[int, SentenceSums]],
    reference_lang: str,
    metric: str = "mean_act",
    aggregate: str = "token",
    ids_by_lang: dict[str, list] | None = None,
    bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    bands: dict | None = None,
    model: str | None = None,
    sae: str | None = None,
    max_fvu: float | None = MAX_FVU,
    max_truncated_pct: float | None = MAX_TRUNCATED_PCT,
) -> dict:
    """The content of `analysis/summary.json` (strict JSON: NaN becomes null, layer keys are strings).

    Keys: model, sae, reference_lang, metric, aggregate, ci, bootstrap, layers (ints), langs (tier order),
    values[lang][layer][metric], values_ci[lang][layer][metric] = [low, high] | null, disparity_pct[lang][layer]
    (of `metric`), disparity_ci[lang][layer] = [low, high] | null, bands {band: [layers]}, band_summary,
    statements, n_tokens[lang], n_sentences[lang], corpus_stats[lang] {tokens_per_sentence, truncated_pct,
    mean_position}, max_fvu, unfit_layers (reference FVU >= max_fvu; left out of band_summary and statements),
    sae_fits[layer] (bool), warnings (also logged).
    """
    check_metric(metric)
    check_aggregate(aggregate)
    if reference_lang not in stats:
        raise UserError(f"reference language {reference_lang!r} was not analysed; add it to langs or set reference_lang")
    layer_sets = {lang: sorted(by_layer) for lang, by_layer in stats.items()}
    layers = layer_sets[reference_lang]
    if any(ls != layers for ls in layer_sets.values()):
        raise ValueError(f"languages were analysed at different layers: {layer_sets}")
    values = compute_metrics(stats, aggregate)
    disp = disparity(values, reference_lang, metric)
    boot = bootstrap_ci(stats, reference_lang, metric, aggregate, ids_by_lang, bootstrap, ci, seed)
    band_layers = layer_bands(layers, bands)
    langs = order_by_tier(list(stats))
    first = {lang: stats[lang][layers[0]] for lang in langs}
    unfit = unfit_layers(values, reference_lang, max_fvu)
    corpus = corpus_stats(stats)
    warnings = []
    if unfit:
        warnings.append(unfit_statement(values, reference_lang, unfit))
    for lang in langs:
        pct = corpus[lang]["truncated_pct"]
        if max_truncated_pct is not None and _finite(pct) and pct > max_truncated_pct:
            warnings.append(f"{pct:.1f}% of {lang}'s sentences are cut at max_length (threshold {max_truncated_pct}%): "
                            f"its numbers cover shorter, earlier-position text than other languages; raise data.max_length "
                            f"or compare position-matched with analysis.max_position")
    for warning in warnings:
        log.warning(warning)
    return _clean(
        {
            "model": model,
            "sae": sae,
            "reference_lang": reference_lang,
            "metric": metric,
            "aggregate": aggregate,
            "ci": ci,
            "bootstrap": int(bootstrap),
            "layers": [int(layer) for layer in layers],
            "langs": langs,
            "values": {lang: values[lang] for lang in langs},
            "values_ci": {lang: boot["values_ci"][lang] for lang in langs} if boot["values_ci"] else None,
            "disparity_pct": {lang: disp[lang] for lang in langs},
            "disparity_ci": {lang: boot["disparity_ci"][lang] for lang in langs} if boot["disparity_ci"] else None,
            "bands": band_layers,
            "band_summary": band_summary(values, disp, reference_lang, band_layers, unfit),
            "statements": headline_statements(values, disp, reference_lang, metric, band_layers, unfit),
            "n_tokens": {lang: first[lang].total_tokens for lang in langs},
            "n_sentences": {lang: first[lang].n_sentences for lang in langs},
            "corpus_stats": {lang: corpus[lang] for lang in langs},
            "max_fvu": max_fvu,
            "unfit_layers": [int(layer) for layer in unfit],
            "sae_fits": {layer: layer not in unfit for layer in layers},
            "warnings": warnings,
        }
    )


METRICS_CSV_COLUMNS = ("lang", "layer", "metric", "value", "ci_low", "ci_high", "n_tokens", "n_sentences")


def metrics_rows(summary: dict) -> list[dict]:
    """Long-format rows for `analysis/metrics.csv` (`METRICS_CSV_COLUMNS`): every metric of every (lang, layer),
    then `disparity_pct` of the primary metric. Missing CIs are None (empty cells)."""
    rows = []
    values_ci = summary.get("values_ci") or {}
    disparity_ci = summary.get("disparity_ci") or {}
    for lang in summary["langs"]:
        counts = {"n_tokens": summary["n_tokens"][lang], "n_sentences": summary["n_sentences"][lang]}
        for layer in summary["layers"]:
            key = str(layer)
            for metric, value in summary["values"][lang][key].items():
                low_high = (values_ci.get(lang, {}).get(key, {}) or {}).get(metric) or [None, None]
                rows.append({"lang": lang, "layer": layer, "metric": metric, "value": value,
                             "ci_low": low_high[0], "ci_high": low_high[1], **counts})
            low_high = disparity_ci.get(lang, {}).get(key) or [None, None]
            rows.append({"lang": lang, "layer": layer, "metric": "disparity_pct",
                         "value": summary["disparity_pct"][lang][key], "ci_low": low_high[0], "ci_high": low_high[1], **counts})
    return rows
