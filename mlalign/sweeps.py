"""After a Hydra multirun: gather each job's results into `<sweep dir>/summary.csv` plus plots (each metric vs the
swept parameter; parallel coordinates of every swept parameter vs the outcomes), and log them to W&B."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from hydra.experimental.callback import Callback

from mlalign.io import ERROR_FILE, is_complete, save_figure, write_text_atomic

log = logging.getLogger(__name__)

ROW_KEYS = ("job", "status", "error", "complete")
"""The columns every row has before its overrides and metrics; `status` is `ok` or `failed` (scripts read it)."""


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job folder, finished or not: Hydra writes `.hydra/` before the task starts."""
    found = {p.parent for pattern in ("*/metrics.json", "*/.hydra/overrides.yaml", f"*/{ERROR_FILE}")
             for p in sweep_dir.glob(pattern)}
    found = {p.parent if p.name == ".hydra" else p for p in found}
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _job_error(job: Path) -> str:
    """The job's error line; empty for a job that completed; a note for one that ended without either."""
    file = job / ERROR_FILE
    if file.is_file():
        return (file.read_text(encoding="utf-8").strip().splitlines() or ["failed"])[0]
    return "" if is_complete(job) else "no COMPLETE marker: killed, timed out or still running"


def _overrides(job_dir: Path) -> dict[str, str]:
    file = job_dir / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    pairs = [str(o).split("=", 1) for o in yaml.safe_load(file.read_text()) or []]
    return {k: v for k, v in (p for p in pairs if len(p) == 2)}


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def collect_rows(sweep_dir: str | Path | None = None, run_dirs: list[Path] | None = None) -> list[dict]:
    """One row per job: its directory name, `status` (`ok`/`failed`), its `error` line, whether it completed, its
    overrides and its scalar metrics (none for a job that failed). `run_dirs` (instead of a multirun directory): any
    run directories, e.g. a plain-LoRA run and an activation-aware one; their rows are named by path."""
    import json

    rows = []
    jobs = _job_dirs(Path(sweep_dir)) if run_dirs is None else [Path(d) for d in run_dirs]
    for job in jobs:
        error = _job_error(job)
        row = {"job": job.name if run_dirs is None else str(job), "status": "failed" if error else "ok", "error": error, "complete": is_complete(job),
               **_overrides(job)}
        if (job / "metrics.json").is_file():
            row.update(json.loads((job / "metrics.json").read_text()))
        rows.append(row)
    return rows


