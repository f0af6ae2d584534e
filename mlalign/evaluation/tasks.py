"""The one table from (suite, benchmark, language) to an lm-eval task name, with the reason where none exists."""

from __future__ import annotations

import difflib
from typing import NamedTuple

from mlalign.errors import UserError
from mlalign.languages import LANGUAGES, get_language

BENCHMARKS: tuple[str, ...] = ("arc_challenge", "mmlu", "hellaswag", "belebele")
SUITES: tuple[str, ...] = ("harness", "bundled")

# Okapi (Lai et al. 2023) translated HellaSwag into 26 languages, Chinese not among them.
_NO_HELLASWAG_ZH = "Okapi has no Chinese HellaSwag (lm-eval has no hellaswag_zh task)"
_NO_BUNDLED_HELLASWAG = (
    "HellaSwag is not bundled (its files are too large for the offline snapshot); use eval=harness, which downloads it"
)
_NO_BUNDLED_BELEBELE = "Belebele is not bundled; use eval=harness, which downloads it (lm-eval's belebele_<flores code>)"


def _harness_name(benchmark: str, lang: str) -> str | None:
    # English runs the original tasks; MMLU uses Okapi's English file (m_mmlu_en) rather than `mmlu`, because
    # `mmlu` is 57 subject subtasks with a different prompt (a subject header), while m_mmlu_en has exactly the
    # prompt, choices and split of every other m_mmlu_<lang>.
    if benchmark == "arc_challenge":
        return "arc_challenge" if lang == "en" else f"arc_{lang}"
    if benchmark == "mmlu":
        return f"m_mmlu_{lang}"
    if benchmark == "hellaswag":
        if lang == "zh":
            return None
        return "hellaswag" if lang == "en" else f"hellaswag_{lang}"
    if benchmark == "belebele":
        # Belebele is FLORES-based (the same passages as the corpus) and written by native speakers in every language.
        return f"belebele_{get_language(lang).flores_code}"
    raise AssertionError(benchmark)


def _bundled_name(benchmark: str, lang: str) -> str | None:
    if benchmark == "arc_challenge":
        return f"mlalign_arc_{lang}"
    if benchmark == "mmlu":
        return f"mlalign_mmlu_{lang}"
    return None


def _reason(suite: str, benchmark: str, lang: str) -> str:
    if suite == "bundled" and benchmark == "hellaswag":
        return _NO_BUNDLED_HELLASWAG
    if suite == "bundled" and benchmark == "belebele":
        return _NO_BUNDLED_BELEBELE
    if benchmark == "hellaswag" and lang == "zh":
        return _NO_HELLASWAG_ZH
    raise AssertionError((suite, benchmark, lang))


# TASK_TABLE[suite][benchmark][lang] -> lm-eval task name, or None where the combination does not exist.
TASK_TABLE: dict[str, dict[str, dict[str, str | None]]] = {
    suite: {
        benchmark: {lang: (_harness_name if suite == "harness" else _bundled_name)(benchmark, lang) for lang in LANGUAGES}
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
    task = TASK_TABLE[suite][benchmark][lang]
    return TaskChoice(task) if task is not None else TaskChoice(None, _reason(suite, benchmark, lang))
