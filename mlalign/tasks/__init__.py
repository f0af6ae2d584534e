"""Task dispatch: every task is `run(cfg, ctx) -> dict[str, float]` behind one wrapper (seed, config, errors, tracker)."""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
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

WARNINGS_FILE = "WARNINGS"
"""Written in a run directory whose results carry a caveat (too few held-out sentences or resamples): one per line."""

TRAINING_TASKS = ("train", "pipeline")

MIN_CI_SENTENCES = 10
"""Below this many sentences per language in a split that gets bootstrap intervals, a run warns (console, WARNINGS);
below 2 it refuses: resampling one sentence gives an interval of zero width."""


class FinishedRunDirectory(UserError):
    """A new run aimed at a finished run's directory: refused before anything is written there (no ERROR file)."""


class TaskStopped(UserError):
    """The task was stopped by SIGTERM (training stops itself after a checkpoint: `training.loop.TrainingStopped`)."""


def in_multirun() -> bool:
    """True inside a job of `run.py -m` (whatever the launcher), where a failure must not end the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_dir(cfg: DictConfig) -> Path | None:
    from mlalign.tasks.common import hydra_run_dir

    run_dir = hydra_run_dir() or OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_missing=False)
    return Path(run_dir) if run_dir else None


def _record_failure(cfg: DictConfig, line: str) -> None:
    from mlalign.io import write_text_atomic

    run_dir = _run_dir(cfg)
    if not run_dir:
        return
    try:
        write_text_atomic(run_dir / ERROR_FILE, line + "\n")
    except OSError:  # a full disk may refuse the temp file and still take one short line in place
        try:
            (run_dir / ERROR_FILE).write_text(line + "\n", encoding="utf-8")
        except OSError:
            pass  # the line is on the console; nothing can be written there


def _claim_run_dir(cfg: DictConfig) -> str | None:
    """The rule for a run directory that holds a finished run (COMPLETE): a new run there is refused, before anything
    is written, unless it continues that run (task=train/pipeline with train.resume) or `overwrite=true`; then COMPLETE
    is removed before anything else is written, so a failure cannot leave it beside an ERROR. Returns what to say."""
    from mlalign.io import COMPLETE_MARKER, is_complete

    run_dir = _run_dir(cfg)
    if run_dir is None or not is_complete(run_dir):
        return None
    from mlalign.training.checkpoint import checkpoints_newest_first

    training = str(cfg.task) in TRAINING_TASKS
    asked = training and cfg.train.resume in (True, "auto") and not cfg.train.get("resume_from")
    # Only a training run's checkpoints are continued. Issue 30 audit: train.resume=true into a finished analysis
    # removed its COMPLETE and then failed (no checkpoint); resume=auto trained afresh among its files.
    checkpoints = training and bool(checkpoints_newest_first(run_dir))
    resuming = asked and checkpoints
    if not (resuming or cfg.get("overwrite")):
        raise FinishedRunDirectory(
            f"{run_dir} holds a finished run (COMPLETE)"
            + (" and no training checkpoint to resume" if asked else "")
            + "; a new run there would mix its files with that one's: choose a new directory (hydra.run.dir=<new "
            "dir>), or add overwrite=true to replace it"
            + (", or train.resume=true to continue its training" if checkpoints else ""))
    (run_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    (run_dir / WARNINGS_FILE).unlink(missing_ok=True)
    why = "train.resume continues it" if resuming else "overwrite=true"
    return (f"{run_dir} held a finished run; {why}: its COMPLETE marker is removed until this run finishes"
            + ("" if resuming else " (files this run does not write again stay from the old one)"))


class _StopOnSigterm:
    """SIGTERM ends the task with a TaskStopped (one line, an ERROR file, no COMPLETE) instead of killing it silently;
    the training loop installs its own handler while it trains (checkpoint first) and hands this one back."""

    def __init__(self, task: str):
        self.task = task
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:  # a second SIGTERM while the first unwinds: leave quietly
            return
        self.raised = True
        raise self.error()

    def error(self) -> TaskStopped:
        return TaskStopped(f"stopped by SIGTERM during task={self.task}; nothing in the run directory is marked "
                           "complete: run the same command again to redo it")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _warn(warnings: list[str], line: str) -> None:
    from mlalign import console

    warnings.append(line)
    console.emit(f"warning: {line}", result=True)


def _check_ci_splits(cfg: DictConfig, langs: list[str], warnings: list[str]) -> None:
    """The splits that get bootstrap intervals need sentences to resample: refuse one, warn below MIN_CI_SENTENCES.
    Without intervals (analysis.bootstrap=0) a split that small still warns: its point estimates are no better."""
    from mlalign.data.corpus import load_corpus

    intervals = int(cfg.analysis.bootstrap) > 0
    for key in CORPUS_TASKS[str(cfg.task)]:
        if key == "train":
            continue
        split = str(cfg.data.splits[key])
        corpus = load_corpus(cfg.data, langs, split)
        n = min(len(corpus[lang]) for lang in langs)
        what = (f"the {split} split (data.splits.{key}) holds {n} sentence(s) per language"
                + (f" (data.max_sentences={cfg.data.max_sentences})" if cfg.data.max_sentences is not None else ""))
        if not intervals:
            if n < MIN_CI_SENTENCES:  # issue 30 audit: one sentence with analysis.bootstrap=0 passed without a word
                _warn(warnings, f"{what}: its numbers rest on fewer than {MIN_CI_SENTENCES} sentences (and "
                                "analysis.bootstrap=0 gives them no interval) and are not to be reported")
            continue
        if n < 2:
            raise UserError(f"{what}: a bootstrap interval over one sentence has zero width and means nothing; give "
                            f"it at least {MIN_CI_SENTENCES} sentences (a larger corpus or data.max_sentences), or "
                            "type analysis.bootstrap=0 for point estimates without intervals")
        if n < MIN_CI_SENTENCES:
            _warn(warnings, f"{what}: its {int(100 * float(cfg.analysis.ci))}% intervals rest on fewer than "
                            f"{MIN_CI_SENTENCES} sentences and are not to be reported")


def _run_task(cfg: DictConfig, module, warnings: list[str]):
    """Check the config, then run the task in its run directory: (metrics, the finished RunContext)."""
    from mlalign.tasks.common import RunContext

    with _StopOnSigterm(str(cfg.task)) as sigterm:
        check_config = getattr(module, "check_config", None)
        if check_config is not None:  # settings that cannot work fail before any tokenizer or model loads
            check_config(cfg)
        if str(cfg.task) in TRAINING_TASKS:  # a resume that cannot continue fails before config.yaml is rewritten
            from mlalign.training.checkpoint import resume_point

            resume_point(cfg, _run_dir(cfg))
        with RunContext(cfg) as ctx:
            metrics = _run_in_context(cfg, module, ctx, warnings)
            if sigterm.raised:  # a library swallowed the stop: still no COMPLETE
                raise sigterm.error()
            ctx.finish(metrics)
    return metrics, ctx


def _run_in_context(cfg: DictConfig, module, ctx, warnings: list[str]) -> dict:
    """The corpus report and its checks, the run's warnings on file, then the task itself."""
    from mlalign import console
    from mlalign.io import write_text_atomic

    console.emit(f"task={cfg.task}, model {cfg.model.name}: {ctx.run_dir}")
    if cfg.task in CORPUS_TASKS:
        from mlalign.data.corpus import write_corpus_report

        write_corpus_report(cfg.data, ctx.langs, ctx.run_dir, ctx.load_tokenizer(), CORPUS_TASKS[cfg.task])
        _check_ci_splits(cfg, ctx.langs, warnings)
    if warnings and ctx.is_main_process:
        write_text_atomic(ctx.run_dir / WARNINGS_FILE, "".join(f"{line}\n" for line in warnings))
        console.headline(*(f"warning: {line}" for line in warnings), at=0)
        console.output("warnings", ctx.run_dir / WARNINGS_FILE)
    return module.run(cfg, ctx)


