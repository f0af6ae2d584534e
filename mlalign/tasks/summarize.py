"""task=summarize sweep_dir=DIR: gather a finished (or interrupted) multirun's job results into summary.csv + plots."""

from __future__ import annotations

import csv
from pathlib import Path

from mlalign.errors import UserError
from mlalign.sweeps import summarize_sweep


def run(cfg, ctx) -> dict[str, float]:
    if not cfg.sweep_dir:
        raise UserError("task=summarize needs the multirun directory: add sweep_dir=multirun/<task>/<date_time>")
    sweep_dir = Path(cfg.sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep_dir {sweep_dir} does not exist; pass a directory created by `python run.py -m ...`")
    path = summarize_sweep(sweep_dir, ctx.tracker)
    with path.open() as handle:
        n_jobs = sum(1 for _ in csv.DictReader(handle))
    if n_jobs == 0:
        raise UserError(f"{sweep_dir} holds no finished job (no */metrics.json); is it a multirun directory?")
    print(f"summarised {n_jobs} jobs -> {path}")
    return {"n_jobs": float(n_jobs)}
