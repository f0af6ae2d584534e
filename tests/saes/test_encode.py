"""The analysis's SAE arithmetic (fused encode, sparse code, sparse decode, stacked layer groups) against sae-lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.analysis.stats import per_sentence_sums
from mlalign.errors import UserError
from mlalign.saes.encode import StackedSAEs, decode_active, elementwise_encoder, stack_groups, supports_sparse_decode
from tests.analysis.testkit import identity_sae, jumprelu_sae


def _sparse_code(n_tokens: int, d_sae: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_tokens, d_sae, generator=g) * 3
    return acts * (torch.rand(n_tokens, d_sae, generator=g) < density)


@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_sparse_decode_equals_dense_decode(density):
    sae = jumprelu_sae(24, 96, seed=3)
    acts = _sparse_code(50, 96, density, seed=1)
    acts[0] = 0.0  # a token with no active feature decodes to b_dec
    dense, sparse = sae.decode(acts), decode_active(sae, acts)
    assert sparse.shape == dense.shape
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[0], sae.b_dec.detach())


def test_identity_sae_reconstructs_exactly_through_the_sparse_path():
    sae = identity_sae(8)
    x = torch.randn(20, 8)
    torch.testing.assert_close(decode_active(sae, sae.encode(x)), x)


def test_saes_whose_decode_is_not_linear_fall_back_to_their_own_decode():
    topk = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        topk.W_dec.mul_(3.0)
    assert not supports_sparse_decode(topk)
    acts = topk.encode(torch.randn(5, 8))
    torch.testing.assert_close(decode_active(topk, acts), topk.decode(acts))
    assert supports_sparse_decode(jumprelu_sae(8, 16, seed=0)) and supports_sparse_decode(identity_sae(4))


def test_engine_numbers_do_not_depend_on_the_decode_path(model, tokenizer, saes, texts):
    small = {lang: sentences[:10] for lang, sentences in texts.items()}
    sparse = collect_stats(model, tokenizer, saes, small,
                           EngineSettings(batch_size=4, max_length=48, progress=False, decode="sparse"))
    dense = collect_stats(model, tokenizer, saes, small,
                          EngineSettings(batch_size=4, max_length=48, progress=False, decode="dense"))
    for lang in small:
        for layer in saes:
            for name in per_sentence_sums():
                np.testing.assert_allclose(sparse[lang][layer].sum_of(name), dense[lang][layer].sum_of(name),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{lang} layer {layer} {name}")
    assert sparse["en"][0].sq_err.sum() > 0  # FVU's numerator is really computed, not zero on both paths


def test_unknown_decode_mode_is_a_user_error(model, tokenizer, saes, texts):
    with pytest.raises(UserError, match="analysis.decode"):
        collect_stats(model, tokenizer, {0: saes[0]}, {"en": texts["en"][:2]},
                      EngineSettings(progress=False, decode="fast"))



def test_fused_encode_equals_saelens_encode_and_its_code_lists_every_active_feature():
    sae = jumprelu_sae(16, 64, seed=7)
    with torch.no_grad():  # some negative thresholds: relu and the jump must both apply
        sae.threshold.copy_(torch.linspace(-0.2, 0.3, 64))
    x = torch.randn(40, 16)
    acts, code = StackedSAEs([sae]).encode(x, with_code=True)
    torch.testing.assert_close(acts, sae.encode(x), rtol=1e-6, atol=1e-6)
    dense_from_code = torch.zeros_like(acts)
    dense_from_code[code.rows, code.features] = code.values
    assert torch.equal(dense_from_code, acts)
    assert int(code.active_per_token().sum()) == int((acts != 0).sum()) > 0


def test_an_saes_hooks_or_other_encoders_keep_it_out_of_the_fused_path():
    sae = jumprelu_sae(8, 16, seed=1)
    assert elementwise_encoder(sae) == "jumprelu"
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda module, inputs, output: output * 2)
    try:
        assert elementwise_encoder(sae) is None and not supports_sparse_decode(sae)
        assert not StackedSAEs.stackable([sae])  # the engine then calls sae.encode / sae.decode
        with pytest.raises(ValueError):
            StackedSAEs([sae])
    finally:
        handle.remove()
    assert elementwise_encoder(identity_sae(4)) == "relu"
    acts, code = StackedSAEs([identity_sae(4)]).encode(torch.tensor([[1.0, -2.0, 0.0, 3.0]]), with_code=True)
    assert acts.tolist() == [[1.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0]] and code.features.tolist() == [0, 3, 5]


@pytest.mark.parametrize("with_code", [True, False])
def test_a_stacked_group_encodes_and_decodes_like_each_layers_own_sae(with_code):
    saes = [jumprelu_sae(12, 40, seed=seed) for seed in range(3)]
    with torch.no_grad():
        saes[1].threshold.copy_(torch.linspace(-0.1, 0.2, 40))
    saes[2].cfg.apply_b_dec_to_input = False
    x = [torch.randn(9, 12) for _ in saes]
    stack = StackedSAEs(saes)
    acts, code = stack.encode(torch.cat(x), with_code=with_code)
    x_hat = stack.decode(acts, code)
    for i, sae in enumerate(saes):
        rows = slice(9 * i, 9 * (i + 1))
        torch.testing.assert_close(acts[rows], sae.encode(x[i]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_hat[rows], sae.decode(sae.encode(x[i])), rtol=1e-5, atol=1e-5)
    assert (code is None) != with_code
    if with_code:
        assert int(code.active_per_token().sum()) == int((acts != 0).sum()) > 0
        # Without the dense code (what the engine asks for on the CPU): the same entries and the same x̂.
        none, sparse_only = stack.encode(torch.cat(x), with_code=True, dense=False)
        assert none is None
        for name in ("rows", "features", "values"):
            assert torch.equal(getattr(sparse_only, name), getattr(code, name)), name
        assert torch.equal(stack.decode(None, sparse_only), x_hat)


def test_stack_groups_keep_the_work_tensor_bounded_and_leave_unstackable_saes_alone():
    saes = {layer: jumprelu_sae(8, 1024, seed=layer) for layer in range(6)}
    assert stack_groups(list(range(6)), saes, max_tokens=100, device=torch.device("cpu")) == [list(range(6))]
    # 4 bytes x 1024 features x 40000 tokens = 164 MB a layer: two exceed the CPU budget (256 MB)
    assert stack_groups(list(range(6)), saes, max_tokens=40000, device=torch.device("cpu")) == [[i] for i in range(6)]
    topk = TopKSAE(TopKSAEConfig(d_in=8, d_sae=1024, k=2))
    assert not StackedSAEs.stackable([saes[0], topk])
    assert stack_groups([0, 1], {0: saes[0], 1: topk}, 10, torch.device("cpu")) == [[0], [1]]
    assert not StackedSAEs.stackable([saes[0], jumprelu_sae(8, 512, seed=9)])  # widths differ


def test_engine_with_an_unstackable_sae_matches_its_own_encode_decode(model, tokenizer, saes, texts):
    """A TopK SAE takes sae-lens's encode/decode inside the engine; its numbers equal a hand computation's."""
    from mlalign.analysis.metrics import compute_metrics

    topk = TopKSAE(TopKSAEConfig(d_in=saes[0].cfg.d_in, d_sae=48, k=3))
    small = {"en": texts["en"][:6]}
    mixed = collect_stats(model, tokenizer, {0: saes[0], 1: topk}, small,
                          EngineSettings(batch_size=3, max_length=48, progress=False))
    alone = collect_stats(model, tokenizer, {0: saes[0]}, small,
                          EngineSettings(batch_size=3, max_length=48, progress=False))
    for name in per_sentence_sums():
        np.testing.assert_allclose(mixed["en"][0].sum_of(name), alone["en"][0].sum_of(name), rtol=1e-6, atol=1e-9)
    assert compute_metrics(mixed)["en"][1]["l0"] == pytest.approx(3.0)  # TopK: exactly k active features per token


def test_layer_stats_from_a_sparse_code_equal_the_dense_path(saes):
    from mlalign.analysis.stats import LayerStats

    sae = saes[0]
    x = torch.randn(30, sae.cfg.d_in)
    acts, code = StackedSAEs([sae]).encode(x, with_code=True)
    sentence = torch.arange(30) // 7
    with_code, without = (LayerStats(5, sae.cfg.d_in, sae.cfg.d_sae) for _ in range(2))
    with_code.update(x, acts, decode_active(sae, acts, code), sentence, code=code)
    without.update(x, acts, sae.decode(acts), sentence)
    a, b = with_code.finalize(), without.finalize()
    for name in per_sentence_sums():
        np.testing.assert_allclose(a.sum_of(name), b.sum_of(name), rtol=1e-6, atol=1e-9, err_msg=name)
    assert np.array_equal(a.features_fired, b.features_fired) and a.sum_of("l0").sum() > 0


def test_engine_feature_stats_do_not_depend_on_the_code_path(model, tokenizer, saes, texts):
    """With decode=dense the engine sums activations and per-feature firing densely (no SparseCode); the numbers
    equal the sparse path's."""
    small = {lang: sentences[:8] for lang, sentences in texts.items()}
    out = {}
    for mode in ("sparse", "dense"):
        features: dict = {}
        collect_stats(model, tokenizer, saes, small,
                      EngineSettings(batch_size=3, max_length=48, progress=False, decode=mode),
                      feature_stats=features)
        out[mode] = features
    for lang in small:
        for layer in saes:
            a, b = out["sparse"][lang][layer], out["dense"][lang][layer]
            for name in ("act_sum", "fire_count", "sentences_fired", "n_sentences", "n_tokens"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, err_msg=f"{lang} {layer} {name}")
            assert a.fire_count.sum() > 0 and a.sentences_fired.max() <= a.n_sentences


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stacked_code_lists_every_active_entry_in_row_major_order_on_any_thread_count(threads):
    """On the CPU the active entries are found layer by layer, with numpy's flatnonzero on one thread and torch's
    nonzero on more; either way the code is sae-lens's code, entry for entry, in row-major order."""
    saes = [jumprelu_sae(16, 64, seed=seed) for seed in range(3)]
    x = [torch.randn(23, 16) for _ in saes]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acts, code = StackedSAEs(saes).encode(torch.cat(x), with_code=True)
    finally:
        torch.set_num_threads(previous)
    expected = torch.cat([sae.encode(xi) for sae, xi in zip(saes, x)]).detach()
    torch.testing.assert_close(acts, expected, rtol=1e-5, atol=1e-6)
    rows, features = expected.nonzero(as_tuple=True)
    assert torch.equal(code.rows, rows) and torch.equal(code.features, features) and len(rows) > 0
    assert torch.equal(code.values, acts[rows, features])
    assert torch.equal(code.layer_position(23), rows // 23)
    # The columns come precomputed from the layer-by-layer search: they must be what the rows and features say.
    assert torch.equal(code.layer_feature(23), rows // 23 * 64 + features)
    assert torch.equal(code.column_counts(23), torch.bincount(rows // 23 * 64 + features, minlength=3 * 64))


@pytest.mark.parametrize("d_sae", [64, 48])
def test_the_accelerators_one_piece_search_finds_the_same_code_as_the_cpus_layer_by_layer_one(d_sae):
    """An accelerator finds a group's active entries in one `nonzero` (no host sync per layer), the CPU layer by layer
    with indices derived in numpy: the same rows, features, values and columns, for either kind of width."""
    from mlalign.saes.encode import _sparse_code

    g = torch.Generator().manual_seed(5)
    pre = torch.randn(3, 17, d_sae, generator=g)
    threshold = (0.5 + torch.rand(3, 1, d_sae, generator=g)).clamp_min(0)
    by_layer, one_piece = _sparse_code(pre, threshold, layer_by_layer=True), _sparse_code(pre, threshold, False)
    for name in ("rows", "features", "values"):
        assert torch.equal(getattr(by_layer, name), getattr(one_piece, name)), name
    assert torch.equal(by_layer.layer_feature(17), one_piece.layer_feature(17))
    assert by_layer.values_positive and one_piece.values_positive and len(by_layer.values) > 0
    rows, features = (pre > threshold).view(3 * 17, d_sae).nonzero(as_tuple=True)
    assert torch.equal(by_layer.rows, rows) and torch.equal(by_layer.features, features)


@pytest.mark.parametrize("d_sae", [64, 48])
def test_stacked_saes_without_an_input_bias_encode_like_saelens(d_sae):
    """Gemma Scope SAEs do not subtract b_dec from their input: the stack then skips the subtraction (b_in is None),
    and codes still equal sae-lens's, for a power-of-two width (shift and mask) and another (division)."""
    saes = [jumprelu_sae(16, d_sae, seed=seed) for seed in range(2)]
    for sae in saes:
        sae.cfg.apply_b_dec_to_input = False
    stack = StackedSAEs(saes)
    assert stack.b_in is None
    x = [torch.randn(11, 16) for _ in saes]
    acts, code = stack.encode(torch.cat(x), with_code=True)
    expected = torch.cat([sae.encode(xi) for sae, xi in zip(saes, x)]).detach()
    torch.testing.assert_close(acts, expected, rtol=1e-5, atol=1e-6)
    rows, features = expected.nonzero(as_tuple=True)
    assert torch.equal(code.rows, rows) and torch.equal(code.features, features) and len(rows) > 0
    assert code.values_positive and bool((code.values > 0).all())


def test_layer_stats_take_l1_from_absolute_values_unless_the_code_says_they_are_positive():
    """A code with negative values (any SAE's, via SparseCode.from_dense) sums |a| for L1 and a for mean_act; the
    shortcut L1 = sum(a) is taken only for codes marked values_positive (ReLU/JumpReLU)."""
    from mlalign.saes.encode import SparseCode
    from mlalign.analysis.stats import LayerStats

    acts = torch.tensor([[1.5, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 3.0], [-1.0, 0.5, 0.0, 0.0]])
    code = SparseCode.from_dense(acts)
    assert not code.values_positive
    x = torch.randn(3, 5)
    acc = LayerStats(3, 5, 4)
    acc.update(x, None, x, torch.arange(3), code=code)
    sums = acc.finalize()
    np.testing.assert_allclose(sums.sum_of('l1'), [3.5, 3.0, 1.5])
    np.testing.assert_allclose(sums.sum_of('mean_act'), [-0.5 / 4, 3.0 / 4, -0.5 / 4])
    np.testing.assert_array_equal(sums.sum_of('l0'), [2, 1, 2])
    np.testing.assert_array_equal(sums.features_fired, [True, True, True, True])


def test_layer_stats_take_a_group_layer_by_layer_or_at_once_with_the_same_sums(monkeypatch):
    """LayerStats works a layer at a time on the CPU and a whole group at once on an accelerator: same sums."""
    from mlalign.analysis import stats

    saes = [jumprelu_sae(16, 64, seed=seed) for seed in range(3)]
    stack = StackedSAEs(saes)
    sentence = torch.arange(20) // 6
    x = torch.cat([torch.randn(20, 16) * 2 + layer for layer in range(3)])
    acts, code = stack.encode(x, with_code=True)
    x_hat = stack.decode(acts, code)
    results = []
    for block in (1, 3):
        monkeypatch.setattr(stats, "layers_per_block", lambda device, n_layers, block=block: block)
        acc = stats.LayerStats(4, 16, 64, n_layers=3)
        acc.update(x, acts, x_hat, sentence, torch.arange(20), code=code)
        results.append(acc.finalize_layers())
    for by_layer, at_once in zip(*results):
        for name, value in by_layer.to_dict().items():
            np.testing.assert_allclose(value, at_once.to_dict()[name], rtol=1e-12, err_msg=name)
    layer = 2  # and equal to a float64 hand computation
    x2, err = x[40:].double(), (x[40:] - x_hat[40:]).double()
    np.testing.assert_allclose(results[0][layer].sq_err, np.bincount(sentence, err.pow(2).sum(-1).numpy()), rtol=1e-6)
    np.testing.assert_allclose(results[0][layer].sq_norm, np.bincount(sentence, x2.pow(2).sum(-1).numpy()), rtol=1e-12)
    np.testing.assert_allclose(results[0][layer].sum_x, x2.sum(0).numpy(), rtol=1e-12)
    shift = results[0][layer].shift
    np.testing.assert_allclose(shift, x2[sentence == 0].mean(0).numpy(), rtol=1e-12)
    dev = x2 - torch.from_numpy(shift)
    np.testing.assert_allclose(results[0][layer].sq_dev, np.bincount(sentence, dev.pow(2).sum(-1).numpy()), rtol=1e-10)
    np.testing.assert_allclose(results[0][layer].sum_dev, torch.zeros(4, 16, dtype=torch.float64).index_add_(
        0, sentence, dev).numpy(), rtol=1e-5, atol=1e-5)
