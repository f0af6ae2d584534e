"""What a run shows on the console, and what goes to its log file instead.

The console tells the story: one line when each stage starts and one when it ends, with its wall time (`stage`),
progress bars for the slow steps, and a closing block with the headline numbers and the paths of the results
(`closing_block`). Other libraries' chatter (transformers, datasets, lm-eval, huggingface_hub, sae-lens, accelerate,
peft: their log records below ERROR, datasets' progress bars) goes to the run's log file, `<run dir>/run.log` (Hydra's
file handler), not the console; lm-eval's per-item "Truncating ... tokens from the left" warnings are counted and
reported once per evaluation; a few known deprecation / future warnings are silenced where they are raised
(`KNOWN_WARNINGS`, each matched by module and message). `log_level=debug` (or Hydra's `hydra.verbose=true`) puts it all
back on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from mlalign.errors import UserError

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning")
"""`log_level=`: debug (everything, libraries included, on the console), info (the default: mlalign's story),
warning (mlalign's warnings and the results only)."""

LM_EVAL_TRUNCATION = "exceeds model's maximum length"
"""lm-eval's per-item warning when a prompt does not fit the model's context (it cuts tokens from the left)."""

KNOWN_WARNINGS = (
    # (category, module regex, message regex): each one seen in `make demo` or a task test, silenced where raised.
    # peft asks every wrapped model this (transformers 5 renamed it); nothing for a user to change.
    (FutureWarning, r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
)

_STATE = {"level": "info", "depth": 0, "counts": {}, "stages": [], "headline": [], "outputs": [], "configured": False}
_stage_log = logging.getLogger("mlalign.stage")  # stage lines are printed; this copy goes to run.log only


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def verbose() -> bool:
    return _STATE["level"] == "debug"


def emit(line: str = "", result: bool = False) -> None:
    """A line of the story: printed (main process only; at log_level=warning only `result` lines) and written to
    run.log."""
    if not is_main_process():
        return
    if result or _STATE["level"] != "warning":
        print(line, flush=True)
    if line.strip():
        _stage_log.info(line.strip())


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


@contextlib.contextmanager
def stage(title: str, start_line: bool = True):
    """`title ...` when the stage starts, `title: done in 12.3 s` (or `failed after`) when it ends; nested stages
    are indented. Every top-level or nested stage's wall time is kept for the closing block. `start_line=False` for
    stages whose own progress bar says that they run (loading the model or the SAEs): only the end line."""
    prefix = "  " * _STATE["depth"]
    if start_line:
        emit(f"{prefix}{title} ...")
    started = time.perf_counter()
    _STATE["depth"] += 1
    try:
        yield
    except BaseException:
        _STATE["depth"] -= 1
        emit(f"{prefix}{title}: failed after {format_seconds(time.perf_counter() - started)}")
        raise
    _STATE["depth"] -= 1
    seconds = time.perf_counter() - started
    _STATE["stages"].append((_STATE["depth"], title, seconds))
    emit(f"{prefix}{title}: done in {format_seconds(seconds)}")


def note(line: str) -> None:
    """A line inside the current stage, indented like its nested stages (e.g. `base model: cache hit ...`)."""
    emit(f"{'  ' * _STATE['depth']}{line}")


def headline(*lines: str, at: int | None = None) -> None:
    """Lines for the closing block's headline (printed once, at the end of the run, by `closing_block`); `at=0`
    puts them before the lines registered so far."""
    new = [str(line) for line in lines]
    if at is None:
        _STATE["headline"].extend(new)
    else:
        _STATE["headline"][at:at] = new


def output(label: str, path) -> None:
    """A result file or folder the closing block names (`report`, `results`, `adapter`, ...)."""
    _STATE["outputs"].append((str(label), Path(path)))


def take_count(name: str) -> int:
    """How many records of kind `name` the console filter held back since the last call (e.g. `lm_eval_truncation`)."""
    return _STATE["counts"].pop(name, 0)


def report_truncations() -> None:
    """One line for all of lm-eval's per-item truncation warnings since the last call (each one is in run.log)."""
    n = take_count("lm_eval_truncation")
    if n:
        emit(f"{'  ' * _STATE['depth']}lm-eval cut {n} prompt(s) from the left to fit the model's context "
             f"(each one is in run.log; log_level=debug shows them)")


class ConsoleFilter(logging.Filter):
    """On the console handler: drops other libraries' records below ERROR (they stay in run.log), counts lm-eval's
    truncation warnings, and drops the `mlalign.stage` copies of lines that were printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _stage_log.name:
            return False
        if LM_EVAL_TRUNCATION in str(record.msg):
            _STATE["counts"]["lm_eval_truncation"] = _STATE["counts"].get("lm_eval_truncation", 0) + 1
            return verbose()
        if verbose():
            return True
        if record.levelno < logging.WARNING and _STATE["level"] == "warning":
            return False
        if record.levelno == logging.WARNING:
            # The same warning again (task=pipeline's second analysis of the same corpus): run.log only.
            seen = _STATE.setdefault("warned", set())
            key = (record.name, record.getMessage())
            if key in seen:
                return False
            seen.add(key)
        if record.name == "mlalign" or record.name.startswith("mlalign."):
            return record.levelno >= logging.INFO  # mlalign's DEBUG records: run.log only
        if record.name == "py.warnings" or record.name.startswith(("__main__", "hydra")):
            return True  # unknown warnings, and Hydra's own sweep messages (launching jobs, failed trials)
        if record.levelno < logging.ERROR:
            _STATE["counts"]["library_records"] = _STATE["counts"].get("library_records", 0) + 1
            return False
        return True


class ConsoleFormatter(logging.Formatter):
    """`message` for INFO, `warning: message` / `error: message` above it; the logger's name at log_level=debug."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if verbose():
            return f"[{record.levelname}][{record.name}] {message}"
        if record.name == "py.warnings":  # "<file>:<line>: FutureWarning: <text>\n  warnings.warn(": the first line
            return f"warning: {message.strip().splitlines()[0]}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def _console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)]


def _route_to_root(name: str, level: int | None) -> None:
    """A library logger with its own console handler (transformers, datasets, lm-eval) hands its records to the root
    logger instead, i.e. to run.log and, filtered, to the console."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    logger.propagate = True
    if level is not None:
        logger.setLevel(level)


def _quiet_libraries(debug: bool) -> None:
    try:
        import transformers  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity(logging.INFO if debug else logging.WARNING)
        # "Loading weights" bars vanish when done (the stage line says how long loading took) instead of leaving one
        # line per model load.
        hf_logging.set_tqdm_hook(None if debug else lambda factory, args, kwargs: factory(*args, **{"leave": False,
                                                                                                     **kwargs}))
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        import datasets

        _route_to_root("datasets", logging.INFO if debug else logging.WARNING)
        if debug:
            datasets.enable_progress_bars()
        else:
            datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        import lm_eval.utils

        # lm-eval attaches its own stderr handler (propagate=False) the first time it sets up logging; mark it done
        # so its records reach run.log through the root logger like everyone else's.
        lm_eval.utils._LOGGING_CONFIGURED = True
    except (ImportError, AttributeError):  # pragma: no cover - an optional path
        pass
    for name in ("lm_eval", "lm-eval", "huggingface_hub", "sae_lens", "accelerate", "peft"):
        _route_to_root(name, None)
    if not debug:
        for name in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL", "absl", "numexpr"):
            logging.getLogger(name).setLevel(logging.WARNING)


def end_progress_bars() -> None:
    """Close every progress bar still drawn (a task that failed inside a loop leaves its bar open): the line printed
    next starts a line of its own instead of continuing the bar's (`train:  50%|...error: ...`)."""
    import sys

    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:  # no bar was ever drawn
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone: nothing to end
            pass


def transient_bars(*modules: str) -> None:
    """Progress bars of these modules, which do `from tqdm import tqdm` (or `from tqdm.auto import tqdm`), vanish when
    done instead of leaving a line each (lm-eval draws one per task and side: 40 lines in `make demo`; sae-lens one per
    trained SAE); log_level=debug keeps them."""
    if verbose():
        return
    import functools
    import importlib

    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        bar = getattr(module, "tqdm", None)
        if bar is tqdm or bar is auto_tqdm:
            module.tqdm = functools.partial(bar, leave=False)


def _filter_known_warnings() -> None:
    for category, module, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def configure(cfg) -> str:
    """Set up the console for this run from `cfg.log_level` (and Hydra's `hydra.verbose`); returns the level."""
    level = str(cfg.get("log_level", None) or "info").lower()
    if level not in LOG_LEVELS:
        raise UserError(f"log_level={level} is not one of {', '.join(LOG_LEVELS)}; type e.g. log_level=debug to see "
                        "every library's messages on the console")
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and HydraConfig.get().verbose:
            level = "debug"
    except Exception:  # pragma: no cover - outside Hydra
        pass
    _STATE.update(level=level, depth=0, counts={}, stages=[], headline=[], outputs=[], warned=set())
    debug = level == "debug"
    logging.getLogger("mlalign").setLevel(logging.DEBUG)  # run.log keeps mlalign's details; the console filters
    for handler in _console_handlers():
        if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
        handler.setFormatter(ConsoleFormatter())
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger: run.log, and the console
    _quiet_libraries(debug)
    if not debug:
        _filter_known_warnings()
    _STATE["configured"] = True
    return level


# --- the closing block ------------------------------------------------------------------------------------------

RULE = "-" * 72


def _plots(run_dir: Path) -> list[str]:
    """One line per folder: `analysis_base/ disparity_heatmap.png, layer_curves.png`."""
    by_folder: dict[str, list[str]] = {}
    for path in sorted(run_dir.rglob("*.png")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in ("wandb", "checkpoints", ".hydra") or rel.name.startswith("."):
            continue
        by_folder.setdefault(str(rel.parent), []).append(rel.name)
    return [f"{folder}/ {', '.join(names)}" if folder != "." else ", ".join(names) for folder, names in by_folder.items()]


def closing_block(task: str, run_dir: Path, seconds: float, tracker=None) -> list[str]:
    """The lines that end a run: its time (and each top-level stage's), the headline numbers the task registered
    (`headline`), its result files (`output`), its plots, the log file and the W&B run."""
    run_dir = Path(run_dir)
    lines = [RULE, f"task={task} finished in {format_seconds(seconds)}: {run_dir}"]
    top = [(title, secs) for depth, title, secs in _STATE["stages"] if depth == 0]
    if top:
        lines.append("  time: " + "; ".join(f"{title.split('] ')[-1]} {format_seconds(secs)}" for title, secs in top))
    lines.extend(f"  {line}" for line in _STATE["headline"])
    width = max([len(label) for label, _ in _STATE["outputs"]] + [len("plots")])
    for label, path in _STATE["outputs"]:
        lines.append(f"  {label + ':':<{width + 1}} {path}")
    plots = _plots(run_dir)
    for i, line in enumerate(plots):
        lines.append(f"  {('plots:' if i == 0 else ''):<{width + 1}} {line}")
    log_file = next(iter(sorted(run_dir.glob("*.log"))), None)
    if log_file is not None:
        held = _STATE["counts"].get("library_records", 0)
        note = f" ({held} message(s) from other libraries; log_level=debug shows them here)" if held else ""
        lines.append(f"  {'log:':<{width + 1}} {log_file}{note}")
    run = getattr(tracker, "run", None)
    if run is not None:
        try:
            url = None if run.offline else run.url  # asking an offline run for its URL prints a W&B warning
        except Exception:
            url = None
        where = url or f"offline, upload with: wandb sync {run_dir}/wandb/offline-run-*"
        lines.append(f"  {'W&B:':<{width + 1}} {where}")
    lines.append(RULE)
    return lines


def print_closing_block(task: str, run_dir: Path, seconds: float, tracker=None) -> None:
    for line in closing_block(task, run_dir, seconds, tracker):
        emit(line, result=True)
