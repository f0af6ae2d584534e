"""The per-(language, layer) statistics cache: round trip, checksum, and identity."""

import numpy as np

from mlalign.analysis.cache import StatsCache
from mlalign.analysis.stats import SentenceSums, code_sum_names


def _sums(seed: int) -> SentenceSums:
    rng = np.random.default_rng(seed)
    n = 5
    return SentenceSums(n_tokens=rng.integers(1, 9, n),
                        code_sums={name: rng.random(n) for name in code_sum_names()},
                        resid_norm=rng.random(n), sq_err=rng.random(n), sq_dev=rng.random(n), sq_norm=rng.random(n),
                        position=rng.random(n), sum_x=rng.random(4), shift=rng.random(4),
                        features_fired=rng.random(8) > 0.5, sum_dev=rng.random((n, 4)).astype(np.float32),
                        truncated=rng.random(n) > 0.5)


def test_round_trip_and_identity(tmp_path):
    cache = StatsCache(tmp_path, {"model": "m", "corpus": {"split": "test"}})
    assert cache.load("hi", 3) is None
    cache.save("hi", 3, _sums(0))
    loaded = cache.load("hi", 3)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.to_dict().values(), _sums(0).to_dict().values()))
    assert cache.load("hi", 4) is None and cache.load("mr", 3) is None
    assert StatsCache(tmp_path, {"model": "m", "corpus": {"split": "dev"}}).load("hi", 3) is None
    assert StatsCache(tmp_path, {"model": "m", "corpus": {"split": "test"}}, enabled=False).load("hi", 3) is None


def test_a_position_window_round_trips(tmp_path):
    from mlalign.analysis.stats import within_cap_names

    sums = _sums(0)
    rng = np.random.default_rng(3)
    sums.position_cap = 7
    sums.within_cap = {name: rng.random(5) for name in within_cap_names()}
    sums.within_cap.update(sum_dev=rng.random((5, 4)).astype(np.float32), sum_x=rng.random(4))
    cache = StatsCache(tmp_path, {"model": "m"})
    cache.save("hi", 0, sums)
    loaded = cache.load("hi", 0)
    assert loaded.position_cap == 7 and set(loaded.within_cap) == set(within_cap_names())
    assert all(np.array_equal(loaded.within_cap[k], v) for k, v in sums.within_cap.items())
    np.testing.assert_array_equal(loaded.position_matched().n_tokens, sums.within_cap["n_tokens"])
    cache.save("hi", 1, _sums(1))
    assert cache.load("hi", 1).position_cap is None and cache.load("hi", 1).position_matched() is None


def test_corrupt_or_unfinished_entry_is_not_trusted(tmp_path):
    cache = StatsCache(tmp_path, {"model": "m"})
    cache.save("hi", 0, _sums(0))
    data = next(tmp_path.glob("*.npz"))
    data.write_bytes(data.read_bytes()[:-10] + b"0123456789")
    assert cache.load("hi", 0) is None
    cache.save("ml", 0, _sums(1))
    next(p for p in tmp_path.glob("*.sha256") if p.stat().st_mtime == max(q.stat().st_mtime for q in tmp_path.glob("*.sha256"))).unlink()
    assert cache.load("ml", 0) is None


def test_entry_with_other_fields_is_recomputed_not_loaded(tmp_path):
    """An entry written by an older version (no per-sentence residual sums) under the same key is ignored."""
    import io

    from mlalign.analysis.cache import file_digest

    cache = StatsCache(tmp_path, {"model": "m"})
    cache.save("hi", 0, _sums(0))
    data = next(tmp_path.glob("*.npz"))
    old = {k: v for k, v in _sums(0).to_dict().items() if k not in ("sum_dev", "truncated", "sq_norm", "position")}
    buffer = io.BytesIO()
    np.savez(buffer, **old)
    data.write_bytes(buffer.getvalue())
    data.with_suffix(".sha256").write_text(file_digest(data))
    assert cache.load("hi", 0) is None


def test_identity_covers_attention_files_positions_and_each_layers_sae(tmp_path):
    """attn_implementation, the model folder's tokenizer, analysis positions and one layer's SAE files each change
    the key; a layer whose SAE did not change keeps its key."""
    from mlalign.analysis.cache import entry_key
    from mlalign.analysis.cache import cache_identity
    from tests.helpers import compose_cfg

    model_dir, sae_dir = tmp_path / "model", tmp_path / "saes"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.json").write_text('{"v": 1}')
    for layer in (0, 1):
        (sae_dir / f"layer_{layer}").mkdir(parents=True)
        (sae_dir / f"layer_{layer}" / "cfg.json").write_text(f'{{"layer": {layer}}}')

    def keys(*overrides):
        cfg = compose_cfg([f"model.hf_id={model_dir}", "sae=local", f"sae.path_template={sae_dir}", *overrides], tmp_path)
        identity = cache_identity(cfg, None, None, "dev", [0, 1])
        return [entry_key(identity, "hi", layer) for layer in (0, 1)]

    base = keys()
    assert keys() == base
    assert set(keys("model.attn_implementation=sdpa")).isdisjoint(base)
    assert set(keys("analysis.max_position=64")).isdisjoint(base)
    (sae_dir / "layer_1" / "cfg.json").write_text('{"layer": 1, "retrained": true}')
    changed = keys()
    assert changed[0] == base[0] and changed[1] != base[1]
    (model_dir / "tokenizer.json").write_text('{"v": 2}')
    assert set(keys()).isdisjoint(changed)


def test_other_entry_kinds_round_trip_and_checksum(tmp_path):
    cache = StatsCache(tmp_path, {"model": "m"})
    arrays = {"act_sum": np.arange(4.0), "fire_count": np.ones(4)}
    assert cache.load_arrays("hi", 2, "features", arrays) is None
    cache.save("hi", 2, _sums(0))
    cache.save_arrays("hi", 2, "features", arrays)
    loaded = cache.load_arrays("hi", 2, "features", ("act_sum", "fire_count"))
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    assert cache.load("hi", 2) is not None  # the kinds live side by side
    assert cache.load_arrays("hi", 2, "features", ("act_sum",)) is None  # other fields: recompute
    data = next(tmp_path.glob("*.features.npz"))
    data.write_bytes(data.read_bytes()[:-4] + b"0000")
    assert cache.load_arrays("hi", 2, "features", ("act_sum", "fire_count")) is None


def test_model_fingerprint_of_a_missing_local_path_is_not_a_crash():
    from mlalign.analysis.cache import model_fingerprint

    # Not a directory and not a valid hub id: the fingerprint is empty; loading the model then says what is wrong.
    assert model_fingerprint("/nonexistent/model") == {"snapshot": None}
