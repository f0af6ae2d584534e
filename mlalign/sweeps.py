"""After a Hydra multirun: gather each job's results into `<sweep dir>/summary.csv` plus plots, and log them to W&B."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from hydra.experimental.callback import Callback

from mlalign.io import is_complete, write_text_atomic

log = logging.getLogger(__name__)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p.parent for p in sweep_dir.glob("*/metrics.json")), key=lambda p: p.name)


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


def collect_rows(sweep_dir: str | Path) -> list[dict]:
    """One row per job: its directory name, whether it completed, its overrides and its scalar metrics."""
    import json

    rows = []
    for job in _job_dirs(Path(sweep_dir)):
        row = {"job": job.name, "complete": is_complete(job), **_overrides(job)}
        row.update(json.loads((job / "metrics.json").read_text()))
        rows.append(row)
    return rows


def swept_params(rows: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (the sweep's axes)."""
    keys = [k for k in rows[0] if k not in ("job", "complete")] if rows else []
    return [k for k in keys if isinstance(rows[0].get(k), str) and len({r.get(k) for r in rows}) > 1]


def plot_sweep(rows: list[dict], out_dir: Path, metrics: list[str]) -> list[Path]:
    """Each metric against the first numeric swept parameter (e.g. activation gain vs LoRA rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [k for k in swept_params(rows) if all(_number(r.get(k)) is not None for r in rows)]
    metrics = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if not axes_keys or not metrics:
        return []
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


def summarize_sweep(sweep_dir: str | Path, tracker=None) -> Path:
    """Write `summary.csv` (one row per job) and `summary.png` in the sweep directory; return the CSV's path."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
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
    incomplete = [r["job"] for r in rows if not r["complete"]]
    log.info("sweep summary of %d jobs -> %s%s", len(rows), path,
             f" ({len(incomplete)} incomplete: {incomplete})" if incomplete else "")
    return path


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
        try:
            path = summarize_sweep(sweep_dir, tracker)
            print(f"sweep summary: {path}")
        finally:
            if tracker is not None:
                tracker.finish()
