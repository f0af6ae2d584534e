"""The write-up's numbers for experiments/gemma3_270m_map (the map under 3 SAE seeds, and the SAE-mix question), from
the committed copies in results/ only.

After the run: `python experiments/gemma3_270m_map/tables.py copy` copies exactly the files of `COPY` from
outputs/gemma3_270m_map/ into results/ (and nothing else); `python experiments/gemma3_270m_map/tables.py > \
experiments/gemma3_270m_map/results.md` writes every table; the README's marked blocks call the functions below
(mlalign/docs_numbers.py). Each function takes the results folder as its one optional argument (tests pass their own).

Why these files and not the per-seed `analysis/sae_seed_<s>/summary.json`: `sae_seeds.json` already holds every
seed's `disparity_pct` and sentence CI per cell (docs/method.md §9), and each map summary is ~0.3 MB (18 layers x 10
languages x every metric with CIs); they stay in outputs/. What the control tables read from them (the companions,
residual norm, FVU, tokens per sentence) `copy` extracts into `map/controls.json`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUTS = Path("outputs/gemma3_270m_map")
"""run.sh's $OUT (relative to the repository root)."""

COPY = {
    "map/sae_seeds.json": "map/analysis/sae_seeds.json",
    "map/sae_seeds_heatmap.png": "map/analysis/sae_seeds_heatmap.png",
    "mix_english_heavy/sae_seeds.json": "mix_english_heavy/analysis/sae_seeds.json",
    "saes_balanced/fidelity.json": "saes_balanced/saes/fidelity.json",
    "saes_balanced/train_data.json": "saes_balanced/saes/train_data.json",
    "saes_english_heavy/fidelity.json": "saes_english_heavy/saes/fidelity.json",
    "saes_english_heavy/train_data.json": "saes_english_heavy/saes/train_data.json",
}
"""{destination under results/: source under outputs/gemma3_270m_map/}. The heatmap is for the README to show; no
function reads it."""
CONTROLS = "map/controls.json"
"""Written by `copy` from the per-seed summaries (`extract_controls`): the analysis's controls per cell and seed."""
DEPTH_COPY = {
    "map_depth/sae_seeds.json": "map_depth/analysis/sae_seeds.json",
    "saes_balanced_depth/fidelity.json": "saes_balanced_depth/saes/fidelity.json",
    "saes_balanced_depth/train_data.json": "saes_balanced_depth/saes/train_data.json",
}
"""The depth re-run (run.sh's depth_saes and depth_map parts): the layers whose SAEs missed issue 27's bar, trained
again with real_small's per-depth recipe (`sae_train.layer_overrides`) and analysed again on the same sentences and
seeds. Where these files exist, `seeds_map`, `controls` and `fidelity('balanced')` take those layers from them
(`replace_layers`): every other layer's cells and SAEs are the first run's."""
DEPTH_CONTROLS = "map_depth/controls.json"
DEPTH_HEATMAP = "map_depth/merged_heatmap.png"
"""The map's heatmap redrawn by `copy depth` from the merged cells (results/map/sae_seeds_heatmap.png is the first
run's)."""
DEPTH_SWEEP = "depth_sweep"
"""results/depth_sweep/<candidate>/{fidelity,train_data}.json: the dev-split sweep that chose the per-depth recipe
(run.sh's depth_sweep part; `depth_sweep_table`)."""

MIXES = {"balanced": "balanced", "english_heavy": "English-heavy"}
MIX_LAYERS = ("3", "9")
"""The layers the mix question is asked at (run.sh's MIX_LAYERS, fixed by experiments/gemma3_270m's (b))."""
STARVED_LANG = "hi"
STARVATION_BAR_FVU = 0.30
"""Fixed in the README before any result: Hindi's held-out FVU at the mix layers is at most this for every seed of
both mixes, else the English-heavy SAEs are retrained with sae_train.tokens=250000 before any mix result is read."""
STUDY_TIER = "medium_low"
"""The study's figures are about its medium-to-low resource languages (id, ca, mr, ml, hi); ours are taken over the
same tier."""
STUDY = {"early": "up to ~26% lower", "middle": "not reported", "deep": "~20% lower"}
"""Gemma-2-2B with Gemma Scope; the study publishes no definition of the quantity."""


# ------------------------------------------------------------------------------------------------------- files


def _load(name: str, results: Path = RESULTS) -> dict:
    path = Path(results) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: after the run, `python experiments/gemma3_270m_map/tables.py copy`"
                                f" copies it from {OUTPUTS / COPY[name]}")
    return json.loads(path.read_text())


def _has_depth_rerun(results: Path) -> bool:
    return all((Path(results) / name).exists() for name in (*DEPTH_COPY, DEPTH_CONTROLS))


def depth_layers(results: Path = RESULTS) -> list[int]:
    """The layers the depth re-run replaced (none before it)."""
    return [int(layer) for layer in _load("map_depth/sae_seeds.json", results)["layers"]] \
        if _has_depth_rerun(results) else []


def seeds_map(results: Path = RESULTS) -> dict:
    """The map's analysis/sae_seeds.json (all 18 layers, balanced SAEs, 3 seeds), with the depth re-run's layers in
    place of the first run's where it exists (`mlalign.analysis.sae_seeds.replace_layers`)."""
    first = _load("map/sae_seeds.json", results)
    if not _has_depth_rerun(results):
        return first
    from mlalign.analysis.sae_seeds import replace_layers

    return replace_layers(first, _load("map_depth/sae_seeds.json", results))


def seeds_mix(results: Path = RESULTS) -> dict:
    """The English-heavy SAEs' analysis/sae_seeds.json (layers 3 and 9, 3 seeds, the same sentences)."""
    return _load("mix_english_heavy/sae_seeds.json", results)


def fidelity(mix: str, results: Path = RESULTS, merged: bool = True) -> dict:
    """task=train_saes's fidelity.json for one mix ('balanced' or 'english_heavy'); the balanced mix's with the depth
    re-run's layer records in place of the first run's where it exists (merged=False: the first run's alone)."""
    table = _load(f"saes_{mix}/fidelity.json", results)
    if mix == "balanced" and merged and _has_depth_rerun(results):
        table = {**table, **_load("saes_balanced_depth/fidelity.json", results)}
    return table


def train_data(mix: str, results: Path = RESULTS) -> dict:
    return _load(f"saes_{mix}/train_data.json", results)


def _seed_summaries(out: Path, part: str = "map") -> list[Path]:
    """The map's (or another analysis part's) per-seed summaries (analysis/sae_seed_<s>/summary.json), by seed."""
    return sorted((Path(out) / part / "analysis").glob("sae_seed_*/summary.json"),
                  key=lambda path: int(path.parent.name.rsplit("_", 1)[1]))


def extract_controls(summaries: dict[int, dict]) -> dict:
    """`map/controls.json`: the analysis's controls per cell and SAE seed, from each seed's summary.json ({seed:
    summary}): the token disparity and its two companions (`sentence`: each sentence's mean first, so long
    sentences weigh no more; `position_matched`: only positions every language reaches), the residual norm's
    disparity vs the reference (uncentred mean ||x||), and the SAE's held-out FVU on the analysed text (`fvu`
    centred on each language's mean; `fvu_raw` over ||x||²), the reference's included; plus each language's tokens
    per sentence and share of truncated sentences (the same sentences under every seed: seed 0's)."""
    from mlalign.analysis.metrics import disparity_pct

    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    ref, layers = first["reference_lang"], [str(layer) for layer in first["layers"]]

    def per_seed(get):
        return {str(s): get(summaries[s]) for s in seeds}

    cells = {}
    for lang in first["langs"]:
        cells[lang] = {}
        for layer in layers:
            cell = {"fvu": per_seed(lambda d: d["values"][lang][layer].get("fvu")),
                    "fvu_raw": per_seed(lambda d: d["values"][lang][layer].get("fvu_raw"))}
            if lang != ref:
                cell.update({
                    "token": per_seed(lambda d: d["disparity_pct"][lang][layer]),
                    "sentence": per_seed(lambda d: (d.get("disparity_pct_sentence") or {}).get(lang, {}).get(layer)),
                    "position_matched": per_seed(
                        lambda d: (d.get("disparity_pct_position_matched") or {}).get(lang, {}).get(layer)),
                    "resid_norm_pct": per_seed(lambda d: disparity_pct(d["values"][lang][layer]["resid_norm"],
                                                                       d["values"][ref][layer]["resid_norm"]))})
            cells[lang][layer] = cell
    stats = first["corpus_stats"]
    return {"seeds": seeds, "reference_lang": ref, "metric": first["metric"], "layers": first["layers"],
            "langs": first["langs"], "bands": first["bands"], "position_cap": first.get("position_cap"),
            "n_sentences": first["n_sentences"],
            "tokens_per_sentence": {lang: stats[lang]["tokens_per_sentence"] for lang in first["langs"]},
            "truncated_pct": {lang: stats[lang]["truncated_pct"] for lang in first["langs"]}, "cells": cells}


