"""The tolerance defaults pass a no-change model at least 95% of the time on the calibration run, and the table in
experiments/tolerance_calibration/README.md is the one its results file gives (docs numbers come from files)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mlalign.training.outcomes import FIDELITY_TOLERANCE, SPLICED_TOLERANCE_NATS

HERE = Path(__file__).resolve().parents[2] / "experiments" / "tolerance_calibration"


def _calibrate():
    spec = importlib.util.spec_from_file_location("calibrate", HERE / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    return json.loads((HERE / "results_small.json").read_text())


def test_the_defaults_pass_a_no_change_model_at_least_95_percent_of_the_time(results):
    rates = _calibrate().pass_rates(results, FIDELITY_TOLERANCE, SPLICED_TOLERANCE_NATS)
    assert rates and all(len(v["recon_error_ratio_maxima"]) == results["n_splits"] for v in results["per_lang"].values())
    for lang, (recon, spliced) in rates.items():
        assert recon >= 0.95, (lang, recon)
        assert spliced >= 0.95, (lang, spliced)


def test_the_readme_table_is_generated_from_the_results_file(results):
    readme = (HERE / "README.md").read_text()
    assert _calibrate().table(results) in readme


def test_the_numbers_quoted_in_the_docs_are_the_results_files(results):
    rates = _calibrate().pass_rates(results, FIDELITY_TOLERANCE, SPLICED_TOLERANCE_NATS)
    lowest = f"{100 * min(min(pair) for pair in rates.values()):.1f}%"
    q95 = [v["recon_error_ratio_q95"] for v in results["per_lang"].values()]
    spread = f"x{min(q95):.2f}-{max(q95):.2f}"
    training = (HERE.parents[1] / "docs" / "training.md").read_text()
    readme = (HERE / "README.md").read_text()
    for text in (training, readme):
        text = re.sub(r"<!-- /?generated.*?-->", "", text)  # the markers `make docs` writes the numbers between
        assert f"at least {lowest} of the no-change splits" in " ".join(text.split())
        assert spread in text
