"""What a reader gets from the metrics: layer bands, the per-band summary, the study's headline statements (worded by
the metric's direction, with their CIs), the artefact verdicts, and `analysis/summary.json` / metrics.csv rows.

The numbers themselves come from `analysis/metrics.py`; nothing here computes a metric.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from mlalign.analysis.bootstrap import bootstrap_p_value, holm, simultaneous_intervals
from mlalign.analysis.decomposition import decompose
from mlalign.analysis.metrics import bootstrap_ci, check_metric, compute_metrics, corpus_stats, disparity, disparity_pct
from mlalign.analysis.registry import check_aggregate, get_metric
from mlalign.analysis.stats import POSITION_CAP_QUANTILE, SentenceSums, code_sum_names
from mlalign.config import AnalysisConfig
from mlalign.errors import UserError
from mlalign.languages import LANGUAGES

log = logging.getLogger(__name__)

TIER_ORDER = ("reference", "high", "medium_low")
TIER_WORDS = {"high": "High-resource languages", "medium_low": "Medium-to-low resource languages"}
FVU_ARTEFACT_RATIO = 1.25
"""A language's raw FVU (`fvu_raw`, same denominator form for every language) this many times the reference's marks
the SAE as fitting it markedly worse."""
MAX_FVU = 1.0
"""Default `analysis.max_fvu`: a layer where the reference language's FVU reaches this is flagged as unfit (the SAE
reconstructs worse than predicting the mean residual), and none of its numbers is read as a finding."""
MODEL_LEVEL_FRACTION = 0.5
"""A residual-norm gap at least this fraction of the metric's gap (same sign) flags the gap as possibly a scale effect."""


# ---------------------------------------------------------------------------------------------------- layer bands


def layer_bands(layers: list[int], bands: dict | None = None, n_model_layers: int | None = None) -> dict[str, list[int]]:
    """band -> the analysed layers in it.

    Default: early/middle/deep = thirds of the model's `n_model_layers` layers (the first bands get the remainder, so
    26 layers split 9/9/8 = [0-8], [9-17], [18-25]), each holding the analysed layers that fall in it: with
    `layers=[0, 25]` of 26, layer 25 is deep, not "middle". Bands holding no analysed layer are dropped. Without
    `n_model_layers` the thirds are of the analysed layers themselves.
    `bands` = {name: [first, last]} (inclusive, in model layer numbers) overrides this, in the given order.
    """
    layers = sorted(int(layer) for layer in layers)
    if not layers:
        raise UserError("no layers to analyse; set layers=null (all) or e.g. layers=[0,5,10]")
    if bands is None:
        if n_model_layers is None:
            parts = np.array_split(np.array(layers), 3)
            return {name: [int(x) for x in part] for name, part in zip(("early", "middle", "deep"), parts) if len(part)}
        if layers[-1] >= n_model_layers:
            raise ValueError(f"layer {layers[-1]} is beyond a model of {n_model_layers} layers")
        thirds = np.array_split(np.arange(int(n_model_layers)), 3)
        out = {name: [layer for layer in layers if len(third) and third[0] <= layer <= third[-1]]
               for name, third in zip(("early", "middle", "deep"), thirds)}
        return {name: members for name, members in out.items() if members}
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
    """What the residual stream and the SAE's fit do at a gap: to flag a scale effect or an SAE artefact."""
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
    # Both causes are named where both hold: a residual shrunk by scale alone also raises the raw FVU (the SAE's error
    # floor over a smaller ||x||²), and naming only the first would hide the scale (the testbed's planted gap does this).
    reasons = []
    if _finite(fvu) and _finite(fvu_ref) and fvu_ref > 0 and fvu > FVU_ARTEFACT_RATIO * fvu_ref:
        reasons.append("the SAE reconstructs this language markedly worse, so part of the gap may be an SAE artefact")
    if _finite(resid) and _finite(gap) and gap != 0 and resid * gap > 0 and abs(resid) >= MODEL_LEVEL_FRACTION * abs(gap):
        reasons.append("the residual norm differs in the same direction by at least half as much, so part of the gap "
                       "may be the residual's scale rather than what its features represent (the resid_norm values "
                       "beside the metric's)")
    if reasons:
        return "; and ".join(reasons)
    return "the SAE fits both languages comparably and the residual norm does not explain the gap"


def unfit_layers(values, reference_lang: str, max_fvu: float | None = MAX_FVU) -> list[int]:
    """Layers where the reference language's FVU is >= `max_fvu`: the SAE reconstructs this model's residual stream
    no better than its mean (an SAE for another model or layer, or uncalibrated), so no number there is a finding."""
    if max_fvu is None:
        return []
    return [layer for layer, v in values[reference_lang].items() if _finite(v.get("fvu")) and v["fvu"] >= max_fvu]


def unfit_cells(values, reference_lang: str, max_fvu: float | None = MAX_FVU) -> dict[str, list[int]]:
    """lang -> the layers (fit for the reference) where that language's own FVU is >= `max_fvu`: the SAE reconstructs
    English there but not this language (e.g. an SAE trained on English text only), so the language's disparity at
    that layer is read through a reconstruction no better than the mean and is no finding. Languages with none are
    left out."""
    if max_fvu is None:
        return {}
    unfit = set(unfit_layers(values, reference_lang, max_fvu))
    cells = {lang: [layer for layer, v in by_layer.items() if layer not in unfit and _finite(v.get("fvu"))
                    and v["fvu"] >= max_fvu]
             for lang, by_layer in values.items() if lang != reference_lang}
    return {lang: layers for lang, layers in cells.items() if layers}


