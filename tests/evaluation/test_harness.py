"""run_benchmarks on a tiny Gemma-2 with the bundled suite: offline, per-language accuracies, skipped combinations."""

import socket

import pytest

from mlalign.config import EvalConfig
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
        settings = EvalConfig(suite="bundled", benchmarks=["arc_challenge", "mmlu", "hellaswag"], num_fewshot=0,
                              limit=LIMIT, batch_size=8)
        return run_benchmarks(tiny_model, tiny_tokenizer, EVAL_LANGS, settings, seed=0,
                              work_dir=tmp_path_factory.mktemp("eval"))


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
     ({"langs": ["xx"]}, "valid codes"), ({"num_fewshot": -1}, "num_fewshot"), ({"limit": 0}, "eval.limit"),
     ({"num_fewshot": {"mmlx": 5}}, "did you mean mmlu"), ({"batch_size": "autom"}, "positive integer or auto"),
     ({"benchmarks": [], "tasks": []}, "nothing to evaluate"), ({"tasks": "arc_hi"}, "eval.tasks must be a list")],
)
def test_user_mistakes_fail_before_any_model_work(kwargs, expected, tmp_path):
    arguments = {"langs": ["hi"], "benchmarks": ["mmlu"], "suite": "bundled"} | kwargs
    langs = arguments.pop("langs")
    with pytest.raises(UserError, match=expected):
        run_benchmarks(None, None, langs, EvalConfig(**arguments), work_dir=tmp_path)  # no model: validation first
    assert not (tmp_path / "lm_eval_tasks").exists()


def test_items_are_kept_per_question_for_the_paired_tests(bundled_run):
    row = bundled_run["results"]["arc_challenge"]["hi"]
    assert row["items"]["ids"] == [f"mlalign_arc_hi/{i}" for i in range(LIMIT)]
    assert set(row["items"]["acc"]) <= {0.0, 1.0} and sum(row["items"]["acc"]) / LIMIT == pytest.approx(row["acc"])
    assert row["items"]["acc_norm"] is not None and bundled_run["results"]["mmlu"]["hi"]["items"]["acc_norm"] is None


@pytest.mark.parametrize(
    ("tasks", "expected"),
    [(["mlalign_arc_hj"], "close matches: .*mlalign_arc_hi"), (["arc_challenge"], "built-in tasks need eval=harness"),
     (["mlalign_arcc_{lang}"], "mlalign_arc_hi")],
)
def test_unknown_task_names_fail_with_close_matches_before_any_model_work(tasks, expected, tmp_path):
    with pytest.raises(UserError, match=expected):
        run_benchmarks(None, None, ["hi"], EvalConfig(suite="bundled", benchmarks=[], tasks=tasks), work_dir=tmp_path)


def test_builtin_task_names_are_checked_against_lm_evals_index(builtin_task_manager, tmp_path):
    from mlalign.evaluation.harness import plan_benchmarks

    settings = EvalConfig(suite="harness", benchmarks=["belebele"], tasks=["xnli_{lang}", "ai2_arc"],
                          num_fewshot={"belebele": 5, "ai2_arc": 25})
    plan = plan_benchmarks(["hi", "ml"], settings, task_manager=builtin_task_manager)
    planned = {(e.benchmark, e.lang): (e.task, e.num_fewshot) for e in plan.entries}
    assert planned[("belebele", "ml")] == ("belebele_mal_Mlym", 5)
    assert planned[("xnli_{lang}", "hi")] == ("xnli_hi", 0)  # not in the mapping: 0 shots
    assert planned[("arc_challenge", "all")] == ("arc_challenge", 25)  # a tag runs as its member tasks
    assert {(s["benchmark"], s["lang"]) for s in plan.skipped} == {("xnli_{lang}", "ml")}  # XNLI has no Malayalam
    with pytest.raises(UserError, match="close matches: .*belebele_hin_Deva"):
        plan_benchmarks(["hi"], EvalConfig(suite="harness", benchmarks=[], tasks=["belebele_hin_Dev"]),
                        task_manager=builtin_task_manager)


