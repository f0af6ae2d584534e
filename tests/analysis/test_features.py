"""Per-feature statistics (mlalign.analysis.features) against known answers and brute-force numpy."""

import numpy as np
import pytest
import torch

from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.analysis.features import FeatureStats, add_intervals, analyze_features, weighted_jaccard
from mlalign.analysis.metrics import compute_metrics
from tests.analysis.test_engine import MAX_LENGTH, layer_outputs_one_by_one, numpy_jumprelu

F = 8


def synthetic_sentences(lang_index: int, n_sentences: int = 12, seed: int = 0) -> list[np.ndarray]:
    """Per sentence [tokens, F] activations: feature 5 fires (1.0) on every token of every language, feature 3 only
    in language 1 (2.0, every token), features 0-2 at random with language-dependent strength, 4 6 7 never."""
    rng = np.random.default_rng([seed, lang_index])
    out = []
    for _ in range(n_sentences):
        n = int(rng.integers(1, 7))
        acts = np.zeros((n, F))
        acts[:, 5] = 1.0
        if lang_index == 1:
            acts[:, 3] = 2.0
        for f in range(3):
            fires = rng.random(n) < 0.5
            acts[fires, f] = rng.random(fires.sum()) * (1 + f * lang_index)
        out.append(acts)
    return out


def stream(sentences: list[np.ndarray], batch_sizes=None, feature_ids=None):
    """Feed sentences (a batch = whole sentences, rows in order) through FeatureStats."""
    acc = FeatureStats(len(sentences), F, feature_ids=feature_ids)
    batch_sizes = batch_sizes or [len(sentences)]
    start = 0
    for size in batch_sizes:
        batch = sentences[start : start + size]
        acts = torch.tensor(np.concatenate(batch), dtype=torch.float32)
        rows = torch.tensor(np.concatenate([[r] * len(s) for r, s in enumerate(batch)]), dtype=torch.long)
        acc.update(acts, rows, len(batch), rows + start)
        start += size
    return acc.finalize()


def brute(sentences):
    tokens = np.concatenate(sentences)
    return {"mean_act": tokens.mean(0), "firing_rate": (tokens != 0).mean(0),
            "sentences_fired": np.array([(s != 0).any(0) for s in sentences]).sum(0),
            "per_sentence": np.array([s.sum(0) for s in sentences]), "n_tokens": np.array([len(s) for s in sentences])}


LANGS = ["en", "hi", "mr"]


def synthetic_data():
    """(sentences, feature totals) of LANGS: lang -> sentences, lang -> {layer 0: FeatureSums}."""
    sentences = {lang: synthetic_sentences(i) for i, lang in enumerate(LANGS)}
    return sentences, {lang: {0: stream(s)} for lang, s in sentences.items()}


def raised(sentences, base, feature: int, factor: float) -> dict:
    """`base` with Hindi's `feature` scaled by `factor` on every token: what an adapter that raised it would give."""
    out = dict(base)
    scaled = [s.copy() for s in sentences["hi"]]
    for s in scaled:
        s[:, feature] *= factor
    out["hi"] = {0: stream(scaled)}
    return out


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_data()


def test_streaming_equals_one_pass_and_brute_force(synthetic):
    sentences, _ = synthetic
    s = sentences["hi"]
    whole = stream(s, feature_ids=[0, 3, 5])
    streamed = stream(s, [5, 1, 6], feature_ids=[0, 3, 5])
    for name in ("n_tokens", "n_sentences", "act_sum", "fire_count", "sentences_fired", "sentence_sums"):
        # Each batch's column sums are float32 (like the per-token sums of stats.LayerStats), accumulated in float64.
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-6)
    expected = brute(s)
    np.testing.assert_allclose(whole.mean_act, expected["mean_act"], rtol=1e-6)
    np.testing.assert_allclose(whole.firing_rate, expected["firing_rate"], rtol=1e-12)
    np.testing.assert_array_equal(whole.sentences_fired, expected["sentences_fired"])
    np.testing.assert_allclose(whole.sentence_sums, expected["per_sentence"][:, [0, 3, 5]], rtol=1e-6)
    assert whole.n_sentences == len(s) and whole.n_tokens == expected["n_tokens"].sum()
    assert np.isnan(whole.mean_act_firing[4]) and whole.mean_act_firing[5] == 1.0


