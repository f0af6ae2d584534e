"""The whole method on a real language model (Gemma-3-270M from its PyPI GGUF): train SAEs, analyse, train an adapter,
asserting what only a real model can get wrong (its BOS, its tokenizer's counts, sparse SAEs on massive residuals)."""

import json
import math

import pytest

from mlalign.data.corpus import load_flores
from tests.helpers import compose_cfg, run_cli

pytestmark = pytest.mark.slow

LAYERS = [3, 9]
LANGS = ["hi", "zh"]  # + en; hi is cut into more tokens than en by Gemma's tokenizer, zh about as many
SENTENCES = 24
WIDTH = 512
MAX_FVU = 0.6
"""Bound on the SAEs' pooled held-out FVU. Measured: 0.12 (layer 3) and 0.29 (layer 9). The task's defaults at this
budget (threshold_travel 2.4, b_dec from zero) gave 1.04 and 4.66 on this model: worse than predicting the mean."""
SPLICED_SENTENCES = 4
"""Dev sentences per language of the spliced-in LM loss (each costs a full forward per layer, LM head included)."""
MAX_L0_PCT = 25.0
"""Bound on the features firing per token, % of the width. Measured: 13.8% (layer 3) and 4.7% (layer 9) at this tiny
budget (real SAEs: under 1%); a bound, not a target: it catches an SAE that went dense."""


@pytest.fixture(scope="module")
def runs(gemma_cache, tmp_path_factory):
    """train_saes -> analyze with those SAEs -> a 2-step train, each through run.py, in one temp root."""
    root = tmp_path_factory.mktemp("real_model")
    common = ["model=gemma3_270m_pypi", f"paths.cache_dir={gemma_cache}", f"layers=[{','.join(map(str, LAYERS))}]",
              f"langs=[{','.join(LANGS)}]"]
    out = {}
    steps = [
        ("saes", ["task=train_saes", "sae_train.tokens=4500", f"sae_train.width={WIDTH}", "sae_train.epochs=6",
                  "sae_train.threshold_travel=0.6", f"sae_train.eval_sentences={SENTENCES}",
                  f"sae_train.spliced_sentences={SPLICED_SENTENCES}"]),
        ("analyze", ["task=analyze", "sae=local", f"sae.path_template={root / 'saes' / 'saes'}",
                     f"data.max_sentences={SENTENCES}", "analysis.bootstrap=200", "analysis.plots=false"]),
        # One step of one 32-token sentence: a step of the real model (262k-word head, KL retention) is the slow part.
        ("train", ["task=train", "sae=local", f"sae.path_template={root / 'saes' / 'saes'}", "langs=[hi]",
                   "train.max_steps=1", "train.batch_size=1", "train.max_length=32", "train.warmup_steps=0",
                   "train.save_every=0", "train.eval_every=0", "data.max_sentences=6", "analysis.bootstrap=100",
                   "analysis.plots=false"]),
    ]
    for name, args in steps:
        result = run_cli([*common, *args, f"hydra.run.dir={root / name}"], timeout=900)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        out[name] = root / name
    return out


def test_bos_is_the_first_token_and_dropped_from_every_statistic(gemma_cache, runs):
    from mlalign.models import load_tokenizer, prepare_model

    cfg = compose_cfg(["model=gemma3_270m_pypi"])
    prepare_model(cfg.model, gemma_cache)
    tokenizer = load_tokenizer(cfg.model)
    corpus = load_flores(["en", *LANGS], "test", max_sentences=SENTENCES)
    summary = json.loads((runs["analyze"] / "analysis" / "summary.json").read_text())
    for lang, sentences in corpus.sentences.items():
        ids = tokenizer(sentences, truncation=True, max_length=cfg.data.max_length)["input_ids"]
        assert all(row[0] == tokenizer.bos_token_id and row.count(tokenizer.bos_token_id) == 1 for row in ids), lang
        # Analysed tokens = every token but BOS; the first analysed position is 1, so positions average above 1.
        assert summary["n_tokens"][lang] == sum(len(row) - 1 for row in ids), lang
        assert summary["corpus_stats"][lang]["tokens_per_sentence"] == pytest.approx(
            sum(len(row) - 1 for row in ids) / len(ids))
        assert summary["corpus_stats"][lang]["mean_position"] > 1