@dataclass(frozen=True)
class Unfit:
    """Where no number is a finding: every language at `layers` (the reference's FVU >= max_fvu, `unfit_layers`) and
    one language at `cells[lang]` (its own FVU >= max_fvu, `unfit_cells`)."""

    layers: frozenset = frozenset()
    cells: Mapping[str, frozenset] = field(default_factory=dict)

    @classmethod
    def of(cls, unfit: "Unfit | Iterable[int]") -> "Unfit":
        """An `Unfit` as it is, or one from a plain list of layers (reference-unfit only)."""
        return unfit if isinstance(unfit, Unfit) else cls(layers=frozenset(unfit))

    def excludes(self, lang: str, layer) -> bool:
        return layer in self.layers or layer in self.cells.get(lang, ())

    def __bool__(self) -> bool:
        return bool(self.layers) or any(self.cells.values())


def band_summary(values, disp, reference_lang: str, bands: dict[str, list[int]], unfit=(),
                 metric: str | None = None) -> dict[str, dict]:
    """Per band: mean disparity over the non-reference languages (overall and per tier) and the worst (lang, layer)
    with its residual-norm disparity and FVUs (`most_negative`: the lowest disparity; for a `lower_is_better` metric
    the highest, i.e. the worst fit); layers and cells in `unfit` are left out (listed as unfit_layers and
    unfit_cells)."""
    sign = -1 if metric is not None and get_metric(metric).lower_is_better else 1
    unfit = Unfit.of(unfit)
    others = [lang for lang in disp if lang != reference_lang]
    out = {}
    for band, layers in bands.items():
        entry: dict = {"layers": layers, "unfit_layers": [layer for layer in layers if layer in unfit.layers],
                       "unfit_cells": {lang: [layer for layer in layers if layer in unfit.cells[lang]]
                                       for lang in others if set(layers) & set(unfit.cells.get(lang, ()))}}
        cells = [(disp[lang][layer], lang, layer) for lang in others for layer in layers
                 if not unfit.excludes(lang, layer) and _finite(disp[lang][layer])]
        entry["mean_disparity_pct"] = float(np.mean([c[0] for c in cells])) if cells else None
        entry["mean_disparity_pct_by_tier"] = {}
        for tier in TIER_ORDER[1:]:
            tier_cells = [c[0] for c in cells if tier_of(c[1]) == tier]
            if tier_cells:
                entry["mean_disparity_pct_by_tier"][tier] = float(np.mean(tier_cells))
        worst = min(cells, key=lambda c: (sign * c[0], c[1], c[2])) if cells else None
        entry["most_negative"] = _gap_context(values, disp, reference_lang, *worst[1:]) if cells else None
        out[band] = entry
    return out


def _ci_words(disparity_ci, lang: str, layer, adverse_sign: int, ci: float) -> str:
    """" (95% CI 20.3-33.0%)" for a cell's disparity CI, in the statement's direction; "" where there is none."""
    cell = ((disparity_ci or {}).get(lang) or {}).get(layer)
    if not cell or not all(_finite(v) for v in cell):
        return ""
    low, high = sorted(-adverse_sign * v for v in cell)
    note = ", includes 0" if low <= 0 <= high else ""
    return f" ({100 * ci:.0f}% CI {low:.1f} to {high:.1f}%{note})"


@dataclass(frozen=True)
class OtherAggregates:
    """The same disparity measured two other ways, quoted beside each headline's token-aggregate cell (its record's
    value_sentence, value_position_matched, ci_position_matched) and named in its statement where the position-matched
    one disagrees: a gap a language's late positions carry is a gap of where its tokens sit."""

    sentence: dict | None = None
    """disparity_pct_sentence[lang][layer]: every sentence weighs the same."""
    position_matched: dict | None = None
    """disparity_pct_position_matched[lang][layer]: only tokens at positions <= position_cap."""
    position_matched_ci: dict | None = None
    """[lang][layer] -> [low, high], its bootstrap CI."""
    position_cap: int | None = None
    """The last position of the window: the reference language's 90th-percentile analysed position."""
    norm_matched: dict | None = None
    """disparity_pct_norm_matched[lang][layer]: every token's centred residual rescaled to one norm (method §1c)."""
    norm_matched_ci: dict | None = None
    """[lang][layer] -> [low, high], its bootstrap CI."""


def headline_statements(values, disp, reference_lang: str, metric: str, bands: dict[str, list[int]], unfit=(),
                        disparity_ci=None, ci: float = 0.95, disparity_samples=None,
                        other: OtherAggregates | None = None) -> list[str]:
    """The texts of `headlines`, then the statement naming unfit layers if any."""
    unfit = Unfit.of(unfit)
    intervals = CellIntervals(disparity_ci, disparity_samples, ci)
    texts = [h["text"] for h in headlines(values, disp, reference_lang, metric, bands, unfit, intervals, other=other)]
    return texts + unfit_statements(values, reference_lang, unfit)


def _simultaneous_words(interval, n_cells: int, adverse_sign: int, ci: float) -> str:
    if not interval:
        return ""
    low, high = sorted(-adverse_sign * v for v in interval)
    return f"; {100 * ci:.0f}% simultaneous CI over the {n_cells} cells searched {low:.1f} to {high:.1f}%"


@dataclass(frozen=True)
class CellIntervals:
    """What the bootstrap says of each (lang, layer) cell a headline quotes: its own interval (`disparity_ci`
    [lang][layer] -> [low, high]) and its resampled disparities (`disparity_samples`, for the simultaneous interval
    over the cells a headline searched), at confidence level `ci`."""

    disparity_ci: dict | None = None
    disparity_samples: dict | None = None
    ci: float = 0.95


