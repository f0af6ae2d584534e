"""The engine against direct computations: capture points, hand-computable SAEs, BOS/padding exclusion, invariances."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.analysis.testkit import D_MODEL, N_LAYERS, identity_sae
from mlalign.analysis.capture import ResidualCapture
from mlalign.analysis.engine import EngineSettings, analysed_positions, collect_stats, pad_batch, position_cap
from mlalign.analysis.metrics import compute_metrics
from mlalign.analysis.registry import REGISTRY as METRICS
from mlalign.analysis.stats import LayerStats, per_sentence_sums
from mlalign.errors import UserError

MAX_LENGTH = 48


def layer_outputs_one_by_one(model, tokenizer, texts):
    """Per text, {layer: [seq, d_model]} decoder-layer outputs from an unpadded batch-1 pass with plain hooks (not
    ResidualCapture), BOS included."""
    outputs = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")["input_ids"]
        seen = {}
        handles = [
            block.register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out[0] if isinstance(out, tuple) else out))
            for layer, block in enumerate(model.model.layers)
        ]
        try:
            with torch.inference_mode():
                model(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        outputs.append({layer: seen[layer][0].double().numpy() for layer in seen})
    return outputs


def numpy_jumprelu(sae, x):
    """sae-lens JumpReLU, written out: f = pre * (pre > threshold), pre = (x - b_dec) W_enc + b_enc."""
    w_enc, b_enc, w_dec, b_dec, thr = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold))
    pre = (x - b_dec) @ w_enc + b_enc
    feats = pre * (pre > thr)
    return feats, feats @ w_dec + b_dec


def numpy_metrics(feats_per_sentence, x_per_sentence, x_hat_per_sentence, aggregate, decoder_norms=None):
    feats, x, x_hat = (np.concatenate(a) for a in (feats_per_sentence, x_per_sentence, x_hat_per_sentence))
    per_token = {
        "mean_act": feats.mean(axis=1),
        "dec_weighted_act": feats @ (np.full(feats.shape[1], np.nan) if decoder_norms is None else decoder_norms),
        "l1": np.abs(feats).sum(axis=1),
        "l0": (feats != 0).sum(axis=1),
        "resid_norm": np.linalg.norm(x, axis=1),
    }
    out = {}
    if aggregate == "token":
        out.update({k: v.mean() for k, v in per_token.items()})
    else:
        bounds = np.cumsum([0] + [len(s) for s in x_per_sentence])
        out.update({k: np.mean([v[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:]) if b > a]) for k, v in per_token.items()})
    out["feature_coverage"] = (feats != 0).any(axis=0).mean()
    out["fvu"] = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    out["fvu_raw"] = ((x - x_hat) ** 2).sum() / (x**2).sum()
    return out


def test_capture_points_are_decoder_layer_outputs(model, tokenizer, texts):
    enc = tokenizer(texts["en"][:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc, output_hidden_states=True).hidden_states
        pre_norm = {}
        handle = model.model.norm.register_forward_pre_hook(lambda _m, args: pre_norm.__setitem__("x", args[0]))
        model(**enc)
        handle.remove()
        with ResidualCapture(model, list(range(N_LAYERS)), stop_after_last=True) as capture:
            captured = capture.forward(**enc)
    assert sorted(captured) == list(range(N_LAYERS))
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(captured[layer], hidden[layer + 1], rtol=0, atol=0)
    last = captured[N_LAYERS - 1]
    assert (last - hidden[-1]).abs().max() > 0.1, "hidden_states[-1] is the final-normed stream, not the layer output"
    torch.testing.assert_close(last, pre_norm["x"], rtol=0, atol=0)


@pytest.mark.parametrize("aggregate", ["token", "sentence"])
def test_every_metric_matches_numpy_for_a_jumprelu_sae(model, tokenizer, saes, texts, reference_stats, aggregate):
    values = compute_metrics(reference_stats, aggregate)
    for lang in ("en", "hi"):
        residuals = layer_outputs_one_by_one(model, tokenizer, texts[lang])
        for layer in range(N_LAYERS):
            x = [r[layer][1:] for r in residuals]  # position 0 is BOS
            encoded = [numpy_jumprelu(saes[layer], xs) for xs in x]
            norms = np.linalg.norm(saes[layer].W_dec.detach().double().numpy(), axis=1)
            expected = numpy_metrics([f for f, _ in encoded], x, [h for _, h in encoded], aggregate, norms)
            for metric in METRICS:
                assert values[lang][layer][metric] == pytest.approx(expected[metric], rel=1e-5), (lang, layer, metric)


def test_identity_sae_gives_hand_computable_metrics(model, tokenizer, texts):
    """Features relu(x), relu(-x): mean_act = ||x||_1 / (2 d), l1 = ||x||_1, l0 = d, coverage = 1, FVU = 0."""
    sae = identity_sae(D_MODEL)
    stats = collect_stats(model, tokenizer, {1: sae}, {"en": texts["en"][:8]},
                          EngineSettings(batch_size=3, max_length=MAX_LENGTH, progress=False))
    values = compute_metrics(stats)["en"][1]
    x = np.concatenate([r[1][1:] for r in layer_outputs_one_by_one(model, tokenizer, texts["en"][:8])])
    l1 = np.abs(x).sum(axis=1).mean()
    assert values["l1"] == pytest.approx(l1, rel=1e-5)
    assert values["mean_act"] == pytest.approx(l1 / (2 * D_MODEL), rel=1e-5)
    assert values["l0"] == D_MODEL
    assert values["feature_coverage"] == 1.0
    assert values["fvu"] == pytest.approx(0.0, abs=1e-10)


def test_bos_and_padding_are_excluded(model, tokenizer, texts, reference_stats):
    """The BOS residual is identical in every sentence and far from the content tokens: counting it would change
    n_tokens and every mean."""
    lengths = np.array([len(tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in texts["en"]])
    sums = reference_stats["en"][0]
    np.testing.assert_array_equal(sums.n_tokens, lengths - 1)
    residuals = layer_outputs_one_by_one(model, tokenizer, texts["en"])
    with_bos = np.mean([np.linalg.norm(r[0], axis=1).mean() for r in residuals])
    without_bos = np.mean([np.linalg.norm(r[0][1:], axis=1).mean() for r in residuals])
    sentence_means = sums.resid_norm / sums.n_tokens
    assert sentence_means.mean() == pytest.approx(without_bos, rel=1e-6)
    assert abs(with_bos - without_bos) > 0.01 * without_bos  # far beyond the 1e-6 match above


def test_analysed_positions_drop_bos_on_either_side():
    rows = [[7, 1, 2, 3], [7, 4], [5, 6]]  # 7 = BOS; the third row has none
    for side in ("left", "right"):
        batch = pad_batch(rows, pad_id=0, padding_side=side, device=torch.device("cpu"))
        keep = analysed_positions(batch["input_ids"], batch["attention_mask"], bos_token_id=7)
        kept = [batch["input_ids"][b][keep[b]].tolist() for b in range(3)]
        assert kept == [[1, 2, 3], [4], [5, 6]], side
        real = batch["attention_mask"].bool()
        assert batch["position_ids"][real].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]


def _assert_same_stats(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for lang in a:
        assert a[lang].keys() == b[lang].keys()
        for layer in a[lang]:
            for name in per_sentence_sums():
                np.testing.assert_allclose(a[lang][layer].sum_of(name), b[lang][layer].sum_of(name), rtol=rtol, atol=1e-8, err_msg=f"{lang} {layer} {name}")
            np.testing.assert_array_equal(a[lang][layer].features_fired, b[lang][layer].features_fired)
    for aggregate in ("token", "sentence"):
        va, vb = compute_metrics(a, aggregate), compute_metrics(b, aggregate)
        for lang in va:
            for layer in va[lang]:
                for metric in METRICS:
                    assert va[lang][layer][metric] == pytest.approx(vb[lang][layer][metric], rel=rtol), (lang, layer, metric)


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (16, "left"), (16, "right"), (5, "left")])
def test_batch_size_and_padding_side_change_no_number(model, tokenizer, saes, texts, reference_stats, batch_size, padding_side):
    stats = collect_stats(model, tokenizer, saes, texts,
                          EngineSettings(batch_size=batch_size, max_length=MAX_LENGTH, padding_side=padding_side, progress=False))
    _assert_same_stats(stats, reference_stats)


@pytest.mark.parametrize("sae_chunk", [1, 3])
def test_sae_chunk_gives_identical_results_and_restores_sae_devices(model, tokenizer, saes, texts, reference_stats, sae_chunk):
    stats = collect_stats(model, tokenizer, saes, texts,
                          EngineSettings(batch_size=8, max_length=MAX_LENGTH, sae_chunk=sae_chunk, progress=False))
    _assert_same_stats(stats, reference_stats, rtol=1e-12)
    assert all(sae.W_enc.device.type == "cpu" for sae in saes.values())


def test_the_reused_work_buffer_changes_no_number_across_groups_and_batches(model, tokenizer, saes, texts,
                                                                            monkeypatch):
    """On the CPU every stacked group writes its codes into one buffer per layer chunk (`engine._work_buffer`): with
    groups of one layer (so each group's encode overwrites the previous group's codes) and with per-feature
    statistics, the numbers are exactly those of a fresh tensor per group."""
    from mlalign.analysis import engine

    monkeypatch.setattr(engine, "stack_groups", lambda layers, *_: [[layer] for layer in layers])
    runs = {}
    for reuse in (True, False):
        monkeypatch.setattr(engine, "REUSE_WORK_BUFFER", reuse)
        features: dict = {}
        runs[reuse] = (collect_stats(model, tokenizer, saes, texts,
                                     EngineSettings(batch_size=5, max_length=MAX_LENGTH, progress=False),
                                     feature_stats=features), features)
    _assert_same_stats(runs[True][0], runs[False][0], rtol=0.0)
    for lang, by_layer in runs[True][1].items():
        for layer, sums in by_layer.items():
            other = runs[False][1][lang][layer]
            assert np.array_equal(sums.act_sum, other.act_sum) and np.array_equal(sums.fire_count, other.fire_count)
    assert engine._work_buffer([[0], [1, 2]], [None, object()], 7, torch.device("meta")) is None  # CPU only


def test_streaming_equals_one_update_with_all_tokens(saes):
    """Chunked updates in any order equal one update holding every token (what a non-streaming pass would do)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, D_MODEL, generator=gen) * 3 + 1
    sentence = torch.sort(torch.randint(0, 12, (200,), generator=gen)).values
    sae = saes[2]
    feats = sae.encode(x).detach()
    x_hat = sae.decode(feats).detach()
    whole = LayerStats(12, D_MODEL, sae.cfg.d_sae)
    whole.update(x, feats, x_hat, sentence)
    streamed = LayerStats(12, D_MODEL, sae.cfg.d_sae)
    for part in torch.randperm(200, generator=gen).split(17):
        streamed.update(x[part], feats[part], x_hat[part], sentence[part])
    a, b = whole.finalize(), streamed.finalize()
    for name in per_sentence_sums():
        if name != "sq_dev":  # centred on the first sentence seen, which differs here; the total below does not
            np.testing.assert_allclose(a.sum_of(name), b.sum_of(name), rtol=1e-10)
    np.testing.assert_array_equal(a.features_fired, b.features_fired)
    assert a.total_sq_dev_from_mean() == pytest.approx(b.total_sq_dev_from_mean(), rel=1e-10)
    assert a.total_sq_dev_from_mean() == pytest.approx(((x.double() - x.double().mean(0)) ** 2).sum().item(), rel=1e-10)


