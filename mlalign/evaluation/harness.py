"""Run benchmarks in every language through lm-eval's `simple_evaluate` on an in-memory model; one result per task."""

from __future__ import annotations

import logging
from pathlib import Path

from mlalign.errors import UserError
from mlalign.evaluation.bundled import write_bundled_tasks
from mlalign.evaluation.tasks import check_benchmarks, check_suite, lookup_task
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
    return float(value) if isinstance(value, (int, float)) else None


def _check_settings(langs, num_fewshot, limit, batch_size) -> list[str]:
    if langs is None or isinstance(langs, str):
        raise UserError(f"langs must be a list of language codes, got {langs!r}; type e.g. langs=[hi,mr]")
    langs = list(dict.fromkeys(str(lang) for lang in langs))
    for lang in langs:
        get_language(lang)
    if not langs:
        raise UserError("langs is empty; give at least one language, e.g. langs=[hi,mr]")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise UserError(f"eval.num_fewshot must be an integer >= 0, got {num_fewshot!r}; e.g. eval.num_fewshot=0")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"eval.limit must be a positive integer or null (all items), got {limit!r}; e.g. eval.limit=50")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"eval.batch_size must be a positive integer, got {batch_size!r}; e.g. eval.batch_size=8")
    return langs


def run_benchmarks(
    model,
    tokenizer,
    langs: list[str],
    benchmarks: list[str],
    suite: str,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    work_dir: str | Path = ".",
    task_manager=None,
) -> dict:
    """Evaluate `model` on each benchmark in each language; combinations that do not exist are skipped.

    Returns {"results": {benchmark: {lang: {task, acc, acc_stderr, acc_norm, acc_norm_stderr, n_samples}}},
    "skipped": [{benchmark, lang, reason}], "settings": {...}}. `acc_norm` is None for MMLU (its Okapi task
    reports accuracy only). `work_dir` receives the bundled task YAMLs (`lm_eval_tasks/`) and their `datasets`
    cache; the bundled suite reads only local files. `task_manager` defaults to a process-wide one: lm-eval's
    built-in index for suite=harness, an index of `<work_dir>/lm_eval_tasks` alone for suite=bundled.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_suite(suite)
    benchmarks = check_benchmarks(benchmarks)
    langs = _check_settings(langs, num_fewshot, limit, batch_size)

    plan, skipped = [], []
    for benchmark in benchmarks:
        for lang in langs:
            choice = lookup_task(benchmark, lang, suite)
            if choice.task is None:
                log.warning("skipping %s in %s: %s", benchmark, lang, choice.reason)
                skipped.append({"benchmark": benchmark, "lang": lang, "reason": choice.reason})
            else:
                plan.append((benchmark, lang, choice.task))

    if suite == "bundled":
        task_dir = Path(work_dir) / "lm_eval_tasks"
        # Every language and benchmark, not just these: the TaskManager cached for this folder must know them all.
        write_bundled_tasks(task_dir)
        # Only the bundled tasks are indexed: no built-in task (and no download) can be reached from here.
        task_manager = task_manager or get_task_manager(include_path=task_dir, include_defaults=False)
        if num_fewshot > 0:
            log.warning(
                "bundled suite: the %d few-shot examples come from the same items as the test set "
                "(the item being scored is left out)",
                num_fewshot,
            )
    else:
        task_manager = task_manager or get_task_manager()

    results: dict[str, dict[str, dict]] = {benchmark: {} for benchmark in benchmarks}
    if plan:
        tasks = [task for _, _, task in plan]
        log.info("lm-eval %s suite, %d-shot, limit %s: %s", suite, num_fewshot, limit, ", ".join(tasks))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        was_training = model.training
        model.eval()
        try:
            # One call for all tasks: lm-eval batches their requests together and shows their progress, and its
            # per-call overhead (it runs `pip list` and friends for environment info) is paid once. Each task
            # seeds its own few-shot sampler with fewshot_random_seed, so a score does not depend on its neighbours.
            output = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        finally:
            model.train(was_training)
        for benchmark, lang, task in plan:
            metrics = output["results"][task]
            row = {
                "task": task,
                "acc": _float_or_none(metrics.get("acc,none")),
                "acc_stderr": _float_or_none(metrics.get("acc_stderr,none")),
                "acc_norm": _float_or_none(metrics.get("acc_norm,none")),
                "acc_norm_stderr": _float_or_none(metrics.get("acc_norm_stderr,none")),
                "n_samples": int(output["n-samples"][task]["effective"]),
            }
            results[benchmark][lang] = row
            log.info("%s %s (%s): acc %.4f on %d items", benchmark, lang, task, row["acc"], row["n_samples"])

    return {
        "results": results,
        "skipped": skipped,
        "settings": {
            "suite": suite,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
        },
    }
