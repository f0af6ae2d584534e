"""What every task shares: run directory, seeding, resolved config on disk, tracker, languages, layers and loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mlalign.errors import UserError
from mlalign.io import mark_complete, write_json_atomic, write_text_atomic
from mlalign.languages import resolve_langs
from mlalign.tracking import Tracker, make_tracker, scrub_secrets

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Rank 0, or the only process. `accelerate launch` and `torch.distributed.run` set RANK before the task starts,
    so this holds before any Accelerator exists (the run files and the W&B run are opened before training)."""
    return int(os.environ.get("RANK", "0")) == 0


def hydra_run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def job_name_and_group(cfg: DictConfig, task: str) -> tuple[str, str]:
    """W&B run name from the job's overrides (paths left out); group from the experiment, the sweep, or the task."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name, group = task, task
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        skip = ("task=", "logger=", "hydra", "paths.", "experiment=")
        overrides = [o for o in hc.overrides.task if not o.startswith(skip)]
        name = ",".join(overrides) or task
        experiment = OmegaConf.select(hc, "runtime.choices.experiment", default=None)
        if hc.mode == RunMode.MULTIRUN:
            group = f"{experiment or task}-{Path(hc.sweep.dir).name}"
        elif experiment:
            group = str(experiment)
    return name, group


def resolve_layers(layers, num_layers: int) -> list[int]:
    """`null` = every layer; otherwise a validated, sorted list of distinct layer indices."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (int, str)):
        layers = [layers]
    try:
        layers = [int(layer) for layer in layers]
    except (TypeError, ValueError):
        raise UserError(f"layers must be integers, got {list(layers)}; type e.g. layers=[0,5,12]") from None
    if not layers:
        raise UserError(f"layers is empty; give at least one layer (0..{num_layers - 1}) or layers=null for all")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: this model has {num_layers} layers (0..{num_layers - 1}); "
                        f"type e.g. layers=[0,{num_layers // 2},{num_layers - 1}]")
    return sorted(set(layers))


def prepare_testbed(cfg: DictConfig) -> None:
    """For model=testbed: build it on first use (cached under paths.cache_dir) and point paths.testbed_dir at it."""
    testbed = cfg.model.get("testbed")
    if testbed is None or cfg.model.hf_id:
        return
    from mlalign.console import stage
    from mlalign.testbed import TestbedSpec, ensure_testbed
    from mlalign.testbed.build import COMPLETE_MARKER, testbed_dir

    spec = TestbedSpec.from_config(testbed)
    if (testbed_dir(spec, cfg.paths.cache_dir) / COMPLETE_MARKER).is_file():
        directory = ensure_testbed(spec, cfg.paths.cache_dir)
    else:  # minutes, once per build config: tokenizer, pretraining and one SAE per layer, with their own bars
        with stage(f"building the testbed (first use; cached under {cfg.paths.cache_dir})"):
            directory = ensure_testbed(spec, cfg.paths.cache_dir)
    with open_dict(cfg):
        cfg.paths.testbed_dir = str(directory)


class RunContext:
    """Opened around each task by `mlalign.tasks.dispatch`; closes the tracker even when the task fails. With several
    processes (DDP) only the main one writes config.yaml, metrics.json and COMPLETE and opens a W&B run; the others
    get the no-op tracker."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.task = str(cfg.task)
        run_dir = run_dir or hydra_run_dir() or OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_missing=False)
        if not run_dir:
            raise UserError("no run directory: run through run.py, or set paths.output_dir=DIR")
        self.run_dir = Path(run_dir)
        self.tracker = None
        self.is_main_process = is_main_process()

    def __enter__(self) -> "RunContext":
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from transformers import set_seed

        # One seed for every task (CONVENTIONS rule 5): this call covers python, numpy, torch and each accelerator;
        # accelerate and lm-eval take the same number where they run.
        set_seed(int(cfg.seed))
        # Cheap checks first: a typo must cost seconds, not a testbed build or a model download.
        self.langs = resolve_langs(cfg.langs, cfg.reference_lang)
        from mlalign.models import resolve_model_shape

        resolve_model_shape(cfg.model, OmegaConf.select(cfg, "paths.testbed_dir", default=None))  # model=hf: config.json
        resolve_layers(cfg.layers, int(cfg.model.num_layers))
        if cfg.get("adapter"):
            from mlalign.models import check_adapter

            check_adapter(cfg.adapter)
        prepare_testbed(cfg)
        from mlalign.models import prepare_model

        prepare_model(cfg.model, cfg.paths.cache_dir)  # GGUF sources: convert once, cached
        if not self.is_main_process:
            self.tracker = Tracker()
            return self
        resolved = scrub_secrets(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
        write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
        name, group = job_name_and_group(cfg, self.task)
        self.tracker = make_tracker(cfg, self.run_dir, self.task, name, group)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tracker is not None:
            self.tracker.finish(exit_code=0 if exc_type is None else 1)
        if exc_type is not None and not issubclass(exc_type, UserError):
            log.error("task %s failed: %s: %s", self.task, exc_type.__name__, exc)

    def finish(self, metrics: dict) -> None:
        """Log the task's scalar results and mark the run directory complete (written last)."""
        if not self.is_main_process:
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.tracker.summary(scalars)
        if self.task in ("train", "pipeline"):  # the adapter this run trained
            self.tracker.log_adapter(self.run_dir / "adapter")
        write_json_atomic(self.run_dir / "metrics.json", scalars)
        mark_complete(self.run_dir, {"task": self.task})

    @property
    def testbed_dir(self) -> str | None:
        return OmegaConf.select(self.cfg, "paths.testbed_dir", default=None)

    def layers(self, num_layers: int | None = None) -> list[int]:
        return resolve_layers(self.cfg.layers, int(num_layers or self.cfg.model.num_layers))

    def load_tokenizer(self):
        from mlalign.models import load_tokenizer

        return load_tokenizer(self.cfg.model, self.testbed_dir)

    def load_model(self, adapter: str | None = None, **kwargs):
        from mlalign.console import stage
        from mlalign.models import load_model

        with stage(f"loading model {self.cfg.model.name}" + (f" + adapter {adapter}" if adapter else ""),
                   start_line=False):  # transformers' "Loading weights" bar shows it running
            return load_model(self.cfg.model, self.testbed_dir, adapter=adapter, **kwargs)

    def load_saes(self, layers: list[int], hidden_size: int, device, sae_cfg=None) -> dict:
        """`layers`' SAEs from `sae_cfg` (default the run's `sae` group; task=analyze's SAE seeds pass each seed's)."""
        from mlalign.console import stage
        from mlalign.saes import load_saes

        sae_cfg = self.cfg.sae if sae_cfg is None else sae_cfg
        with stage(f"loading {len(layers)} SAE(s) ({sae_cfg.name})", start_line=False):  # with its own bar
            return load_saes(sae_cfg, layers, hidden_size, device=str(device))