def test_empty_sentence_counts_no_tokens_and_is_skipped_by_the_sentence_mean(model, tokenizer, saes, texts):
    sentences = ["", *texts["en"][:4]]
    stats = collect_stats(model, tokenizer, {0: saes[0]}, {"en": sentences},
                          EngineSettings(batch_size=2, max_length=MAX_LENGTH, progress=False))
    assert stats["en"][0].n_tokens[0] == 0
    with_empty = compute_metrics(stats, "sentence")["en"][0]
    without = compute_metrics(collect_stats(model, tokenizer, {0: saes[0]}, {"en": sentences[1:]},
                                            EngineSettings(batch_size=2, max_length=MAX_LENGTH, progress=False)), "sentence")["en"][0]
    for metric in METRICS:
        assert with_empty[metric] == pytest.approx(without[metric], rel=1e-6)


def test_user_mistakes_raise_user_error(model, tokenizer, saes, texts):
    small = {"en": texts["en"][:2]}
    with pytest.raises(UserError, match="out of range"):
        collect_stats(model, tokenizer, {N_LAYERS: saes[0]}, small, EngineSettings(progress=False))
    with pytest.raises(UserError, match="d_in"):
        collect_stats(model, tokenizer, {0: identity_sae(D_MODEL + 1)}, small, EngineSettings(progress=False))
    with pytest.raises(UserError, match="padding_side"):
        collect_stats(model, tokenizer, {0: saes[0]}, small, EngineSettings(padding_side="middle", progress=False))


