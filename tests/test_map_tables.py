"""The map experiment's write-up generator (experiments/gemma3_270m_map/tables.py) on result files with known answers,
written by the real writers (`write_seed_spread` for sae_seeds.json, task=train_saes's record and output functions
for fidelity.json and train_data.json) at the paths run.sh gives them, then copied by the generator's own `copy`:
the band headline, the sign-stable count, the study table (its tier, not a more negative high-resource cell), the
starvation bar passing and failing, and the mix table's differences and seed-pair ranges."""

from __future__ import annotations

import json

import pytest

from tests.helpers import compose_cfg, load_experiment_module

LAYERS = list(range(18))
BANDS = {"early": list(range(6)), "middle": list(range(6, 12)), "deep": list(range(12, 18))}
HIGH, MEDIUM_LOW = ["zh", "ru", "es", "it"], ["id", "ca", "mr", "ml", "hi"]
LANGS = ["en", *HIGH, *MEDIUM_LOW]
OFFSET = [-1.0, 0.0, 1.0]  # seed s moves every unplanted cell by OFFSET[s]: seed mean = base, seed SD = 1
MAP_PLANTED = {("hi", 3): [-30.0, -28.0, -26.0],  # the early medium-to-low worst cell
               ("zh", 2): [-40.0, -40.0, -40.0],  # more negative, but high resource: not the study's languages
               ("mr", 8): [-12.0, -10.0, -8.0],   # the middle medium-to-low worst cell
               ("ml", 14): [-22.0, -21.0, -20.0],  # the deep medium-to-low worst cell
               ("es", 10): [-1.0, 0.5, -1.0],     # sign depends on the seed
               ("id", 16): [1.0, -1.0, 3.0]}      # sign depends on the seed
MIX_PLANTED = {("hi", 3): [-20.0, -18.0, -16.0], ("hi", 9): [-6.0, -5.0, -4.0]}
CONTROLS_PLANTED = {("hi", 3): {"sentence": 1.0},                    # the gap is not there sentence by sentence
                    ("mr", 8): {"values": {"resid_norm": 94.0}},        # -6%: at least half of mr 8's -10
                    ("ml", 14): {"values": {"fvu": 0.2}}}               # 2x English's FVU
HINDI_FVU = {"balanced": {3: [0.10, 0.12, 0.14], 9: [0.15, 0.16, 0.17]},
             "english_heavy": {3: [0.20, 0.22, 0.24], 9: [0.25, 0.28, 0.29]}}


@pytest.fixture(scope="module")
def tables():
    return load_experiment_module("experiments/gemma3_270m_map/tables.py", "map_tables")


def _summary(layers: list[int], bands: dict, values: dict, unfit_cells: dict) -> dict:
    """One seed's summary.json, holding what `seed_spread` reads; each seed's CI is its value ± 2."""
    return {"reference_lang": "en", "metric": "mean_act", "aggregate": "token", "ci": 0.95, "bootstrap": 1000,
            "layers": layers, "langs": LANGS, "bands": bands,
            "disparity_pct": {"en": {str(layer): 0.0 for layer in layers}, **values},
            "disparity_ci": {lang: {layer: [v - 2, v + 2] for layer, v in by_layer.items()}
                             for lang, by_layer in values.items()},
            "unfit_layers": [], "unfit_cells": unfit_cells}


def _with_controls(summary: dict) -> dict:
    """The control fields of one seed's summary.json that `tables.extract_controls` reads, with CONTROLS_PLANTED:
    every companion equals the token disparity, every residual norm is English's (100) and every FVU 0.1, except
    where planted."""
    layers = [str(layer) for layer in summary["layers"]]
    disp = summary["disparity_pct"]
    values = {lang: {layer: {"fvu": 0.1, "fvu_raw": 0.01, "resid_norm": 100.0, "mean_act": 1.0} for layer in layers}
              for lang in LANGS}
    sentence = {lang: dict(by_layer) for lang, by_layer in disp.items()}
    for (lang, layer), planted in CONTROLS_PLANTED.items():
        if str(layer) not in layers:
            continue
        values[lang][str(layer)].update(planted.get("values", {}))
        if "sentence" in planted:
            sentence[lang][str(layer)] = planted["sentence"]
    stats = {lang: {"tokens_per_sentence": 60.0 if lang == "hi" else 30.0, "truncated_pct": 2.0 if lang == "hi" else 0.0,
                    "mean_position": 15.0} for lang in LANGS}
    return {**summary, "values": values, "disparity_pct_sentence": sentence,
            "disparity_pct_position_matched": {lang: dict(by_layer) for lang, by_layer in disp.items()},
            "position_cap": 40, "corpus_stats": stats, "n_sentences": {lang: 204 for lang in LANGS}}


