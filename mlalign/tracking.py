"""Experiment tracking in one place: Weights & Biases (`logger=wandb`) or nothing (`logger=none`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SECRET_KEY_PARTS = ("token", "api_key", "apikey", "password", "secret")
RUN_ID_FILE = "wandb_run_id"
"""In the run directory: the W&B run's id, so a resumed or requeued job continues the same W&B run."""
STEP_METRIC = "train/step"
"""What stepped metrics (the training curve) are plotted against: W&B's own step only ever grows, so earlier unstepped
logs (task=pipeline's analysis) or a resume from an older checkpoint would otherwise drop the first steps."""


def _verbose() -> bool:
    from mlalign.console import verbose

    return verbose()


def _quiet_stderr():
    import contextlib
    import io

    return contextlib.nullcontext() if _verbose() else contextlib.redirect_stderr(io.StringIO())


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

    def log_adapter(self, adapter_dir: str | Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, cfg, run_dir: Path, task: str, name: str, group: str, config: dict | None = None,
                 reinit: str = "finish_previous"):
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
            reinit=reinit,
            id=self._run_id(run_dir),
            resume="allow",
            # W&B's own banner and end-of-run history/summary tables (~40 lines) stay off the console unless
            # log_level=debug; mlalign.console's closing block names the run and how to sync it.
            settings=wandb.Settings(silent=not _verbose()),
        )
        self._wandb = wandb
        self._log_adapter = bool(logger_cfg.get("log_adapter", True))
        try:
            self.run = wandb.init(**kwargs)
        except Exception as err:  # an unreachable W&B must not kill a long job
            log.warning("W&B unreachable (%s); logging offline to %s instead", str(err).splitlines()[0], run_dir)
            kwargs["mode"] = "offline"
            self.run = wandb.init(**kwargs)
        self.run.define_metric(STEP_METRIC)
        for prefix in ("train", "heldout"):
            self.run.define_metric(f"{prefix}/*", step_metric=STEP_METRIC)

    @staticmethod
    def _run_id(run_dir: Path) -> str:
        """The id stored in this run directory, or a new one stored there first."""
        file = Path(run_dir) / RUN_ID_FILE
        if file.is_file() and file.read_text().strip():
            return file.read_text().strip()
        import secrets
        import string

        from mlalign.io import write_text_atomic

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form

        write_text_atomic(file, run_id + "\n")
        return run_id

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics if step is None else {**metrics, STEP_METRIC: step})

    def log_images(self, images: dict[str, str | Path]) -> None:
        self.run.log({name: self._wandb.Image(str(path)) for name, path in images.items() if Path(path).is_file()})

    def log_table(self, name: str, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            self.run.log({name: self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def summary(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def log_adapter(self, adapter_dir: str | Path) -> None:
        """The peft adapter folder as a `model` artifact (`logger.log_adapter=false` skips it)."""
        if not self._log_adapter or not (Path(adapter_dir) / "adapter_config.json").is_file():
            return
        artifact = self._wandb.Artifact(name=f"adapter-{self.run.id}", type="model",
                                        metadata={"run_dir": str(Path(adapter_dir).parent)})
        with _quiet_stderr():  # "wandb: Adding directory to artifact ... Done." even in a silent run
            artifact.add_dir(str(adapter_dir))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg, run_dir: Path, task: str, name: str, group: str, config: dict | None = None,
                 reinit: str = "finish_previous") -> Tracker:
    """`name`: the job's overrides (so runs of one sweep tell themselves apart); `group`: the sweep or experiment;
    `config`: what to record as the run's config (default: the whole resolved job config); `reinit="create_new"`
    keeps runs already open (task=compare's one run per arm x seed beside the task's own)."""
    backend = cfg.logger.get("backend", "none")
    if backend == "wandb":
        return WandbTracker(cfg, run_dir, task, name, group, config, reinit)
    return Tracker()