def test_the_real_tokenizer_cuts_hindi_into_more_tokens_than_english(runs):
    stats = json.loads((runs["analyze"] / "analysis" / "summary.json").read_text())["corpus_stats"]
    # Measured on the full test split: hi 1.36x, zh 1.0x the English count (the testbed's byte BPE: hi 1.59x).
    assert stats["hi"]["tokens_per_sentence"] > 1.15 * stats["en"]["tokens_per_sentence"]
    assert 0.7 < stats["zh"]["tokens_per_sentence"] / stats["en"]["tokens_per_sentence"] < 1.3
    assert all(stats[lang]["truncated_pct"] == 0 for lang in ["en", *LANGS])  # FLORES fits in 128 Gemma tokens


def test_trained_saes_are_faithful_and_sparse_on_the_real_residual_stream(runs):
    fidelity = json.loads((runs["saes"] / "saes" / "fidelity.json").read_text())
    assert sorted(fidelity, key=int) == [str(layer) for layer in LAYERS]
    for layer, row in fidelity.items():
        assert 0 < row["fvu"] < MAX_FVU, (layer, row["fvu"])
        assert 0 < row["l0_pct"] < MAX_L0_PCT, (layer, row["l0_pct"])
        for lang, stats in row["per_lang"].items():
            assert 0 < stats["fvu"] < 1.0, (layer, lang, stats["fvu"])  # better than predicting the mean
            assert math.isfinite(stats["spliced_dlm_loss"]), (layer, lang)
        # The fidelity contract: an imperfect reconstruction spliced into the real model raises its loss.
        assert row["spliced_dlm_loss"] > 0 and row["spliced_sentences"] == SPLICED_SENTENCES * (1 + len(LANGS))
        assert row["torch_seed"] == int(layer)  # seed 0 + layer, recorded
    data = json.loads((runs["saes"] / "saes" / "train_data.json").read_text())
    assert data["seeds"] == 1 and data["torch_seeds"] == {str(layer): [layer] for layer in LAYERS}
    assert data["seconds"]["spliced"] > 0 and data["seconds"]["training_per_sae"] > 0


def test_disparities_are_finite_with_cis_and_the_saes_fit(runs):
    summary = json.loads((runs["analyze"] / "analysis" / "summary.json").read_text())
    assert summary["layers"] == LAYERS and summary["unfit_layers"] == []
    for lang in LANGS:
        for layer in map(str, LAYERS):
            value, (low, high) = summary["disparity_pct"][lang][layer], summary["disparity_ci"][lang][layer]
            assert math.isfinite(value) and low <= value <= high and high - low > 0, (lang, layer)
            fvu = summary["values"][lang][layer]["fvu"]
            assert 0 < fvu < 1.0 and math.isfinite(summary["values"][lang][layer]["resid_norm"])
    assert summary["statements"]


def test_a_short_training_reports_the_outcome_contract(runs):
    metrics = json.loads((runs["train"] / "train" / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["targets"] == ["hi"]
    for key in ("activation_gain_pct", "norm_matched_gain_pct"):
        assert math.isfinite(metrics[key]["hi"]), key
    assert math.isfinite(metrics["english_retention_pct"]) and metrics["english_retention_pct"] <= 100
    low, high = metrics["english_retention_ci"]
    assert low <= high and math.isfinite(low)
    assert math.isfinite(metrics["fvu_ratio_max"]) and isinstance(metrics["all_valid"], bool)
    hi = metrics["per_lang"]["hi"]
    for key in ("gain_pct", "fvu_before", "fvu_after", "lm_loss_before", "lm_loss_after", "resid_norm_change_pct"):
        assert math.isfinite(hi[key]), key
    assert len(hi["gain_ci"]) == 2 and 0 < hi["fvu_before"] < 1.0
    assert 0 < hi["lm_loss_before"] < 12.5  # a trained LM: well below uniform over 262k tokens (ln 262144 = 12.5)
    assert (runs["train"] / "adapter" / "adapter_config.json").exists()
