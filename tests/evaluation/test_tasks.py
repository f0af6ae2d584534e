"""The (suite, benchmark, language) -> lm-eval task table against the installed harness's own task index."""

from pathlib import Path

import pytest

from mlalign.errors import UserError
from mlalign.evaluation.tasks import BENCHMARKS, SUITES, lookup_task, task_table
from mlalign.languages import LANGUAGES, use_languages


def test_table_covers_every_suite_benchmark_and_language():
    table = task_table()
    assert set(table) == set(SUITES)
    for suite in SUITES:
        assert set(table[suite]) == set(BENCHMARKS)
        for benchmark in BENCHMARKS:
            assert set(table[suite][benchmark]) == set(LANGUAGES)


def test_every_harness_task_exists_in_installed_lm_eval(builtin_task_manager):
    known = set(builtin_task_manager.all_subtasks)
    names = [name for by_lang in task_table()["harness"].values() for name in by_lang.values() if name is not None]
    assert len(names) == 4 * len(LANGUAGES) - 1  # everything but HellaSwag in Chinese
    missing = [name for name in names if name not in known]
    assert not missing, f"not in lm-eval {len(known)} tasks: {missing}"
    # Belebele by each entry's own FLORES-200 code: the table's two codes of a language cannot drift apart.
    assert all(task_table()["harness"]["belebele"][code] == f"belebele_{lang.flores_code}"
               for code, lang in LANGUAGES.items())


def test_harness_uses_english_originals_and_okapi_elsewhere():
    assert lookup_task("arc_challenge", "en").task == "arc_challenge"
    assert lookup_task("hellaswag", "en").task == "hellaswag"
    assert lookup_task("mmlu", "en").task == "m_mmlu_en"
    assert lookup_task("arc_challenge", "mr").task == "arc_mr"
    assert lookup_task("hellaswag", "ml").task == "hellaswag_ml"
    assert lookup_task("mmlu", "ca").task == "m_mmlu_ca"
    # Belebele by FLORES-200 code, the corpus's own language names.
    assert lookup_task("belebele", "ml").task == "belebele_mal_Mlym"
    assert lookup_task("belebele", "zh").task == "belebele_zho_Hans"
    assert lookup_task("belebele", "en").task == "belebele_eng_Latn"


def test_english_mmlu_has_the_prompt_of_the_other_languages(builtin_task_manager):
    # Why the table uses m_mmlu_en and not `mmlu`: identical prompt, choices and target to every m_mmlu_<lang>.
    from lm_eval.tasks._yaml_loader import load_yaml

    def prompt_fields(task):
        cfg = load_yaml(Path(builtin_task_manager.task_index[task].yaml_path), resolve_func=False)
        return [cfg[key] for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "test_split")]

    english = prompt_fields("m_mmlu_en")
    for lang in LANGUAGES:
        assert prompt_fields(task_table()["harness"]["mmlu"][lang]) == english


def test_missing_combinations_come_with_a_reason():
    choice = lookup_task("hellaswag", "zh", "harness")
    assert choice.task is None and "Chinese" in choice.reason
    for lang in LANGUAGES:
        choice = lookup_task("hellaswag", lang, "bundled")
        assert choice.task is None and "eval=harness" in choice.reason
        choice = lookup_task("belebele", lang, "bundled")
        assert choice.task is None and "eval=harness" in choice.reason
    assert lookup_task("mmlu", "zh", "bundled") == ("mlalign_mmlu_zh", None)
    # Bengali is in the table (Okapi and Belebele online) but has no bundled items.
    assert lookup_task("mmlu", "bn", "harness") == ("m_mmlu_bn", None)
    choice = lookup_task("mmlu", "bn", "bundled")
    assert choice.task is None and "eval=harness" in choice.reason and "m_mmlu_bn" in choice.reason


def test_a_language_added_in_config_gets_its_tasks_and_reasons():
    table = {"en": {"name": "English", "flores_code": "eng_Latn", "script": "Latin", "tier": "reference",
                    "tasks": {"mmlu": "m_mmlu_en"}},
             "sw": {"name": "Swahili", "flores_code": "swh_Latn", "script": "Latin", "tier": "medium_low",
                    "tasks": {"belebele": "belebele_swh_Latn"}}}
    with use_languages(table):
        assert lookup_task("belebele", "sw").task == "belebele_swh_Latn"
        choice = lookup_task("mmlu", "sw")
        assert choice.task is None and "Swahili" in choice.reason and "tasks.mmlu" in choice.reason
        assert set(task_table()["harness"]["belebele"]) == {"en", "sw"}
    with pytest.raises(UserError, match="valid codes"):
        lookup_task("belebele", "sw")  # the run's table is gone after the block


@pytest.mark.parametrize(
    ("args", "expected"),
    [(("gsm8k", "hi"), "arc_challenge, mmlu, hellaswag, belebele"), (("belebel", "hi"), "did you mean belebele"),
     (("gsm8k", "hi"), "eval.tasks=\\[gsm8k\\]"), (("mmlu", "xx"), "valid codes"),
     (("mmlu", "hi", "online"), "eval=bundled")],
)
def test_user_mistakes_are_user_errors(args, expected):
    with pytest.raises(UserError, match=expected):
        lookup_task(*args)
