"""The base side of the paired outcome pass, cached: the same numbers as measuring it, token by token, whatever the
batches; the old one-pass definition of the code cosine; a key that changes with the split and a switch that
recomputes."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from mlalign.training import base_cache
from mlalign.training.outcomes import measure_adapted, measure_base, measure_paired
from tests.training.test_outcomes import scaled_layer

LAYERS = [4, 12]


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from mlalign.saes import load_saes
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    overrides = ["model=testbed", *bed_overrides(testbed_dir)]
    cfg = compose_cfg(overrides)
    model = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    saes = load_saes(cfg.sae, LAYERS, model.config.hidden_size)
    corpus = load_corpus(cfg.data, ["en", "hi"], "dev")
    texts = {lang: corpus[lang][:24] for lang in ("hi", "en")}
    return model, tokenizer, saes, texts, overrides


def _cache(bed, tmp_path, *overrides, split="dev"):
    from tests.helpers import compose_cfg

    cfg = compose_cfg([*bed[4], *overrides], tmp_path)
    return base_cache.open_cache(cfg, None, split, LAYERS, "no")


def _same(a: dict, b: dict, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for lang in a:
        for name, value in asdict(a[lang]).items():
            other = asdict(b[lang])[name]
            if value is None or other is None:  # the spliced-in loss, measured separately (add_spliced)
                assert value is None and other is None, (lang, name)
            elif rtol == 0.0:
                assert np.array_equal(np.asarray(value), np.asarray(other)), (lang, name)
            else:
                np.testing.assert_allclose(value, other, rtol=rtol, atol=1e-9, err_msg=f"{lang} {name}")


def test_a_cached_base_side_gives_the_same_numbers_as_measuring_it(bed, tmp_path):
    model, tokenizer, saes, texts, _ = bed
    state, adapter_off = scaled_layer(model, 3, 1.3)
    try:
        direct = measure_paired(model, adapter_off, tokenizer, saes, texts, "l1", batch_size=8, max_length=48,
                                progress=False)
        cache = _cache(bed, tmp_path)
        with adapter_off():
            first = base_cache.base_sides(cache, model, tokenizer, saes, texts, batch_size=8, max_length=48,
                                          progress=False)
        assert len(list(cache.directory.glob("*.npz"))) == len(texts) * len(LAYERS)
        loaded, missing = base_cache.load(_cache(bed, tmp_path), list(texts), LAYERS)
        assert missing == {}
        # Another batch size for the adapted side (another sweep job): the tokens still line up, one by one.
        from_cache = measure_adapted(model, loaded, tokenizer, saes, texts, "l1", batch_size=5, max_length=48,
                                     progress=False)
        same_run = measure_adapted(model, first, tokenizer, saes, texts, "l1", batch_size=8, max_length=48,
                                   progress=False)
    finally:
        state["handle"].remove()
    _same(direct, same_run)  # what the cache held is what was measured
    _same(direct, from_cache, rtol=1e-5)  # the batches differ: float rounding only
    assert all(np.any(direct[lang].metric_after != direct[lang].metric_before) for lang in texts)  # the "adapter" acts


def test_code_cosine_and_norm_matched_metric_keep_the_one_pass_definition(bed):
    """The adapted side rebuilds f_before from the stored non-zero entries: the same numbers as both forward passes
    side by side, as the outcome measures were first defined (docs/training.md)."""
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions, pad_batch

    model, tokenizer, saes, texts, _ = bed
    layer, lang = LAYERS[1], "hi"
    state, adapter_off = scaled_layer(model, 3, 1.3)
    try:
        paired = measure_paired(model, adapter_off, tokenizer, {layer: saes[layer]}, {lang: texts[lang]}, "mean_act",
                                batch_size=64, max_length=48, progress=False)[lang]
        encoded = tokenizer(texts[lang], truncation=True, max_length=48)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        inputs = pad_batch(encoded, pad, "right", torch.device("cpu"))
        keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
        residual = {}
        with torch.no_grad():
            for which, context in (("before", adapter_off), ("after", None)):
                with (context() if context else torch.no_grad()), ResidualCapture(model, [layer]) as capture:
                    model(**inputs, use_cache=False)
                    residual[which] = capture.activations[layer].float()
    finally:
        state["handle"].remove()
    sae = saes[layer]
    cosine, matched = [], []
    for row in range(len(encoded)):
        x_before, x_after = residual["before"][row][keep[row]], residual["after"][row][keep[row]]
        f_before, f_after = sae.encode(x_before), sae.encode(x_after)
        centre = sae.b_dec  # the norm is matched around b_dec (the residual's near-constant part)
        scale = (x_before - centre).norm(dim=-1) / (x_after - centre).norm(dim=-1)
        matched.append(sae.encode(centre + (x_after - centre) * scale[:, None]).mean(dim=-1).sum().item())
        both_zero = (f_before.norm(dim=-1) == 0) & (f_after.norm(dim=-1) == 0)
        cos = torch.nn.functional.cosine_similarity(f_before, f_after, dim=-1, eps=1e-12)
        cosine.append(torch.where(both_zero, torch.ones_like(cos), cos).sum().item())
    np.testing.assert_allclose(paired.code_cosine[:, 0], cosine, rtol=1e-4)
    np.testing.assert_allclose(paired.metric_norm_matched[:, 0], matched, rtol=1e-4)
    assert 0 < paired.code_cosine.sum() / paired.n_tokens.sum() < 1  # the codes changed, yet stayed related


def test_the_key_follows_the_split_and_max_length_and_analysis_cache_false_recomputes(bed, tmp_path):
    model, tokenizer, saes, texts, _ = bed
    small = {"en": texts["en"][:6]}
    cache = _cache(bed, tmp_path)
    base_cache.base_sides(cache, model, tokenizer, saes, small, batch_size=8, max_length=48, progress=False)
    assert base_cache.load(_cache(bed, tmp_path), ["en"], LAYERS)[1] == {}
    for other in (_cache(bed, tmp_path, split="test"), _cache(bed, tmp_path, "data.max_length=32")):
        assert base_cache.load(other, ["en"], LAYERS)[1] == {"en": LAYERS}
    off = _cache(bed, tmp_path, "analysis.cache=false")
    assert base_cache.load(off, ["en"], LAYERS)[1] == {"en": LAYERS}
    before = {p: p.stat().st_mtime_ns for p in cache.directory.glob("*.npz")}
    measured = base_cache.base_sides(off, model, tokenizer, saes, small, batch_size=8, max_length=48, progress=False)
    assert set(measured["en"].layers) == set(LAYERS)
    assert {p: p.stat().st_mtime_ns for p in cache.directory.glob("*.npz")} == before  # nothing written
    direct = measure_base(model, tokenizer, saes, small, batch_size=8, max_length=48, progress=False)
    _same({"en": measured["en"].layers[4]}, {"en": direct["en"].layers[4]})


def test_the_analysis_pass_records_the_same_base_side_as_measuring_it(bed):
    """task=pipeline's step 1 records the paired pass's base side in its own forward passes (stacked SAE step, its own
    batches, left padding, one layer chunk at a time): the same tokens, codes and sums as `measure_base`."""
    from mlalign.analysis.engine import EngineSettings, collect_stats
    from mlalign.analysis.norm_matched import sae_centres
    from mlalign.training.outcomes import BaseSideRecorder

    model, tokenizer, saes, texts, _ = bed
    measured = measure_base(model, tokenizer, saes, texts, batch_size=8, max_length=48, progress=False)
    # en: analysed, not recorded
    recorders = {"hi": BaseSideRecorder(len(texts["hi"]), LAYERS, "cpu", sae_centres(saes))}
    collect_stats(model, tokenizer, saes, texts,
                  EngineSettings(batch_size=5, max_length=48, sae_chunk=1, padding_side="left", progress=False),
                  token_recorders=recorders)
    side, expected = recorders["hi"].finalize(model.config.hidden_size), measured["hi"]
    for name in ("n_tokens", "ce", "ce_tokens"):
        np.testing.assert_allclose(getattr(side, name), getattr(expected, name), rtol=1e-5, err_msg=name)
    assert side.layers.keys() == expected.layers.keys()
    for layer in LAYERS:
        for name, value in asdict(side.layers[layer]).items():
            np.testing.assert_allclose(value, getattr(expected.layers[layer], name), rtol=1e-5, atol=1e-9,
                                       err_msg=f"layer {layer} {name}")
    assert side.ce.sum() > 0 and np.array_equal(side.ce_tokens, side.n_tokens)  # each analysed token is predicted once
    assert all(len(side.layers[layer].code_features) > 0 for layer in LAYERS)


def test_recording_refuses_a_narrower_position_window(bed):
    from mlalign.analysis.engine import EngineSettings, collect_stats
    from mlalign.analysis.norm_matched import sae_centres
    from mlalign.training.outcomes import BaseSideRecorder

    model, tokenizer, saes, texts, _ = bed
    with pytest.raises(ValueError, match="every token but BOS"):
        collect_stats(model, tokenizer, saes, {"hi": texts["hi"]},
                      EngineSettings(max_length=48, progress=False, min_position=2),
                      token_recorders={"hi": BaseSideRecorder(len(texts["hi"]), LAYERS, "cpu", sae_centres(saes))})


def test_the_adapted_models_analysis_pass_gives_the_paired_sums_of_measure_adapted(bed):
    """task=pipeline's step 2 measures the adapter on the held-out split as the adapted model's analysis pass
    (`AdaptedSideRecorder` in the engine: stacked SAE step, its own batches, left padding, layer chunks): the same
    paired sums as `measure_adapted`, for an "adapter" that changes every number."""
    from mlalign.analysis.engine import EngineSettings, collect_stats
    from mlalign.training.outcomes import AdaptedSideRecorder

    model, tokenizer, saes, texts, _ = bed
    state, adapter_off = scaled_layer(model, 3, 1.3)
    try:
        with adapter_off():
            base = measure_base(model, tokenizer, saes, texts, batch_size=8, max_length=48, progress=False)
        expected = measure_adapted(model, base, tokenizer, saes, texts, "l1", batch_size=8, max_length=48,
                                   progress=False)
        recorders = {lang: AdaptedSideRecorder(base[lang], saes, "l1", "cpu") for lang in texts}
        collect_stats(model, tokenizer, saes, texts,
                      EngineSettings(batch_size=5, max_length=48, sae_chunk=1, padding_side="left", progress=False),
                      token_recorders=recorders)
        got = {lang: recorder.finalize() for lang, recorder in recorders.items()}
    finally:
        state["handle"].remove()
    _same(expected, got, rtol=1e-5)
    assert all(np.any(got[lang].ce_after != got[lang].ce_before) for lang in texts)  # the "adapter" acts


def test_an_adapted_pass_over_other_layers_is_refused(bed):
    from mlalign.analysis.engine import EngineSettings, collect_stats
    from mlalign.training.outcomes import AdaptedSideRecorder

    model, tokenizer, saes, texts, _ = bed
    base = measure_base(model, tokenizer, saes, {"hi": texts["hi"]}, batch_size=8, max_length=48, progress=False)
    recorder = AdaptedSideRecorder(base["hi"], saes, "l1", "cpu")
    collect_stats(model, tokenizer, {LAYERS[0]: saes[LAYERS[0]]}, {"hi": texts["hi"]},
                  EngineSettings(max_length=48, progress=False), token_recorders={"hi": recorder})
    with pytest.raises(ValueError, match="per layer"):
        recorder.finalize()
