"""mlalign's one entry point: `python run.py task=analyze|train|eval|pipeline|build_testbed|summarize [overrides]`."""

from mlalign.errors import stop_in_one_line_on_early_sigterm

stop_in_one_line_on_early_sigterm()  # first: a SIGTERM while the libraries import is one line, not a silent -15

import hydra  # noqa: E402
from omegaconf import DictConfig

import mlalign.config  # noqa: F401,E402  (registers the typed config schemas)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from mlalign.tasks import dispatch

    return dispatch(cfg)


if __name__ == "__main__":
    from mlalign.errors import report_composition_errors_in_one_line

    report_composition_errors_in_one_line()  # a mistyped key or value: one `error:` line, as every other mistake
    main()
