"""Experiment tracking in one place: Weights & Biases (`logger=wandb`) or nothing (`logger=none`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SECRET_KEY_PARTS = ("token", "api_key", "apikey", "password", "secret")


def scrub_secrets(container):
    """A copy of a plain config dict with any secret-looking values removed (tokens never leave the machine)."""
    if isinstance(container, dict):
        return {k: ("<redacted>" if any(p in str(k).lower() for p in SECRET_KEY_PARTS) else scrub_secrets(v))
                for k, v in container.items()}
    if isinstance(container, list):
        return [scrub_secrets(v) for v in container]
    if isinstance(container, str):
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
            secret = os.environ.get(name)
            if secret and secret in container:
                container = container.replace(secret, "<redacted>")
    return container


class Tracker:
    """No-op tracker; `WandbTracker` overrides what it logs."""

    backend = "none"

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_images(self, images: dict[str, str | Path]) -> None:
        pass

    def log_table(self, name: str, rows: list[dict]) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, cfg, run_dir: Path, task: str, name: str, group: str, config: dict | None = None):
        import wandb

        logger_cfg = cfg.logger
        kwargs = dict(
            project=logger_cfg.get("project") or "mlalign",
            entity=logger_cfg.get("entity"),
            group=str(logger_cfg.get("group") or group),
            job_type=task,
            name=name,
            dir=str(run_dir),
            config=scrub_secrets(config if config is not None else OmegaConf.to_container(cfg, resolve=True)),
            tags=list(logger_cfg.get("tags") or []),
            mode=logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "online",
            reinit="finish_previous",
        )
        self._wandb = wandb
        try:
            self.run = wandb.init(**kwargs)
        except Exception as err:  # an unreachable W&B must not kill a long job
            log.warning("W&B unreachable (%s); logging offline to %s instead", str(err).splitlines()[0], run_dir)
            kwargs["mode"] = "offline"
            self.run = wandb.init(**kwargs)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, str | Path]) -> None:
        self.run.log({name: self._wandb.Image(str(path)) for name, path in images.items() if Path(path).is_file()})

    def log_table(self, name: str, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            self.run.log({name: self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def summary(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg, run_dir: Path, task: str, name: str, group: str, config: dict | None = None) -> Tracker:
    """`name`: the job's overrides (so runs of one sweep tell themselves apart); `group`: the sweep or experiment;
    `config`: what to record as the run's config (default: the whole resolved job config)."""
    backend = cfg.logger.get("backend", "none")
    if backend == "wandb":
        return WandbTracker(cfg, run_dir, task, name, group, config)
    return Tracker()
