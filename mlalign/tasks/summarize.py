"""task=summarize: gather run results into summary.csv + plots, from a multirun directory or any list of run dirs.

    python run.py task=summarize sweep_dir=multirun/train/<time>          # writes into the sweep directory
    python run.py task=summarize runs=[outputs/train/A,outputs/train/B]   # or globs: "runs=['outputs/train/*']";
                                                                          # writes into this run's directory
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path

from mlalign.errors import UserError
from mlalign.sweeps import summarize_sweep


def resolve_runs(patterns) -> list[Path]:
    """Run directories from paths or glob patterns, in the given order (each glob sorted), without duplicates."""
    found: list[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"runs: {pattern!r} matches no directory; pass run directories or a quoted glob, "
                            f"e.g. \"runs=['outputs/train/*']\"")
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                raise UserError(f"runs: {path} is not a directory; pass run directories written by run.py")
            if path not in found:
                found.append(path)
    return found


def run(cfg, ctx) -> dict[str, float]:
    runs = cfg.get("runs")
    if runs and cfg.sweep_dir:
        raise UserError("task=summarize takes sweep_dir=DIR or runs=[...], not both")
    if runs:
        run_dirs = resolve_runs(runs)
        path = summarize_sweep(ctx.run_dir, ctx.tracker, run_dirs=run_dirs)
        source = f"{len(run_dirs)} run directories"
    else:
        if not cfg.sweep_dir:
            raise UserError("task=summarize needs the multirun directory or run directories: add "
                            "sweep_dir=multirun/<task>/<date_time> or runs=[outputs/train/A,outputs/train/B]")
        sweep_dir = Path(cfg.sweep_dir)
        if not sweep_dir.is_dir():
            raise UserError(f"sweep_dir {sweep_dir} does not exist; pass a directory created by `python run.py -m ...`")
        path = summarize_sweep(sweep_dir, ctx.tracker)
        source = str(sweep_dir)
    with path.open() as handle:
        n_jobs = sum(1 for _ in csv.DictReader(handle))
    if n_jobs == 0:
        raise UserError(f"{source} holds no job (no */metrics.json or */.hydra); is it a multirun directory?")
    from mlalign.console import output
    from mlalign.sweeps import PARALLEL_FILE

    print(f"summarised {n_jobs} jobs -> {path}")
    output("summary", path)
    for name in ("summary.png", PARALLEL_FILE):
        if (path.parent / name).is_file():
            output(name.removesuffix(".png").replace("_", " "), path.parent / name)
    return {"n_jobs": float(n_jobs)}
