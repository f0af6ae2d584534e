"""Run benchmarks in every language through lm-eval's `simple_evaluate` on an in-memory model; one result per task.

Two steps: `plan_benchmarks` resolves every (benchmark, language) and every `eval.tasks` name to lm-eval task names
and checks them against lm-eval's own task index (no model, no dataset touched); `run_plan` evaluates a plan, writes
lm-eval's standard `results_*.json` / `samples_*.jsonl` through its EvaluationTracker, and keeps each item's score
for the paired base-vs-adapter tests.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mlalign.config import EvalConfig
from mlalign.errors import UserError
from mlalign.evaluation.bundled import write_bundled_tasks
from mlalign.evaluation.tasks import BENCHMARKS, check_benchmarks, check_suite, lookup_task
from mlalign.languages import get_language

log = logging.getLogger(__name__)

# Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so each TaskManager is built once per process.
_TASK_MANAGERS: dict[tuple, object] = {}


def get_task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """A process-wide TaskManager for these arguments (built on first use)."""
    from lm_eval.tasks import TaskManager

    key = (str(Path(include_path).resolve()) if include_path is not None else None, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def _float_or_none(value):
    # lm-eval writes "N/A" where it could not compute a stderr (e.g. a single sample).
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


ALL_LANGS = "all"
"""The language key of an `eval.tasks` entry without a `{lang}` or `{flores}` placeholder: it runs once, as named."""


def check_num_fewshot(num_fewshot, names) -> None:
    """An int >= 0, null (each task's own default), or {benchmark or task name: int or null} for names in `names`."""
    def valid(value):
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)

    if isinstance(num_fewshot, dict) or hasattr(num_fewshot, "items"):
        for key, value in num_fewshot.items():
            if str(key) not in names:
                close = difflib.get_close_matches(str(key), list(names), n=3)
                raise UserError(f"eval.num_fewshot names {key!r}, which is neither a benchmark nor a task of this run"
                                + (f" (did you mean {' or '.join(close)}?)" if close else "")
                                + f"; use one of {', '.join(names)}, e.g. eval.num_fewshot={{arc_challenge: 25}}")
            if not valid(value):
                raise UserError(f"eval.num_fewshot.{key} must be an integer >= 0 or null, got {value!r}")
        return
    if not valid(num_fewshot):
        raise UserError(f"eval.num_fewshot must be an integer >= 0, null (each task's default) or a mapping such as "
                        f"{{arc_challenge: 25, mmlu: 5}}, got {num_fewshot!r}; e.g. eval.num_fewshot=0")


def check_batch_size(batch_size):
    """A positive int, `auto` or `auto:N` (lm-eval's: find the largest batch that fits, re-detected N times)."""
    if isinstance(batch_size, str) and (batch_size == "auto" or (batch_size.startswith("auto:")
                                                                 and batch_size[5:].isdigit())):
        return batch_size
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"eval.batch_size must be a positive integer or auto, got {batch_size!r}; "
                        "e.g. eval.batch_size=8 or eval.batch_size=auto")
    return batch_size


def _check_settings(langs, num_fewshot, limit, batch_size, names) -> list[str]:
    if langs is None or isinstance(langs, str):
        raise UserError(f"langs must be a list of language codes, got {langs!r}; type e.g. langs=[hi,mr]")
    langs = list(dict.fromkeys(str(lang) for lang in langs))
    for lang in langs:
        get_language(lang)
    if not langs:
        raise UserError("langs is empty; give at least one language, e.g. langs=[hi,mr]")
    check_num_fewshot(num_fewshot, names)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"eval.limit must be a positive integer or null (all items), got {limit!r}; e.g. eval.limit=50")
    check_batch_size(batch_size)
    return langs


def _check_tasks(tasks) -> list[str]:
    if tasks is None:
        return []
    if isinstance(tasks, str):
        raise UserError(f"eval.tasks must be a list, got {tasks!r}; type e.g. eval.tasks=[xnli_hi,belebele_hin_Deva]")
    return list(dict.fromkeys(str(task) for task in tasks))