def _copy_part(out: Path, results: Path, files: dict[str, str], part: str, controls_file: str, parts_said: str
               ) -> list[Path]:
    """Copy `files` ({destination: source}) from a finished run's folder into results/ and write `controls_file` from
    the analysis part's per-seed summaries (`extract_controls`); writes nothing if any source is missing."""
    missing = [str(Path(out) / source) for source in files.values() if not (Path(out) / source).exists()]
    summaries = _seed_summaries(out, part)
    if not summaries:
        missing.append(str(Path(out) / part / "analysis" / "sae_seed_<s>" / "summary.json"))
    if missing:
        raise FileNotFoundError(f"not there ({parts_said}): " + ", ".join(missing))
    controls_ = extract_controls({int(path.parent.name.rsplit("_", 1)[1]): json.loads(path.read_text())
                                  for path in summaries})
    written = []
    for destination, source in files.items():
        target = Path(results) / destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out) / source, target)
        written.append(target)
    target = Path(results) / controls_file
    target.write_text(json.dumps(controls_, indent=1) + "\n")
    return [*written, target]


def copy(out: Path = OUTPUTS, results: Path = RESULTS) -> list[Path]:
    """Copy every file of COPY from a finished run's folder into results/, and write `map/controls.json` from the
    map's per-seed summaries (`extract_controls`); writes nothing if any source is missing."""
    return _copy_part(out, results, COPY, "map", CONTROLS, "has every part of run.sh finished?")


def copy_depth(out: Path = OUTPUTS, results: Path = RESULTS) -> list[Path]:
    """The depth re-run's files (`DEPTH_COPY`, `DEPTH_CONTROLS` from its per-seed summaries) into results/, and the
    merged map's heatmap (`DEPTH_HEATMAP`); writes nothing if any source is missing."""
    written = _copy_part(out, results, DEPTH_COPY, "map_depth", DEPTH_CONTROLS,
                         "have run.sh's depth_saes and depth_map finished?")
    return [*written, merged_heatmap(results)]


def merged_heatmap(results: Path = RESULTS) -> Path:
    """The heatmap of the merged map (`seeds_map`), drawn as task=analyze draws sae_seeds_heatmap.png."""
    from mlalign.analysis.plots import plot_disparity_heatmap
    from mlalign.analysis.sae_seeds import heatmap_view

    spread = seeds_map(results)
    header = {"langs": [spread["reference_lang"], *spread["langs"]], "model": "gemma3_270m_pypi",
              "sae": f"real_small (layers {', '.join(map(str, depth_layers(results)))}: per-depth recipe)"}
    view, marked = heatmap_view(spread, {**spread, **header})
    return plot_disparity_heatmap(view, Path(results) / DEPTH_HEATMAP, marked=marked,
                                  what="mean over SAE seeds, hatched: sign depends on the seed")


def copy_sweep(out: Path = OUTPUTS, results: Path = RESULTS) -> list[Path]:
    """Every finished candidate of run.sh's depth_sweep part (its fidelity.json and train_data.json) into
    results/depth_sweep/<candidate>/."""
    written = []
    for fidelity_file in sorted((Path(out) / DEPTH_SWEEP).glob("*/saes/fidelity.json")):
        name = fidelity_file.parent.parent.name
        for file in ("fidelity.json", "train_data.json"):
            target = Path(results) / DEPTH_SWEEP / name / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fidelity_file.parent / file, target)
            written.append(target)
    if not written:
        raise FileNotFoundError(f"no finished candidate under {Path(out) / DEPTH_SWEEP}: run run.sh depth_sweep")
    return written


# ------------------------------------------------------------------------------------------------------ helpers


def _tier(lang: str) -> str:
    from mlalign.languages import LANGUAGES

    return LANGUAGES[lang].tier if lang in LANGUAGES else "unknown"


def _counted(cell: dict) -> bool:
    """The cells sae_seeds.json counts: every seed's SAE fits there and every seed defines the disparity."""
    return bool(cell["fit"]) and cell["sign_stable"] is not None


def _band_layers(spread: dict, band: str) -> list[str]:
    return [str(layer) for layer in spread["bands"][band]]


def _band_label(spread: dict, band: str) -> str:
    layers = spread["bands"][band]
    return f"{band} ({min(layers)}-{max(layers)})" if len(layers) > 1 else f"{band} ({layers[0]})"


def _mean(values) -> float | None:
    values = list(values)
    return statistics.mean(values) if values else None


