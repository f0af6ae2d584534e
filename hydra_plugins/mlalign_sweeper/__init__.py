"""mlalign's Hydra sweeper (Hydra loads sweepers only from the `hydra_plugins` namespace): a failed job ends no sweep."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class KeepGoingSweeper(BasicSweeper):
    """Hydra's basic sweeper (mlalign's default: conf/hydra/default.yaml), except that a failed job does not end the
    sweep: BasicSweeper re-raises the first failure after its batch, which skips every later batch and the
    `on_multirun_end` callbacks (the sweep summary). Failures are logged here; mlalign.sweeps.SweepSummaryCallback
    writes the summary and then exits non-zero."""

    def sweep(self, arguments: list[str]):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params_conf), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, initial_job_idx = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for num, result in enumerate(results, start=initial_job_idx):
                if result.status == JobStatus.FAILED:
                    self._log_failure(num, result)
            initial_job_idx += len(batch)
            returns.append(results)
        return returns

    @staticmethod
    def _log_failure(num: int, result) -> None:
        from mlalign.errors import UserError

        err = result._return_value
        overrides = " ".join(result.overrides or [])
        if isinstance(err, UserError):
            log.error("job %d (%s) failed: %s", num, overrides, err)
        else:  # a bug: the traceback belongs in the log
            log.error("job %d (%s) failed", num, overrides, exc_info=(type(err), err, err.__traceback__))