def test_one_language_feature_is_specific_with_selectivity_one(synthetic):
    _, stats = synthetic
    report = analyze_features(stats, "en", LANGS, top_k=3, min_sentences=2)
    s = report.stats[0]
    hi = LANGS.index("hi")
    assert s["selectivity"][hi, 3] == 1.0 and s["specificity"][hi, 3] == 1.0
    assert s["selectivity"][0, 3] == 0.0 and s["selectivity"][2, 3] == 0.0
    np.testing.assert_allclose(s["selectivity"][:, 5], 1 / 3)  # fires equally everywhere: the uniform baseline
    np.testing.assert_allclose(s["specificity"][:, 5], 0.0, atol=1e-12)
    assert report.lists["hi"][0]["specific"][0] == 3
    assert 3 not in report.lists["en"][0]["specific"] and 5 not in report.lists["mr"][0]["specific"]
    assert report.lists["hi"][0]["over"][0] == 3  # the largest difference from English
    assert 3 not in report.lists["hi"][0]["under"] and 3 not in report.lists["mr"][0]["over"]
    # never-firing features are in no list and selectivity NaN
    assert np.isnan(s["selectivity"][:, 4]).all()
    assert all(4 not in kinds.get(k, []) for by in report.lists.values() for kinds in by.values() for k in kinds)


