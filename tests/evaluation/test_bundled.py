"""The bundled offline tasks: they load in lm-eval, hold every item, and prompt exactly as lm-eval's Okapi tasks do."""

import json
from pathlib import Path

import pytest
import yaml

from mlalign.errors import UserError
from mlalign.evaluation.bundled import bundled_langs, okapi_file, process_arc_docs, task_config, write_bundled_tasks
from mlalign.evaluation.tasks import task_table

BUNDLED = {"arc_challenge": "arc", "mmlu": "mmlu"}


@pytest.fixture(scope="module")
def bundled_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path_factory.mktemp("bundled_tasks")
    written = write_bundled_tasks(task_dir)
    return written, TaskManager(include_path=str(task_dir), include_defaults=False)


def _builtin_task_on_bundled_file(builtin_task_manager, name: str, data_file: Path, cache_dir: Path):
    """lm-eval's own built-in task (its YAML, process_docs and templates), pointed at the bundled JSON file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(builtin_task_manager.task_index[name].yaml_path), resolve_func=True, recursive=True)
    config |= {"dataset_path": "json", "dataset_name": None, "training_split": None, "validation_split": None,
               "test_split": "test", "fewshot_split": None,
               "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)}}
    (task,) = builtin_task_manager.load(config)["tasks"].values()
    return task


def test_yamls_name_every_bundled_task_with_absolute_local_data(bundled_manager):
    written, manager = bundled_manager
    expected = {name for benchmark in BUNDLED for name in task_table()["bundled"][benchmark].values() if name}
    assert set(written) == expected
    assert expected <= set(manager.all_subtasks)
    for path in written.values():
        text = path.read_text(encoding="utf-8")
        config = yaml.load(text, Loader=yaml.BaseLoader)  # BaseLoader: leave `!function` unresolved
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert config["dataset_path"] == "json" and data_file.is_absolute() and data_file.is_file()


@pytest.mark.parametrize("benchmark", list(BUNDLED))
def test_every_item_loads(bundled_manager, benchmark):
    _, manager = bundled_manager
    langs = bundled_langs()
    assert langs == ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]  # the ten with bundled Okapi items
    names = [task_table()["bundled"][benchmark][lang] for lang in langs]
    tasks = manager.load(names)["tasks"]
    for lang, name in zip(langs, names):
        items = json.loads(okapi_file(benchmark, lang).read_text(encoding="utf-8"))
        assert len(list(tasks[name].eval_docs)) == len(items), name


@pytest.mark.parametrize("lang", ["en", "hi", "zh", "ml"])
@pytest.mark.parametrize("benchmark", list(BUNDLED))
def test_prompts_match_the_okapi_builtin_task(bundled_manager, builtin_task_manager, tmp_path, benchmark, lang):
    _, manager = bundled_manager
    ours = next(iter(manager.load([task_table()["bundled"][benchmark][lang]])["tasks"].values()))
    builtin_name = f"arc_{lang}" if benchmark == "arc_challenge" else f"m_mmlu_{lang}"
    if builtin_name == "arc_en":  # Okapi has no English ARC; the English file has the Okapi layout, so use Hindi's.
        builtin_name = "arc_hi"
    builtin = _builtin_task_on_bundled_file(builtin_task_manager, builtin_name, okapi_file(benchmark, lang), tmp_path)
    our_docs, builtin_docs = list(ours.eval_docs), list(builtin.eval_docs)
    assert len(our_docs) == len(builtin_docs)
    for ours_doc, builtin_doc in zip(our_docs, builtin_docs):
        assert ours.doc_to_text(ours_doc) == builtin.doc_to_text(builtin_doc)
        assert ours.doc_to_choice(ours_doc) == builtin.doc_to_choice(builtin_doc)
        assert ours.doc_to_target(ours_doc) == builtin.doc_to_target(builtin_doc)
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in builtin.config.metric_list]


def test_arc_choices_follow_the_options_present():
    import datasets

    items = json.loads(okapi_file("arc_challenge", "es").read_text(encoding="utf-8"))
    five = next(item for item in items if item.get("option_e"))
    three = next(item for item in items if not item.get("option_d"))
    # A file in which no item has option_e has no such column at all; the built-in would raise KeyError there.
    without_e = {key: value for key, value in three.items() if key != "option_e"}
    docs = process_arc_docs(datasets.Dataset.from_list([without_e]))
    assert len(docs[0]["choices"]) == 3
    docs = process_arc_docs(datasets.Dataset.from_list([five, three]))
    assert len(docs[0]["choices"]) == 5 and docs[0]["gold"] == "ABCDE".index(five["answer"])
    assert len(docs[1]["choices"]) == 3 and docs[0]["query"].startswith("Question: ")


def test_fewshot_examples_are_other_items_of_the_same_file(bundled_manager):
    _, manager = bundled_manager
    task = next(iter(manager.load(["mlalign_mmlu_hi"])["tasks"].values()))
    docs = list(task.eval_docs)
    context = task.fewshot_context(docs[0], num_fewshot=2)
    # first_n sampler, with the scored item left out: the shots are items 1 and 2, then item 0's question.
    assert context.startswith(task.doc_to_text(docs[1]))
    assert task.doc_to_text(docs[2]) in context
    assert context.endswith(task.doc_to_text(docs[0]))
    assert context.count(task.doc_to_text(docs[0])) == 1


def test_mmlu_item_with_a_fifth_option_is_refused(tmp_path):
    items = json.loads(okapi_file("mmlu", "hi").read_text(encoding="utf-8"))[:3]
    items[1] |= {"option_e": "extra", "answer": "E"}
    bad = tmp_path / "m_mmlu" / "hi_dev.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(items), encoding="utf-8")
    with pytest.raises(UserError, match="four-option"):
        task_config("mmlu", "hi", okapi_dir=tmp_path)


def test_no_bundled_arc_item_has_a_bracketed_span_for_the_okapi_preprocessing_to_strip():
    """README (Evaluation): the bundled ARC keeps lm-eval's Okapi preprocessing, which deletes `[...]` spans
    (lm-eval issue 2000); on the bundled files that deletes nothing, so comparability costs no item its text."""
    import re

    langs = bundled_langs()
    assert len(langs) == 10
    for lang in langs:
        for item in json.loads(okapi_file("arc_challenge", lang).read_text(encoding="utf-8")):
            fields = [item["instruction"], *(item.get(f"option_{k}") or "" for k in "abcde")]
            assert not any(re.search(r"\[.*?\]", text) for text in fields), (lang, item["id"])