def test_a_language_beyond_the_ten_runs_its_table_tasks_and_skips_what_is_not_bundled(builtin_task_manager, tmp_path):
    from mlalign.evaluation.harness import plan_benchmarks

    online = plan_benchmarks(["bn"], EvalConfig(suite="harness", benchmarks=["arc_challenge", "mmlu", "hellaswag",
                                                                          "belebele"]),
                             task_manager=builtin_task_manager)
    assert {e.task for e in online.entries} == {"arc_bn", "m_mmlu_bn", "hellaswag_bn", "belebele_ben_Beng"}
    offline = plan_benchmarks(["en", "bn"], EvalConfig(suite="bundled", benchmarks=["arc_challenge", "mmlu"]),
                              work_dir=tmp_path)
    assert {(e.lang, e.task) for e in offline.entries} == {("en", "mlalign_arc_en"), ("en", "mlalign_mmlu_en")}
    assert {(s["benchmark"], s["lang"]) for s in offline.skipped} == {("arc_challenge", "bn"), ("mmlu", "bn")}
    assert all("eval=harness" in s["reason"] for s in offline.skipped)


def test_per_benchmark_fewshot_and_lm_evals_own_files(tiny_model, tiny_tokenizer, tmp_path):
    import json

    out = tmp_path / "lm_eval"
    settings = EvalConfig(suite="bundled", benchmarks=["arc_challenge", "mmlu"], tasks=["mlalign_mmlu_{lang}"],
                          num_fewshot={"arc_challenge": 2}, limit=3, batch_size=4)
    run = run_benchmarks(tiny_model, tiny_tokenizer, ["hi"], settings, work_dir=tmp_path, output_dir=out)
    assert run["results"]["arc_challenge"]["hi"]["num_fewshot"] == 2
    assert run["results"]["mmlu"]["hi"]["num_fewshot"] == 0
    assert run["results"]["mlalign_mmlu_{lang}"]["hi"]["task"] == "mlalign_mmlu_hi"
    results = sorted(out.glob("results_*.json"))
    assert len(results) == 2  # one simple_evaluate call per few-shot setting
    by_task = {task: json.loads(path.read_text()) for path in results for task in json.loads(path.read_text())["n-shot"]}
    assert by_task["mlalign_arc_hi"]["n-shot"]["mlalign_arc_hi"] == 2 and "versions" in by_task["mlalign_arc_hi"]
    samples = sorted(p.name.split("_2")[0] for p in out.glob("samples_*.jsonl"))
    assert samples == ["samples_mlalign_arc_hi", "samples_mlalign_mmlu_hi"]
    lines = (next(out.glob("samples_mlalign_arc_hi_*.jsonl"))).read_text().splitlines()
    assert len(lines) == 3 and {"doc_id", "acc", "resps"} <= set(json.loads(lines[0]))


def test_without_log_samples_only_results_files_are_written(tiny_model, tiny_tokenizer, tmp_path):
    settings = EvalConfig(suite="bundled", benchmarks=["mmlu"], limit=2, log_samples=False)
    run_benchmarks(tiny_model, tiny_tokenizer, ["en"], settings, work_dir=tmp_path, output_dir=tmp_path / "out")
    assert [p.name.split("_")[0] for p in (tmp_path / "out").iterdir()] == ["results"]


def test_a_task_whose_data_cannot_be_downloaded_is_one_user_error(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """Issue 30 audit: `eval=harness` offline (e.g. experiment=testbed_demo eval=harness) ended in a traceback from
    datasets (ConnectionError: Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled))."""
    import lm_eval

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(UserError, match=r"lm-eval cannot load the data of mlalign_arc_hi: Couldn't reach "
                                        r"'allenai/ai2_arc'.*run it once online.*or use eval=bundled"):
        run_benchmarks(tiny_model, tiny_tokenizer, ["hi"], EvalConfig(suite="bundled", benchmarks=["arc_challenge"],
                                                                     num_fewshot=0, limit=2, batch_size=4),
                       work_dir=tmp_path)
