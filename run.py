"""mlalign's one entry point: `python run.py task=analyze|train|eval|pipeline|build_testbed|summarize [overrides]`."""

import hydra
from omegaconf import DictConfig

import mlalign.config  # noqa: F401  (registers the typed config schemas)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from mlalign.tasks import dispatch

    return dispatch(cfg)


if __name__ == "__main__":
    from mlalign.errors import report_composition_errors_in_one_line

    report_composition_errors_in_one_line()  # a mistyped key or value: one `error:` line, as every other mistake
    main()