def _write_seeds(run_dir, layers, bands, base, planted, unfit_cells_by_seed=None, summaries_too=False):
    """`task=analyze sae.seeds=[0,1,2]`'s analysis/sae_seeds.json under run_dir, by the real writer; with
    `summaries_too`, each seed's analysis/sae_seed_<s>/summary.json with its control fields as well."""
    from mlalign.analysis.sae_seeds import write_seed_spread

    summaries = {}
    for s in range(3):
        values = {lang: {str(layer): planted.get((lang, layer), [base[lang] + o for o in OFFSET])[s]
                         for layer in layers} for lang in LANGS[1:]}
        summaries[s] = _summary(layers, bands, values, (unfit_cells_by_seed or {}).get(s, {}))
    analysis = run_dir / "analysis"
    paths = {s: analysis / f"sae_seed_{s}" / "summary.json" for s in summaries}
    write_seed_spread(summaries, paths, analysis, plots=False)
    if summaries_too:
        for s, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_with_controls(summaries[s])))
    (analysis / "sae_seeds_heatmap.png").write_bytes(b"png")  # the map's heatmap: copied, never read


def _write_saes(run_dir, mix: str, layers: list[int], hindi_fvu: dict):
    """`task=train_saes sae_train=real_small sae_train.seeds=3`'s saes/fidelity.json and train_data.json, through the
    task's own record, spliced, layer-record and output functions (no SAE trained, no plot drawn)."""
    from mlalign.config import SAETrainConfig, typed
    from mlalign.saes.training import SAETrainSettings
    from mlalign.tasks import train_saes

    cfg = compose_cfg(["task=train_saes", "sae_train=real_small", "sae_train.seeds=3", f"sae_train.lang_mix={mix}",
                       "sae_train.spliced_sentences=0"])
    st = typed(cfg.sae_train, SAETrainConfig)
    weights = train_saes.mix_weights(mix, LANGS, st.english_heavy_weights)
    quotas = train_saes.token_quotas(weights, int(st.tokens))
    job = train_saes._Job(st, layers, LANGS, weights, quotas, None, None, run_dir / "saes",
                          SAETrainSettings(width=1280, steps=2344, lr=1e-3))
    job.recipes = {layer: job.recipe for layer in layers}
    records = {}
    for layer in layers:
        records[layer] = []
        for s in range(3):
            per_lang = {lang: {"fvu": hindi_fvu.get(layer, [0.5] * 3)[s] if lang == "hi" else 0.05, "l0": 96.0,
                               "tokens": 3000} for lang in LANGS}
            overall = {"fvu": 0.06, "l0": 96.0, "l0_pct": 7.5, "dead_pct": 1.0, "tokens": 30000}
            records[layer].append(train_saes._seed_record(overall, per_lang, layer + 1000 * s, 60.0))
    train_saes._add_spliced(cfg, job, None, None, [], records)
    table = {str(layer): train_saes.layer_record(records[layer], 1280, LANGS) for layer in layers}
    data_info = {"tokens_per_lang": quotas, "unique_tokens_per_lang": dict(quotas), "repeated_langs": [],
                 "saes_kept_from_an_earlier_try": 0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_saes, "plot_fidelity", lambda *args, **kwargs: None)
        train_saes._write_outputs(cfg, job, table, records, data_info, {"activations": 1.0, "training": 2.0,
                                                                         "total": 3.0, "training_per_sae": 0.1})


