"""After a Hydra multirun: gather each job's results into `<sweep dir>/summary.csv` plus plots, and log them to W&B."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from hydra.experimental.callback import Callback

from mlalign.io import is_complete, write_text_atomic
from mlalign.tasks import ERROR_FILE

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
        fig.savefig(path, dpi=120)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


PLOTTED_METRICS = ["dev_activation_gain_pct_mean", "dev_english_retention_pct", "alignment_score"]


def summarize_sweep(sweep_dir: str | Path, tracker=None, run_dirs: list[Path] | None = None) -> Path:
    """Write `summary.csv` (one row per job) and `summary.png` in `sweep_dir`; return the CSV's path. With `run_dirs`,
    the rows are those run directories and `sweep_dir` is only where the summary goes."""
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