def check_task_names(names, task_manager, suite: str) -> None:
    """Every name must be a task, group or tag in lm-eval's index; otherwise one error naming the closest ones."""
    index = task_manager.task_index
    for name in names:
        if name not in index:
            close = difflib.get_close_matches(name, task_manager.all_tasks, n=5, cutoff=0.6)
            where = ("the bundled offline tasks (eval=bundled)" if suite == "bundled"
                     else f"lm-eval's {len(index)} tasks, groups and tags")
            raise UserError(f"unknown lm-eval task {name!r}: not in {where}"
                            + (f"; close matches: {', '.join(close)}" if close else "")
                            + ("; built-in tasks need eval=harness" if suite == "bundled" else ""))


def _tag_members(task_manager, tag: str) -> list[str]:
    return sorted(name for name, entry in task_manager.task_index.items() if tag in (entry.tags or ()))


@dataclass(frozen=True)
class PlanEntry:
    """One result row: `benchmark` (a table benchmark or an `eval.tasks` name) in `lang`, as lm-eval task `task`."""

    benchmark: str
    lang: str
    task: str
    num_fewshot: int | None


@dataclass
class EvalPlan:
    """What one evaluation runs: every entry checked against `task_manager`'s index; `skipped` says why others are not."""

    suite: str
    entries: list[PlanEntry]
    skipped: list[dict]
    task_manager: object
    settings: dict
    benchmarks: list[str] = field(default_factory=list)


def _expand(name: str, lang: str) -> str:
    return name.replace("{lang}", lang).replace("{flores}", get_language(lang).flores_code)


def plan_benchmarks(langs: list[str], settings: EvalConfig, *, seed: int = 0, work_dir: str | Path = ".",
                    task_manager=None) -> EvalPlan:
    """Resolve and check everything before any model or dataset loads; user mistakes are one UserError.

    `settings` is the eval group; this reads suite, benchmarks, tasks, num_fewshot, limit and batch_size.
    `benchmarks` are table entries (arc_challenge, mmlu, hellaswag, belebele), run in every language. `tasks` are
    any lm-eval task, group or tag names; one with `{lang}` (or `{flores}`, the FLORES-200 code) runs in every
    language, e.g. `xnli_{lang}`, the others once under the language key `all`. A tag runs as its member tasks.
    `num_fewshot` is an int, null (each task's own default) or {benchmark or task name: int or null} (others: 0).
    """
    suite, num_fewshot, limit, batch_size = settings.suite, settings.num_fewshot, settings.limit, settings.batch_size
    check_suite(suite)
    benchmarks = check_benchmarks(settings.benchmarks, allow_empty=True)
    tasks = _check_tasks(settings.tasks)
    if not benchmarks and not tasks:
        raise UserError(f"nothing to evaluate: eval.benchmarks and eval.tasks are both empty; give e.g. "
                        f"eval.benchmarks=[{','.join(BENCHMARKS[:2])}] or eval.tasks=[belebele_hin_Deva]")
    langs = _check_settings(langs, num_fewshot, limit, batch_size, [*benchmarks, *tasks])

    if suite == "bundled":
        task_dir = Path(work_dir) / "lm_eval_tasks"
        # Every language and benchmark, not just these: the TaskManager cached for this folder must know them all.
        write_bundled_tasks(task_dir)
        # Only the bundled tasks are indexed: no built-in task (and no download) can be reached from here.
        task_manager = task_manager or get_task_manager(include_path=task_dir, include_defaults=False)
    else:
        task_manager = task_manager or get_task_manager()

    def shots(name: str):
        if isinstance(num_fewshot, dict) or hasattr(num_fewshot, "items"):
            return num_fewshot.get(name, 0)
        return num_fewshot

    entries, skipped = [], []
    for benchmark in benchmarks:
        for lang in langs:
            choice = lookup_task(benchmark, lang, suite)
            if choice.task is None:
                skipped.append({"benchmark": benchmark, "lang": lang, "reason": choice.reason})
            elif choice.task not in task_manager.task_index:
                skipped.append({"benchmark": benchmark, "lang": lang,
                                "reason": f"lm-eval has no task {choice.task!r} (installed lm-eval)"})
            else:
                entries.append(PlanEntry(benchmark, lang, choice.task, shots(benchmark)))
    for name in tasks:
        if "{lang}" in name or "{flores}" in name:
            found = {lang: _expand(name, lang) for lang in langs}
            present = {lang: task for lang, task in found.items() if task in task_manager.task_index}
            if not present:
                check_task_names([found[langs[0]]], task_manager, suite)
            for lang, task in found.items():
                if lang in present:
                    entries.append(PlanEntry(name, lang, task, shots(name)))
                else:
                    skipped.append({"benchmark": name, "lang": lang, "reason": f"lm-eval has no task {task!r}"})
        else:
            check_task_names([name], task_manager, suite)
            entry = task_manager.task_index[name]
            if str(entry.kind).endswith("TAG"):
                for member in _tag_members(task_manager, name):
                    entries.append(PlanEntry(member, ALL_LANGS, member, shots(name)))
            else:
                entries.append(PlanEntry(name, ALL_LANGS, name, shots(name)))
    for item in skipped:
        log.warning("skipping %s in %s: %s", item["benchmark"], item["lang"], item["reason"])
    if suite == "bundled" and any(entry.num_fewshot for entry in entries):
        log.warning("bundled suite: the few-shot examples come from the same items as the test set "
                    "(the item being scored is left out)")
    recorded = {"suite": suite, "num_fewshot": _plain(num_fewshot), "limit": limit, "batch_size": batch_size,
                "seed": seed}
    return EvalPlan(suite, entries, skipped, task_manager, recorded, benchmarks=[*benchmarks, *tasks])