def _pct(value: float | None, spec: str = "+.1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _definition(spread: dict) -> str:
    over = "over analysed tokens" if spread["aggregate"] == "token" else f"{spread['aggregate']} aggregate"
    return f"no: study publishes none; ours is {spread['metric']} {over}, BOS dropped"


# ------------------------------------------------------------------------------------------------- 1. the map


def _band_cell(cells: list[dict]) -> str:
    counted = [cell for cell in cells if _counted(cell)]
    left_out = len(cells) - len(counted)
    if not counted:
        return f"n/a (0/0, {left_out} left out)"
    mean = _mean(cell["mean_disparity_pct"] for cell in counted)
    stable = sum(bool(cell["sign_stable"]) for cell in counted)
    return f"{mean:+.1f} ({stable}/{len(counted)}" + (f", {left_out} left out)" if left_out else ")")


def headline_table(results: Path = RESULTS) -> str:
    """Per language and band: the seed-mean disparity averaged over the band's layers, and (k/n) how many of those
    cells keep their sign under every SAE seed; then each tier over its languages' cells."""
    spread = seeds_map(results)
    bands, cells = list(spread["bands"]), spread["cells"]
    lines = ["| lang | tier | " + " | ".join(_band_label(spread, band) for band in bands) + " |",
             "| --- | --- |" + " --- |" * len(bands)]
    for lang in spread["langs"]:
        lines.append(f"| {lang} | {_tier(lang)} | " + " | ".join(
            _band_cell([cells[lang][layer] for layer in _band_layers(spread, band)]) for band in bands) + " |")
    for tier, name in (("high", "high"), ("medium_low", "medium-to-low")):
        langs = [lang for lang in spread["langs"] if _tier(lang) == tier]
        if langs:
            lines.append(f"| {name}: {', '.join(langs)} | all cells | " + " | ".join(
                _band_cell([cells[lang][layer] for lang in langs for layer in _band_layers(spread, band)])
                for band in bands) + " |")
    n = len(spread["seeds"])
    lines += ["", f"`disparity_pct` of `{spread['metric']}` vs {spread['reference_lang']}, the mean over {n} SAE seeds "
              f"averaged over the band's layers (tier rows: over all their languages' cells); (k/n): k of the n "
              f"counted cells keep their sign under all {n} seeds; left out: some seed's SAE does not fit there or "
              "leaves the value undefined."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ 1b. the controls


def controls(results: Path = RESULTS) -> dict:
    """map/controls.json, with the depth re-run's layers in place of the first run's where it exists."""
    first = _load(CONTROLS, results)
    if not _has_depth_rerun(results):
        return first
    rerun = _load(DEPTH_CONTROLS, results)
    for key in ("seeds", "reference_lang", "metric", "langs", "n_sentences"):
        if rerun[key] != first[key]:
            raise ValueError(f"{DEPTH_CONTROLS} has {key}={rerun[key]!r}, {CONTROLS} {first[key]!r}")
    replaced = {str(layer) for layer in rerun["layers"]}
    cells = {lang: {layer: (rerun if layer in replaced else first)["cells"][lang][layer] for layer in by_layer}
             for lang, by_layer in first["cells"].items()}
    return {**first, "cells": cells}


def _seed_mean(per_seed: dict) -> float | None:
    values = list(per_seed.values())
    return statistics.mean(values) if values and all(isinstance(v, (int, float)) and v == v for v in values) else None


def _band_mean(ctl: dict, lang: str, layers: list[str], key: str) -> float | None:
    means = [_seed_mean(ctl["cells"][lang][layer][key]) for layer in layers]
    return _mean(means) if means and all(m is not None for m in means) else None


def controls_table(results: Path = RESULTS) -> str:
    """Per language and band (seed means, averaged over the band's layers): the token disparity beside its two
    companions and the residual norm's disparity, and the SAE's FVU on that language's analysed text beside
    English's: a gap the companions do not share is a length or position effect; a gap the residual norm shares is
    scale; a gap where the SAE fits the language much worse may be the SAE's."""
    ctl, spread = controls(results), seeds_map(results)
    ref = ctl["reference_lang"]
    lines = [f"| lang | tokens per sentence (truncated) | band | token (the map) | sentence aggregate | position-matched "
             f"| residual norm | FVU, lang / {ref} |", "| --- " * 8 + "|"]
    for lang in spread["langs"]:
        for i, band in enumerate(spread["bands"]):
            layers = _band_layers(spread, band)
            length = (f"{ctl['tokens_per_sentence'][lang]:.1f} ({ctl['truncated_pct'][lang]:.0f}%)" if i == 0 else "")
            fvu, fvu_ref = _band_mean(ctl, lang, layers, "fvu"), _band_mean(ctl, ref, layers, "fvu")
            lines.append(f"| {lang if i == 0 else ''} | {length} | {_band_label(spread, band)} | "
                         + " | ".join(f"{_pct(_band_mean(ctl, lang, layers, key))}%"
                                      for key in ("token", "sentence", "position_matched", "resid_norm_pct"))
                         + f" | {_pct(fvu, '.3f')} / {_pct(fvu_ref, '.3f')} |")
    lines += ["", f"{ref}: {ctl['tokens_per_sentence'][ref]:.1f} tokens per sentence "
              f"({ctl['truncated_pct'][ref]:.0f}% truncated). Disparities vs {ref} in %, the mean over "
              f"{len(ctl['seeds'])} SAE seeds averaged over the band's layers. Sentence aggregate: each sentence's "
              "mean first; position-matched: only token positions every language reaches"
              + (f" (up to {ctl['position_cap']})" if ctl.get("position_cap") else "")
              + "; residual norm: the disparity of the uncentred mean ||x|| per token (uncentred, so where a "
              "near-constant component dominates the norm it barely moves even if the content does); FVU: the SAE's "
              "on the analysed (test) text, centred on each language's mean."]
    return "\n".join(lines)


def _stable_deficits(spread: dict, langs: list[str], layers: list[str]) -> list[tuple[str, str]]:
    """(lang, layer) of the counted cells whose seed-mean disparity is below 0 under every seed's sign."""
    return [(lang, layer) for lang in langs for layer in layers
            if _counted(spread["cells"][lang][layer]) and spread["cells"][lang][layer]["sign_stable"]
            and spread["cells"][lang][layer]["mean_disparity_pct"] < 0]


def _scale_flag(ctl: dict, spread: dict, lang: str, layer: str) -> bool:
    """The analysis's own scale flag on the seed means: the residual norm lower by at least half the gap."""
    from mlalign.analysis.summary import MODEL_LEVEL_FRACTION

    norm, gap = _seed_mean(ctl["cells"][lang][layer]["resid_norm_pct"]), spread["cells"][lang][layer]["mean_disparity_pct"]
    return norm is not None and norm < 0 and abs(norm) >= MODEL_LEVEL_FRACTION * abs(gap)


def controls_summary(results: Path = RESULTS) -> str:
    """Over the map's counted cells with a sign-stable seed-mean deficit (< 0): how many keep it under both
    companions, how many the residual norm could explain (same direction, at least half as large: the analysis's
    own flag), and how many the SAE fits markedly worse than English (FVU ratio above the analysis's flag)."""
    from mlalign.analysis.summary import FVU_ARTEFACT_RATIO

    ctl, spread = controls(results), seeds_map(results)
    ref = ctl["reference_lang"]
    deficits = _stable_deficits(spread, spread["langs"], [str(layer) for layer in spread["layers"]])
    both, scale, worse_fit = 0, 0, 0
    for lang, layer in deficits:
        cell = ctl["cells"][lang][layer]
        sentence, position = _seed_mean(cell["sentence"]), _seed_mean(cell["position_matched"])
        both += sentence is not None and position is not None and sentence < 0 and position < 0
        scale += _scale_flag(ctl, spread, lang, layer)
        fvu, fvu_ref = _seed_mean(cell["fvu"]), _seed_mean(ctl["cells"][ref][layer]["fvu"])
        worse_fit += fvu is not None and fvu_ref is not None and fvu_ref > 0 and fvu > FVU_ARTEFACT_RATIO * fvu_ref
    n = len(deficits)
    return (f"of the {n} cells with a deficit whose sign holds under every SAE seed, {both} keep it under both "
            f"companions (sentence aggregate and position-matched), the residual norm is lower by at least half as "
            f"much in {scale}, and the SAE's FVU on the language is more than {FVU_ARTEFACT_RATIO}x English's in "
            f"{worse_fit}")


# ------------------------------------------------------------------------------------------- 2. sign stability


def n_sign_stable(results: Path = RESULTS) -> str:
    """'k of n': the map's cells whose sign holds under every SAE seed, of the cells counted."""
    spread = seeds_map(results)
    return f"{spread['n_sign_stable']} of {spread['n_cells']}"


def sign_stability(results: Path = RESULTS) -> str:
    """One paragraph: sign-stable cells of all, with CIs, by band, and where the sign depends on the seed."""
    spread = seeds_map(results)
    seeds = spread["seeds"]
    text = (f"{spread['n_sign_stable']} of {spread['n_cells']} (language, layer) cells keep the sign of their "
            f"disparity under all {len(seeds)} SAE seeds ({', '.join(map(str, seeds))})")
    if spread["n_ci_sign_stable"] is not None:
        text += (f"; in {spread['n_ci_sign_stable']} of them every seed's {100 * spread['ci']:.0f}% sentence CI "
                 "excludes 0 on the same side")
    if spread["n_cells_left_out"]:
        text += (f"; {spread['n_cells_left_out']} cell(s) left out (some seed's SAE does not fit there, or leaves the "
                 "value undefined)")
    text += ". By band: " + ", ".join(f"{_band_label(spread, band)} {counts['n_sign_stable']} of {counts['n_cells']}"
                                      for band, counts in spread["by_band"].items()) + "."
    unstable = spread["sign_unstable"]
    if unstable:
        text += " The sign depends on the seed at " + ", ".join(
            f"{lang} layer {layer} ({spread['cells'][lang][str(layer)]['seed_range'][0]:+.1f} to "
            f"{spread['cells'][lang][str(layer)]['seed_range'][1]:+.1f}%)" for lang, layer in unstable) + "."
    return text


# -------------------------------------------------------------------------------------- 3. against the study


def most_negative(spread: dict, band: str, tier: str = STUDY_TIER) -> tuple[str, str, dict] | None:
    """(lang, layer, cell) of the lowest seed-mean disparity among the tier's counted cells in the band."""
    found = [(lang, layer, spread["cells"][lang][layer]) for lang in spread["langs"] if _tier(lang) == tier
             for layer in _band_layers(spread, band) if _counted(spread["cells"][lang][layer])]
    return min(found, key=lambda item: item[2]["mean_disparity_pct"]) if found else None


def study_table(results: Path = RESULTS) -> str:
    """The study's figures beside ours per band: ours is the most negative seed-mean cell of the medium-to-low
    languages (with its seed range and whether its sign holds under every seed) and the tier's mean over the band."""
    spread = seeds_map(results)
    n = len(spread["seeds"])
    lines = ["| band | the study (Gemma-2-2B, Gemma Scope) | ours: most negative seed-mean cell, medium-to-low "
             f"(Gemma 3 270M, {n} SAE seeds) | its seed range | its sign under every seed | ours: medium-to-low mean "
             "over the band | same definition? |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for band in spread["bands"]:
        worst = most_negative(spread, band)
        tier = tier_band_seeds(spread, band)
        mean = None if tier is None else tier["mean"]
        if worst is None:
            ours, where, kept = "n/a", "n/a", "n/a"
        else:
            lang, layer, cell = worst
            ours = f"{cell['mean_disparity_pct']:+.1f}% ({lang}, layer {layer})"
            where = f"{cell['seed_range'][0]:+.1f} to {cell['seed_range'][1]:+.1f}%"
            kept = "kept" if cell["sign_stable"] else "depends on the seed"
        lines.append(f"| {_band_label(spread, band)} | {STUDY.get(band, 'not reported')} | {ours} | {where} | {kept} | "
                     f"{_pct(mean)}% | {_definition(spread)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the answer


def tier_band_seeds(spread: dict, band: str, tier: str = STUDY_TIER) -> dict | None:
    """The tier's mean disparity over the band's counted cells: the mean over seeds, and each seed's own mean (the
    whole band analysed with that seed's SAEs), whose range is the band mean's spread across SAE seeds."""
    cells = [spread["cells"][lang][layer] for lang in spread["langs"] if _tier(lang) == tier
             for layer in _band_layers(spread, band) if _counted(spread["cells"][lang][layer])]
    if not cells:
        return None
    per_seed = {seed: statistics.mean(cell["disparity_pct"][seed] for cell in cells) for seed in cells[0]["disparity_pct"]}
    return {"mean": statistics.mean(cell["mean_disparity_pct"] for cell in cells), "per_seed": per_seed,
            "range": [min(per_seed.values()), max(per_seed.values())], "n_cells": len(cells),
            "n_sign_stable": sum(bool(cell["sign_stable"]) for cell in cells)}


def scale_explained(band: str, results: Path = RESULTS, tier: str = STUDY_TIER) -> tuple[int, int]:
    """(k, n): of the tier's n sign-stable deficits in the band, k where the residual norm is lower by at least half
    as much (the analysis's own scale flag, on the seed means)."""
    ctl, spread = controls(results), seeds_map(results)
    cells = _stable_deficits(spread, [lang for lang in spread["langs"] if _tier(lang) == tier],
                             _band_layers(spread, band))
    return sum(_scale_flag(ctl, spread, lang, layer) for lang, layer in cells), len(cells)


def answer(results: Path = RESULTS) -> str:
    """The map's answer in one sentence: the medium-to-low tier's mean disparity per band with its range over SAE
    seeds, the most negative cell with its sentence CIs, and the weakest point (how many of the worst band's deficits
    the residual norm could explain, and where the norm-matched run measured it, what it found)."""
    spread = seeds_map(results)
    bands = {band: tier_band_seeds(spread, band) for band in spread["bands"]}
    bands = {band: value for band, value in bands.items() if value is not None}
    worst_band = min(bands, key=lambda band: bands[band]["mean"])
    parts = [f"{_band_label(spread, band)} {value['mean']:+.1f}% ({value['range'][0]:+.1f} to {value['range'][1]:+.1f} "
             f"across seeds; {value['n_sign_stable']} of {value['n_cells']} cells sign-stable)"
             for band, value in bands.items()]
    text = (f"Against {spread['reference_lang']}, the medium-to-low resource languages' SAE activations differ by "
            + ", ".join(parts) + f" on average over each band's layers ({len(spread['seeds'])} SAE seeds)")
    worst = most_negative(spread, worst_band)
    if worst is not None:
        lang, layer, cell = worst
        cis = [ci for ci in cell["disparity_ci"].values() if ci]
        ci = f", every seed's 95% sentence CI within {min(c[0] for c in cis):+.1f} to {max(c[1] for c in cis):+.1f}%" if cis else ""
        text += f", most negative at {lang} layer {layer} ({cell['mean_disparity_pct']:+.1f}%{ci})"
    k, n = scale_explained(worst_band, results)
    text += (f"; its weakest point: in {k} of the tier's {n} sign-stable {worst_band} deficits the residual stream's own "
             "norm is lower by at least half as much, so there the gap may be the residual's scale rather than what its "
             "features represent")
    if (Path(results) / NORM).exists():
        table = _load(NORM, results)
        counts = norm_counts(results=results)
        layers = f"{min(table['layers'])}-{max(table['layers'])}"
        raw, matched = norm_tier_means(results)
        text += (f"; measured with the centred, norm-matched disparity at layers {layers}, {counts['beyond the scale']} of "
                 f"the tier's {sum(counts.values())} deficits there are beyond the scale, i.e. in the residual's "
                 f"direction ({counts['mixed']} mixed, {counts['scale']} scale alone; the tier's mean there "
                 f"{raw:+.1f}% raw, {matched:+.1f}% norm-matched)")
        measured = [band for band, band_layers in spread["bands"].items() if set(band_layers) & set(table["layers"])]
        missing = sorted({layer for band in measured for layer in spread["bands"][band]} - set(table["layers"]))
        if missing:
            text += (f"; layers {', '.join(map(str, missing))} of the {' and '.join(measured)} band were not measured "
                     "this way")
    return text


# --------------------------------------------------------------------------------------- 4. the starvation bar


def _seed_values(row: dict, lang: str) -> dict[str, float | None]:
    """{seed: held-out FVU of lang} from one fidelity.json layer row (a single-seed row is its own seed 0)."""
    records = row.get("seeds") or {"0": row}
    return {seed: record["per_lang"][lang]["fvu"] for seed, record in records.items()}


def starvation_rows(results: Path = RESULTS) -> list[dict]:
    """One row per (mix, layer, seed): Hindi's held-out FVU and whether it meets the bar."""
    rows = []
    for mix in MIXES:
        table = fidelity(mix, results)
        for layer in MIX_LAYERS:
            if layer not in table:
                raise KeyError(f"saes_{mix}/fidelity.json has no layer {layer} (it has {', '.join(table)})")
            for seed, fvu in _seed_values(table[layer], STARVED_LANG).items():
                rows.append({"mix": mix, "layer": layer, "seed": seed, "fvu": fvu,
                             "passed": fvu is not None and fvu <= STARVATION_BAR_FVU})
    return rows


def starvation_passed(results: Path = RESULTS) -> bool:
    return all(row["passed"] for row in starvation_rows(results))


def _hindi_tokens(mix: str, results: Path) -> str:
    data = train_data(mix, results)
    quota, unique = data["tokens_per_lang"][STARVED_LANG], data["unique_tokens_per_lang"][STARVED_LANG]
    return f"{quota}" + (f" ({unique} distinct, repeated)" if unique < quota else "")


def starvation_check(results: Path = RESULTS) -> str:
    """'passed: ...' or 'FAILED: ...', one sentence, against the bar fixed before the run."""
    rows = starvation_rows(results)
    what = (f"{STARVED_LANG}'s held-out FVU at layers {' and '.join(MIX_LAYERS)}, every seed of both mixes "
            f"(training tokens of {STARVED_LANG}: " + ", ".join(f"{name} {_hindi_tokens(mix, results)}"
                                                             for mix, name in MIXES.items())
            + f"), against the bar {STARVATION_BAR_FVU:.2f} fixed before the run")
    misses = [row for row in rows if not row["passed"]]
    if not misses:
        worst = max(rows, key=lambda row: row["fvu"])
        return (f"passed: {what}; the worst is {worst['fvu']:.3f} ({MIXES[worst['mix']]}, layer {worst['layer']}, "
                f"seed {worst['seed']})")
    named = ", ".join(f"{MIXES[row['mix']]} layer {row['layer']} seed {row['seed']}: "
                      f"{'none' if row['fvu'] is None else format(row['fvu'], '.3f')}" for row in misses)
    return (f"FAILED: {what}; over the bar: {named}. As fixed in advance, the English-heavy SAEs are retrained with "
            "sae_train.tokens=250000 before any mix result is read")


def starvation_table(results: Path = RESULTS) -> str:
    """Per mix and mix layer: Hindi's held-out FVU under each seed, the worst, and whether it meets the bar."""
    rows = starvation_rows(results)
    seeds = sorted({row["seed"] for row in rows}, key=int)
    lines = [f"| mix | {STARVED_LANG} training tokens | layer | " + " | ".join(f"seed {s}" for s in seeds)
             + f" | worst | ≤ {STARVATION_BAR_FVU:.2f} |", "| --- | --- | --- |" + " --- |" * (len(seeds) + 2)]
    for mix, name in MIXES.items():
        for layer in MIX_LAYERS:
            mine = {row["seed"]: row for row in rows if row["mix"] == mix and row["layer"] == layer}
            values = [mine[s]["fvu"] for s in seeds if s in mine and mine[s]["fvu"] is not None]
            lines.append(f"| {name} | {_hindi_tokens(mix, results)} | {layer} | " + " | ".join(
                _pct(mine[s]["fvu"], ".3f") if s in mine else "–" for s in seeds) + f" | "
                f"{_pct(max(values) if values else None, '.3f')} | "
                f"{'yes' if all(row['passed'] for row in mine.values()) else 'no'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ 5. the mixes


def _check_comparable(balanced: dict, heavy: dict) -> None:
    for key in ("reference_lang", "metric", "aggregate", "ci", "bootstrap", "seeds"):
        if balanced[key] != heavy[key]:
            raise ValueError(f"the map has {key}={balanced[key]!r} and the English-heavy analysis {heavy[key]!r}: "
                             "the mix table compares like with like only")


def mix_difference(balanced: dict, heavy: dict) -> dict | None:
    """English-heavy minus balanced for one cell: the difference of the seed means and its range over every pairing
    of a balanced seed with an English-heavy seed (the two mixes' seeds are not paired: same torch seed, other data)."""
    if balanced["mean_disparity_pct"] is None or heavy["mean_disparity_pct"] is None:
        return None
    pairs = [h - b for h in heavy["disparity_pct"].values() for b in balanced["disparity_pct"].values()]
    return {"difference": heavy["mean_disparity_pct"] - balanced["mean_disparity_pct"],
            "pair_range": [min(pairs), max(pairs)], "n_pairs": len(pairs)}


def _mean_sd(cell: dict) -> str:
    if cell["mean_disparity_pct"] is None:
        return "n/a"
    return f"{cell['mean_disparity_pct']:+.1f} ± {cell['seed_sd']:.1f}" + ("" if cell["fit"] else " †")


def mix_table(results: Path = RESULTS) -> str:
    """Per language at the mix layers: the map's (balanced) cell beside the English-heavy one (seed mean ± seed SD),
    their difference with its range over the seed pairs, each side's mean sentence-CI half-width and each mix's
    held-out FVU of that language. Headed by a warning when the starvation bar failed."""
    balanced, heavy = seeds_map(results), seeds_mix(results)
    _check_comparable(balanced, heavy)
    fvu = {mix: fidelity(mix, results) for mix in MIXES}
    n = len(heavy["seeds"])
    lines = [] if starvation_passed(results) else [
        f"**Not to be read: the starvation bar failed** ({starvation_check(results)}).", ""]
    lines += ["| layer | lang | balanced: seed mean ± SD | English-heavy: seed mean ± SD | "
              f"English-heavy − balanced | its range over the {n * len(balanced['seeds'])} seed pairs | "
              "mean sentence-CI half-width, balanced / English-heavy | held-out FVU, balanced / English-heavy |",
              "| --- " * 8 + "|"]
    for layer in MIX_LAYERS:
        for lang in heavy["langs"]:
            b, h = balanced["cells"][lang][layer], heavy["cells"][lang][layer]
            diff = mix_difference(b, h)
            spread = "n/a" if diff is None else f"{diff['pair_range'][0]:+.1f} to {diff['pair_range'][1]:+.1f}"
            lines.append(
                f"| {layer} | {lang} | {_mean_sd(b)} | {_mean_sd(h)} | "
                f"{'n/a' if diff is None else format(diff['difference'], '+.1f')} | {spread} | "
                f"{_pct(b['sentence_ci_halfwidth'], '.1f')} / {_pct(h['sentence_ci_halfwidth'], '.1f')} | "
                f"{_pct(fvu['balanced'][layer]['per_lang'][lang]['fvu'], '.3f')} / "
                f"{_pct(fvu['english_heavy'][layer]['per_lang'][lang]['fvu'], '.3f')} |")
    lines += ["", f"`disparity_pct` of `{heavy['metric']}` vs {heavy['reference_lang']} in points, the same "
              f"{heavy['bootstrap']}-resample sentence bootstrap on both sides; FVU: the mean over {n} SAE seeds on "
              "the held-out (dev) text (fidelity.json); † some seed's SAE does not fit there. The difference has no "
              "sentence CI of its own (that needs the per-sentence values of both runs): each side's CI half-width "
              "is given beside it."]
    return "\n".join(lines)


def mix_shift(results: Path = RESULTS) -> str:
    """The mix's effect on the whole map at the mix layers, one clause: the range of English-heavy minus balanced over
    every language and mix layer, and the medium-to-low tier's range."""
    balanced, heavy = seeds_map(results), seeds_mix(results)
    _check_comparable(balanced, heavy)
    diffs = {(lang, layer): mix_difference(balanced["cells"][lang][layer], heavy["cells"][lang][layer])
             for layer in MIX_LAYERS for lang in heavy["langs"]}
    diffs = {key: value["difference"] for key, value in diffs.items() if value is not None}
    tier = [value for (lang, _), value in diffs.items() if _tier(lang) == STUDY_TIER]
    return (f"training the SAEs on an English-heavy mix instead of a balanced one moves every language's disparity at "
            f"layers {' and '.join(MIX_LAYERS)} by {min(diffs.values()):+.1f} to {max(diffs.values()):+.1f} points "
            f"(medium-to-low: {min(tier):+.1f} to {max(tier):+.1f}), with the same model, sentences and recipe")


def mix_hindi(layer: str | int, results: Path = RESULTS) -> str:
    """One sentence on Hindi at one mix layer: both disparities, their difference and its seed-pair range, both FVUs,
    and whether the English-heavy SAEs fit Hindi worse while showing a smaller deficit."""
    layer = str(layer)
    b, h = seeds_map(results)["cells"][STARVED_LANG][layer], seeds_mix(results)["cells"][STARVED_LANG][layer]
    diff = mix_difference(b, h)
    if diff is None:
        return f"at layer {layer} {STARVED_LANG}'s disparity is undefined under some seed"
    fb = fidelity("balanced", results)[layer]["per_lang"][STARVED_LANG]["fvu"]
    fh = fidelity("english_heavy", results)[layer]["per_lang"][STARVED_LANG]["fvu"]
    worse_fit, smaller_deficit = fh > fb, b["mean_disparity_pct"] < 0 and diff["difference"] > 0
    every_pair = diff["pair_range"][0] > 0
    reading = ("the English-heavy SAEs fit it worse and show a smaller deficit"
               + (" under every seed pairing" if every_pair else ", though not under every seed pairing")
               if worse_fit and smaller_deficit else
               f"the English-heavy SAEs {'fit it worse' if worse_fit else 'do not fit it worse'} and "
               f"{'show a smaller deficit' if smaller_deficit else 'show no smaller deficit'}")
    return (f"at layer {layer} {STARVED_LANG}'s disparity is {b['mean_disparity_pct']:+.1f}% with balanced SAEs and "
            f"{h['mean_disparity_pct']:+.1f}% with English-heavy ones (difference {diff['difference']:+.1f} points, "
            f"{diff['pair_range'][0]:+.1f} to {diff['pair_range'][1]:+.1f} over the {diff['n_pairs']} seed pairs); "
            f"held-out FVU {fb:.3f} balanced vs {fh:.3f} English-heavy: {reading}")


# -------------------------------------------------------------------------------------- 6. the SAEs' own bar

SAE_BAR = {"fvu": 0.20, "lang_fvu": 0.30, "dead_pct": 10.0}
"""Issue 27 item 1's bar for every SAE: held-out FVU pooled and per language, and dead features (the same bar as
experiments/gemma3_270m_saes/tables.py's BAR), checked here for every seed of the map's balanced SAEs."""


def sae_bar_misses(mix: str = "balanced", results: Path = RESULTS, merged: bool = True) -> list[str]:
    """Every miss of SAE_BAR among the mix's SAEs (layers x seeds), in words."""
    table = fidelity(mix, results, merged)
    misses = []
    for layer in sorted(table, key=int):
        for seed, record in (table[layer].get("seeds") or {"0": table[layer]}).items():
            if record["fvu"] > SAE_BAR["fvu"]:
                misses.append(f"layer {layer} seed {seed} pooled FVU {record['fvu']:.3f}")
            misses += [f"layer {layer} seed {seed} {lang} FVU {stats['fvu']:.3f}"
                       for lang, stats in record["per_lang"].items() if stats["fvu"] > SAE_BAR["lang_fvu"]]
            if record["dead_pct"] > SAE_BAR["dead_pct"]:
                misses.append(f"layer {layer} seed {seed} {record['dead_pct']:.1f}% dead")
    return misses


def n_first_run_misses(results: Path = RESULTS) -> str:
    """How many misses of the bar the first run's balanced SAEs had (before the depth re-run)."""
    return str(len(sae_bar_misses("balanced", results, merged=False)))


def sae_bar(mix: str = "balanced", results: Path = RESULTS, merged: bool = True) -> str:
    """One sentence: how many of the mix's SAEs (layers x seeds) meet the bar, and every miss (merged=False: the
    first run's SAEs, before the depth re-run)."""
    table = fidelity(mix, results, merged)
    n = sum(len(row.get("seeds") or {"0": row}) for row in table.values())
    misses = sae_bar_misses(mix, results, merged)
    bar = (f"pooled FVU <= {SAE_BAR['fvu']:g}, every language <= {SAE_BAR['lang_fvu']:g}, dead <= "
           f"{SAE_BAR['dead_pct']:g}%")
    if not misses:
        return f"all {n} SAEs meet the bar ({bar})"
    return f"{len(misses)} miss(es) of the bar ({bar}) over {n} SAEs: " + "; ".join(misses)


def map_cell(lang: str, layer: int | str, key: str = "mean_disparity_pct", spec: str = "+.1f",
             results: Path = RESULTS) -> str:
    """One value of the (merged) map's cell, formatted: what the README quotes of single cells."""
    return format(seeds_map(results)["cells"][lang][str(layer)][key], spec)


def map_statement(index: int, results: Path = RESULTS) -> str:
    """One of the (merged) map's statements (`seed_statements`)."""
    return seeds_map(results)["statements"][index]


def fidelity_value(layer: int | str, key: str, spec: str = "+.2f", results: Path = RESULTS) -> str:
    """One value of a balanced SAE layer record (the depth re-run's where it replaced the layer), formatted."""
    return format(fidelity("balanced", results)[str(layer)][key], spec)


# ------------------------------------------------------------------------------------------- the depth re-run


DEPTH_GROUPS = {"deep": ["deep_l0_128", "deep_e10"], "early": ["early_travel_1.2", "early_dw25"]}
"""The depth sweep's candidates per group of layers (run.sh's depth_sweep part; README.md 'The depth re-run')."""


def _bar_misses(record: dict) -> list[float]:
    """How far one SAE's record exceeds each part of SAE_BAR it misses (empty: it meets the bar)."""
    excess = [record["fvu"] - SAE_BAR["fvu"], *(stats["fvu"] - SAE_BAR["lang_fvu"]
                                                for stats in record["per_lang"].values()),
              (record["dead_pct"] - SAE_BAR["dead_pct"]) / 100]
    return [x for x in excess if x > 0]


def _seed_records(layer_record: dict) -> list[dict]:
    return list((layer_record.get("seeds") or {"0": layer_record}).values())


def depth_sweep(results: Path = RESULTS) -> dict[str, dict]:
    """{candidate: {"layers", "records" (every SAE's record), "misses", "worst_excess", "target_l0", "steps",
    "worst_dead_pct"}} for every committed candidate of the depth sweep."""
    out = {}
    for group in DEPTH_GROUPS.values():
        for name in group:
            folder = Path(results) / DEPTH_SWEEP / name
            if not (folder / "fidelity.json").exists():
                continue
            table = json.loads((folder / "fidelity.json").read_text())
            data = json.loads((folder / "train_data.json").read_text())
            records = [(int(layer), r) for layer, row in table.items() for r in _seed_records(row)]
            excess = [x for _, r in records for x in _bar_misses(r)]
            out[name] = {"layers": sorted({layer for layer, _ in records}), "records": records,
                         "misses": sum(bool(_bar_misses(r)) for _, r in records),
                         "worst_excess": max(excess, default=0.0), "target_l0": data["target_l0"],
                         "steps": data["steps"], "seconds": data["seconds"]["training_per_sae"],
                         "worst_dead_pct": max(r["dead_pct"] for _, r in records)}
    return out


def depth_choice(group: str, results: Path = RESULTS) -> tuple[str, bool] | None:
    """(the candidate the README's rule picks for the group, whether it meets the bar on every SAE it trained), or
    None before the group's candidates are all committed."""
    sweep = depth_sweep(results)
    names = DEPTH_GROUPS[group]
    if not all(name in sweep for name in names):
        return None
    passing = [name for name in names if sweep[name]["misses"] == 0]
    if passing:
        key = ((lambda n: (sweep[n]["target_l0"], sweep[n]["steps"])) if group == "deep"
               else (lambda n: sweep[n]["worst_dead_pct"]))
        return min(passing, key=key), True
    return min(names, key=lambda n: (sweep[n]["misses"], sweep[n]["worst_excess"])), False


def depth_shift(results: Path = RESULTS) -> str:
    """One sentence: how far re-training the depth layers' SAEs moved their cells' seed-mean disparity (every
    language), and the medium-to-low tier's mean over those layers before and after."""
    first = _load("map/sae_seeds.json", results)
    rerun = _load("map_depth/sae_seeds.json", results)
    layers = [str(layer) for layer in rerun["layers"]]
    shifts = {(lang, layer): rerun["cells"][lang][layer]["mean_disparity_pct"]
              - first["cells"][lang][layer]["mean_disparity_pct"]
              for lang in first["langs"] for layer in layers
              if _counted(first["cells"][lang][layer]) and _counted(rerun["cells"][lang][layer])}
    (lang, layer), largest = max(shifts.items(), key=lambda item: abs(item[1]))
    tier = [lang for lang in first["langs"] if _tier(lang) == STUDY_TIER]

    def tier_mean(spread, at):
        return _mean([spread["cells"][x][y]["mean_disparity_pct"] for x in tier for y in at
                      if _counted(spread["cells"][x][y])])

    parts = []
    for band in first["bands"]:
        at = [y for y in layers if y in _band_layers(first, band)]
        if at:
            label = f"layer {at[0]}" if len(at) == 1 else f"layers {', '.join(at)}"
            parts.append(f"{label} {_pct(tier_mean(first, at))}% before, {_pct(tier_mean(rerun, at))}% after")
    return (f"re-training layers {', '.join(layers)} moved their cells' seed-mean disparity by "
            f"{statistics.median(abs(v) for v in shifts.values()):.1f} points at the median cell (largest "
            f"{largest:+.1f}, {lang} layer {layer}, over {len(shifts)} cells); the medium-to-low tier's mean: "
            + "; ".join(parts))


def depth_sweep_table(results: Path = RESULTS) -> str:
    """One row per candidate SAE of the depth sweep: layer, seed, FVU, its worst language, L0, dead %, the bar."""
    lines = ["| candidate | layer | seed | FVU | worst language FVU | L0 | dead % | s per SAE | meets the bar |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, found in depth_sweep(results).items():
        for layer, record in found["records"]:
            worst = max(record["per_lang"], key=lambda lang: record["per_lang"][lang]["fvu"])
            seed = (record["torch_seed"] - layer) // 1000 if "torch_seed" in record else 0
            lines.append(f"| {name} | {layer} | {seed} | {record['fvu']:.3f} | "
                         f"{record['per_lang'][worst]['fvu']:.3f} ({worst}) | {record['l0']:.1f} | "
                         f"{record['dead_pct']:.1f} | {found['seconds']:.0f} | "
                         f"{'no' if _bar_misses(record) else 'yes'} |")
    for group in DEPTH_GROUPS:
        pick = depth_choice(group, results)
        if pick is not None:
            lines += ["", f"Chosen for the {group} group by the README's rule: {pick[0]}"
                          + ("" if pick[1] else " (no candidate meets the bar: the fewest misses, then the smallest "
                                                "excess)") + "."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- cost


def _times(results: Path = RESULTS) -> dict[str, int]:
    """{part: seconds} as run.sh's `timed` logged them (results/times.txt, copied from outputs/ by hand: the last
    line per part; a resumed part's time is that of its last try only)."""
    path = Path(results) / "times.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: cp {OUTPUTS / 'times.txt'} {path}")
    times = {}
    for line in path.read_text().splitlines():
        if line.startswith("== ") and line.endswith(" s"):
            name, seconds = line[3:-2].rsplit(": ", 1)
            times[name] = int(seconds)
    return times


def wall_times(results: Path = RESULTS) -> str:
    """Each part's wall time (`_times`), in minutes."""
    return ", ".join(f"{name} {seconds / 60:.0f} min" for name, seconds in _times(results).items())


def part_minutes(name: str, results: Path = RESULTS) -> str:
    """One part's wall time, e.g. "14 min"."""
    return f"{_times(results)[name] / 60:.0f} min"


# ------------------------------------------------------------------------------------------------------- main



# ------------------------------------------------------------------------- scale or features? (norm-matched)

NORM = "norm_map/norm_matched.json"
"""Written by `copy norm` from run.sh's norm_map part (each seed's summary.json, `extract_norm_matched`)."""
NORM_PARTS = ("norm_map", "norm_map_12_14")
"""run.sh's norm-matched analysis parts (layers 15-17 with the depth re-run's SAEs; 12-14 with the first run's SAEs
trained again); `copy norm` merges those that finished."""


def extract_norm_matched(summaries: dict[int, dict]) -> dict:
    """`norm_map/norm_matched.json`: per cell and SAE seed the raw disparity and the centred, norm-matched one
    (docs/method.md §1c) with their 95% sentence CIs and the residual norm's disparity, plus each seed's target."""
    from mlalign.analysis.metrics import disparity_pct

    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    ref, layers = first["reference_lang"], [str(layer) for layer in first["layers"]]
    cells = {}
    for lang in first["langs"]:
        if lang == ref:
            continue
        cells[lang] = {layer: {str(s): {
            "raw": d["disparity_pct"][lang][layer], "raw_ci": d["disparity_ci"][lang][layer],
            "norm_matched": d["disparity_pct_norm_matched"][lang][layer],
            "norm_matched_ci": d["disparity_ci_norm_matched"][lang][layer],
            "resid_norm_pct": disparity_pct(d["values"][lang][layer]["resid_norm"], d["values"][ref][layer]["resid_norm"]),
        } for s, d in ((s, summaries[s]) for s in seeds)} for layer in layers}
    return {"seeds": seeds, "reference_lang": ref, "metric": first["metric"], "layers": first["layers"],
            "langs": [lang for lang in first["langs"] if lang != ref], "n_sentences": first["n_sentences"][ref],
            "bootstrap": first["bootstrap"], "centre": first["norm_matched_centre"],
            "targets": {str(s): summaries[s]["norm_matched_target"] for s in seeds}, "cells": cells}


def merge_norm_matched(parts: list[dict]) -> dict:
    """Several `extract_norm_matched` tables over other layers, on the same seeds, sentences, languages and metric,
    as one (layers in order)."""
    merged = json.loads(json.dumps(parts[0]))
    for part in parts[1:]:
        for key in ("seeds", "reference_lang", "metric", "langs", "n_sentences", "bootstrap", "centre"):
            if part[key] != merged[key]:
                raise ValueError(f"the norm-matched parts differ in {key}: {part[key]!r} vs {merged[key]!r}")
        if set(part["layers"]) & set(merged["layers"]):
            raise ValueError(f"two norm-matched parts cover layers {sorted(set(part['layers']) & set(merged['layers']))}")
        merged["layers"] = sorted(merged["layers"] + part["layers"])
        for lang in merged["langs"]:
            merged["cells"][lang].update(part["cells"][lang])
        for seed, targets in part["targets"].items():
            merged["targets"][seed].update(targets)
    return merged


def copy_norm(out: Path = OUTPUTS, results: Path = RESULTS) -> list[Path]:
    """`NORM` from the finished norm-matched parts' per-seed summaries (`NORM_PARTS`, merged); writes nothing if none
    finished."""
    parts = []
    for part in NORM_PARTS:
        summaries = _seed_summaries(out, part)
        if summaries:
            parts.append(extract_norm_matched({int(path.parent.name.rsplit("_", 1)[1]): json.loads(path.read_text())
                                               for path in summaries}))
    if not parts:
        raise FileNotFoundError(f"not there (has run.sh norm_map finished?): {Path(out) / NORM_PARTS[0]}/analysis/"
                                "sae_seed_<s>/summary.json")
    target = Path(results) / NORM
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merge_norm_matched(parts), indent=1) + "\n")
    written = [target]
    for file in ("fidelity.json", "train_data.json"):  # the SAEs trained again for layers 12-14, where they exist
        source = Path(out) / REST_SAES / "saes" / file
        if source.exists():
            copied = Path(results) / REST_SAES / file
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copied)
            written.append(copied)
    return written


REST_SAES = "saes_balanced_12_14"
"""run.sh's rest_saes part: the first run's SAEs at layers 12-14 trained again (same recipe, data and seeds)."""


def rest_saes_check(results: Path = RESULTS) -> str:
    """One clause: whether the SAEs trained again at layers 12-14 meet issue 27's bar, and how far their pooled FVU
    lies from the first run's SAEs' (same recipe, data and seeds; another CPU's rounding)."""
    again = json.loads((Path(results) / REST_SAES / "fidelity.json").read_text())
    first = fidelity("balanced", results, merged=False)
    records = [(layer, seed, record) for layer, row in again.items() for seed, record in row["seeds"].items()]
    misses = sum(bool(_bar_misses(record)) for _, _, record in records)
    gap = max(abs(record["fvu"] - first[layer]["seeds"][seed]["fvu"]) for layer, seed, record in records)
    bar = "all meet the bar" if not misses else f"{misses} miss the bar"
    return (f"the {len(records)} SAEs trained again at layers {', '.join(sorted(again, key=int))}: {bar}, pooled "
            f"FVU within {gap:.4f} of the first run's SAEs of the same layer and seed")


def norm_verdict(cell: dict) -> str | None:
    """The README's rule for one deficit cell ({seed: record}): "beyond the scale" where under every seed the
    norm-matched disparity is negative, its CI below 0, and at least half the raw one; "scale" where under every seed
    its CI includes 0 or lies above it; "mixed" otherwise. None where the raw disparity is not a deficit under every
    seed (the rule is about deficits)."""
    records = list(cell.values())
    if not all(r["raw"] < 0 for r in records):
        return None
    if all(r["norm_matched_ci"][1] < 0 and r["norm_matched"] <= 0.5 * r["raw"] for r in records):
        return "beyond the scale"
    if all(r["norm_matched_ci"][1] >= 0 for r in records):
        return "scale"
    return "mixed"


def _seed_mean_of(cell: dict, key: str) -> float:
    """The mean over seeds of one key of a norm_matched.json cell ({seed: record})."""
    return statistics.mean(r[key] for r in cell.values())


def norm_counts(tier: str = STUDY_TIER, results: Path = RESULTS) -> dict[str, int]:
    """{verdict: number of the tier's deficit cells} at the norm_map layers."""
    table = _load(NORM, results)
    counts = {"beyond the scale": 0, "scale": 0, "mixed": 0}
    for lang in table["langs"]:
        if _tier(lang) == tier:
            for cell in table["cells"][lang].values():
                verdict = norm_verdict(cell)
                if verdict is not None:
                    counts[verdict] += 1
    return counts


def norm_tier_means(results: Path = RESULTS, tier: str = STUDY_TIER) -> tuple[float, float]:
    """(raw, norm-matched): the tier's mean disparity at the norm_map layers, over languages, layers and seeds."""
    table = _load(NORM, results)
    cells = [table["cells"][lang][str(layer)] for lang in table["langs"] if _tier(lang) == tier
             for layer in table["layers"]]
    return tuple(statistics.mean(_seed_mean_of(cell, key) for cell in cells) for key in ("raw", "norm_matched"))


def norm_summary(results: Path = RESULTS, tier: str = STUDY_TIER) -> str:
    """One sentence: the tier's deficits at the norm_map layers by verdict, and its mean raw and norm-matched
    disparity there (means over languages, layers and seeds)."""
    table = _load(NORM, results)
    langs = [lang for lang in table["langs"] if _tier(lang) == tier]
    counts = norm_counts(tier, results)
    n = sum(counts.values())
    layers = ", ".join(map(str, table["layers"]))
    raw, matched = norm_tier_means(results, tier)
    return (f"at layers {layers}, of the {n} medium-to-low resource deficits ({', '.join(langs)}; every SAE seed's "
            f"disparity negative), {counts['beyond the scale']} are beyond the scale (norm-matched still a deficit under"
            f" every seed, CI below 0, at least half the raw), {counts['scale']} are scale (norm-matched CI reaching 0 "
            f"or above under every seed) and {counts['mixed']} mixed; the tier's mean disparity there is {raw:+.1f}% "
            f"raw and {matched:+.1f}% norm-matched ({len(table['seeds'])} SAE seeds, {table['n_sentences']} sentences)")


def norm_span(langs: str, key: str = "norm_matched", results: Path = RESULTS, layers: str = "") -> str:
    """"a to b": the range of the seed-mean `key` ("raw", "norm_matched", "resid_norm_pct") over the cells of `langs`
    (comma-separated) at `layers` (comma-separated; all of the run's by default)."""
    table = _load(NORM, results)
    wanted = layers.split(",") if layers else [str(layer) for layer in table["layers"]]
    values = [_seed_mean_of(table["cells"][lang][layer], key) for lang in langs.split(",") for layer in wanted]
    return f"{min(values):+.1f} to {max(values):+.1f}"


def norm_hidden(langs: str, results: Path = RESULTS) -> str:
    """How many of `langs`' (comma-separated) cells have no raw deficit under every seed yet a norm-matched one
    (every seed's CI below 0), and the range of those norm-matched disparities: "k of n cells (a to b%)"."""
    table = _load(NORM, results)
    cells = [table["cells"][lang][str(layer)] for lang in langs.split(",") for layer in table["layers"]]
    no_raw = [cell for cell in cells if norm_verdict(cell) is None]
    hidden = [cell for cell in no_raw if all(r["norm_matched_ci"][1] < 0 for r in cell.values())]
    values = [_seed_mean_of(cell, "norm_matched") for cell in hidden]
    span = f" ({min(values):+.1f} to {max(values):+.1f}%)" if values else ""
    return f"{len(hidden)} of {len(no_raw)} cells{span}"


def norm_cells_with(verdict: str, langs: str, results: Path = RESULTS) -> str:
    """The cells of `langs` (comma-separated) the rule gives `verdict`, e.g. "mr 12, hi 15" ("none" if none)."""
    table = _load(NORM, results)
    cells = [f"{lang} {layer}" for lang in langs.split(",") for layer in table["layers"]
             if norm_verdict(table["cells"][lang][str(layer)]) == verdict]
    return ", ".join(cells) or "none"


def norm_table(results: Path = RESULTS) -> str:
    """Per language and layer: the raw and the norm-matched disparity (means over SAE seeds, and the range of the
    seeds' 95% sentence CIs), the residual norm's disparity, and the verdict."""
    table = _load(NORM, results)
    lines = ["| lang | tier | layer | raw | norm-matched (CI range over seeds) | residual norm | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for lang in table["langs"]:
        for layer in map(str, table["layers"]):
            cell = table["cells"][lang][layer]
            lows = [r["norm_matched_ci"][0] for r in cell.values()]
            highs = [r["norm_matched_ci"][1] for r in cell.values()]
            lines.append(f"| {lang} | {_tier(lang)} | {layer} | {_seed_mean_of(cell, 'raw'):+.1f}% | "
                         f"{_seed_mean_of(cell, 'norm_matched'):+.1f}% ({min(lows):+.1f} to {max(highs):+.1f}) | "
                         f"{_seed_mean_of(cell, 'resid_norm_pct'):+.1f}% | {norm_verdict(cell) or 'no raw deficit'} |")
    lines += ["", f"Disparity of `{table['metric']}` vs {table['reference_lang']} in %, the mean over SAE seeds "
              f"{', '.join(map(str, table['seeds']))}; norm-matched: every token's residual rescaled about the SAE's "
              f"b_dec to {table['reference_lang']}'s centred RMS at the layer before encoding (docs/method.md §1c); "
              "residual norm: the uncentred mean ||x|| per token. The verdict applies README.md's rule."]
    return "\n".join(lines)


def main(results: Path = RESULTS) -> None:
    spread = seeds_map(results)
    print("# The map of Gemma 3 270M under 3 SAE seeds, and the SAE mix: results (generated by tables.py from "
          "results/)\n")
    print(f"SAE seeds {', '.join(map(str, spread['seeds']))}; {spread['bootstrap']} sentence-bootstrap resamples.\n")
    print(f"**The answer.** {answer(results)}.\n")
    print("## The map per band\n")
    print(headline_table(results) + "\n")
    print(f"Sign stability: {sign_stability(results)}\n")
    print("## The controls\n")
    print(f"Of the map's deficits: {controls_summary(results)}.\n")
    print(controls_table(results) + "\n")
    print("## Against the study\n")
    print(study_table(results) + "\n")
    print(f"SAEs (balanced, every layer and seed) against issue 27's bar: {sae_bar('balanced', results)}.\n")
    if _has_depth_rerun(results):
        print("## The depth re-run\n")
        print(f"The first run's SAEs: {sae_bar('balanced', results, merged=False)}.\n")
        print("The sweep that chose the per-depth recipe (dev split):\n")
        print(depth_sweep_table(results) + "\n")
        print(f"Its effect on the map: {depth_shift(results)}.\n")
    print("## Was either mix starved of Hindi?\n")
    print(f"Bar: {starvation_check(results)}.\n")
    print(starvation_table(results) + "\n")
    print("## Balanced vs English-heavy SAEs\n")
    print(f"In one line: {mix_shift(results)}.\n")
    print(mix_table(results) + "\n")
    for layer in MIX_LAYERS:
        print(f"- {mix_hindi(layer, results)}.")
    if (Path(results) / NORM).exists():
        print("\n## Scale or features? The norm-matched deep band\n")
        print(f"In one line: {norm_summary(results)}.\n")
        print(norm_table(results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["copy"]:
        how = {"depth": copy_depth, "sweep": copy_sweep, "norm": copy_norm}.get(sys.argv[2] if len(sys.argv) > 2 else "", copy)
        rest = sys.argv[3:] if how is not copy else sys.argv[2:]
        for path in how(Path(rest[0]) if rest else OUTPUTS):
            print(f"copied {path}")
    else:
        main()
