"""The map across SAE seeds (analysis/sae_seeds.json): spread and sign verdicts on constructed per-seed summaries."""

import pytest

from mlalign.analysis.sae_seeds import seed_spread

LAYERS = [0, 1, 2]
BANDS = {"early": [0, 1], "deep": [2]}


def summary(disparity: dict[str, list[float]], ci: dict[str, list[list[float]]] | None = None, unfit_layers=(),
            bootstrap: int = 100) -> dict:
    """A summary.json as `summarize` writes it, holding only what `seed_spread` reads."""
    by_layer = {lang: {str(layer): value for layer, value in zip(LAYERS, values)} for lang, values in disparity.items()}
    cis = None if ci is None else {lang: {str(layer): c for layer, c in zip(LAYERS, cs)} for lang, cs in ci.items()}
    return {"reference_lang": "en", "metric": "mean_act", "aggregate": "token", "ci": 0.95, "bootstrap": bootstrap,
            "layers": LAYERS, "langs": ["en", *disparity], "bands": BANDS,
            "disparity_pct": {"en": {str(layer): 0.0 for layer in LAYERS}, **by_layer},
            "disparity_ci": cis, "unfit_layers": list(unfit_layers), "unfit_cells": {}}


def test_identical_seeds_have_zero_spread_and_every_cell_keeps_its_sign():
    # 0.1 three times: a float mean would be 0.10000000000000002 and the SD ~1e-17; the spread must be exactly 0.
    one = summary({"hi": [0.1, -7.3, 12.9], "zh": [-0.1, 3.3, -25.0]},
                  ci={"hi": [[0.05, 0.2], [-9, -5], [10, 15]], "zh": [[-0.3, 0.1], [1, 5], [-30, -20]]})
    spread = seed_spread({0: one, 1: one, 2: one})
    cells = [cell for by_layer in spread["cells"].values() for cell in by_layer.values()]
    assert len(cells) == 6 and all(cell["seed_sd"] == 0.0 for cell in cells)
    assert all(cell["seed_range"][0] == cell["seed_range"][1] == cell["mean_disparity_pct"] for cell in cells)
    assert spread["cells"]["hi"]["0"]["mean_disparity_pct"] == 0.1
    assert (spread["n_cells"], spread["n_sign_stable"]) == (6, 6) and spread["sign_unstable"] == []
    # zh layer 0's CI includes 0 under every seed: its point sign is stable, its CI sign is not.
    assert spread["n_ci_sign_stable"] == 5 and spread["cells"]["zh"]["0"]["ci_sign_stable"] is False
    assert spread["cells"]["hi"]["2"]["sentence_ci_halfwidth"] == 2.5
    assert spread["statements"][0].startswith("6 of 6 (language, layer) cells keep the sign")


def test_one_seed_flipping_a_cell_makes_that_cell_sign_unstable():
    base = {"hi": [-10.0, -4.0, 6.0], "zh": [2.0, 3.0, -1.0]}
    flipped = {"hi": [-11.0, 0.5, 6.5], "zh": [2.5, 3.5, -1.5]}  # hi layer 1 changes sign under seed 1
    spread = seed_spread({0: summary(base), 1: summary(flipped), 2: summary(base)})
    hi1 = spread["cells"]["hi"]["1"]
    assert hi1["sign_stable"] is False and hi1["disparity_pct"] == {"0": -4.0, "1": 0.5, "2": -4.0}
    assert hi1["seed_range"] == [-4.0, 0.5] and hi1["mean_disparity_pct"] == pytest.approx(-2.5)
    assert hi1["seed_sd"] == pytest.approx(2.598076, rel=1e-6)  # sample SD (n - 1) of -4, 0.5, -4
    assert spread["sign_unstable"] == [["hi", 1]]
    assert (spread["n_cells"], spread["n_sign_stable"]) == (6, 5)
    assert spread["by_band"]["early"]["n_sign_stable"] == 3 and spread["by_band"]["deep"]["n_sign_stable"] == 2
    assert spread["n_ci_sign_stable"] is None  # no CIs: no CI verdict, and no words about one
    assert any("depends on the SAE seed at hi layer 1 (-4.0 to +0.5%)" in line for line in spread["statements"])
    assert not any("sentence CI" in line for line in spread["statements"])


def test_a_zero_keeps_no_sign_and_a_ci_touching_zero_is_not_excluding_it():
    spread = seed_spread({0: summary({"hi": [0.0, -2.0, -2.0]}, ci={"hi": [[-1, 1], [-3, 0.0], [-3, -1]]}),
                          1: summary({"hi": [1.0, -2.5, -2.5]}, ci={"hi": [[0.5, 2], [-4, -1], [-4, -2]]})})
    assert spread["cells"]["hi"]["0"]["sign_stable"] is False
    assert spread["cells"]["hi"]["1"]["sign_stable"] is True and spread["cells"]["hi"]["1"]["ci_sign_stable"] is False
    assert spread["cells"]["hi"]["2"]["ci_sign_stable"] is True