def headlines(values, disp, reference_lang: str, metric: str, bands: dict[str, list[int]], unfit=(),
              intervals: CellIntervals = CellIntervals(), decomposition=None,
              other: OtherAggregates | None = None) -> list[dict]:
    """The study's sentences, one per resource tier, reproduced from the numbers, as records {text, lang, layer,
    value (the cell's disparity_pct), ci (its own bootstrap CI), simultaneous_ci, n_cells_searched, value_sentence,
    value_position_matched, ci_position_matched (the same cell's disparity under the `other` aggregates, None
    without them)}, e.g.

    "Medium-to-low resource languages (id, ca, mr, ml, hi) receive up to 27.1% (95% CI 20.3 to 33.0%) lower SAE
    activations than English in early layers (hi, layer 3); a gap of 12.3% persists in deep layers (mean over layers
    18-25). At hi, layer 3 the residual norm differs by -2.0% and the FVU is 0.31 vs 0.30 for English: <verdict>."

    The adverse direction follows the metric: for activations a gap is a lower value than the reference's; for FVU
    (`lower_is_better` in the registry) it is a higher one, worded as a worse SAE fit. The worst cell's bootstrap CI
    (`intervals.disparity_ci[lang][layer]`) is quoted where there is one, and flagged when it includes 0.
    "Up to X%" is the most extreme of `n_cells_searched` cells (the tier's languages x layers), so beside the cell's
    own CI it carries a simultaneous one (max-t over those cells' bootstrap resamples,
    `intervals.disparity_samples`): the interval that would hold whichever cell had come out most extreme.
    Layers in `unfit` (the SAE does not reconstruct the reference there, see `unfit_layers`), and a language's cells
    where it does not reconstruct that language (`unfit_cells`), give no finding: they are left out of every number and
    named by `headline_statements` instead.
    Where the cell's position-matched disparity (`other`) has the other sign, or lies outside the cell's own CI, the
    statement says so (`_position_words`).
    """
    ref_name = LANGUAGES[reference_lang].name if reference_lang in LANGUAGES else reference_lang
    unfit = Unfit.of(unfit)
    disparity_ci, disparity_samples, ci = intervals.disparity_ci, intervals.disparity_samples, intervals.ci
    what = get_metric(metric).words
    lower_is_better = get_metric(metric).lower_is_better
    # adverse < 0 is a gap: lower activation than the reference, or a higher FVU (a worse fit).
    sign = -1 if lower_is_better else 1
    worse_words = "higher" if lower_is_better else "lower"
    fit_words = " (a worse SAE fit)" if lower_is_better else ""
    records = []
    band_of = {layer: band for band, layers in bands.items() for layer in layers}
    for tier in TIER_ORDER[1:]:
        langs = [lang for lang in disp if lang != reference_lang and tier_of(lang) == tier]
        cells = [(sign * disp[lang][layer], lang, layer) for lang in langs for layer in disp[lang]
                 if layer in band_of and not unfit.excludes(lang, layer) and _finite(disp[lang][layer])]
        if not cells:
            continue
        gap, lang, layer = min(cells)
        where = band_of[layer]
        head = f"{TIER_WORDS[tier]} ({', '.join(langs)})"
        searched = {(c[1], c[2]): ((disparity_samples or {}).get(c[1]) or {}).get(c[2]) for c in cells}
        simultaneous, _ = simultaneous_intervals({k: v for k, v in searched.items() if v is not None},
                                                 {k: disp[k[0]][k[1]] for k in searched}, ci)
        record = {"lang": lang, "layer": int(layer), "value": disp[lang][layer],
                  "ci": ((disparity_ci or {}).get(lang) or {}).get(layer),
                  "simultaneous_ci": simultaneous.get((lang, layer)), "n_cells_searched": len(cells),
                  **_other_values(other, lang, layer)}
        position = _position_words(record, other, ref_name, ci) + (
            "" if gap >= 0 or lower_is_better else _norm_words(record, ref_name, ci))
        if gap >= 0:
            records.append({"text": f"{head} show no {worse_words} {what} than {ref_name} in any analysed layer "
                                    f"(smallest difference {sign * gap:+.1f}%, {lang}, layer {layer})." + position,
                            **record})
            continue
        verb = "have" if lower_is_better else "receive"
        own = _ci_words(disparity_ci, lang, layer, sign, ci)
        if own and record["simultaneous_ci"]:
            own = own[:-1] + _simultaneous_words(record["simultaneous_ci"], len(cells), sign, ci) + ")"
        parts = [f"{head} {verb} up to {-gap:.1f}%{own} {worse_words} "
                 f"{what}{fit_words} than {ref_name} in {where} layers ({lang}, layer {layer})",
                 *_other_band_words(cells, bands, band_of, where, sign)]
        check = _check_words(values, disp, reference_lang, ref_name, lang, layer, lower_is_better)
        records.append({"text": "; ".join(parts) + ". " + check + _reshuffling_words(decomposition, lang, layer)
                                + position, **record})
    return records


def _other_band_words(cells: list, bands: dict[str, list[int]], band_of: dict, where: str, sign: int) -> list[str]:
    """A headline's clauses on the bands other than the worst cell's (`where`): the mean gap of the searched `cells`
    (adverse value, lang, layer) in each."""
    band_names = list(bands)
    parts = []
    for band in band_names:
        if band == where:
            continue
        band_cells = [c[0] for c in cells if band_of[c[2]] == band]
        if not band_cells:
            continue
        mean = float(np.mean(band_cells))
        span = f"layer {bands[band][0]}" if len(bands[band]) == 1 else f"mean over layers {bands[band][0]}-{bands[band][-1]}"
        if mean < 0:
            later = "persists" if band_names.index(band) > band_names.index(where) else "is already present"
            parts.append(f"a gap of {-mean:.1f}% {later} in {band} layers ({span})")
        else:
            parts.append(f"no gap remains on average in {band} layers ({sign * mean:+.1f}%, {span})")
    return parts


