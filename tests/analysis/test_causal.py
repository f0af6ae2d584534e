"""task=analyze with analysis.features.ablate/steer/dashboard on the testbed: the files and the contract downstream
scripts read (ablation.json, steering.json, features_neuronpedia.json), and bad settings as one line before any work."""

from __future__ import annotations

import json

import pytest

from mlalign.errors import UserError
from tests.helpers import compose_cfg
from tests.tasks.test_train import bed_overrides

SMALL = ["task=analyze", "model=testbed", "langs=[hi]", "layers=[3,13]", "data.max_sentences=8",
         "data.max_length=32", "analysis.bootstrap=20", "analysis.features.ablate.max_sentences=8",
         "analysis.features.steer.prompts=3", "analysis.features.steer.max_new_tokens=5",
         "analysis.features.steer.alphas=[0,4]", "analysis.features.dashboard.max_sentences=6"]
ON = ["analysis.features.ablate.enabled=true", "analysis.features.steer.enabled=true",
      "analysis.features.dashboard.enabled=true"]


def run_analyze(testbed_dir, tmp_path, *overrides):
    from mlalign.tasks import analyze
    from mlalign.tasks.common import RunContext

    cfg = compose_cfg([*SMALL, *bed_overrides(testbed_dir), *overrides], tmp_path)
    with RunContext(cfg) as ctx:
        analyze.run(cfg, ctx)
    return tmp_path / "run" / "analysis"


@pytest.mark.slow
def test_the_three_steps_write_their_contract(testbed_dir, tmp_path):
    out = run_analyze(testbed_dir, tmp_path, *ON)
    ablation = json.loads((out / "ablation.json").read_text())
    assert ablation["layer"] == 13 and ablation["k"] == 10  # null = the middle analysed layer
    langs = {"en", "hi"}
    assert set(ablation["matrix"]) <= langs and ablation["matrix"]
    for kind in ("matrix", "random"):
        for row in ablation[kind].values():
            assert set(row) == langs
            assert all({"dlm_loss", "ci"} <= set(cell) for cell in row.values())
    assert len(ablation["statements"]) == 2 and (out / "ablation.png").is_file()
    steering = json.loads((out / "steering.json").read_text())
    assert steering["layer"] == 13 and set(steering["results"]) <= {"hi"}
    for rows in steering["results"].values():
        assert [r["alpha"] for r in rows] == [0.0, 4.0]
        assert all({"alpha", "share_in_lang", "share_in_lang_random"} <= set(r) for r in rows)
    neuronpedia = json.loads((out / "features_neuronpedia.json").read_text())
    assert "does not host" in neuronpedia["note"] and set(neuronpedia["lists"]) == langs
    assert (out / "feature_dashboard.html").read_text().startswith("<!doctype html>")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["causal"]) == {"ablation", "steering", "dashboard"}


@pytest.mark.parametrize("override, message", [
    ("analysis.features.ablate.layer=5", "analysis.features.ablate.layer=5 is not an analysed layer"),
    ("analysis.features.steer.k=0", "analysis.features.steer.k must be >= 1"),
    ("analysis.features.dashboard.k=-3", "analysis.features.dashboard.k must be >= 1"),
    ("analysis.bootstrap=0", "analysis.bootstrap=0 gives none"),
    ("analysis.features.steer.max_new_tokens=0", "steer.prompts and max_new_tokens must be >= 1"),
    ("analysis.features.dashboard.contexts=0", "dashboard.contexts and logit_tokens must be >= 1"),
])
def test_a_bad_setting_is_one_line_before_any_work(testbed_dir, tmp_path, override, message):
    step = override.split(".")[2] if override.startswith("analysis.features.") else "ablate"
    enabled = f"analysis.features.{step}.enabled=true"
    with pytest.raises(UserError, match=message) as error:
        run_analyze(testbed_dir, tmp_path, enabled, override)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "analysis").exists()  # failed before the analysis wrote anything