def _fail(cfg: DictConfig, line: str, record: bool = True) -> None:
    from mlalign.console import end_progress_bars

    end_progress_bars()  # the error line starts its own line, not the end of a bar the failure left open
    print(line, file=sys.stderr)
    if record:
        _record_failure(cfg, line)


def _typed_overrides() -> list[str]:
    """The overrides typed on the command line (this job's, in a multirun)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def dispatch(cfg: DictConfig) -> float | None:
    """Run `cfg.task`; return the metric a sweeper optimises. A failure leaves its line in `<run dir>/ERROR`; a user
    mistake is printed as one line and, in a single run, exits 1. In a multirun every failure is raised to Hydra, which
    marks the job failed: the sweep goes on (hydra_plugins.mlalign_sweeper, Optuna's max_failure_rate) and
    exits non-zero at the end (mlalign.sweeps.SweepSummaryCallback)."""
    from mlalign.io import disk_full_error
    from mlalign.tasks.common import hydra_run_dir

    try:
        claimed = _claim_run_dir(cfg)  # first: a refused run writes nothing into a finished run's directory
        stale = hydra_run_dir()
        if stale is not None:  # a requeued or resumed job starts clean
            (stale / ERROR_FILE).unlink(missing_ok=True)
        from mlalign import console
        from mlalign.config import check_values, honour_typed_eval
        from mlalign.languages import use_languages

        console.configure(cfg)  # the story on the console, other libraries' chatter in <run dir>/run.log
        started = time.perf_counter()
        if cfg.task not in TASKS:
            raise UserError(f"unknown task {cfg.task!r}; choose one of: task={' | task='.join(TASKS)}")
        warnings = []
        for line in check_values(cfg):
            _warn(warnings, line)
        honoured = honour_typed_eval(cfg, _typed_overrides())
        for line in (claimed, honoured):
            if line:
                console.emit(f"note: {line}")
        module = importlib.import_module(f"mlalign.tasks.{TASKS[cfg.task]}")
        # The run's languages table (conf/languages/ plus the user's entries) before anything reads a language.
        with use_languages(cfg.get("languages")):
            metrics, ctx = _run_task(cfg, module, warnings)
        console.print_closing_block(str(cfg.task), ctx.run_dir, time.perf_counter() - started, ctx.tracker)
    except UserError as err:
        _fail(cfg, f"error: {err}", record=not isinstance(err, FinishedRunDirectory))
        if in_multirun():
            raise
        sys.exit(1)
    except Exception as err:
        full = disk_full_error(err)
        if full is None:  # a bug: Hydra prints (single run) or the sweeper logs (multirun) the full traceback
            _record_failure(cfg, f"{type(err).__name__}: {err}".splitlines()[0])
            raise
        what = (f"{full.filename}: {full.strerror}" if isinstance(full, OSError) and full.filename
                else getattr(full, "strerror", None) or str(full))
        _fail(cfg, f"error: no room to write ({what}: the disk, a quota or a file-size limit is full); nothing is "
                   "marked complete: free space there, or point hydra.run.dir= and paths.cache_dir= at a disk with "
                   "room, and run the same command again")
        if in_multirun():
            raise
        sys.exit(1)
    objective = getattr(module, "OBJECTIVE", None)
    return float(metrics[objective]) if objective and objective in metrics else None