def _build(tmp_path, tables, hindi_fvu=HINDI_FVU):
    """A finished run's folder (what run.sh leaves) with known answers, copied into results/ by `tables.copy`."""
    out = tmp_path / "outputs"
    base = {**{lang: 2.0 for lang in HIGH}, **{lang: -5.0 for lang in MEDIUM_LOW}}
    _write_seeds(out / "map", LAYERS, BANDS, base, MAP_PLANTED, {1: {"ca": [17]}},  # ca 17: seed 1's SAE misfits
                 summaries_too=True)
    mix_base = {**{lang: 1.0 for lang in HIGH}, **{lang: -4.0 for lang in MEDIUM_LOW}}
    _write_seeds(out / "mix_english_heavy", [3, 9], {"early": [3], "middle": [9]}, mix_base, MIX_PLANTED)
    _write_saes(out / "saes_balanced", "balanced", LAYERS, hindi_fvu["balanced"])
    _write_saes(out / "saes_english_heavy", "english_heavy", [3, 9], hindi_fvu["english_heavy"])
    results = tmp_path / "results"
    copied = tables.copy(out, results)
    assert sorted(p.relative_to(results).as_posix() for p in copied) == sorted([*tables.COPY, tables.CONTROLS])
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory, tables):
    return _build(tmp_path_factory.mktemp("map_run"), tables)


