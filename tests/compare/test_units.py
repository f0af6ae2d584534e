"""Per-sentence sums of a unit survive the round trip through its files; per-layer sums aggregate like the report."""

from __future__ import annotations

import numpy as np

from mlalign.compare.units import _ratio_sums, load_sums, save_sums


def test_sums_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    sums = {"hi": {"lm_loss": (rng.random(7), rng.random(7) + 1, 1.0, 0.0),
                   "gain_pct": (rng.random(7), rng.random(7), 100.0, -100.0)},
            "en": {"topic_transfer_acc": (np.array([1.0, 0.0, 1.0]), np.ones(3), 1.0, 0.0)}}
    save_sums(tmp_path / "test.npz", sums)
    back = load_sums(tmp_path / "test.npz")
    assert set(back) == {"hi", "en"} and set(back["hi"]) == {"lm_loss", "gain_pct"}
    for lang, outcomes in sums.items():
        for name, (num, den, scale, shift) in outcomes.items():
            got = back[lang][name]
            assert np.array_equal(got[0], num) and np.array_equal(got[1], den) and (got[2], got[3]) == (scale, shift)


def test_ratio_sums_of_layers_give_the_summed_level_gain():
    after = np.array([[2.0, 4.0], [1.0, 1.0]])  # [sentences, layers] metric sums
    before = np.array([[1.0, 2.0], [1.0, 1.0]])
    tokens = np.array([2.0, 1.0])
    token = _ratio_sums(after, tokens, "token").sum() / _ratio_sums(before, tokens, "token").sum()
    assert token == 8.0 / 5.0  # Σ over sentences and layers, as the outcome report's token aggregate
    sentence = _ratio_sums(after, tokens, "sentence").sum() / _ratio_sums(before, tokens, "sentence").sum()
    assert sentence == (3.0 + 2.0) / (1.5 + 2.0)  # per-sentence means first
