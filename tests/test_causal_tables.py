"""The causal experiment's write-up generator (experiments/gemma3_270m_causal/tables.py) on a layer's files with known
answers, built by the real functions (`ablation_matrix` over constant per-sentence changes, so every interval is its
point; `steering_results` over a scripted generator and identifier) in the shape causal.py writes, then copied by the
generator's own `copy`: a language shown causal, one not (its features raise another language's loss more), one
without features, and the steering shares per alpha."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import load_experiment_module

LANGS = ["en", "zh", "hi"]
N = 6  # sentences per language
OWN = {"hi": {"en": 0.0, "zh": 0.1, "hi": 0.5}, "zh": {"en": 0.0, "zh": 0.2, "hi": 0.3}}
RANDOM = {"hi": {"en": 0.0, "zh": 0.0, "hi": 0.05}, "zh": {"en": 0.0, "zh": 0.01, "hi": 0.0}}


@pytest.fixture(scope="module")
def tables():
    return load_experiment_module("experiments/gemma3_270m_causal/tables.py", "causal_tables")


def _ablation() -> dict:
    from mlalign.analysis.ablation import ablation_matrix
    from mlalign.analysis.features import paired_counts

    const = lambda table: {a: {e: np.full(N, v) for e, v in row.items()} for a, row in table.items()}  # noqa: E731
    counts = paired_counts(None, LANGS, "en", {lang: N for lang in LANGS}, 50, 0)
    result = ablation_matrix(const(OWN), const(RANDOM), counts, 0.95)
    return {"layer": 3, "k": 10, "split": "dev", "features_chosen_on": "test", "n_sentences": {lang: N for lang in LANGS},
            "ci": 0.95, "bootstrap": 50, "features": {"en": [], "zh": [4, 5], "hi": [1, 2]},
            "random_features": {"zh": [7, 8], "hi": [9, 10]}, "matrix": result["matrix"], "random": result["random"],
            "comparisons": result["comparisons"],
            "causal": {lang: result["comparisons"][lang]["causal"] for lang in OWN}, "statements": []}


def _steering() -> dict:
    from mlalign.analysis.steering import steering_results

    def generate(vector):  # along hi's own direction (first axis): more Hindi the further; random: never
        if vector is None or float(vector[0]) <= 0:
            return ["en"] * 4
        return ["hi"] * 3 + ["en"] if float(vector[0]) >= 2 else ["hi"] + ["en"] * 3

    directions = {"hi": (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])),
                  "zh": (torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0]))}
    results = steering_results(generate, lambda texts: list(texts), directions, [1.0, 2.0], 1.0)
    return {"layer": 3, "k": 10, "alpha_unit": "the centred RMS residual", "alpha_scale": 1.0, "prompts": 4,
            "prompt_split": "dev", "reference_lang": "en", "max_new_tokens": 8, "identifier": "py3langid",
            "candidates": LANGS, "features": {}, "random_features": {}, "results": results, "no_specific_features": []}


@pytest.fixture(scope="module")
def results(tmp_path_factory, tables):
    root = tmp_path_factory.mktemp("causal_run")
    analysis = root / "outputs" / "layer_3" / "analysis"
    analysis.mkdir(parents=True)
    (analysis / "ablation.json").write_text(json.dumps(_ablation()))
    (analysis / "steering.json").write_text(json.dumps(_steering()))
    for name in ("ablation.png", "steering.png", "feature_dashboard.html"):
        (analysis / name).write_bytes(b"shown, not read")
    (analysis / "features_neuronpedia.json").write_text("{}")
    out = root / "results"
    copied = tables.copy(3, root / "outputs", out)
    assert sorted(p.name for p in copied) == sorted(tables.FILES)
    return out


def test_the_verdict_names_the_causal_language_the_one_not_shown_and_the_one_without_features(tables, results):
    assert tables.layers(results) == ["3"]
    assert tables.causal_verdict(3, results) == (
        "at layer 3, removing a language's top 10 specific features raises its own LM loss more than any other "
        "language's and more than 10 matched random features do for 1 of 2 languages (hi); not shown for zh; en had "
        "no specific feature there")


def test_the_ablation_table_gives_the_closest_other_language_and_the_random_control(tables, results):
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in tables.ablation_table(3, results).splitlines()[2:] if line.startswith("| ")}
    # hi: own +0.5; closest other: zh (+0.5 - 0.1); random on hi +0.05. zh: hi's loss rises more (+0.2 - 0.3 < 0).
    assert rows["hi"] == ["+0.500 [+0.500, +0.500]", "zh: +0.400 [+0.400, +0.400]", "+0.050 [+0.050, +0.050]",
                          "+0.450 [+0.450, +0.450]", "yes"]
    assert rows["zh"][1] == "hi: -0.100 [-0.100, -0.100]" and rows["zh"][-1] == "no"
    assert "en" not in rows


def test_the_steering_table_and_sentence_give_each_alphas_shares(tables, results):
    table = tables.steering_table(3, results)
    assert table.splitlines()[0] == "| lang | α = 0 | α = 1 | α = 2 |"
    assert "| hi | 0.00 / 0.00 (0.00; 0.00 / 0.00) | 0.25 / 0.00 (0.25; 0.00 / 0.00) | 0.75 / 0.00 (0.75; 0.00 / 0.00) |" \
        in table
    # Wilson intervals over the 4 prompts: 0 of 4 has upper end z^2 / (n + z^2) = 3.84 / 7.84 = 0.49.
    assert tables.steering_best(3, results) == (
        "at layer 3, the largest share of the 4 generations in the language (95% Wilson interval over prompts), own "
        "direction vs the matched random one at the same α: hi 0.75 [0.30, 0.95] (α 2) vs random 0.00 [0.00, 0.49]; "
        "zh 0.00 [0.00, 0.49] (α 0) vs random 0.00 [0.00, 0.49]")
    low, high = tables.share_ci(0.0, 4)
    assert low == 0.0 and abs(high - 1.96 ** 2 / (4 + 1.96 ** 2)) < 1e-3


def test_copy_refuses_an_unfinished_layer_and_the_tables_name_the_missing_file(tables, tmp_path):
    (tmp_path / "out" / "layer_9" / "analysis").mkdir(parents=True)
    (tmp_path / "out" / "layer_9" / "analysis" / "ablation.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="steering.json"):
        tables.copy(9, tmp_path / "out", tmp_path / "results")
    assert not (tmp_path / "results").exists()
    with pytest.raises(FileNotFoundError, match="tables.py copy 9"):
        tables.ablation_table(9, tmp_path / "results")


def test_the_steering_verdict_needs_intervals_apart_and_names_a_random_direction_that_steers(tables, tmp_path):
    """24 prompts: hi 18 of 24 along its own direction vs 0 along the random one ([0.55, 0.88] vs [0, 0.14]: apart);
    zh 6 vs 14 of 24 (the random direction steers more, and past RANDOM_STEERS); it 4 vs 0 ([0.07, 0.36] vs
    [0, 0.14]: overlapping, so not shown)."""
    def rows(own, random):
        return [{"alpha": 0.0, "share_in_lang": 0.0, "share_in_lang_random": 0.0, "examples": []},
                {"alpha": 2.0, "share_in_lang": own / 24, "share_in_lang_random": random / 24, "examples": []}]

    data = {**_steering(), "prompts": 24, "results": {"hi": rows(18, 0), "zh": rows(6, 14), "it": rows(4, 0)}}
    (tmp_path / "layer_3").mkdir()
    (tmp_path / "layer_3" / "steering.json").write_text(json.dumps(data))
    assert tables.steering_verdict(3, tmp_path) == (
        "at layer 3, steering along a language's top 10 features makes more of the 24 generations that language than "
        "the matched random direction (95% Wilson intervals apart) for 1 of 3 languages: hi (α 2); not for zh, it; the "
        "random direction alone makes at least 50% of generations the language for zh at α 2 (0.58)")
    # Measured repetition: hi's 18 become 3 not-repetitive ones ([0.04, 0.31] vs [0, 0.14]: no longer apart).
    for lang, row in data["results"].items():
        for r in row:
            r.update(share_in_lang_not_repetitive=r["share_in_lang"] * (3 / 18 if lang == "hi" else 1),
                     share_in_lang_not_repetitive_random=0.0, share_repetitive=0.0, share_repetitive_random=0.0)
    (tmp_path / "layer_3" / "steering.json").write_text(json.dumps(data))
    assert tables.steering_verdict(3, tmp_path).startswith(
        "at layer 3, steering along a language's top 10 features makes more of the 24 generations that language, not "
        "repetitive, than the matched random direction (95% Wilson intervals apart) for 0 of 3 languages; not for hi, "
        "zh, it")
