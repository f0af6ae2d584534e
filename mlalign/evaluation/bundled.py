"""Offline lm-eval tasks over the bundled Okapi ARC-Challenge and MMLU items, in the prompt format of lm-eval's Okapi tasks.

The tasks reproduce lm-eval's built-in `arc_<lang>` (lm_eval/tasks/okapi/arc_multilingual: `_arc_yaml` + `utils.py`)
and `m_mmlu_<lang>` (lm_eval/tasks/okapi/mmlu_multilingual/_default_yaml) field for field: same question text,
same choices, same target, same metrics. Only the data differ: the built-ins download ARC-Challenge *test* and MMLU
*test*, while the bundle holds ARC-Challenge *validation* (~297 items) and MMLU *dev* (221-279 items) per language.
tests/evaluation/test_bundled.py checks the prompts against the installed built-in tasks.

Few-shot: the bundle has one split per benchmark, so it is the test split and the few-shot split at once
(`fewshot_split: test`). With num_fewshot > 0 the shots are other items of the same file; lm-eval leaves out the item
being scored (it does so whenever the few-shot split equals the test split). MMLU keeps the built-in `first_n`
sampler, so its shots are the first items of the file; ARC samples shots at random (seeded by fewshot_random_seed),
as the built-in does from its train split.

Licenses (keep with anything shipped): the non-English items are Okapi machine translations, CC-BY-NC-4.0, research
use only; en ARC is AI2's ARC (CC-BY-SA-4.0), en MMLU is Hendrycks et al.'s MMLU (MIT).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mlalign.data.corpus import BUNDLED_DATA_DIR
from mlalign.errors import UserError
from mlalign.io import write_text_atomic
from mlalign.languages import LANGUAGES

OKAPI_DIR = BUNDLED_DATA_DIR / "okapi"
BUNDLED_BENCHMARKS: tuple[str, ...] = ("arc_challenge", "mmlu")
BUNDLED_TAG = "mlalign_bundled"

_OPTION_KEYS = ("option_a", "option_b", "option_c", "option_d", "option_e")
_ANSWER_LETTERS = ("A", "B", "C", "D", "E")


def okapi_file(benchmark: str, lang: str, okapi_dir: Path = OKAPI_DIR) -> Path:
    if benchmark == "arc_challenge":
        return okapi_dir / "m_arc" / f"{lang}_validation.json"
    if benchmark == "mmlu":
        return okapi_dir / "m_mmlu" / f"{lang}_dev.json"
    raise ValueError(f"no bundled items for benchmark {benchmark!r}")


def bundled_task_name(benchmark: str, lang: str) -> str:
    return f"mlalign_{'arc' if benchmark == 'arc_challenge' else benchmark}_{lang}"


def bundled_langs() -> list[str]:
    """The languages of the table with bundled Okapi items (the study's ten)."""
    return [lang for lang in LANGUAGES if all(okapi_file(b, lang).is_file() for b in BUNDLED_BENCHMARKS)]


def license_note(lang: str, benchmark: str) -> str:
    if lang != "en":
        return "Okapi machine translation (Lai et al. 2023), CC-BY-NC-4.0, research use only"
    return "AI2 ARC, CC-BY-SA-4.0" if benchmark == "arc_challenge" else "MMLU (Hendrycks et al.), MIT"


# --- the Okapi ARC document processing (copied from lm_eval/tasks/okapi/arc_multilingual/utils.py) -----------------
def _preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _process_arc_doc(doc: dict) -> dict:
    # `doc.get`: a file whose items all lack option_e (or option_d) has no such column, where the built-in would fail.
    return {
        "id": doc["id"],
        "query": "Question: " + _preprocess(doc["instruction"]) + "\nAnswer:",
        "choices": [_preprocess(doc[key]) for key in _OPTION_KEYS if doc.get(key)],
        "gold": list(_ANSWER_LETTERS).index(doc["answer"]),
    }


def process_arc_docs(dataset):
    """`process_docs` of the bundled ARC tasks: the Okapi ARC fields `query`, `choices` and `gold`."""
    return dataset.map(_process_arc_doc)


# --- task configs -----------------------------------------------------------------------------------------------
class _Function(str):
    """A YAML `!function module.name` reference, resolved by lm-eval's YAML loader when the task loads."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))
# Prompt templates stay on one line, double-quoted with `\n`, as in lm-eval's own YAMLs.
_TaskDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)
)

_ARC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
_MMLU_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def task_config(benchmark: str, lang: str, cache_dir: Path | None = None, okapi_dir: Path = OKAPI_DIR) -> dict:
    """The lm-eval config of one bundled task, with an absolute path to its JSON file."""
    data_file = okapi_file(benchmark, lang, okapi_dir).resolve()
    if not data_file.is_file():
        raise UserError(f"bundled benchmark file {data_file} is missing; reinstall mlalign (pip install -e .)")
    dataset_kwargs: dict = {"data_files": {"test": str(data_file)}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    common = {
        "task": bundled_task_name(benchmark, lang),
        "tag": [BUNDLED_TAG],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": dataset_kwargs,
        "output_type": "multiple_choice",
        "test_split": "test",
        "fewshot_split": "test",
    }
    if benchmark == "arc_challenge":
        # lm_eval/tasks/okapi/arc_multilingual/_arc_yaml
        return common | {
            "process_docs": _Function(f"{__name__}.process_arc_docs"),
            "doc_to_text": "query",
            "doc_to_target": "gold",
            "doc_to_choice": "choices",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "query",
            "metric_list": _ARC_METRICS,
            "metadata": {"version": 2.0, "data_license": license_note(lang, benchmark)},
        }
    _check_four_options(data_file)
    # lm_eval/tasks/okapi/mmlu_multilingual/_default_yaml
    return common | {
        "fewshot_config": {"sampler": "first_n"},
        "doc_to_text": "{{instruction.strip()}}\nA. {{option_a}}\nB. {{option_b}}\nC. {{option_c}}\nD. {{option_d}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": _MMLU_METRICS,
        "metadata": {"version": 0.0, "data_license": license_note(lang, benchmark)},
    }


def _check_four_options(data_file: Path) -> None:
    # The Okapi MMLU prompt shows options A-D only; an item with a fifth option or answer E would be scored wrong.
    for item in json.loads(data_file.read_text(encoding="utf-8")):
        if item.get("option_e") or item["answer"] not in _ANSWER_LETTERS[:4]:
            raise UserError(f"MMLU item {item.get('id')!r} in {data_file} is not four-option (A-D); fix or remove it")


def write_bundled_tasks(
    task_dir: str | Path,
    langs: list[str] | None = None,
    benchmarks: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write one lm-eval task YAML per (benchmark, language) into `task_dir`; returns {task name: YAML path}.

    Load them with `TaskManager(include_path=task_dir)`. `cache_dir` is where `datasets` keeps its Arrow copy
    (default: `<task_dir>/datasets_cache`), so nothing lands in the user's global HF cache.
    """
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else task_dir / "datasets_cache"
    written = {}
    for benchmark in benchmarks or BUNDLED_BENCHMARKS:
        for lang in langs or bundled_langs():
            config = task_config(benchmark, lang, cache_dir)
            path = task_dir / f"{config['task']}.yaml"
            text = "# Written by mlalign.evaluation.bundled; prompt format of lm-eval's Okapi tasks.\n"
            text += yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1000)
            write_text_atomic(path, text)
            written[config["task"]] = path
    return written