def _rows(table: str) -> dict[str, list[str]]:
    """Markdown rows keyed by their first cell (data rows only)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}


def test_the_band_headline_is_the_seed_mean_over_the_bands_layers_with_its_sign_stable_count(tables, results):
    table = tables.headline_table(results)
    assert table.splitlines()[0] == "| lang | tier | early (0-5) | middle (6-11) | deep (12-17) |"
    rows = _rows(table)
    assert rows["hi"] == ["medium_low", "-8.8 (6/6)", "-5.0 (6/6)", "-5.0 (6/6)"]  # (5 x -5 - 28) / 6
    assert rows["zh"][1] == "-5.0 (6/6)"                                             # (5 x 2 - 40) / 6
    assert rows["es"][2] == "+1.6 (5/6)"                                             # (5 x 2 - 0.5) / 6; one flips
    assert rows["ca"][3] == "-5.0 (5/5, 1 left out)"                                 # seed 1's SAE misfits ca 17
    assert rows["id"][3] == "-4.0 (5/6)"                                             # (5 x -5 + 1) / 6; one flips
    assert rows["medium-to-low: id, ca, mr, ml, hi"][1] == "-5.8 (30/30)"           # (29 x -5 - 28) / 30


def test_the_sign_stable_count_is_the_seed_summarys_over_the_cells_it_counts(tables, results):
    assert tables.n_sign_stable(results) == "159 of 161"
    text = tables.sign_stability(results)
    # CI = value ± 2: the medium-to-low cells (-6..-4) exclude 0, the high ones (1..3) do not; zh 2 (-40) does.
    assert text.startswith("159 of 161 (language, layer) cells keep the sign of their disparity under all 3 SAE "
                           "seeds (0, 1, 2); in 89 of them every seed's 95% sentence CI excludes 0 on the same side; "
                           "1 cell(s) left out")
    assert "By band: early (0-5) 54 of 54, middle (6-11) 53 of 54, deep (12-17) 52 of 53." in text
    assert text.endswith("The sign depends on the seed at es layer 10 (-1.0 to +0.5%), id layer 16 (-1.0 to +3.0%).")


def test_the_controls_table_puts_the_companions_norm_and_fit_beside_each_bands_disparity(tables, results):
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in tables.controls_table(results).splitlines()
            if line.startswith("| ")][1:]
    hi = rows[[row[0] for row in rows].index("hi"):][:3]
    # early: token (5 x -5 - 28) / 6; sentence (5 x -5 + 1) / 6 (hi 3's sentence companion is +1); no norm gap.
    assert hi[0] == ["hi", "60.0 (2%)", "early (0-5)", "-8.8%", "-4.0%", "-8.8%", "+0.0%", "0.100 / 0.100"]
    mr_middle = rows[[row[0] for row in rows].index("mr") + 1]
    assert mr_middle[2:7] == ["middle (6-11)", "-5.8%", "-5.8%", "-5.8%", "-1.0%"]  # (5 x -5 - 10) / 6; -6 / 6
    ml_deep = rows[[row[0] for row in rows].index("ml") + 2]
    assert ml_deep[-1] == "0.117 / 0.100"                                          # (5 x 0.1 + 0.2) / 6
    # 89 sign-stable deficits: 5 medium-to-low x 18 - ca 17 (left out) - id 16 (sign flips) + zh 2 (-40).
    assert tables.controls_summary(results) == (
        "of the 89 cells with a deficit whose sign holds under every SAE seed, 88 keep it under both companions "
        "(sentence aggregate and position-matched), the residual norm is lower by at least half as much in 1, and the "
        "SAE's FVU on the language is more than 1.25x English's in 1")


def test_the_answer_gives_each_bands_tier_mean_with_its_seed_range_the_worst_cell_and_the_scale_caveat(tables,
                                                                                                      results):
    # Per seed, the tier's early mean: (29 x (-5 + offset) + hi 3's planted value) / 30.
    assert tables.answer(results) == (
        "Against en, the medium-to-low resource languages' SAE activations differ by early (0-5) -5.8% (-6.8 to -4.7 "
        "across seeds; 30 of 30 cells sign-stable), middle (6-11) -5.2% (-6.2 to -4.1 across seeds; 30 of 30 cells "
        "sign-stable), deep (12-17) -5.3% (-6.3 to -4.3 across seeds; 28 of 29 cells sign-stable) on average over "
        "each band's layers (3 SAE seeds), most negative at hi layer 3 (-28.0%, every seed's 95% sentence CI within "
        "-32.0 to -24.0%); its weakest point: in 0 of the tier's 30 sign-stable early deficits the residual stream's "
        "own norm is lower by at least half as much, so there the gap may be the residual's scale rather than what "
        "its features represent")
    assert tables.scale_explained("middle", results) == (1, 30)  # mr 8: norm -6% beside a -10% gap


def test_the_study_table_takes_the_most_negative_medium_to_low_cell_per_band(tables, results):
    rows = _rows(tables.study_table(results))
    definition = "no: study publishes none; ours is mean_act over analysed tokens, BOS dropped"
    assert rows["early (0-5)"] == ["up to ~26% lower", "-28.0% (hi, layer 3)", "-30.0 to -26.0%", "kept", "-5.8%",
                                   definition]  # zh 2 (-40) is high resource: not the study's comparison
    assert rows["middle (6-11)"][:4] == ["not reported", "-10.0% (mr, layer 8)", "-12.0 to -8.0%", "kept"]
    assert rows["deep (12-17)"][:5] == ["~20% lower", "-21.0% (ml, layer 14)", "-22.0 to -20.0%", "kept",
                                        "-5.3%"]  # (27 x -5 - 21 + 1) / 29: ca 17 left out


def test_the_starvation_bar_passes_when_every_seeds_hindi_fvu_is_under_it(tables, results):
    assert tables.starvation_passed(results) is True
    check = tables.starvation_check(results)
    # conf/sae_train's English-heavy weights sum to 0.96 and are normalised: hi gets 0.04 / 0.96 of 100000 tokens.
    assert check.startswith("passed: hi's held-out FVU at layers 3 and 9, every seed of both mixes (training tokens "
                            "of hi: balanced 10000, English-heavy 4167)")
    assert check.endswith("the worst is 0.290 (English-heavy, layer 9, seed 2)")
    rows = [line for line in tables.starvation_table(results).splitlines() if line.startswith("| English-heavy")]
    assert rows[1] == "| English-heavy | 4167 | 9 | 0.250 | 0.280 | 0.290 | 0.290 | yes |"


def test_the_starvation_bar_fails_on_one_seed_over_it_and_the_mix_table_says_not_to_read_it(tables, tmp_path):
    starved = {**HINDI_FVU, "english_heavy": {3: [0.20, 0.22, 0.24], 9: [0.25, 0.34, 0.29]}}
    results = _build(tmp_path, tables, starved)
    assert tables.starvation_passed(results) is False
    check = tables.starvation_check(results)
    assert check.startswith("FAILED: ") and "over the bar: English-heavy layer 9 seed 1: 0.340." in check
    assert "retrained with sae_train.tokens=250000" in check
    assert "| English-heavy | 4167 | 9 | 0.250 | 0.340 | 0.290 | 0.340 | no |" in tables.starvation_table(results)
    assert tables.mix_table(results).startswith("**Not to be read: the starvation bar failed**")


def test_the_mix_table_gives_the_difference_of_seed_means_and_its_range_over_seed_pairs(tables, results):
    table = tables.mix_table(results)
    assert not table.startswith("**")
    lines = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    rows = {(row[0], row[1]): row[2:] for row in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    # balanced hi 3: -30/-28/-26; English-heavy: -20/-18/-16; FVU: seed means of HINDI_FVU.
    assert rows[("3", "hi")] == ["-28.0 ± 2.0", "-18.0 ± 2.0", "+10.0", "+6.0 to +14.0", "2.0 / 2.0", "0.120 / 0.220"]
    assert rows[("9", "hi")][2:4] == ["+0.0", "-2.0 to +2.0"]
    assert rows[("3", "zh")][:4] == ["+2.0 ± 1.0", "+1.0 ± 1.0", "-1.0", "-3.0 to +1.0"]
    assert len(rows) == 18
    assert tables.mix_hindi(3, results) == (
        "at layer 3 hi's disparity is -28.0% with balanced SAEs and -18.0% with English-heavy ones (difference +10.0 "
        "points, +6.0 to +14.0 over the 9 seed pairs); held-out FVU 0.120 balanced vs 0.220 English-heavy: the "
        "English-heavy SAEs fit it worse and show a smaller deficit under every seed pairing")
    assert tables.mix_hindi(9, results).endswith("the English-heavy SAEs fit it worse and show no smaller deficit")
    # Unplanted cells: English-heavy base (1, -4) minus balanced base (2, -5) per tier; hi 3 +10, hi 9 (-5) - (-5) = 0.
    assert tables.mix_shift(results) == (
        "training the SAEs on an English-heavy mix instead of a balanced one moves every language's disparity at layers "
        "3 and 9 by -1.0 to +10.0 points (medium-to-low: +0.0 to +10.0), with the same model, sentences and recipe")


def test_copy_refuses_a_run_that_has_not_finished_and_the_tables_name_the_missing_file(tables, tmp_path):
    (tmp_path / "out" / "map" / "analysis").mkdir(parents=True)
    (tmp_path / "out" / "map" / "analysis" / "sae_seeds.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="saes_balanced/saes/fidelity.json"):
        tables.copy(tmp_path / "out", tmp_path / "results")
    assert not (tmp_path / "results").exists()
    with pytest.raises(FileNotFoundError, match="map/analysis/sae_seeds.json"):
        tables.headline_table(tmp_path / "results")


def test_wall_times_take_each_parts_last_try_from_times_txt(tables, tmp_path):
    (tmp_path / "times.txt").write_text("== seeds: 600 s\n== map: 897 s\n== seeds: 3306 s\nnoise\n")
    assert tables.wall_times(tmp_path) == "seeds 55 min, map 15 min"
    with pytest.raises(FileNotFoundError, match="times.txt"):
        tables.wall_times(tmp_path / "none")


def test_the_sae_bar_names_every_seed_that_misses_it(tables, results, tmp_path):
    # _write_saes: pooled FVU 0.06, dead 1%, other languages 0.05; Hindi 0.5 outside the mix layers (16 x 3 misses),
    # its planted values (all <= 0.30) at layers 3 and 9.
    bar = "(pooled FVU <= 0.2, every language <= 0.3, dead <= 10%)"
    text = tables.sae_bar("balanced", results)
    assert text.startswith(f"48 miss(es) of the bar {bar} over 54 SAEs: layer 0 seed 0 hi FVU 0.500; ")
    assert "layer 3 " not in text and "layer 9 " not in text
    missed = _build(tmp_path, tables, {**HINDI_FVU, "balanced": {**HINDI_FVU["balanced"], 3: [0.10, 0.31, 0.14]}})
    text = tables.sae_bar("balanced", missed)
    assert text.startswith(f"49 miss(es) of the bar {bar} over 54 SAEs: ")
    assert "; layer 3 seed 1 hi FVU 0.310; " in text and "layer 3 seed 0" not in text


DEPTH_LAYERS = [1, 15, 16, 17]


def test_the_depth_rerun_replaces_its_layers_in_the_map_the_controls_and_the_sae_bar(tables, tmp_path):
    """The depth re-run's layers (every medium-to-low cell -9 instead of -5, no misfit, Hindi FVU 0.1) stand in for
    the first run's; every other layer is the first run's."""
    results = _build(tmp_path, tables)
    assert tables.depth_layers(results) == []
    out = tmp_path / "outputs"
    base = {**{lang: 2.0 for lang in HIGH}, **{lang: -9.0 for lang in MEDIUM_LOW}}
    _write_seeds(out / "map_depth", DEPTH_LAYERS, {"early": [1], "deep": [15, 16, 17]}, base, {}, summaries_too=True)
    _write_saes(out / "saes_balanced_depth", "balanced", DEPTH_LAYERS, {layer: [0.1] * 3 for layer in DEPTH_LAYERS})
    copied = tables.copy_depth(out, results)
    assert sorted(p.relative_to(results).as_posix() for p in copied) == sorted(
        [*tables.DEPTH_COPY, tables.DEPTH_CONTROLS, tables.DEPTH_HEATMAP])
    assert tables.depth_layers(results) == DEPTH_LAYERS
    spread = tables.seeds_map(results)
    assert spread["cells"]["hi"]["15"]["mean_disparity_pct"] == -9.0 and spread["replaced_layers"] == DEPTH_LAYERS
    assert spread["cells"]["hi"]["14"]["mean_disparity_pct"] == -5.0
    assert spread["cells"]["hi"]["3"]["mean_disparity_pct"] == -28.0  # planted in the first run, kept
    # id 16 flipped sign and ca 17 misfit in the first run; the re-run's cells are stable and fit: 161 of 162.
    assert tables.n_sign_stable(results) == "161 of 162"
    assert tables.sign_stability(results).endswith("The sign depends on the seed at es layer 10 (-1.0 to +0.5%).")
    assert tables.map_cell("ml", 16, results=results) == "-9.0"
    ctl = tables.controls(results)
    assert ctl["cells"]["hi"]["15"]["token"] == {"0": -10.0, "1": -9.0, "2": -8.0}
    assert ctl["cells"]["hi"]["3"]["sentence"] == {"0": 1.0, "1": 1.0, "2": 1.0}  # the first run's planted control
    # The first run: 48 misses (Hindi 0.5 outside layers 3 and 9); the re-run's 12 SAEs meet the bar.
    text = tables.sae_bar("balanced", results)
    assert text.startswith("36 miss(es) of the bar") and "layer 15 " not in text and "layer 14 seed 0 hi" in text
    assert tables.fidelity_value(15, "fvu", ".2f", results) == "0.06"
    assert (results / tables.DEPTH_HEATMAP).stat().st_size > 1000
    # Before: medium-to-low cells -5 (ca 17 left out, id 16 -1/+1/+3 -> +1); after: -9 everywhere.
    assert tables.depth_shift(results) == (
        "re-training layers 1, 15, 16, 17 moved their cells' seed-mean disparity by 4.0 points at the median cell "
        "(largest -10.0, id layer 16, over 35 cells); the medium-to-low tier's mean: layer 1 -5.0% before, -9.0% "
        "after; layers 15, 16, 17 -4.6% before, -9.0% after")
    assert tables.sae_bar("balanced", results, merged=False).startswith("48 miss(es)")


def test_copy_depth_refuses_an_unfinished_rerun(tables, tmp_path):
    (tmp_path / "out" / "map_depth" / "analysis").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="saes_balanced_depth/saes/fidelity.json"):
        tables.copy_depth(tmp_path / "out", tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_the_depth_sweeps_rule_takes_the_candidate_meeting_the_bar_else_the_fewest_misses(tables, tmp_path):
    out, results = tmp_path / "outputs", tmp_path / "results"
    ok = [0.1] * 3
    _write_saes(out / "depth_sweep" / "deep_l0_128", "balanced", [15, 16, 17], {15: ok, 16: ok, 17: ok})
    _write_saes(out / "depth_sweep" / "deep_e10", "balanced", [15, 16, 17], {15: ok, 16: [0.31, 0.1, 0.1], 17: ok})
    _write_saes(out / "depth_sweep" / "early_travel_1.2", "balanced", [1], {1: [0.5, 0.5, 0.5]})
    assert tables.depth_choice("early", results / "none") is None
    tables.copy_sweep(out, results)
    assert tables.depth_choice("deep", results) == ("deep_l0_128", True)
    assert tables.depth_choice("early", results) is None  # one early candidate not run yet: no choice
    _write_saes(out / "depth_sweep" / "early_dw25", "balanced", [1], {1: [0.1, 0.31, 0.1]})
    tables.copy_sweep(out, results)
    # Neither early candidate meets the bar: the fewer misses (1 of 3 against 3 of 3) wins, and the table says so.
    assert tables.depth_choice("early", results) == ("early_dw25", False)
    table = tables.depth_sweep_table(results)
    assert "| deep_e10 | 16 | 0 | 0.060 | 0.310 (hi) | 96.0 | 1.0 | 0 | no |" in table
    assert "Chosen for the early group by the README's rule: early_dw25 (no candidate meets the bar" in table


# ------------------------------------------------------------------------- scale or features? (norm-matched)

NORM_PLANTED = {  # (lang, layer): per seed (raw, norm-matched, its CI half-width)
    ("hi", 15): [(-40.0, -30.0, 2.0)] * 3,                                    # beyond the scale
    ("hi", 16): [(-40.0, -2.0, 3.0)] * 3,                                     # scale: every CI reaches 0
    ("ml", 15): [(-40.0, -30.0, 2.0), (-40.0, -30.0, 2.0), (-40.0, -10.0, 2.0)],  # mixed: one seed under half
    ("ml", 16): [(5.0, -4.0, 1.0)] * 3,                                       # no raw deficit, a norm-matched one
    ("es", 15): [(-10.0, -9.0, 1.0)] * 3,                                     # high resource: not the tier's
    ("es", 16): [(-10.0, -9.0, 1.0)] * 3,
}


def _norm_summary(seed: int) -> dict:
    """One seed's summary.json of the norm_map part, holding what `extract_norm_matched` reads."""
    layers, langs = ["15", "16"], ["en", "es", "ml", "hi"]
    disparity, ci, matched, matched_ci = {}, {}, {}, {}
    for lang in langs:
        disparity[lang], ci[lang], matched[lang], matched_ci[lang] = {}, {}, {}, {}
        for layer in layers:
            raw, nm, half = NORM_PLANTED[(lang, int(layer))][seed] if lang != "en" else (0.0, 0.0, 0.0)
            disparity[lang][layer], ci[lang][layer] = raw, [raw - 1, raw + 1]
            matched[lang][layer], matched_ci[lang][layer] = nm, [nm - half, nm + half]
    values = {lang: {layer: {"resid_norm": 100.0 if lang == "en" else 80.0} for layer in layers} for lang in langs}
    return {"reference_lang": "en", "layers": [15, 16], "langs": langs, "metric": "mean_act", "bootstrap": 1000,
            "n_sentences": {lang: 204 for lang in langs}, "norm_matched_centre": "sae_b_dec",
            "norm_matched_target": {"15": 10.0 + seed, "16": 12.0}, "values": values, "disparity_pct": disparity,
            "disparity_ci": ci, "disparity_pct_norm_matched": matched, "disparity_ci_norm_matched": matched_ci}