def test_truncation_is_recorded_per_sentence(tokenizer, reference_stats, texts):
    full = np.array([len(tokenizer(t)["input_ids"]) for t in texts["hi"]])
    np.testing.assert_array_equal(reference_stats["hi"][0].truncated, full > MAX_LENGTH)
    assert reference_stats["hi"][0].truncated.any() and not reference_stats["hi"][0].truncated.all()


def test_position_window_keeps_only_positions_in_range(model, tokenizer, saes, texts, reference_stats):
    """max_position=10 keeps positions 1..9 of each sentence (0 is BOS); min_position=5 keeps positions >= 5."""
    n_all = reference_stats["en"][0].n_tokens
    capped = collect_stats(model, tokenizer, {0: saes[0]}, {"en": texts["en"]},
                           EngineSettings(batch_size=8, max_length=MAX_LENGTH, max_position=10, progress=False))["en"][0]
    np.testing.assert_array_equal(capped.n_tokens, np.minimum(n_all, 9))
    late = collect_stats(model, tokenizer, {0: saes[0]}, {"en": texts["en"]},
                         EngineSettings(batch_size=8, max_length=MAX_LENGTH, min_position=5, progress=False))["en"][0]
    np.testing.assert_array_equal(late.n_tokens, np.maximum(n_all - 4, 0))
    n = late.n_tokens
    assert late.position.sum() == pytest.approx(((n_all * (n_all + 1) - 20) / 2 * (n > 0)).sum())
    with pytest.raises(UserError, match="min_position"):
        collect_stats(model, tokenizer, {0: saes[0]}, {"en": texts["en"][:2]},
                      EngineSettings(min_position=5, max_position=5, progress=False))