def test_a_layer_some_seeds_sae_does_not_fit_is_left_out_of_the_counts():
    values = {"hi": [-1.0, -2.0, 3.0]}
    spread = seed_spread({0: summary(values), 1: summary({"hi": [-1.0, 2.0, 3.0]}, unfit_layers=[1])})
    assert spread["cells"]["hi"]["1"]["fit"] is False and spread["cells"]["hi"]["1"]["sign_stable"] is False
    assert spread["n_cells"] == 2 and spread["n_sign_stable"] == 2 and spread["sign_unstable"] == []
    assert spread["n_cells_left_out"] == 1 and "1 cell(s) left out" in spread["statements"][0]


def test_seeds_that_analysed_different_layers_are_a_bug_not_a_spread():
    other = summary({"hi": [1.0, 2.0, 3.0]})
    other["layers"] = [0, 1]
    with pytest.raises(ValueError, match="layers"):
        seed_spread({0: summary({"hi": [1.0, 2.0, 3.0]}), 1: other})


def _one_layer(layer: int, values: dict[str, float]) -> dict:
    """A summary of one layer only, as a re-run at that layer writes it."""
    out = summary({lang: [value] * len(LAYERS) for lang, value in values.items()})
    out["layers"] = [layer]
    out["disparity_pct"] = {"en": {str(layer): 0.0}, **{lang: {str(layer): value} for lang, value in values.items()}}
    return out


def test_replacing_a_layer_takes_its_cells_from_the_rerun_and_recounts_everything():
    from mlalign.analysis.sae_seeds import replace_layers

    base = {"hi": [-10.0, -4.0, 6.0], "zh": [2.0, 3.0, -1.0]}
    flipped = {"hi": [-10.0, 0.5, 6.0], "zh": [2.0, 3.0, -1.0]}  # hi layer 1 flips under seed 1 ...
    spread = seed_spread({0: summary(base), 1: summary(flipped)})
    assert spread["sign_unstable"] == [["hi", 1]]
    # ... and a re-run of layer 1 with other SAEs finds it stable under both seeds.
    rerun = seed_spread({0: _one_layer(1, {"hi": -3.0, "zh": 4.0}), 1: _one_layer(1, {"hi": -5.0, "zh": 2.0})})
    merged = replace_layers(spread, rerun)
    assert merged["cells"]["hi"]["1"] == rerun["cells"]["hi"]["1"]
    assert merged["cells"]["hi"]["1"]["disparity_pct"] == {"0": -3.0, "1": -5.0}
    assert merged["cells"]["hi"]["0"] == spread["cells"]["hi"]["0"] and merged["cells"]["zh"]["2"] == spread["cells"]["zh"]["2"]
    assert merged["sign_unstable"] == [] and (merged["n_cells"], merged["n_sign_stable"]) == (6, 6)
    assert merged["by_band"]["early"]["n_sign_stable"] == 4 and merged["replaced_layers"] == [1]
    assert merged["statements"][0].startswith("6 of 6 (language, layer) cells keep the sign")
    assert merged["layers"] == LAYERS and spread["sign_unstable"] == [["hi", 1]]  # the map itself is untouched


def test_a_rerun_on_other_seeds_or_layers_cannot_replace_the_maps_cells():
    from mlalign.analysis.sae_seeds import replace_layers

    spread = seed_spread({0: summary({"hi": [1.0, 2.0, 3.0]}), 1: summary({"hi": [1.0, 2.0, 3.0]})})
    other_seeds = seed_spread({0: _one_layer(1, {"hi": 1.0}), 5: _one_layer(1, {"hi": 1.0})})
    with pytest.raises(ValueError, match="seeds"):
        replace_layers(spread, other_seeds)
    outside = seed_spread({0: _one_layer(7, {"hi": 1.0}), 1: _one_layer(7, {"hi": 1.0})})
    with pytest.raises(ValueError, match="layers"):
        replace_layers(spread, outside)


def test_the_norm_matched_disparity_gets_its_own_record_across_seeds():
    base, matched = {"hi": [-30.0, -20.0, -40.0]}, [{"hi": [-2.0, -15.0, 1.0]}, {"hi": [1.0, -14.0, -1.0]}]
    summaries = {}
    for seed, nm in enumerate(matched):
        one = summary(base)
        one["disparity_pct_norm_matched"] = {"en": {str(layer): 0.0 for layer in LAYERS},
                                             "hi": {str(layer): v for layer, v in zip(LAYERS, nm["hi"])}}
        one["disparity_ci_norm_matched"] = {"hi": {str(layer): [v - 1, v + 1] for layer, v in zip(LAYERS, nm["hi"])}}
        summaries[seed] = one
    spread = seed_spread(summaries)
    cells = spread["cells"]["hi"]
    # layer 0: a scale gap whose sign turns with the seed; layer 1: a direction gap every seed keeps.
    assert cells["0"]["norm_matched"]["sign_stable"] is False and cells["0"]["sign_stable"] is True
    assert cells["1"]["norm_matched"]["mean_disparity_pct"] == pytest.approx(-14.5)
    assert cells["1"]["norm_matched"]["ci_sign_stable"] is True
    assert cells["1"]["norm_matched"]["disparity_pct"] == {"0": -15.0, "1": -14.0} and "fit" not in cells["1"]["norm_matched"]
    # Counts and statements stay the primary disparity's.
    assert (spread["n_cells"], spread["n_sign_stable"]) == (3, 3)
    assert "norm_matched" not in seed_spread({0: summary(base), 1: summary(base)})["cells"]["hi"]["0"]