def test_norm_matched_verdicts_counts_and_sentence_follow_the_rule(tables, tmp_path):
    out, results = tmp_path / "outputs", tmp_path / "results"
    for seed in range(3):
        folder = out / "norm_map" / "analysis" / f"sae_seed_{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(_norm_summary(seed)))
    with pytest.raises(FileNotFoundError, match="norm_map"):
        tables.copy_norm(tmp_path / "nowhere", results)
    assert [p.name for p in tables.copy_norm(out, results)] == ["norm_matched.json"]
    table = json.loads((results / tables.NORM).read_text())
    assert table["seeds"] == [0, 1, 2] and table["targets"]["2"]["15"] == 12.0 and "en" not in table["cells"]
    cells = table["cells"]
    assert [tables.norm_verdict(cells["hi"]["15"]), tables.norm_verdict(cells["hi"]["16"]),
            tables.norm_verdict(cells["ml"]["15"]), tables.norm_verdict(cells["ml"]["16"])] == [
        "beyond the scale", "scale", "mixed", None]
    assert tables.norm_counts(results=results) == {"beyond the scale": 1, "scale": 1, "mixed": 1}
    sentence = tables.norm_summary(results)
    assert "of the 3 medium-to-low resource deficits (ml, hi;" in sentence
    assert "1 are beyond the scale" in sentence and "1 are scale" in sentence and "1 mixed" in sentence
    # Means over languages, layers and seeds: raw (-40 x 3 + 5) / 4; norm-matched (-30 - 2 - 70/3 - 4) / 4.
    assert "-28.8% raw and -14.8% norm-matched (3 SAE seeds, 204 sentences)" in sentence
    rows = tables.norm_table(results).splitlines()
    assert "| ml | medium_low | 15 | -40.0% | -23.3% (-32.0 to -8.0) | -20.0% | mixed |" in rows
    assert "| es | high | 15 | -10.0% | -9.0% (-10.0 to -8.0) | -20.0% | beyond the scale |" in rows
    assert tables.norm_hidden("ml,es", results) == "1 of 1 cells (-4.0 to -4.0%)"
    assert tables.norm_hidden("hi,es", results) == "0 of 0 cells"
    # The map's answer names what the norm-matched run measured, and the deep band's layers it did not.
    mapped = _build(tmp_path / "map", tables)
    tables.copy_norm(out, mapped)
    text = tables.answer(mapped)
    assert text.endswith("measured with the centred, norm-matched disparity at layers 15-16, 1 of the tier's 3 deficits "
                         "there are beyond the scale, i.e. in the residual's direction (1 mixed, 1 scale alone; the "
                         "tier's mean there -28.8% raw, -14.8% norm-matched); layers 12, 13, 14, 17 of the deep band "
                         "were not measured this way")