def swept_params(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep's axes)."""
    keys = [k for k in rows[0] if k not in ROW_KEYS] if rows else []
    return [k for k in keys if isinstance(rows[0].get(k), str) and len({r.get(k) for r in rows}) > 1]


def plot_sweep(rows: list[dict], out_dir: Path, metrics: list[str]) -> list[Path]:
    """Each metric against the first numeric swept parameter (e.g. activation gain vs LoRA rank), or per run when no
    parameter is numeric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [k for k in swept_params(rows) if all(_number(r.get(k)) is not None for r in rows)]
    metrics = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if not metrics:
        return []
    if not axes_keys:  # e.g. a plain-LoRA run next to an activation-aware one: one bar per run
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        names = [Path(str(r["job"])).name for r in rows]
        for ax, metric in zip(axes[0], metrics):
            values = [r.get(metric) if isinstance(r.get(metric), (int, float)) else 0.0 for r in rows]
            ax.bar(range(len(rows)), values)
            ax.set_xticks(range(len(rows)), names, rotation=30, fontsize=7)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        path = out_dir / "summary.png"
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        return [path]
    key = axes_keys[0]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        points = sorted((_number(r[key]), r[metric]) for r in rows if isinstance(r.get(metric), (int, float)))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if all(p[0] > 0 for p in points) and max(p[0] for p in points) / min(p[0] for p in points) >= 8:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep over {key}")
    fig.tight_layout()
    path = out_dir / "summary.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return [path]


PLOTTED_METRICS = ["dev_activation_gain_pct_mean", "dev_english_retention_pct", "alignment_score"]
PARALLEL_METRICS = ("alignment_score", "dev_activation_gain_pct_mean", "dev_fvu_ratio_*", "dev_english_retention_pct",
                    "mean_disparity_pct", "mean_fvu")
"""The outcome axes of `parallel_coordinates.png`, in this order (globs: every matching column, sorted), after one
axis per swept parameter; lines coloured by the first one present (task=train: alignment_score)."""
PARALLEL_FILE = "parallel_coordinates.png"


def parallel_axes(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(swept parameters, outcome columns) that `plot_parallel_coordinates` draws, one vertical axis each."""
    import fnmatch

    ok = [r for r in rows if r.get("status") == "ok"]
    columns = list(dict.fromkeys(k for r in ok for k in r))
    metrics: list[str] = []
    for pattern in PARALLEL_METRICS:
        for key in sorted(fnmatch.filter(columns, pattern)):
            if key not in metrics and any(_is_number(r.get(key)) for r in ok):
                metrics.append(key)
    return swept_params(ok), metrics


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_parallel_coordinates(rows: list[dict], out_dir: Path) -> Path | None:
    """`parallel_coordinates.png`: one vertical axis per swept parameter, then the outcome columns (each scaled to its
    own min..max, labelled at both ends), one line per finished job, coloured by the first outcome: W&B's
    parallel-coordinates panel, drawn from the jobs' metrics.json without a W&B server. None with fewer than two
    finished jobs or no swept parameter."""
    params, metrics = parallel_axes(rows)
    ok = [r for r in rows if r.get("status") == "ok" and any(_is_number(r.get(m)) for m in metrics)]
    if len(ok) < 2 or not params or not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axes_names = [*params, *metrics]
    columns, labels = [], []
    for key in axes_names:
        raw = [r.get(key) for r in ok]
        if key in params and not all(_number(v) is not None for v in raw):  # categorical: one level per value
            levels = sorted({str(v) for v in raw})
            values = np.array([levels.index(str(v)) for v in raw], dtype=float)
            ticks = [(i, level) for i, level in enumerate(levels)]
        else:
            values = np.array([(_number(v) if key in params else v) if _number(v) is not None else np.nan
                               for v in raw], dtype=float)
            finite = values[np.isfinite(values)]
            ticks = [(float(finite.min()), f"{finite.min():.4g}"), (float(finite.max()), f"{finite.max():.4g}")] \
                if finite.size else []
            if key in params:  # every swept value is a tick
                ticks = [(float(v), f"{v:.4g}") for v in sorted(set(finite.tolist()))]
        ticks = list(dict.fromkeys(ticks))  # a constant column: one label
        lo, hi = (min(t[0] for t in ticks), max(t[0] for t in ticks)) if ticks else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        columns.append((values - lo) / span if hi > lo else np.full_like(values, 0.5))
        labels.append([((t - lo) / span if hi > lo else 0.5, text) for t, text in ticks])
    data = np.stack(columns, axis=1)  # [jobs, axes] in 0..1
    colour_by = metrics[0]
    score = np.array([r.get(colour_by) if _is_number(r.get(colour_by)) else np.nan for r in ok], dtype=float)
    finite = score[np.isfinite(score)]
    norm = plt.Normalize(finite.min(), finite.max()) if finite.size else plt.Normalize(0, 1)
    cmap = plt.get_cmap("viridis")

    fig, ax = plt.subplots(figsize=(1.9 * len(axes_names) + 1.5, 4.6))
    x = np.arange(len(axes_names))
    for row, value in zip(data, score):
        ax.plot(x, row, color=cmap(norm(value)) if np.isfinite(value) else "0.6", linewidth=1.6, alpha=0.85,
                marker="o", markersize=3)
    for i, ticks in enumerate(labels):
        ax.axvline(i, color="0.3", linewidth=0.8)
        for level, text in ticks:
            ax.annotate(text, (i, level), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(x, [name.replace("dev_", "dev ").replace("_pct", " %").replace("_", " ") if name in metrics
                      else name for name in axes_names], rotation=20, fontsize=8, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(axes_names) - 0.4)
    ax.set_ylim(-0.06, 1.06)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, label=colour_by)
    ax.set_title(f"{len(ok)} jobs: swept {', '.join(params)} vs outcomes (each axis scaled to its own range)",
                 fontsize=9)
    fig.tight_layout()
    path = out_dir / PARALLEL_FILE
    # The axes, in order, in the PNG's metadata: what tests and scripts read back.
    save_figure(fig, path, dpi=130, metadata={"Description": "axes: " + " | ".join(axes_names)})
    plt.close(fig)
    return path


def summarize_sweep(sweep_dir: str | Path, tracker=None, run_dirs: list[Path] | None = None) -> Path:
    """Write `summary.csv` (one row per job), `summary.png` and `parallel_coordinates.png` (swept parameters vs
    outcomes) in `sweep_dir`; return the CSV's path. With `run_dirs`, the rows are those run directories and
    `sweep_dir` is only where the summary goes."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir, run_dirs)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns or ["job"])
    writer.writeheader()
    writer.writerows(rows)
    path = write_text_atomic(sweep_dir / "summary.csv", buffer.getvalue())
    images = plot_sweep(rows, sweep_dir, PLOTTED_METRICS) if rows else []
    parallel = plot_parallel_coordinates(rows, sweep_dir) if rows else None
    if parallel is not None:
        images.append(parallel)
    if tracker is not None:
        tracker.log_table("sweep_summary", [{c: r.get(c) for c in columns} for r in rows])
        tracker.log_images({p.stem: p for p in images})
    failed = [r["job"] for r in rows if r["status"] == "failed"]
    log.info("sweep summary of %d jobs -> %s%s", len(rows), path,
             f" ({len(failed)} failed: {failed})" if failed else "")
    return path


def failed_jobs(sweep_dir: str | Path) -> list[dict]:
    """The rows of `summary.csv` whose status is `failed`."""
    with (Path(sweep_dir) / "summary.csv").open(encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row.get("status") == "failed"]


class SweepSummaryCallback(Callback):
    """Hydra callback (conf/hydra/default.yaml): summarise the sweep once every job of a multirun has ended."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        tracker = None
        if config.get("logger", {}).get("backend") == "wandb":
            from mlalign.tracking import make_tracker

            task = str(config.get("task", "sweep"))
            experiment = OmegaConf.select(config, "hydra.runtime.choices.experiment", default=None)
            # The same group as the sweep's jobs (mlalign.tasks.common.job_name_and_group), so the summary sits with them.
            tracker = make_tracker(config, sweep_dir, "summarize", name=f"summary:{sweep_dir.name}",
                                   group=f"{experiment or task}-{sweep_dir.name}",
                                   config={"sweep_dir": str(sweep_dir), "task": task})
        failed = []
        try:
            path = summarize_sweep(sweep_dir, tracker)
            print(f"sweep summary: {path}")
            failed = failed_jobs(sweep_dir)
        finally:
            if tracker is not None:
                tracker.finish(exit_code=1 if failed else 0)
        if failed:  # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings
            print(f"error: {len(failed)} job(s) of the sweep failed (status=failed in {path}):", file=sys.stderr)
            for row in failed:
                print(f"  job {row['job']}: {row['error']}", file=sys.stderr)
            sys.exit(1)
