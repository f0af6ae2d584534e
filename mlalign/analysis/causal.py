"""Are the language-specific features causal? task=analyze's ablation, steering and dashboard steps
(`analysis.features.ablate / steer / dashboard`), each writing its files under analysis/ (docs/method.md §8c).

Each step takes the feature report of the analysis (which features are each language's), the model, tokenizer and
SAEs (`Causal`), and reads its own sentences: ablation and dashboards a split other than the analysis split (the
features were chosen there), steering English prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlalign.analysis.ablation import check_k
from mlalign.analysis.features import FeatureReport, paired_counts, specific_features
from mlalign.config import AnalysisConfig
from mlalign.errors import UserError
from mlalign.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Causal:
    """What every step needs: the analysis's feature report and settings, the loaded model, and where to write."""

    report: FeatureReport
    acfg: AnalysisConfig
    data_cfg: object
    """cfg.data (its splits and max_length; the corpus loader reads it)."""
    model: object
    tokenizer: object
    saes: dict
    """layer -> SAE, for every layer a step needs."""
    device: object
    seed: int
    out_dir: Path
    title: str
    split: str
    """The analysis split: where the features were chosen."""


def resolve_layer(requested: int | None, layers: list[int], key: str) -> int:
    """The analysed layer a step works at: `requested`, or the middle analysed layer when None."""
    layers = sorted(int(layer) for layer in layers)
    if requested is None:
        return layers[len(layers) // 2]
    if int(requested) not in layers:
        raise UserError(f"{key}={requested} is not an analysed layer (analysed: {', '.join(map(str, layers))}); add "
                        f"it to layers=[...] or set {key} to one of those")
    return int(requested)


STEPS = ("ablate", "steer", "dashboard")
"""The steps' names under analysis.features, in the order they run."""


def check_settings(acfg: AnalysisConfig, layers: list[int] | None) -> None:
    """Every enabled step's settings, one line before any work (task=analyze when its analysis starts, task=pipeline in
    check_config before anything loads): the feature lists they read, each step's split, k, layer and sizes. layers
    None: not known yet (model=hf with layers=null before its config.json is read); the layers are then checked when
    the analysis starts."""
    fcfg = acfg.features
    enabled = [name for name in STEPS if getattr(fcfg, name).enabled]
    if not enabled:
        return
    if not fcfg.enabled:
        raise UserError("analysis.features.ablate/steer/dashboard need the feature lists: set "
                        "analysis.features.enabled=true")
    from mlalign.data.corpus import check_split

    for name in enabled:
        split = getattr(fcfg, name).split
        try:
            check_split(str(split))
        except UserError as err:
            raise UserError(f"analysis.features.{name}.split={split}: {err}") from None
    wanted_layers(acfg, layers)


def wanted_layers(acfg: AnalysisConfig, layers: list[int] | None) -> list[int]:
    """The layers whose SAEs the enabled steps need (checks every step's layer and k first: a mistake costs nothing);
    layers None (not known yet) checks all but the layers and returns none."""
    fcfg, out = acfg.features, set()
    for name in STEPS:
        step = getattr(fcfg, name)
        if step.enabled:
            check_k(step.k, f"analysis.features.{name}.k")
            if name == "ablate" and int(acfg.bootstrap) < 1:  # its verdict is a set of intervals: none, no verdict
                raise UserError("analysis.features.ablate decides causality from paired-bootstrap intervals, but "
                                "analysis.bootstrap=0 gives none: set analysis.bootstrap=1000 (or more), or "
                                "analysis.features.ablate.enabled=false")
            if layers is not None:
                out.add(resolve_layer(step.layer, layers, f"analysis.features.{name}.layer"))
    if fcfg.steer.enabled and (int(fcfg.steer.prompts) < 1 or int(fcfg.steer.max_new_tokens) < 1):
        raise UserError(f"analysis.features.steer.prompts and max_new_tokens must be >= 1, got {fcfg.steer.prompts} "
                        f"and {fcfg.steer.max_new_tokens}")
    if fcfg.dashboard.enabled and (int(fcfg.dashboard.contexts) < 1 or int(fcfg.dashboard.logit_tokens) < 1):
        raise UserError(f"analysis.features.dashboard.contexts and logit_tokens must be >= 1, got "
                        f"{fcfg.dashboard.contexts} and {fcfg.dashboard.logit_tokens}")
    return sorted(out)


CAUSAL_VERSION = 1
"""Bump when a step's files change meaning: a record written before then no longer matches."""

RECORD = "causal_record.json"
"""In the analysis folder: per finished step, a fingerprint of its inputs and its result (statements, files), written
after the step's files. A rerun into the same folder with the same inputs (a task=pipeline resumed after a stop reruns
both analyses) keeps those files instead of recomputing them (minutes of hooked forwards and generation on a real
model); a step stopped halfway has no record and runs again."""


def step_inputs(name: str, acfg: AnalysisConfig, identity: dict, context: dict) -> str:
    """What decides step `name`'s files: the analysis cache's identity (model files, adapter weights, SAEs, corpus), the
    analysis settings with this step's own (not the other steps'), and `context` (title, seed, languages, data)."""
    settings = asdict(acfg)
    for other in STEPS:
        if other != name:
            settings["features"].pop(other)
    payload = {"step": name, "analysis": settings, "identity": identity, "context": context, "version": CAUSAL_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _record(out_dir: Path) -> dict:
    try:
        record = json.loads((out_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def kept_result(out_dir: Path, name: str, inputs: str) -> dict | None:
    """Step `name`'s result as recorded in `out_dir`, where its inputs were these and all its files are still there;
    None (run it) otherwise."""
    entry = _record(out_dir).get(name)
    if not isinstance(entry, dict) or entry.get("inputs") != inputs:
        return None
    result = dict(entry.get("result") or {})
    files = {key: out_dir / file for key, file in (result.get("files") or {}).items()}
    if not files or not all(path.is_file() for path in files.values()):
        return None
    result["files"] = {key: str(path) for key, path in files.items()}
    return result


def record_result(out_dir: Path, name: str, inputs: str, result: dict) -> None:
    """Step `name` finished with these inputs: its result into the folder's record (file names relative to it)."""
    record = _record(out_dir)
    kept = {**result, "files": {key: Path(path).name for key, path in result["files"].items()}}
    record[name] = {"inputs": inputs, "result": kept}
    write_json_atomic(out_dir / RECORD, record)


def _texts(c: Causal, langs: list[str], split: str, max_sentences: int | None):
    from mlalign.data.corpus import load_corpus

    corpus = load_corpus(c.data_cfg, langs, split)
    if split == c.split or set(split.split("+")) & set(c.split.split("+")) or "all" in (split, c.split):
        log.warning("the %s split overlaps the analysis split %s where the features were chosen", split, c.split)
    return ({lang: corpus[lang][:max_sentences] for lang in langs},
            {lang: corpus.ids[lang][:max_sentences] for lang in langs})


def _random_features(c: Causal, layer: int, lang: str, chosen: list[int]) -> list[int]:
    from mlalign.analysis.ablation import matched_random_features

    rate = np.nanmean(c.report.stats[layer]["firing_rate"], axis=0)
    return matched_random_features(rate, chosen, seed=[c.seed, layer, c.report.langs.index(lang)])


def ablation_step(c: Causal) -> dict:
    """analysis/ablation.json and ablation.png; returns the statements and the files."""
    from mlalign.analysis.ablation import ablated_dlm_loss, ablation_matrix, ablation_statements, plot_ablation
    from mlalign.analysis.spliced import token_batches
    from mlalign.languages import get_language

    s, langs = c.acfg.features.ablate, c.report.langs
    layer = resolve_layer(s.layer, c.report.layers, "analysis.features.ablate.layer")
    chosen = {lang: specific_features(c.report, lang, layer, int(s.k)) for lang in langs}
    ablated = [lang for lang in langs if chosen[lang]]
    random = {lang: _random_features(c, layer, lang, chosen[lang]) for lang in ablated}
    texts, ids = _texts(c, langs, s.split, s.max_sentences)
    sets = {**{("own", lang): chosen[lang] for lang in ablated}, **{("random", lang): random[lang] for lang in ablated}}
    deltas = {}
    for lang in langs:
        batches = token_batches(c.tokenizer, texts[lang], c.acfg.batch_size, int(c.data_cfg.max_length))
        deltas[lang] = ablated_dlm_loss(c.model, c.saes[layer], layer, batches, sets, device=c.device, progress=True)
    sizes = {lang: len(texts[lang]) for lang in langs}
    counts = paired_counts(ids, langs, langs[0], sizes, max(1, int(c.acfg.bootstrap)), c.seed)
    result = ablation_matrix({a: {e: deltas[e][("own", a)] for e in langs} for a in ablated},
                             {a: {e: deltas[e][("random", a)] for e in langs} for a in ablated}, counts, c.acfg.ci)
    names = {lang: get_language(lang).name for lang in langs}
    statements = ablation_statements(result, names, {lang: len(chosen[lang]) for lang in langs}, layer, c.acfg.ci)
    statements += [f"{names[lang]} ({lang}) has no specific feature at layer {layer}: nothing to ablate."
                   for lang in langs if not chosen[lang]]
    out = {"layer": layer, "k": int(s.k), "split": s.split, "features_chosen_on": c.split,
           "n_sentences": sizes, "ci": c.acfg.ci, "bootstrap": int(c.acfg.bootstrap),
           "features": {lang: chosen[lang] for lang in langs}, "random_features": random,
           "matrix": result["matrix"], "random": result["random"], "comparisons": result["comparisons"],
           "causal": {lang: result["comparisons"][lang]["causal"] for lang in ablated}, "statements": statements}
    files = {"json": write_json_atomic(c.out_dir / "ablation.json", out)}
    if c.acfg.plots and ablated:
        files["png"] = plot_ablation(result, langs, layer, int(s.k), c.out_dir / "ablation.png", c.title)
    return {"statements": statements, "files": {k: str(v) for k, v in files.items()}}


def steering_step(c: Causal, reference_lang: str) -> dict:
    """analysis/steering.json and steering.png."""
    from mlalign.analysis.langid import identify, table_candidates
    from mlalign.analysis.steering import (centred_residual_scale, feature_direction, greedy_generate, plot_steering,
                                          steering_results)

    s, langs = c.acfg.features.steer, c.report.langs
    layer = resolve_layer(s.layer, c.report.layers, "analysis.features.steer.layer")
    candidates = table_candidates()
    steered = [lang for lang in langs if lang != reference_lang]
    sae = c.saes[layer]
    directions, chosen, random = {}, {}, {}
    for lang in steered:
        chosen[lang] = specific_features(c.report, lang, layer, int(s.k))
        random[lang] = _random_features(c, layer, lang, chosen[lang])
        if chosen[lang]:
            directions[lang] = (feature_direction(sae, chosen[lang]), feature_direction(sae, random[lang]))
    prompts = _texts(c, [reference_lang], s.split, int(s.prompts))[0][reference_lang]
    scale = centred_residual_scale(c.model, c.tokenizer, prompts, layer, max_length=int(c.data_cfg.max_length),
                                   device=c.device, batch_size=c.acfg.batch_size)

    def generate(vector):
        ids = greedy_generate(c.model, c.tokenizer, prompts, int(s.max_new_tokens),
                              max_length=int(c.data_cfg.max_length), device=c.device, layer=layer, vector=vector,
                              batch_size=c.acfg.batch_size)
        return [c.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    results = steering_results(generate, lambda texts: identify(texts, candidates), directions, list(s.alphas), scale,
                               progress=True)
    out = {"layer": layer, "k": int(s.k), "alpha_unit": "the centred RMS residual of the prompts at the layer, "
           "sqrt(mean ||x - mean x||^2)", "alpha_scale": scale, "prompts": len(prompts), "prompt_split": s.split, "reference_lang": reference_lang,
           "max_new_tokens": int(s.max_new_tokens), "identifier": "py3langid, closed over the languages table",
           "candidates": list(candidates), "features": chosen, "random_features": random, "results": results,
           "no_specific_features": [lang for lang in steered if not chosen[lang]]}
    files = {"json": write_json_atomic(c.out_dir / "steering.json", out)}
    if c.acfg.plots and results:
        files["png"] = plot_steering(results, layer, c.out_dir / "steering.png", c.title)
    return {"files": {k: str(v) for k, v in files.items()}}


def dashboard_step(c: Causal, neuronpedia: dict[int, str | None]) -> dict:
    """analysis/feature_dashboard.html and features_neuronpedia.json."""
    from mlalign.analysis.feature_dashboard import (dashboard_html, feature_activations, logit_effects,
                                                    neuronpedia_export)
    from mlalign.analysis.spliced import token_batches

    s, report = c.acfg.features.dashboard, c.report
    layer = resolve_layer(s.layer, report.layers, "analysis.features.dashboard.layer")
    lists = {lang: {layer_: specific_features(report, lang, layer_, int(s.k)) for layer_ in report.layers}
             for lang in report.langs}
    export = neuronpedia_export(lists, neuronpedia, c.title)
    files = {"neuronpedia": write_json_atomic(c.out_dir / "features_neuronpedia.json", export)}
    if export.get("note"):
        log.info("features_neuronpedia.json: %s", export["note"])
    shown = {lang: lists[lang][layer] for lang in report.langs}
    union = sorted({f for features in shown.values() for f in features})
    if union:
        texts, _ = _texts(c, report.langs, s.split, s.max_sentences)
        sae = c.saes[layer]
        activations = {lang: feature_activations(c.model, sae, layer, token_batches(
            c.tokenizer, texts[lang], c.acfg.batch_size, int(c.data_cfg.max_length)), union, device=c.device)
            for lang in report.langs}
        effects = dict(zip(union, logit_effects(c.model, sae, union, int(s.logit_tokens))))
        stats = {lang: {f: {name: report.value(name, lang, layer, f) for name in
                            ("selectivity", "specificity", "mean_act", "firing_rate")} for f in features}
                 for lang, features in shown.items()}
        page = dashboard_html(c.tokenizer, layer, c.title, shown, activations, {f: i for i, f in enumerate(union)},
                              effects, stats, int(s.contexts))
        files["html"] = write_text_atomic(c.out_dir / "feature_dashboard.html", page)
    return {"files": {k: str(v) for k, v in files.items()}}