def _check_words(values, disp, reference_lang: str, ref_name: str, lang: str, layer, lower_is_better: bool) -> str:
    """The headline's sentence on the worst cell's residual norm and FVU, with the artefact verdict."""
    context = _gap_context(values, disp, reference_lang, lang, layer)
    # For FVU itself the statement already is the fidelity finding; the artefact verdict is about activations.
    verdict = ("activation differences of this language at this layer partly reflect the SAE's fit"
               if lower_is_better else _verdict(context))
    return (
        f"At {lang}, layer {layer} the residual norm differs by {context['resid_norm_disparity_pct']:+.1f}% and the "
        f"FVU is {context['fvu']:.2f} vs {context['fvu_reference']:.2f} for {ref_name}{_raw_fvu_words(context)}: "
        f"{verdict}."
    )


def _other_values(other: OtherAggregates | None, lang: str, layer) -> dict:
    """A headline cell's disparity under the other aggregates (None where not computed)."""
    def cell(table):
        return ((table or {}).get(lang) or {}).get(layer)

    other = other or OtherAggregates()
    return {"value_sentence": cell(other.sentence), "value_position_matched": cell(other.position_matched),
            "ci_position_matched": cell(other.position_matched_ci), "value_norm_matched": cell(other.norm_matched),
            "ci_norm_matched": cell(other.norm_matched_ci)}


def _position_words(record: dict, other: OtherAggregates | None, ref_name: str, ci: float) -> str:
    """" Position-matched (...), the disparity at hi, layer 3 is -1.2% ... against -27.1% over all tokens: ..." where
    the headline cell's position-matched disparity has the other sign than its token one, or lies outside the token
    one's CI (the interval the statement quotes); "" where they agree or it was not computed."""
    token, matched, interval = record["value"], record["value_position_matched"], record["ci"]
    if other is None or not (_finite(token) and _finite(matched)):
        return ""
    opposite = token * matched < 0
    outside = bool(interval) and all(_finite(v) for v in interval) and not min(interval) <= matched <= max(interval)
    if not (opposite or outside):
        return ""
    why = ("the opposite sign" if opposite else
           f"outside the token aggregate's {100 * ci:.0f}% CI ({min(interval):+.1f} to {max(interval):+.1f}%)")
    own = record["ci_position_matched"]
    own = (f" ({100 * ci:.0f}% CI {min(own):+.1f} to {max(own):+.1f}%)"
           if own and all(_finite(v) for v in own) else "")
    return (f" Position-matched (only tokens at positions <= {other.position_cap}, the {ref_name} "
            f"{100 * POSITION_CAP_QUANTILE:.0f}th-percentile position), the disparity at {record['lang']}, layer "
            f"{record['layer']} is {matched:+.1f}%{own} against {token:+.1f}% over all tokens: {why}, so this "
            f"headline rests partly on positions beyond those that most {ref_name} tokens reach.")


def _norm_words(record: dict, ref_name: str, ci: float) -> str:
    """" Norm-matched (...), the disparity at hi, layer 3 is -2.0% (...) against -27.1%: <what that makes of the gap>."
    for a headline gap whose cell has a norm-matched disparity (method §1c): the measurement that answers the residual
    norm's "may be the residual's scale"; "" without one or without a gap."""
    token, matched, own = record["value"], record["value_norm_matched"], record["ci_norm_matched"]
    if not (_finite(token) and _finite(matched)) or token == 0:
        return ""
    excludes_zero = bool(own) and all(_finite(v) for v in own) and (max(own) < 0 if token < 0 else min(own) > 0)
    if matched * token > 0 and excludes_zero and abs(matched) >= MODEL_LEVEL_FRACTION * abs(token):
        why = "the gap is in the residual's direction, beyond its scale"
    elif matched * token > 0 and excludes_zero:
        why = "part of the gap is the residual's scale, part its direction"
    else:
        why = "the gap is the residual's scale, not what its features represent"
    interval = (f" ({100 * ci:.0f}% CI {min(own):+.1f} to {max(own):+.1f}%)"
                if own and all(_finite(v) for v in own) else "")
    return (f" Norm-matched (every token's centred residual rescaled to the {ref_name} centred RMS before encoding), "
            f"the disparity at {record['lang']}, layer {record['layer']} is {matched:+.1f}%{interval} against "
            f"{token:+.1f}%: {why}.")


def _holm_by_cell(disparity_samples, reference_lang: str, langs: list[str], layers: list[int], unfit) -> dict | None:
    """disparity_p_holm[lang][layer]: each cell's bootstrap p-value of "no disparity", Holm-adjusted over every
    non-reference cell of the fit layers (the family a reader scans in the heatmap; unfit cells are not in it and get
    None); None without a bootstrap."""
    if not disparity_samples:
        return None
    unfit = Unfit.of(unfit)
    cells = {(lang, layer): bootstrap_p_value(disparity_samples[lang][layer]) for lang in langs
             if lang != reference_lang for layer in layers
             if not unfit.excludes(lang, layer) and layer in (disparity_samples.get(lang) or {})}
    adjusted = holm(cells)
    return {lang: {layer: adjusted.get((lang, layer)) for layer in layers} for lang in langs if lang != reference_lang}