def _plain(value):
    return {str(k): v for k, v in value.items()} if hasattr(value, "items") else value


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(child, group_subtasks)]


def _items(task: str, output: dict) -> dict:
    """Per-item scores of `task` (a group: of all its tasks), ids `<task>/<doc_id>`, in lm-eval's sample order."""
    ids, acc, acc_norm = [], [], []
    for leaf in _leaves(task, output.get("group_subtasks") or {}):
        for sample in output["samples"].get(leaf, []):
            if sample.get("filter", "none") != "none":
                continue
            ids.append(f"{leaf}/{sample['doc_id']}")
            acc.append(_float_or_none(sample.get("acc")))
            acc_norm.append(_float_or_none(sample.get("acc_norm")))
    return {"ids": ids, "acc": acc if all(v is not None for v in acc) else None,
            "acc_norm": acc_norm if acc and all(v is not None for v in acc_norm) else None}


def _row(task: str, output: dict) -> dict:
    metrics = output["results"][task]
    items = _items(task, output)
    n_samples = output["n-samples"][task]["effective"] if task in output.get("n-samples", {}) else len(items["ids"])
    return {
        "task": task,
        "acc": _float_or_none(metrics.get("acc,none")),
        "acc_stderr": _float_or_none(metrics.get("acc_stderr,none")),
        "acc_norm": _float_or_none(metrics.get("acc_norm,none")),
        "acc_norm_stderr": _float_or_none(metrics.get("acc_norm_stderr,none")),
        "n_samples": int(n_samples),
        "num_fewshot": output.get("n-shot", {}).get(task),
        "version": output.get("versions", {}).get(task),
        "metrics": {key: float(value) for key, value in metrics.items()
                    if _float_or_none(value) is not None and "_stderr" not in key and key != "sample_len"},
        "items": items,
    }


HARNESS_OFFLINE = ("eval=harness downloads each task's dataset from the Hugging Face Hub once (offline here: "
                   "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or no network): run it once online to cache them, or use "
                   "eval=bundled (ARC and MMLU items shipped with mlalign, offline)")


