"""Benchmarks in every language through lm-evaluation-harness: task-name table, offline bundled tasks, runner, report."""

from mlalign.evaluation.bundled import write_bundled_tasks
from mlalign.evaluation.harness import get_task_manager, run_benchmarks
from mlalign.evaluation.report import compare_results, flat_metrics, write_eval_outputs
from mlalign.evaluation.tasks import BENCHMARKS, SUITES, TaskChoice, lookup_task, task_table

__all__ = [
    "BENCHMARKS",
    "SUITES",
    "TaskChoice",
    "compare_results",
    "flat_metrics",
    "get_task_manager",
    "lookup_task",
    "run_benchmarks",
    "task_table",
    "write_bundled_tasks",
    "write_eval_outputs",
]