def _reshuffling_words(decomposition, lang: str, layer) -> str:
    """" Feature by feature (mean_act): net -12.3%, gross 190% ..." for the headline cell; "" without feature totals."""
    if not decomposition:
        return ""
    net = decomposition["net_change_pct"][lang][layer]
    gross = decomposition["gross_change_pct"][lang][layer]
    dense = decomposition["dense_share"][lang][layer]
    if not (_finite(net) and _finite(gross)):
        return ""
    share = f"; {100 * dense:.0f}% of its activation is in dense features" if _finite(dense) else ""
    # No verdict: the gross sum over thousands of per-feature means also collects their sampling noise, and no
    # no-change floor for it is computed yet (docs/method.md §8b), so it is reported, not interpreted.
    return (f" Feature by feature (mean_act): net change {net:+.1f}% of the reference's activation, gross "
            f"{gross:.1f}% moved between features (gross includes per-feature sampling noise){share}.")


def _raw_fvu_words(context: dict) -> str:
    if not (_finite(context.get("fvu_raw")) and _finite(context.get("fvu_raw_reference"))):
        return ""
    return f" (raw FVU ||x-x̂||²/||x||² {context['fvu_raw']:.3f} vs {context['fvu_raw_reference']:.3f})"


def unfit_statements(values, reference_lang: str, unfit: Unfit) -> list[str]:
    """One statement for the layers the SAE does not reconstruct (reference), one per language it does not
    reconstruct at some fit layer."""
    texts = [unfit_statement(values, reference_lang, sorted(unfit.layers))] if unfit.layers else []
    return texts + [unfit_cell_statement(values, lang, sorted(layers)) for lang, layers in unfit.cells.items() if layers]


def unfit_cell_statement(values, lang: str, layers: list[int]) -> str:
    name = LANGUAGES[lang].name if lang in LANGUAGES else lang
    worst = max(layers, key=lambda layer: values[lang][layer]["fvu"])
    return (f"The SAE does not reconstruct {name} at layer{'s' if len(layers) > 1 else ''} "
            f"{', '.join(str(layer) for layer in layers)} ({lang} FVU up to {values[lang][worst]['fvu']:.2f} at layer "
            f"{worst}, worse than predicting the mean): {lang}'s disparity there is read through a failed "
            f"reconstruction, is no finding, and is left out of the statements above; train SAEs on text that includes "
            f"{name} (task=train_saes).")


def unfit_statement(values, reference_lang: str, layers: list[int]) -> str:
    ref_name = LANGUAGES[reference_lang].name if reference_lang in LANGUAGES else reference_lang
    worst = max(layers, key=lambda layer: values[reference_lang][layer]["fvu"])
    return (f"The SAE does not reconstruct this model's residual stream at layer{'s' if len(layers) > 1 else ''} "
            f"{', '.join(str(layer) for layer in layers)} ({ref_name} FVU up to {values[reference_lang][worst]['fvu']:.2f} "
            f"at layer {worst}, worse than predicting the mean): no number of these layers is a finding, and they are "
            f"left out of the statements above; use the SAE set trained on this model.")


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
    settings: AnalysisConfig | None = None,
    *,
    ids_by_lang: dict[str, list] | None = None,
    seed: int = 0,
    model: str | None = None,
    sae: str | None = None,
    n_model_layers: int | None = None,
    feature_stats: dict | None = None,
    norm_matched: tuple[dict[int, float], dict[str, dict[int, SentenceSums]]] | None = None,
) -> dict:
    """The content of `analysis/summary.json` (strict JSON: NaN becomes null, layer keys are strings).

    settings: the analysis group (`config.AnalysisConfig`; its defaults without one): metric, aggregate, bootstrap,
    ci, bands, max_fvu, max_truncated_pct and dense_threshold are read here.
    Keys: model, sae, reference_lang, metric, aggregate, ci, bootstrap, layers (ints), n_model_layers (bands are
    thirds of these when given), langs (tier order),
    values[lang][layer][metric], values_ci[lang][layer][metric] = [low, high] | null, disparity_pct[lang][layer]
    (of `metric`), disparity_ci[lang][layer] = [low, high] | null, bands {band: [layers]}, band_summary,
    statements, headlines (one record per headline statement: text, lang, layer, value, ci, simultaneous_ci,
    n_cells_searched; see `headlines`), disparity_pct_sentence[lang][layer] (the sentence aggregate's disparity),
    disparity_p_holm[lang][layer] (bootstrap p of "no disparity", Holm over the non-reference cells of fit layers;
    null without a bootstrap), position_cap (the reference language's 90th-percentile analysed position: the last
    position of the window the engine kept beside the whole in the same pass, `position_matched_stats`),
    disparity_pct_position_matched[lang][layer] (the disparity over tokens at positions <= position_cap only),
    disparity_ci_position_matched, disparity_p_holm_position_matched (its CI and Holm p, as above),
    n_tokens_position_matched[lang] (all five null where the statistics kept no window), n_tokens[lang],
    n_sentences[lang], corpus_stats[lang] {tokens_per_sentence, truncated_pct, mean_position}, max_fvu, unfit_layers
    (reference FVU >= max_fvu; left out of band_summary and statements), unfit_cells[lang] (fit layers where that
    language's own FVU >= max_fvu; its cells there are left out too), sae_fits[layer] (bool), warnings (also
    logged). `summary_markdown` renders it as analysis/summary.md.
    With `feature_stats` (the per-feature totals of the same pass): dense_share[lang][layer] and
    gross_change_pct[lang][layer] beside the net disparity, and `decomposition` (analysis.decomposition.decompose:
    dense features at `dense_threshold`, the disparity without them); headline statements then say how much of the
    activation moved between features (net vs gross).
    With `norm_matched` = (targets, statistics of the norm-matched pass, `sources.norm_matched_stats`):
    disparity_pct_norm_matched[lang][layer] (the disparity with every token's residual rescaled about the SAE's b_dec
    to the reference's centred RMS before encoding: its direction, not its scale), disparity_ci_norm_matched,
    disparity_p_holm_norm_matched, norm_matched_target[layer] and norm_matched_centre (all null without it).
    """
    s = settings if settings is not None else AnalysisConfig()
    layers = _checked_layers(stats, reference_lang, s)
    metric, aggregate = s.metric, s.aggregate
    values = compute_metrics(stats, aggregate)
    disp = disparity(values, reference_lang, metric)
    boot = bootstrap_ci(stats, reference_lang, metric, aggregate, ids_by_lang, s.bootstrap, s.ci, seed)
    band_layers = layer_bands(layers, s.bands, n_model_layers)
    langs = order_by_tier(list(stats))
    unfit = Unfit(layers=frozenset(unfit_layers(values, reference_lang, s.max_fvu)),
                  cells={lang: frozenset(layers) for lang, layers in unfit_cells(values, reference_lang, s.max_fvu).items()})
    corpus = corpus_stats(stats)
    warnings = _summary_warnings(values, reference_lang, unfit, corpus, langs, s.max_truncated_pct)
    parts = decompose(feature_stats, reference_lang, s.dense_threshold) if feature_stats else None
    disp_sentence = disparity(compute_metrics(stats, "sentence"), reference_lang, metric)
    cap, matched = _position_matched(stats, reference_lang, s, ids_by_lang, seed, langs, layers, unfit)
    norm = _norm_matched_keys(norm_matched, reference_lang, s, ids_by_lang, seed, langs, layers, unfit)
    other = OtherAggregates(sentence=disp_sentence, position_matched=matched["disparity"],
                            position_matched_ci=matched["ci"], position_cap=cap,
                            norm_matched=norm["disparity_pct_norm_matched"],
                            norm_matched_ci=norm["disparity_ci_norm_matched"])
    heads = headlines(values, disp, reference_lang, metric, band_layers, unfit,
                      CellIntervals(boot["disparity_ci"], boot["disparity_samples"], s.ci), parts, other)
    p_holm = _holm_by_cell(boot["disparity_samples"], reference_lang, langs, layers, unfit)
    return _clean({
        "model": model, "sae": sae, "reference_lang": reference_lang, "metric": metric, "aggregate": aggregate,
        "ci": s.ci, "bootstrap": int(s.bootstrap), "layers": [int(layer) for layer in layers],
        "n_model_layers": n_model_layers, "langs": langs,
        "values": {lang: values[lang] for lang in langs},
        "values_ci": {lang: boot["values_ci"][lang] for lang in langs} if boot["values_ci"] else None,
        "disparity_pct": {lang: disp[lang] for lang in langs},
        "disparity_ci": {lang: boot["disparity_ci"][lang] for lang in langs} if boot["disparity_ci"] else None,
        "bands": band_layers,
        "band_summary": band_summary(values, disp, reference_lang, band_layers, unfit, metric),
        "statements": [h["text"] for h in heads] + unfit_statements(values, reference_lang, unfit),
        "headlines": heads,
        **_other_aggregates(disp_sentence, p_holm, cap, matched, langs),
        **norm,
        "dense_share": parts["dense_share"] if parts else None,
        "gross_change_pct": parts["gross_change_pct"] if parts else None,
        "decomposition": parts,
        **_corpus_and_fit(stats, layers, langs, corpus, s.max_fvu, unfit),
        "warnings": warnings,
    })


