"""task=dashboard sweep_dir=DIR: the sweep's W&B workspace and report written as code (wandb-workspaces).

Always writes <run dir>/dashboard/: spec.json (the panels), workspace.json (what W&B would receive) and the same panels
rendered locally (summary.png, parallel_coordinates.png, language_bars.png). Online (logger.mode / WANDB_MODE not
offline) it also saves the workspace and a report to W&B and prints their URLs.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlalign.errors import UserError


def check_config(cfg) -> None:
    if not cfg.get("sweep_dir"):
        raise UserError("task=dashboard needs the sweep: add sweep_dir=multirun/train/<date_time> (a run.py -m folder)")
    if not Path(cfg.sweep_dir).is_dir():
        raise UserError(f"sweep_dir {cfg.sweep_dir} does not exist; pass a directory created by `python run.py -m ...`")


def online(logger_cfg) -> bool:
    mode = logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "online"
    return str(mode) not in ("offline", "disabled", "dryrun")


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import output
    from mlalign.dashboard import check_rows, dashboard_spec, publish, wandb_target, write_offline
    from mlalign.sweeps import collect_rows, swept_params

    sweep_dir = Path(cfg.sweep_dir)
    rows = collect_rows(sweep_dir)
    check_rows(rows, sweep_dir)
    target = wandb_target(sweep_dir, cfg.logger)
    if not target["logged_to_wandb"]:
        print(f"note: the jobs of {sweep_dir} were not logged to W&B (their logger.backend is not wandb): the "
              f"workspace filters group {target['group']} and stays empty there; run sweeps with logger=wandb")
    spec = dashboard_spec(rows, swept_params(rows), f"mlalign sweep {sweep_dir.name}", target)
    files = write_offline(spec, rows, ctx.run_dir / "dashboard")
    output("dashboard spec", files[0])
    for path in files[2:]:
        output(path.stem.replace("_", " "), path)
    if online(cfg.logger):
        try:
            urls = publish(spec)
        except Exception as err:  # no API key, no network, no such entity: the offline files stand
            raise UserError(f"could not save the dashboard to W&B ({str(err).splitlines()[0]}); run "
                            "`.venv/bin/wandb login` (or set WANDB_API_KEY), or add logger.mode=offline; the spec is "
                            f"in {files[0].parent}") from None
        for url in urls:
            print(f"W&B: {url}")
    n_panels = sum(len(section["panels"]) for section in spec["sections"])
    return {"n_jobs": float(len(rows)), "n_panels": float(n_panels)}