def test_overlap_identity_and_disjoint():
    a = np.array([1.0, 2.0, 0.0, 0.0])
    grid = weighted_jaccard(np.stack([a, 3 * a, np.array([0, 0, 1.0, 1.0]), np.zeros(4)]))
    assert np.allclose(np.diag(grid), 1.0)
    assert grid[0, 1] == pytest.approx(1.0)  # same features, uniformly weaker: full overlap (disparity_pct's job)
    assert grid[0, 2] == 0.0 and grid[0, 3] == 0.0
    half = weighted_jaccard(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert half[0, 1] == pytest.approx(0.5 / 1.5)  # profiles (.5,.5,0) and (.5,0,.5): min 0.5, max 1.5


def test_identical_languages_overlap_one_and_share_all(synthetic):
    sentences, _ = synthetic
    same = stream(sentences["en"])
    report = analyze_features({"en": {0: same}, "xx": {0: stream(sentences["en"], [3, 9])}}, "en", min_sentences=1)
    assert report.overlap[0][0, 1] == pytest.approx(1.0)
    assert report.reference_share["xx"][0] == {"features": 1.0, "mass": 1.0}
    assert report.lists["xx"][0]["over"] == [] and report.lists["xx"][0]["under"] == []
    assert report.specific_counts["xx"][0] == 0


def test_top_k_matches_brute_force():
    rng = np.random.default_rng(3)
    langs = ["en", "hi", "ml"]
    sentences = {lang: [rng.gamma(0.3, 1.0, size=(int(rng.integers(2, 6)), F)) * (rng.random((1, F)) < 0.7)
                        for _ in range(15)] for lang in langs}
    stats = {lang: {2: stream(s, [4, 4, 7])} for lang, s in sentences.items()}
    k, support = 3, 6
    report = analyze_features(stats, "en", langs, top_k=k, min_sentences=support)
    ref = brute(sentences["en"])
    for lang in ("hi", "ml"):
        mine = brute(sentences[lang])
        diff = mine["mean_act"] - ref["mean_act"]
        over = sorted([f for f in range(F) if diff[f] > 0 and mine["sentences_fired"][f] >= support], key=lambda f: -diff[f])[:k]
        under = sorted([f for f in range(F) if diff[f] < 0 and ref["sentences_fired"][f] >= support], key=lambda f: diff[f])[:k]
        assert report.lists[lang][2]["over"] == over
        assert report.lists[lang][2]["under"] == under
    means = np.stack([brute(sentences[lang])["mean_act"] for lang in langs])
    np.testing.assert_allclose(report.stats[2]["selectivity"], means / means.sum(0), rtol=1e-6)


def test_paired_intervals(synthetic):
    sentences, stats = synthetic
    ids = {lang: list(range(12)) for lang in LANGS}
    report = analyze_features(stats, "en", LANGS, top_k=3, min_sentences=2)
    needed = report.needed_features()
    sums = {lang: {0: stream(sentences[lang], [7, 5], feature_ids=needed[lang][0])} for lang in LANGS}
    n_tokens = {lang: {0: brute(sentences[lang])["n_tokens"]} for lang in LANGS}
    add_intervals(report, sums, n_tokens, ids, n_resamples=300, ci=0.9, seed=1)
    for lang in ("hi", "mr"):
        for f in report.lists[lang][0]["over"] + report.lists[lang][0]["under"]:
            low, high = report.intervals[lang][0][f]
            assert low <= report.diff(lang, 0, f) <= high
    # An exact copy of English, paired by id, gives zero-width intervals.
    copy = {"en": stats["en"], "xx": {0: stream(sentences["en"], [2, 10])}}
    twin = analyze_features(copy, "en", top_k=3, min_sentences=1)
    twin.lists["xx"][0]["over"] = [0, 1, 2]  # force some listed features
    feats = twin.needed_features()
    twin_sums = {lang: {0: stream(sentences["en"], feature_ids=feats[lang][0])} for lang in ("en", "xx")}
    add_intervals(twin, twin_sums, {lang: {0: n_tokens["en"][0]} for lang in ("en", "xx")},
                  {"en": ids["en"], "xx": ids["en"]}, n_resamples=100)
    assert all(abs(low) < 1e-12 and abs(high) < 1e-12 for low, high in twin.intervals["xx"][0].values())


def test_engine_feature_stats_match_brute_force(model, tokenizer, saes, texts):
    sentences = texts["hi"][:6]
    feature_stats: dict = {}
    stats = collect_stats(model, tokenizer, {1: saes[1]}, {"hi": sentences},
                          EngineSettings(batch_size=4, max_length=MAX_LENGTH, progress=False),
                          feature_stats=feature_stats, feature_ids={"hi": {1: [0, 7, 11]}})
    plain = collect_stats(model, tokenizer, {1: saes[1]}, {"hi": sentences},
                          EngineSettings(batch_size=4, max_length=MAX_LENGTH, progress=False))
    # Features on change no other number.
    for name, value in plain["hi"][1].to_dict().items():
        np.testing.assert_array_equal(value, stats["hi"][1].to_dict()[name])
    feats = [numpy_jumprelu(saes[1], out[1][1:])[0] for out in layer_outputs_one_by_one(model, tokenizer, sentences)]
    expected = brute(feats)
    got = feature_stats["hi"][1]
    np.testing.assert_allclose(got.mean_act, expected["mean_act"], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(got.sentences_fired, expected["sentences_fired"])
    np.testing.assert_allclose(got.firing_rate, expected["firing_rate"])
    np.testing.assert_allclose(got.sentence_sums, expected["per_sentence"][:, [0, 7, 11]], rtol=1e-4, atol=1e-6)
    # Consistent with the per-layer metrics: mean over features of mean_act, and l0 = total firing rate.
    values = compute_metrics(stats)["hi"][1]
    assert got.mean_act.mean() == pytest.approx(values["mean_act"], rel=1e-6)
    assert got.firing_rate.sum() == pytest.approx(values["l0"], rel=1e-9)
    # Batch size changes nothing.
    other: dict = {}
    collect_stats(model, tokenizer, {1: saes[1]}, {"hi": sentences},
                  EngineSettings(batch_size=1, max_length=MAX_LENGTH, progress=False), feature_stats=other)
    np.testing.assert_array_equal(other["hi"][1].sentences_fired, got.sentences_fired)
    np.testing.assert_allclose(other["hi"][1].act_sum, got.act_sum, rtol=1e-6)


def test_adapter_view_tells_language_features_from_generic_ones(synthetic):
    from mlalign.analysis.features import adapter_changes

    sentences, base = synthetic
    specific = adapter_changes(base, raised(sentences, base, 3, 2.0), ["hi", "en"], "en", top_k=1, min_sentences=2)
    assert specific["hi"][0]["up"][0]["feature"] == 3
    assert specific["hi"][0]["gain_specific_share"] == pytest.approx(1.0)  # feature 3 is Hindi's own
    assert specific["hi"][0]["gain_top_k_share"] == pytest.approx(1.0)
    # Above the uniform-scaling baseline (the base model's mass on Hindi's specific features), and flagged as Hindi's.
    assert 0 < specific["hi"][0]["base_specific_share"] < 1 and specific["hi"][0]["up"][0]["specific"]
    assert specific["en"][0]["up"] == [] and specific["en"][0]["gain_top_k_share"] is None  # English untouched
    generic = adapter_changes(base, raised(sentences, base, 5, 2.0), ["hi"], "en", top_k=1, min_sentences=2)
    assert generic["hi"][0]["up"][0]["feature"] == 5 and generic["hi"][0]["gain_specific_share"] == 0.0


def test_identity_adapter_changes_no_feature(synthetic):
    from mlalign.analysis.features import adapter_changes, adapter_changes_by_band

    _, base = synthetic
    same = {lang: {0: stream(s)} for lang, s in synthetic[0].items()}  # recomputed, as an identity adapter would be
    changes = adapter_changes(base, same, ["hi", "mr", "en"], "en", top_k=3, min_sentences=2)
    for lang in ("hi", "mr", "en"):
        cell = changes[lang][0]
        assert cell["up"] == [] and cell["down"] == [] and cell["total_rise"] == 0 and cell["total_fall"] == 0
        assert cell["turned_on"] == cell["turned_off"] == 0 and cell["gain_top_k_share"] is None
    assert changes["hi"][0]["base_specific_share"] > 0  # feature 3 is Hindi's: the baseline is defined regardless
    band = adapter_changes_by_band(changes, {"all": [0]})["hi"]["all"]
    assert band["gain_specific_share"] is None and band["turned_on"] == 0


def test_planted_encoder_change_is_the_top_change(model, tokenizer, saes, texts):
    """An "adapter" that raises exactly one feature (its encoder column and bias x3 in a JumpReLU SAE: the feature's
    pre-activation triples, nothing else moves) through the real engine: that feature is the top rise and carries all
    of it; no feature falls or turns off."""
    import copy

    from mlalign.analysis.features import adapter_changes

    sub = {lang: texts[lang][:12] for lang in ("en", "hi")}
    base: dict = {}
    collect_stats(model, tokenizer, {1: saes[1]}, sub,
                  EngineSettings(batch_size=4, max_length=MAX_LENGTH, progress=False), feature_stats=base)
    planted = int(np.argmax(base["hi"][1].sentences_fired))
    raised = copy.deepcopy(saes[1])
    with torch.no_grad():
        raised.W_enc[:, planted] *= 3
        raised.b_enc[planted] *= 3
    adapted: dict = {}
    collect_stats(model, tokenizer, {1: raised}, sub,
                  EngineSettings(batch_size=4, max_length=MAX_LENGTH, progress=False), feature_stats=adapted)
    changes = adapter_changes(base, adapted, ["hi", "en"], "en", top_k=1, min_sentences=2)
    for lang in ("hi", "en"):
        cell = changes[lang][1]
        assert [item["feature"] for item in cell["up"]] == [planted]
        assert cell["up"][0]["adapted"] > 2.9 * cell["up"][0]["base"] > 0
        assert cell["gain_top_k_share"] == pytest.approx(1.0) and cell["down"] == [] and cell["total_fall"] == 0
        assert cell["turned_off"] == 0
    # With more room than changed features, the lists still name only the planted one.
    wide = adapter_changes(base, adapted, ["hi"], "en", top_k=10, min_sentences=2)
    assert [item["feature"] for item in wide["hi"][1]["up"]] == [planted]