def _checked_layers(stats: dict, reference_lang: str, s: AnalysisConfig) -> list[int]:
    """The analysed layers, after checking the metric, the aggregate, the reference language and that every
    language was analysed at the same layers."""
    check_metric(s.metric)
    check_aggregate(s.aggregate)
    if reference_lang not in stats:
        raise UserError(f"reference language {reference_lang!r} was not analysed; add it to langs or set reference_lang")
    layer_sets = {lang: sorted(by_layer) for lang, by_layer in stats.items()}
    layers = layer_sets[reference_lang]
    if any(ls != layers for ls in layer_sets.values()):
        raise ValueError(f"languages were analysed at different layers: {layer_sets}")
    return layers


def _summary_warnings(values, reference_lang: str, unfit: Unfit, corpus: dict, langs: list[str],
                      max_truncated_pct: float | None) -> list[str]:
    """The summary's warnings (unfit layers and cells, languages cut at max_length too often), logged as well."""
    warnings = unfit_statements(values, reference_lang, unfit)
    for lang in langs:
        pct = corpus[lang]["truncated_pct"]
        if max_truncated_pct is not None and _finite(pct) and pct > max_truncated_pct:
            warnings.append(f"{pct:.1f}% of {lang}'s sentences are cut at max_length (threshold {max_truncated_pct}%): "
                            f"its numbers cover shorter, earlier-position text than other languages; raise data.max_length "
                            f"and compare disparity_pct_position_matched (or set analysis.max_position)")
    for warning in warnings:
        log.warning(warning)
    return warnings


def _position_matched(stats, reference_lang: str, s: AnalysisConfig, ids_by_lang, seed: int, langs: list[str],
                      layers: list[int], unfit: Unfit) -> tuple[int | None, dict]:
    """(position cap, {disparity, ci, p_holm, n_tokens}) of the position-matched window (all None without one)."""
    cap, window = position_matched_stats(stats)
    if window is None:
        return cap, {"disparity": None, "ci": None, "p_holm": None, "n_tokens": None}
    boot_window = bootstrap_ci(window, reference_lang, s.metric, s.aggregate, ids_by_lang, s.bootstrap, s.ci, seed)
    return cap, {"disparity": disparity(compute_metrics(window, s.aggregate), reference_lang, s.metric),
                 "ci": boot_window["disparity_ci"],
                 "p_holm": _holm_by_cell(boot_window["disparity_samples"], reference_lang, langs, layers, unfit),
                 "n_tokens": {lang: window[lang][layers[0]].total_tokens for lang in langs}}


