"""The one table from (suite, benchmark, language) to an lm-eval task name, with the reason where none exists."""

from __future__ import annotations

import difflib
from typing import NamedTuple

from mlalign.errors import UserError
from mlalign.languages import BENCHMARK_KEYS, LANGUAGES, get_language

BENCHMARKS: tuple[str, ...] = BENCHMARK_KEYS
SUITES: tuple[str, ...] = ("harness", "bundled")

_NO_BUNDLED_HELLASWAG = (
    "HellaSwag is not bundled (its files are too large for the offline snapshot); use eval=harness, which downloads it"
)
_NO_BUNDLED_BELEBELE = "Belebele is not bundled; use eval=harness, which downloads it (lm-eval's belebele_<flores code>)"


def _harness_name(benchmark: str, lang: str) -> str | None:
    # The languages table's names (conf/languages/): English originals (m_mmlu_en for MMLU: the prompt of every other
    # m_mmlu_<lang>), Okapi arc_/m_mmlu_/hellaswag_<lang>, Belebele by FLORES-200 code; a benchmark an entry leaves out
    # has no lm-eval task in that language.
    return get_language(lang).tasks.get(benchmark)


def _bundled_name(benchmark: str, lang: str) -> str | None:
    from mlalign.evaluation.bundled import BUNDLED_BENCHMARKS, bundled_task_name, okapi_file

    if benchmark in BUNDLED_BENCHMARKS and okapi_file(benchmark, lang).is_file():
        return bundled_task_name(benchmark, lang)
    return None


def _reason(suite: str, benchmark: str, lang: str) -> str:
    if suite == "bundled" and benchmark == "hellaswag":
        return _NO_BUNDLED_HELLASWAG
    if suite == "bundled" and benchmark == "belebele":
        return _NO_BUNDLED_BELEBELE
    language = get_language(lang)
    if suite == "bundled":
        harness = language.tasks.get(benchmark)
        return (f"no bundled {benchmark} items in {language.name} ({lang}); use eval=harness, which downloads "
                + (f"lm-eval's {harness}" if harness else "lm-eval's tasks"))
    return (f"no lm-eval {benchmark} task for {language.name} ({lang}): its entry in conf/languages has no "
            f"tasks.{benchmark}")


def task_table() -> dict[str, dict[str, dict[str, str | None]]]:
    """table[suite][benchmark][lang] -> lm-eval task name, or None where the combination does not exist, for every
    language of the current table."""
    return {
        suite: {
            benchmark: {lang: (_harness_name if suite == "harness" else _bundled_name)(benchmark, lang)
                        for lang in LANGUAGES}
            for benchmark in BENCHMARKS
        }
        for suite in SUITES
    }


class TaskChoice(NamedTuple):
    """An lm-eval task name, or None with the reason the combination does not exist (callers skip it)."""

    task: str | None
    reason: str | None = None


def check_suite(suite: str) -> str:
    if suite not in SUITES:
        raise UserError(
            f"unknown evaluation suite {suite!r}; use eval=bundled (offline, bundled ARC/MMLU) "
            f"or eval=harness (lm-eval built-in tasks, downloads data)"
        )
    return suite


def check_benchmarks(benchmarks, allow_empty: bool = False) -> list[str]:
    if benchmarks is None or isinstance(benchmarks, str):
        raise UserError(
            f"benchmarks must be a list, got {benchmarks!r}; type e.g. eval.benchmarks=[arc_challenge,mmlu]"
        )
    benchmarks = [str(name) for name in benchmarks]
    for name in benchmarks:
        if name not in BENCHMARKS:
            close = difflib.get_close_matches(name, BENCHMARKS, n=2)
            raise UserError(
                f"unknown benchmark {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
                + f"; valid benchmarks are {', '.join(BENCHMARKS)} (e.g. eval.benchmarks=[arc_challenge,mmlu]); "
                f"any other lm-eval task or group goes in eval.tasks (e.g. eval.tasks=[{name}])"
            )
    if not benchmarks and not allow_empty:
        raise UserError(f"benchmarks is empty; give at least one of {', '.join(BENCHMARKS)} "
                        "or an lm-eval task in eval.tasks")
    return list(dict.fromkeys(benchmarks))


def lookup_task(benchmark: str, lang: str, suite: str = "harness") -> TaskChoice:
    """The lm-eval task for one benchmark in one language, e.g. ("mmlu", "hi", "harness") -> m_mmlu_hi."""
    check_suite(suite)
    check_benchmarks([benchmark])
    get_language(lang)
    task = (_harness_name if suite == "harness" else _bundled_name)(benchmark, lang)
    return TaskChoice(task) if task is not None else TaskChoice(None, _reason(suite, benchmark, lang))