def test_norm_matched_parts_over_other_layers_merge_and_overlapping_ones_do_not(tables, tmp_path):
    def shifted(seed: int, by: int) -> dict:  # the same summary with its layers renamed 15, 16 -> 15 - by, 16 - by
        text = json.dumps(_norm_summary(seed))
        for layer in (15, 16):
            text = text.replace(f'"{layer}"', f'"{layer - by}"')
        summary = json.loads(text)
        summary["layers"] = [15 - by, 16 - by]
        return summary

    out, results = tmp_path / "outputs", tmp_path / "results"
    for part, by in (("norm_map", 0), ("norm_map_12_14", 3)):
        for seed in range(3):
            folder = out / part / "analysis" / f"sae_seed_{seed}"
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(shifted(seed, by)))
    tables.copy_norm(out, results)
    table = json.loads((results / tables.NORM).read_text())
    assert table["layers"] == [12, 13, 15, 16] and set(table["cells"]["hi"]) == {"12", "13", "15", "16"}
    assert table["cells"]["hi"]["12"] == table["cells"]["hi"]["15"] and table["targets"]["0"] == {
        "12": 10.0, "13": 12.0, "15": 10.0, "16": 12.0}
    assert tables.norm_counts(results=results) == {"beyond the scale": 2, "scale": 2, "mixed": 2}
    one = tables.extract_norm_matched({s: shifted(s, 0) for s in range(3)})
    with pytest.raises(ValueError, match="cover layers"):
        tables.merge_norm_matched([one, one])