def test_missing_bos_is_caught_when_the_sae_was_trained_with_it(model, tokenizer, saes, texts):
    import copy

    from tokenizers import processors

    no_bos = copy.deepcopy(tokenizer)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert no_bos(texts["en"][0])["input_ids"][0] != tokenizer.bos_token_id
    sae = copy.deepcopy(saes[0])
    sae.cfg.metadata.prepend_bos = True
    small = {"en": texts["en"][:4]}
    collect_stats(model, tokenizer, {0: sae}, small, EngineSettings(progress=False))  # BOS present: fine
    with pytest.raises(UserError, match="prepend_bos"):
        collect_stats(model, no_bos, {0: sae}, small, EngineSettings(progress=False))
    # Dropping every first token is the documented way to analyse without BOS.
    stats = collect_stats(model, no_bos, {0: sae}, small, EngineSettings(min_position=1, progress=False))["en"][0]
    lengths = np.array([len(no_bos(t)["input_ids"]) for t in small["en"]])
    np.testing.assert_array_equal(stats.n_tokens, lengths - 1)


@pytest.mark.parametrize("sae_chunk,max_position", [(None, None), (1, 20)])
def test_listed_sums_pass_equals_the_full_path(model, tokenizer, saes, texts, sae_chunk, max_position):
    """The features' second pass (forward + the listed features' encoder columns only) gives the per-sentence sums of
    the full engine's `feature_ids` path, on the same tokens; languages and layers without listed features are not
    computed."""
    from mlalign.analysis.engine import collect_listed_sums

    wanted = {"en": {0: [3, 1, 40], 2: [5]}, "hi": {2: [0, 7, 11, 47]}, "es": {}}
    sub = {lang: texts[lang][:10] for lang in wanted}
    settings = EngineSettings(batch_size=4, max_length=MAX_LENGTH, sae_chunk=sae_chunk, progress=False,
                              max_position=max_position)
    full: dict = {}
    collect_stats(model, tokenizer, {0: saes[0], 2: saes[2]}, sub, settings, feature_stats=full, feature_ids=wanted)
    light = collect_listed_sums(model, tokenizer, {0: saes[0], 2: saes[2]}, sub, wanted, settings)
    assert set(light) == {"en", "hi"} and set(light["en"]) == {0, 2} and set(light["hi"]) == {2}
    for lang, by_layer in light.items():
        for layer, sums in by_layer.items():
            np.testing.assert_array_equal(sums.feature_ids, wanted[lang][layer])
            # Float rounding of a k-column matmul instead of a d_sae-column one: far below any reported digit.
            np.testing.assert_allclose(sums.sentence_sums, full[lang][layer].sentence_sums, rtol=1e-5, atol=1e-6)
            assert sums.sentence_sums.shape == (10, len(wanted[lang][layer])) and sums.sentence_sums.any()
    # Per-sentence sums of a feature add up to its total (float32 batch sums): the light pass saw every analysed token.
    np.testing.assert_allclose(light["hi"][2].sentence_sums.sum(0), full["hi"][2].act_sum[[0, 7, 11, 47]], rtol=1e-6)