def _norm_matched_keys(norm_matched, reference_lang: str, s: AnalysisConfig, ids_by_lang, seed: int,
                       langs: list[str], layers: list[int], unfit: Unfit) -> dict:
    """The summary's norm-matched keys (`summarize`), each null without the norm-matched pass."""
    if norm_matched is not None and s.metric not in code_sum_names():
        # The pass's x̂ reconstructs the rescaled residual: only SAE-code metrics mean what their names say there.
        log.warning("analysis.norm_matched: %s is not an SAE-code metric (%s), so it has no norm-matched disparity",
                    s.metric, ", ".join(code_sum_names()))
        norm_matched = None
    if norm_matched is None:
        return {key: None for key in ("disparity_pct_norm_matched", "disparity_ci_norm_matched",
                                      "disparity_p_holm_norm_matched", "norm_matched_target", "norm_matched_centre")}
    from mlalign.analysis.norm_matched import CENTRE

    targets, nm_stats = norm_matched
    nm_stats = {lang: {layer: nm_stats[lang][layer] for layer in layers} for lang in langs}
    boot = bootstrap_ci(nm_stats, reference_lang, s.metric, s.aggregate, ids_by_lang, s.bootstrap, s.ci, seed)
    disp = disparity(compute_metrics(nm_stats, s.aggregate), reference_lang, s.metric)
    return {
        "disparity_pct_norm_matched": _by_lang(disp, langs),
        "disparity_ci_norm_matched": _by_lang(boot["disparity_ci"], langs),
        "disparity_p_holm_norm_matched": _holm_by_cell(boot["disparity_samples"], reference_lang, langs, layers, unfit),
        "norm_matched_target": {int(layer): float(targets[layer]) for layer in layers},
        "norm_matched_centre": CENTRE,
    }


def _other_aggregates(disp_sentence: dict, p_holm, cap, matched: dict, langs: list[str]) -> dict:
    """The summary's keys beside the headline disparity: the sentence aggregate's, its Holm p, the position-matched
    window's."""
    return {
        # The same disparity with every sentence weighing the same (a language cut into more tokens per sentence
        # counts no more), beside the token aggregate: a headline that holds in one and not the other says so.
        "disparity_pct_sentence": {lang: disp_sentence[lang] for lang in langs},
        "disparity_p_holm": p_holm,
        # The same disparity over only the token positions the reference language reaches (<= its 90th-percentile
        # position): a language cut into more tokens otherwise adds late positions English barely has.
        "position_cap": cap,
        "disparity_pct_position_matched": _by_lang(matched["disparity"], langs),
        "disparity_ci_position_matched": _by_lang(matched["ci"], langs),
        "disparity_p_holm_position_matched": matched["p_holm"],
        "n_tokens_position_matched": matched["n_tokens"],
    }


def _corpus_and_fit(stats, layers: list[int], langs: list[str], corpus: dict, max_fvu, unfit: Unfit) -> dict:
    """The summary's corpus counts per language and where the SAEs fit."""
    first = {lang: stats[lang][layers[0]] for lang in langs}
    return {
        "n_tokens": {lang: first[lang].total_tokens for lang in langs},
        "n_sentences": {lang: first[lang].n_sentences for lang in langs},
        "corpus_stats": {lang: corpus[lang] for lang in langs},
        "max_fvu": max_fvu,
        "unfit_layers": sorted(int(layer) for layer in unfit.layers),
        "unfit_cells": {lang: sorted(int(layer) for layer in unfit.cells[lang]) for lang in langs
                        if unfit.cells.get(lang)},
        "sae_fits": {layer: layer not in unfit.layers for layer in layers},
    }


def _by_lang(table: dict | None, langs: list[str]) -> dict | None:
    return None if table is None else {lang: table[lang] for lang in langs}


def position_matched_stats(stats: dict[str, dict[int, SentenceSums]]) -> tuple[int | None, dict | None]:
    """(position cap, [lang][layer] -> the statistics of only the tokens at positions <= the cap) from the window the
    engine kept in the same pass (`SentenceSums.position_matched`); (None, None) where any (language, layer) kept
    none (e.g. statistics computed without a reference language to cap at)."""
    caps = {sums.position_cap for by_layer in stats.values() for sums in by_layer.values()}
    if None in caps:
        if len(caps) > 1:
            log.warning("some (language, layer) statistics kept no position-matched window; "
                        "disparity_pct_position_matched is left out")
        return None, None
    if len(caps) != 1:
        raise ValueError(f"languages were analysed with different position caps: {sorted(caps)}")
    window = {lang: {layer: sums.position_matched() for layer, sums in by_layer.items()}
              for lang, by_layer in stats.items()}
    return caps.pop(), window


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


# ---------------------------------------------------------------------------------------------------- markdown

STARS = ((0.01, "**"), (0.05, "*"))
"""Markdown tables star a cell whose Holm-adjusted p-value is below the level."""


def stars(p_holm) -> str:
    """"**" below 0.01, "*" below 0.05, "" otherwise (or without a p-value)."""
    if not _finite(p_holm):
        return ""
    return next((mark for level, mark in STARS if p_holm < level), "")