def test_the_sae_check_of_layers_trained_again_counts_bar_misses_and_the_largest_fvu_gap(tables, tmp_path):
    results = _build(tmp_path, tables)
    first = json.loads((results / "saes_balanced" / "fidelity.json").read_text())
    again = {layer: json.loads(json.dumps(first[layer])) for layer in ("12", "13", "14")}
    for layer, row in again.items():
        for seed, record in row["seeds"].items():
            record["fvu"] += 0.0007 if (layer, seed) == ("13", "2") else -0.0002
    (results / tables.REST_SAES).mkdir()
    (results / tables.REST_SAES / "fidelity.json").write_text(json.dumps(again))
    # _write_saes gives Hindi FVU 0.5 outside the mix layers: every one of the 9 misses the bar.
    assert tables.rest_saes_check(results) == ("the 9 SAEs trained again at layers 12, 13, 14: 9 miss the bar, pooled "
                                               "FVU within 0.0007 of the first run's SAEs of the same layer and seed")
    for row in again.values():
        for record in row["seeds"].values():
            record["per_lang"]["hi"]["fvu"] = 0.2
    (results / tables.REST_SAES / "fidelity.json").write_text(json.dumps(again))
    assert "9 SAEs trained again at layers 12, 13, 14: all meet the bar" in tables.rest_saes_check(results)