def test_encode_listed_equals_the_encoders_columns(saes):
    """Only the listed encoder columns for JumpReLU and Standard SAEs; TopK (not feature by feature) and an SAE with a
    hook on a hook point go through sae.encode, exactly."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from mlalign.analysis.engine import encode_listed
    from mlalign.saes.encode import elementwise_encoder as _elementwise_encoder

    x = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([31, 0, 5, 11])  # out of order, in range of both SAEs (d_sae 32 and 48)
    standard = identity_sae(D_MODEL)
    topk = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=48, k=4))
    assert [_elementwise_encoder(s) for s in (saes[0], standard, topk)] == ["jumprelu", "relu", None]
    for sae in (saes[0], standard):
        want = sae.encode(x)[:, ids]
        assert (want != 0).any() and (want == 0).any()
        torch.testing.assert_close(encode_listed(sae, x, ids), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(encode_listed(topk, x, ids), topk.encode(x)[:, ids], rtol=0, atol=0)
    handle = saes[1].hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: out * 2)
    try:
        assert _elementwise_encoder(saes[1]) is None
        torch.testing.assert_close(encode_listed(saes[1], x, ids), saes[1].encode(x)[:, ids], rtol=0, atol=0)
    finally:
        handle.remove()


def _word_tokenizer():
    """A real fast tokenizer that makes one token per space-separated "w" and prepends BOS: token counts by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1, "<unk>": 2, "w": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def test_position_cap_is_the_reference_languages_90th_percentile_position():
    """Sentences of 1..10 words: BOS at 0 is dropped, so sentence k holds positions 1..k and position p is held by
    11 - p sentences; 50 of the 55 tokens (ceil of 90%) sit at positions <= 8, only 49 at <= 7."""
    tokenizer = _word_tokenizer()
    texts = [" ".join(["w"] * k) for k in range(1, 11)]
    assert position_cap(tokenizer, texts, max_length=64) == 8
    positions = np.concatenate([np.arange(1, k + 1) for k in range(1, 11)])
    assert np.percentile(positions, 90, method="inverted_cdf") == 8
    # Truncation at max_length=6 (BOS + 5 words) and a min_position window count as the engine counts them.
    cut = np.concatenate([np.arange(1, min(k, 5) + 1) for k in range(1, 11)])
    assert position_cap(tokenizer, texts, max_length=6) == np.percentile(cut, 90, method="inverted_cdf") == 5
    late = positions[positions >= 4]
    assert position_cap(tokenizer, texts, 64, min_position=4) == np.percentile(late, 90, method="inverted_cdf") == 9
    assert position_cap(tokenizer, texts, 64, quantile=0.5) == np.percentile(positions, 50, method="inverted_cdf")
    assert position_cap(tokenizer, [""], 64) is None
    # Reaching the quantile exactly is enough: 10 of 11 tokens at position 1; 55 of 100 (0.55 x 100 is
    # 55.00000000000001 in floats).
    assert position_cap(tokenizer, ["w"] * 9 + ["w w"], 64) == 1
    assert position_cap(tokenizer, ["w"] * 54 + [" ".join(["w"] * 46)], 64, quantile=0.55) == 1