def disparity_table(summary: dict, key: str = "disparity_pct", p_key: str | None = "disparity_p_holm") -> list[str]:
    """Markdown lines: a table of `summary[key]` (one row per non-reference language, one column per layer, in %),
    each cell starred by `summary[p_key]`, its p-value after Holm's correction across the table's cells (`stars`), then
    the legend that names the correction and the number of cells it ran over. Unfit layers (no test) are marked †,
    a language's unfit cells ‡."""
    ref = summary["reference_lang"]
    layers = [str(layer) for layer in summary["layers"]]
    langs = [lang for lang in summary["langs"] if lang != ref]
    unfit = {str(layer) for layer in summary.get("unfit_layers") or []}
    unfit_cells = {lang: {str(layer) for layer in layers} for lang, layers in (summary.get("unfit_cells") or {}).items()}
    values = summary.get(key) or {}
    p_holm = (summary.get(p_key) if p_key else None) or {}
    lines = ["| lang | " + " | ".join(f"{layer}†" if layer in unfit else layer for layer in layers) + " |",
             "| --- " * (len(layers) + 1) + "|"]
    for lang in langs:
        cells = [(values.get(lang) or {}).get(layer) for layer in layers]
        marks = [stars((p_holm.get(lang) or {}).get(layer)) for layer in layers]
        unfit_here = unfit_cells.get(lang, set())
        lines.append(f"| {lang} | " + " | ".join("n/a" if not _finite(v) else f"{v:+.1f}{mark}"
                                                  + ("‡" if layer in unfit_here else "")
                                                  for v, mark, layer in zip(cells, marks, layers)) + " |")
    n_cells = sum(_finite(p) for by_layer in p_holm.values() for p in by_layer.values())
    lines.append("")
    if p_key is None:
        lines.append("Point values, no test.")
    elif not n_cells:
        lines.append("No stars: no p-values (analysis.bootstrap=0).")
    else:
        lines.append(f"`*` p < 0.05, `**` p < 0.01 after Holm's correction across the {n_cells} "
                     f"cell{'s' if n_cells != 1 else ''} of this table (the two-sided bootstrap p-value of no "
                     f"disparity, {summary.get('bootstrap')} resamples of sentences; Holm bounds the chance of any false "
                     f"star in the table by 5%, or 1% for `**`).{_resolution_words(summary.get('bootstrap'), n_cells)}")
    if unfit:
        lines.append("† the SAE does not reconstruct the reference language at this layer: no test, no finding.")
    if any(unfit_cells.values()):
        lines.append("‡ the SAE does not reconstruct this language at this layer (its FVU >= analysis.max_fvu): no "
                     "test, no finding.")
    return lines


def _resolution_words(n_resamples, n_cells: int) -> str:
    """Where the bootstrap is too short for a star: its smallest p is 2/(B+1), times the number of cells after Holm."""
    if not n_resamples:
        return ""
    floor = n_cells * 2 / (int(n_resamples) + 1)
    for level, mark, factor in ((0.05, "`*`", 40), (0.01, "`**`", 200)):
        if floor >= level:
            return (f" With {n_resamples} resamples no cell can reach {mark} (the smallest Holm-adjusted p is "
                    f"{min(floor, 1.0):.2g}), so a missing {mark} says nothing; analysis.bootstrap={factor * n_cells} "
                    f"makes it reachable.")
    return ""


def summary_markdown(summary: dict) -> str:
    """analysis/summary.md: the statements and the per-layer disparity tables (token, position-matched and sentence
    aggregates) of a `summarize` result, starred after Holm's correction."""
    ref, metric = summary["reference_lang"], summary["metric"]
    lines = [f"# Analysis: {summary.get('model')} / {summary.get('sae')}", "",
             f"`disparity_pct` = 100 (M - M_{ref}) / M_{ref} of `{metric}` per layer, in %; negative = less than "
             f"{ref}. Definitions: docs/method.md.", "", "## Statements", "",
             *[f"- {statement}" for statement in summary["statements"]], ""]
    if summary["langs"] == [ref]:
        return "\n".join(lines + [f"Reference only ({ref}): no disparity to report."]) + "\n"
    lines += [f"## Disparity vs {ref} ({summary['aggregate']} aggregate)", "", *disparity_table(summary), ""]
    if summary.get("disparity_pct_position_matched") is not None:
        kept = summary.get("n_tokens_position_matched") or {}
        shares = ", ".join(f"{lang} {100 * kept[lang] / summary['n_tokens'][lang]:.0f}%" for lang in summary["langs"]
                           if kept.get(lang) is not None and summary["n_tokens"].get(lang))
        lines += [f"## Position-matched: only tokens at positions <= {summary['position_cap']}", "",
                  f"{summary['position_cap']} is {ref}'s {100 * POSITION_CAP_QUANTILE:.0f}th-percentile analysed "
                  f"position; share of each language's analysed tokens it keeps: {shares}.", "",
                  *disparity_table(summary, "disparity_pct_position_matched", "disparity_p_holm_position_matched"), ""]
    if summary.get("disparity_pct_norm_matched") is not None:
        lines += ["## Norm-matched: every token's centred residual rescaled to one norm per layer", "",
                  f"Each token's residual x becomes c + (x - c) r / ||x - c|| before its SAE encodes it: c the SAE's "
                  f"b_dec, r {ref}'s centred RMS at the layer. A gap left here is in the residual's direction, not its "
                  "scale (docs/method.md §1c).", "",
                  *disparity_table(summary, "disparity_pct_norm_matched", "disparity_p_holm_norm_matched"), ""]
    if summary["aggregate"] == "token" and summary.get("disparity_pct_sentence") is not None:
        lines += ["## Sentence aggregate (every sentence weighs the same)", "",
                  *disparity_table(summary, "disparity_pct_sentence", None), ""]
    if summary.get("warnings"):
        lines += ["## Warnings", "", *[f"- {warning}" for warning in summary["warnings"]], ""]
    return "\n".join(lines)
