"""run_benchmarks on a tiny Gemma-2 with the bundled suite: offline, per-language accuracies, skipped combinations."""

import socket

import pytest

from mlalign.errors import UserError
from mlalign.evaluation.harness import run_benchmarks
from mlalign.evaluation.report import compare_results
EVAL_LANGS = ["en", "hi", "zh"]
LIMIT = 10


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def bundled_run(tiny_model, tiny_tokenizer, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        return run_benchmarks(tiny_model, tiny_tokenizer, langs=EVAL_LANGS,
                              benchmarks=["arc_challenge", "mmlu", "hellaswag"], suite="bundled", num_fewshot=0,
                              limit=LIMIT, batch_size=8, seed=0, work_dir=tmp_path_factory.mktemp("eval"))


def test_bundled_run_scores_every_language(bundled_run):
    results = bundled_run["results"]
    assert set(results) == {"arc_challenge", "mmlu", "hellaswag"}
    for benchmark in ("arc_challenge", "mmlu"):
        assert set(results[benchmark]) == set(EVAL_LANGS)
        for row in results[benchmark].values():
            assert row["n_samples"] == LIMIT
            assert 0.0 <= row["acc"] <= 1.0
            assert row["acc_stderr"] is not None and row["acc_stderr"] >= 0.0
    assert all(0.0 <= row["acc_norm"] <= 1.0 for row in results["arc_challenge"].values())
    assert all(row["acc_norm"] is None for row in results["mmlu"].values())  # Okapi MMLU reports acc only
    assert results["arc_challenge"]["hi"]["task"] == "mlalign_arc_hi"
    assert results["mmlu"]["zh"]["task"] == "mlalign_mmlu_zh"


def test_hellaswag_is_recorded_as_skipped_in_the_bundled_suite(bundled_run):
    assert bundled_run["results"]["hellaswag"] == {}
    skipped = {(entry["benchmark"], entry["lang"]): entry["reason"] for entry in bundled_run["skipped"]}
    assert set(skipped) == {("hellaswag", lang) for lang in EVAL_LANGS}
    assert all("eval=harness" in reason for reason in skipped.values())


def test_settings_are_recorded(bundled_run):
    assert bundled_run["settings"] == {"suite": "bundled", "num_fewshot": 0, "limit": LIMIT, "batch_size": 8, "seed": 0}


def test_run_compares_with_itself_as_zero(bundled_run):
    comparison = compare_results(bundled_run, bundled_run)
    assert all(cell["diff"]["acc"] == 0.0 for by_lang in comparison["results"].values() for cell in by_lang.values())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"benchmarks": ["arc"]}, "valid benchmarks"), ({"suite": "web"}, "eval=bundled"), ({"langs": "hi"}, "langs=\\["),
     ({"langs": ["xx"]}, "valid codes"), ({"num_fewshot": -1}, "num_fewshot"), ({"limit": 0}, "eval.limit")],
)
def test_user_mistakes_fail_before_any_model_work(kwargs, expected, tmp_path):
    arguments = {"langs": ["hi"], "benchmarks": ["mmlu"], "suite": "bundled", "work_dir": tmp_path} | kwargs
    with pytest.raises(UserError, match=expected):
        run_benchmarks(None, None, **arguments)  # no model at all: validation must come first
    assert not (tmp_path / "lm_eval_tasks").exists()