def test_the_position_window_kept_in_the_same_pass_equals_a_capped_pass(model, tokenizer, saes, texts):
    """The window's sums (tokens at positions <= cap, split off in the one pass) equal a separate pass with
    max_position=cap+1, and the whole equals a pass without a window."""
    small = {lang: texts[lang][:10] for lang in ("en", "hi")}
    layers = {0: saes[0], 2: saes[2]}
    cap = position_cap(tokenizer, small["en"], MAX_LENGTH)
    settings = EngineSettings(batch_size=4, max_length=MAX_LENGTH, progress=False)
    split = collect_stats(model, tokenizer, layers, small, settings, position_cap=cap)
    whole = collect_stats(model, tokenizer, layers, small, settings)
    capped = collect_stats(model, tokenizer, layers, small, replace(settings, max_position=cap + 1))
    for lang in small:
        for layer in layers:
            got, window = split[lang][layer], split[lang][layer].position_matched()
            assert got.position_cap == cap and whole[lang][layer].position_matched() is None
            for name in per_sentence_sums():
                np.testing.assert_allclose(got.sum_of(name), whole[lang][layer].sum_of(name), rtol=1e-10, atol=1e-12)
                if name != "sq_dev":  # centred on each pass's own first sentence; the totals below are not
                    np.testing.assert_allclose(window.sum_of(name), capped[lang][layer].sum_of(name), rtol=1e-6,
                                               atol=1e-9)
            assert window.total_sq_dev_from_mean() == pytest.approx(capped[lang][layer].total_sq_dev_from_mean(),
                                                                    rel=1e-9)
            np.testing.assert_allclose(window.sum_x, capped[lang][layer].sum_x, rtol=1e-9, atol=1e-9)
            assert window.n_tokens.sum() < got.n_tokens.sum()
    values = {name: compute_metrics(stats) for name, stats in (
        ("window", {lang: {layer: s.position_matched() for layer, s in by.items()} for lang, by in split.items()}),
        ("capped", capped))}
    for lang in small:
        for layer in layers:
            for metric in METRICS:
                if metric == "feature_coverage":  # no feature set is kept per window
                    assert np.isnan(values["window"][lang][layer][metric])
                else:
                    assert values["window"][lang][layer][metric] == pytest.approx(
                        values["capped"][lang][layer][metric], rel=1e-6), (lang, layer, metric)
