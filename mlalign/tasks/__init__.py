"""Task dispatch: every task is `run(cfg, ctx) -> dict[str, float]` behind one wrapper (seed, config, errors, tracker)."""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mlalign.errors import UserError
from mlalign.io import ERROR_FILE

log = logging.getLogger(__name__)

# task name -> module under mlalign.tasks
TASKS = {
    "analyze": "analyze",
    "train": "train",
    "eval": "evaluate",
    "pipeline": "pipeline",
    "compare": "compare",
    "train_saes": "train_saes",
    "build_testbed": "build_testbed",
    "summarize": "summarize",
    "eval_compare": "eval_compare", "dashboard": "dashboard",
}

# Tasks that read the parallel corpus -> the data.splits entries they use: the corpus is checked (those splits hold
# sentences) and reported (corpus.json) before any model is loaded.
CORPUS_TASKS = {"analyze": ("analysis",), "train": ("train", "heldout", "valid"),
                "pipeline": ("analysis", "train", "heldout", "valid"), "compare": ("train", "heldout", "valid")}


def in_multirun() -> bool:
    """True inside a job of `run.py -m` (whatever the launcher), where a failure must not end the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg: DictConfig, line: str) -> None:
    from mlalign.io import write_text_atomic
    from mlalign.tasks.common import hydra_run_dir

    run_dir = hydra_run_dir() or OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_missing=False)
    if run_dir:
        write_text_atomic(Path(run_dir) / ERROR_FILE, line + "\n")


def _run_task(cfg: DictConfig, module):
    """Check the config, then run the task in its run directory: (metrics, the finished RunContext)."""
    from mlalign import console
    from mlalign.tasks.common import RunContext

    check_config = getattr(module, "check_config", None)
    if check_config is not None:  # settings that cannot work fail before any tokenizer or model loads
        check_config(cfg)
    with RunContext(cfg) as ctx:
        console.emit(f"task={cfg.task}, model {cfg.model.name}: {ctx.run_dir}")
        if cfg.task in CORPUS_TASKS:
            from mlalign.data.corpus import write_corpus_report

            write_corpus_report(cfg.data, ctx.langs, ctx.run_dir, ctx.load_tokenizer(), CORPUS_TASKS[cfg.task])
        metrics = module.run(cfg, ctx)
        ctx.finish(metrics)
    return metrics, ctx


def dispatch(cfg: DictConfig) -> float | None:
    """Run `cfg.task`; return the metric a sweeper optimises. A failure leaves its line in `<run dir>/ERROR`; a user
    mistake is printed as one line and, in a single run, exits 1. In a multirun every failure is raised to Hydra, which
    marks the job failed: the sweep goes on (hydra_plugins.mlalign_sweeper, Optuna's max_failure_rate) and
    exits non-zero at the end (mlalign.sweeps.SweepSummaryCallback)."""
    from mlalign.tasks.common import hydra_run_dir

    stale = hydra_run_dir()
    if stale is not None:  # a requeued or resumed job starts clean
        (stale / ERROR_FILE).unlink(missing_ok=True)
    try:
        from mlalign import console
        from mlalign.languages import use_languages

        console.configure(cfg)  # the story on the console, other libraries' chatter in <run dir>/run.log
        started = time.perf_counter()
        if cfg.task not in TASKS:
            raise UserError(f"unknown task {cfg.task!r}; choose one of: task={' | task='.join(TASKS)}")
        module = importlib.import_module(f"mlalign.tasks.{TASKS[cfg.task]}")
        # The run's languages table (conf/languages/ plus the user's entries) before anything reads a language.
        with use_languages(cfg.get("languages")):
            metrics, ctx = _run_task(cfg, module)
        console.print_closing_block(str(cfg.task), ctx.run_dir, time.perf_counter() - started, ctx.tracker)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        _record_failure(cfg, f"error: {err}")
        if in_multirun():
            raise
        sys.exit(1)
    except Exception as err:  # a bug: Hydra prints (single run) or the sweeper logs (multirun) the full traceback
        _record_failure(cfg, f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    objective = getattr(module, "OBJECTIVE", None)
    return float(metrics[objective]) if objective and objective in metrics else None
