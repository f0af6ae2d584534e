"""Task dispatch: every task is `run(cfg, ctx) -> dict[str, float]` behind one wrapper (seed, config, errors, tracker)."""

from __future__ import annotations

import importlib
import logging
import sys

from omegaconf import DictConfig

from mlalign.errors import UserError

log = logging.getLogger(__name__)

# task name -> module under mlalign.tasks
TASKS = {
    "analyze": "analyze",
    "train": "train",
    "eval": "evaluate",
    "pipeline": "pipeline",
    "train_saes": "train_saes",
    "build_testbed": "build_testbed",
    "summarize": "summarize",
}

# Tasks that read the parallel corpus -> the data.splits entries they use: the corpus is checked (those splits hold
# sentences) and reported (corpus.json) before any model is loaded.
CORPUS_TASKS = {"analyze": ("analysis",), "train": ("train", "heldout", "valid"),
                "pipeline": ("analysis", "train", "heldout", "valid")}


def dispatch(cfg: DictConfig) -> float | None:
    """Run `cfg.task`; print a user mistake as one line and exit 1; return the metric a sweeper optimises."""
    from mlalign.tasks.common import RunContext

    try:
        if cfg.task not in TASKS:
            raise UserError(f"unknown task {cfg.task!r}; choose one of: task={' | task='.join(TASKS)}")
        module = importlib.import_module(f"mlalign.tasks.{TASKS[cfg.task]}")
        check_config = getattr(module, "check_config", None)
        if check_config is not None:  # settings that cannot work fail before any tokenizer or model loads
            check_config(cfg)
        with RunContext(cfg) as ctx:
            if cfg.task in CORPUS_TASKS:
                from mlalign.data.corpus import write_corpus_report

                write_corpus_report(cfg.data, ctx.langs, ctx.run_dir, ctx.load_tokenizer(), CORPUS_TASKS[cfg.task])
            metrics = module.run(cfg, ctx)
            ctx.finish(metrics)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    objective = getattr(module, "OBJECTIVE", None)
    return float(metrics[objective]) if objective and objective in metrics else None