def run_plan(model, tokenizer, plan: EvalPlan, output_dir: str | Path | None = None, log_samples: bool = True,
             model_args: dict | None = None) -> dict:
    """Evaluate `plan` on `model`; returns {"results": {benchmark: {lang: row}}, "skipped", "settings"}.

    A row holds acc / acc_norm (and stderrs) as lm-eval reports them, `n_samples`, the task's `num_fewshot` and
    `version`, all its numeric `metrics`, and `items` (ids and per-item acc / acc_norm) for the paired tests.
    With `output_dir`, lm-eval's EvaluationTracker writes `results_<date>.json` there (and, with `log_samples`,
    `samples_<task>_<date>.jsonl`): one pair per few-shot setting, since each is one `simple_evaluate` call.
    `model_args` ({"pretrained": ..., "peft": ...}) is recorded in those files as the model's name.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    from mlalign.console import transient_bars

    # One bar per task and side would stay on the console; mlalign.console's stage lines say what ran and how long.
    transient_bars("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")
    settings = plan.settings
    results: dict[str, dict[str, dict]] = {benchmark: {} for benchmark in plan.benchmarks}
    for entry in plan.entries:
        results.setdefault(entry.benchmark, {})
    by_shots: dict = {}
    for entry in plan.entries:
        by_shots.setdefault(entry.num_fewshot, []).append(entry)
    if plan.entries:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=check_batch_size(settings["batch_size"]))
        was_training = model.training
        model.eval()
        try:
            for num_fewshot, entries in by_shots.items():
                tasks = list(dict.fromkeys(entry.task for entry in entries))
                log.debug("lm-eval %s suite, %s-shot, limit %s: %s", plan.suite,
                         "default" if num_fewshot is None else num_fewshot, settings["limit"], ", ".join(tasks))
                tracker = None
                if output_dir is not None:
                    # A path ending in .json: lm-eval writes results_<date>.json and samples_*.jsonl beside it,
                    # instead of in a sub-folder named after the model.
                    tracker = EvaluationTracker(output_path=str(Path(output_dir) / "results.json"))
                # One call per few-shot setting: lm-eval batches the requests of all its tasks together, and its
                # per-call overhead (environment info) is paid once. Each task seeds its own few-shot sampler with
                # fewshot_random_seed, so a score does not depend on its neighbours. Samples are always kept in
                # memory: the paired tests need every item's score; `log_samples` decides whether they are written.
                try:
                    output = simple_evaluate(
                        model=lm,
                        model_args=model_args,
                        tasks=tasks,
                        num_fewshot=num_fewshot,
                        limit=settings["limit"],
                        task_manager=plan.task_manager,
                        log_samples=True,
                        evaluation_tracker=tracker,
                        random_seed=settings["seed"],
                        numpy_random_seed=settings["seed"],
                        torch_random_seed=settings["seed"],
                        fewshot_random_seed=settings["seed"],
                    )
                except ConnectionError as err:  # issue 30 audit: a traceback when a task's dataset is not cached
                    raise UserError(f"lm-eval cannot load the data of {', '.join(tasks)}: "
                                    f"{(str(err).splitlines() or [type(err).__name__])[0]}; {HARNESS_OFFLINE}") from None
                for entry in entries:
                    row = _row(entry.task, output)
                    results[entry.benchmark][entry.lang] = row
                    log.debug("%s %s (%s): acc %s on %d items", entry.benchmark, entry.lang, entry.task, row["acc"],
                             row["n_samples"])
                if tracker is not None:
                    samples = output.pop("samples")
                    tracker.save_results_aggregated(results=output, samples=samples if log_samples else None)
                    if log_samples:
                        for task in output["configs"]:
                            tracker.save_results_samples(task_name=task, samples=samples[task])
        finally:
            model.train(was_training)
    return {"results": results, "skipped": list(plan.skipped), "settings": dict(settings)}


def run_benchmarks(model, tokenizer, langs: list[str], settings: EvalConfig, *, seed: int = 0,
                   work_dir: str | Path = ".", task_manager=None, output_dir: str | Path | None = None) -> dict:
    """Evaluate `model` on each benchmark in each language (and on `settings.tasks`); combinations that do not exist
    are skipped and recorded. `settings` is the eval group: `plan_benchmarks` documents what it reads, `run_plan`
    the result (and `settings.log_samples`).

    `work_dir` receives the bundled task YAMLs (`lm_eval_tasks/`) and their `datasets` cache; the bundled suite
    reads only local files. `task_manager` defaults to a process-wide one: lm-eval's built-in index for
    suite=harness, an index of `<work_dir>/lm_eval_tasks` alone for suite=bundled.
    """
    plan = plan_benchmarks(langs, settings, seed=seed, work_dir=work_dir, task_manager=task_manager)
    return run_plan(model, tokenizer, plan, output_dir=output_dir, log_samples=settings.log_samples)
