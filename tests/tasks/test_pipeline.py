"""task=pipeline's split choice (the adapter is analysed on held-out sentences only, and corpus.json says so) and its
causal steps (settings checked before anything is written; outputs listed; kept across a resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlalign.data.corpus import write_corpus_report
from mlalign.tasks import CORPUS_TASKS
from mlalign.tasks.pipeline import held_out_analysis
from tests.helpers import compose_cfg


def _text_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("en", "hi"):
        (corpus / f"{lang}.txt").write_text("\n".join(f"{lang} sentence {i}" for i in range(40)) + "\n",
                                             encoding="utf-8")
    return corpus


@pytest.mark.parametrize("data", ["data=text_dir", "data=hf"])
def test_the_pipeline_analyses_held_out_sentences_where_the_analysis_split_holds_training_lines(data, tmp_path):
    cfg = compose_cfg(["task=pipeline", data, "data.path=/nowhere", "langs=[hi]"], tmp_path)
    assert str(cfg.data.splits.analysis) == "all"  # the source's default: every line, the training lines too
    held_out_analysis(cfg)
    assert str(cfg.data.splits.analysis) == str(cfg.data.splits.heldout) == "test"


def test_the_pipeline_keeps_an_analysis_split_that_is_already_held_out(tmp_path):
    cfg = compose_cfg(["task=pipeline", "data=flores", "langs=[hi]", "data.splits.analysis=dev+test"], tmp_path)
    held_out_analysis(cfg)
    assert str(cfg.data.splits.analysis) == "dev+test"


def test_corpus_json_says_whether_the_analysis_reads_held_out_sentences_only(tmp_path):
    cfg = compose_cfg(["task=pipeline", "data=text_dir", f"data.path={_text_dir(tmp_path)}", "langs=[hi]"], tmp_path)
    leaky = write_corpus_report(cfg.data, ["en", "hi"], tmp_path / "a", uses=CORPUS_TASKS["pipeline"])
    assert leaky["analysis_held_out"] is False and leaky["analysis_train_overlap"] == ["train"]
    held_out_analysis(cfg)
    write_corpus_report(cfg.data, ["en", "hi"], tmp_path / "b", uses=CORPUS_TASKS["pipeline"])
    report = json.loads((tmp_path / "b" / "corpus.json").read_text())
    assert report["analysis_held_out"] is True and report["analysis_train_overlap"] == []
    assert report["splits_used"]["analysis"] == "test"


# --- the causal steps (analysis.features.ablate/steer/dashboard) in task=pipeline ------------------------------------

CAUSAL_ON = ["analysis.features.ablate.enabled=true", "analysis.features.steer.enabled=true",
             "analysis.features.dashboard.enabled=true"]


@pytest.mark.parametrize("override, message", [
    ("analysis.features.ablate.layer=5", "analysis.features.ablate.layer=5 is not an analysed layer"),
    ("analysis.features.steer.k=0", "analysis.features.steer.k must be >= 1"),
    ("analysis.features.dashboard.split=valid", "analysis.features.dashboard.split=valid: unknown split 'valid'"),
    ("analysis.features.enabled=false", "need the feature lists: set analysis.features.enabled=true"),
    ("analysis.bootstrap=0", "analysis.bootstrap=0 gives none"),
])
def test_check_config_refuses_bad_causal_settings(tmp_path, override, message):
    """Before: task=pipeline's check_config let them through; step 1 refused them after config.yaml and corpus.json were
    written (over a resumed run's) and the tokenizer had loaded."""
    from mlalign.errors import UserError
    from mlalign.tasks.pipeline import check_config

    cfg = compose_cfg(["task=pipeline", "model=testbed", "eval=bundled", "langs=[hi]", "layers=[1,4]", *CAUSAL_ON,
                       override], tmp_path)
    with pytest.raises(UserError, match=message) as error:
        check_config(cfg)
    assert "\n" not in str(error.value)


def test_check_config_leaves_the_layer_to_the_analysis_where_the_config_does_not_know_the_layers(tmp_path):
    from mlalign.tasks.pipeline import check_causal_config

    cfg = compose_cfg(["task=pipeline", "model=hf", "model.hf_id=/nowhere", "langs=[hi]", "layers=null", *CAUSAL_ON,
                       "analysis.features.ablate.layer=3"], tmp_path)
    check_causal_config(cfg)  # model.num_layers is read from config.json when the run starts; step 1 checks the layer


def _pipeline_args(testbed_cache_dir, run_dir, *overrides):
    from tests.conftest import SMALL_TESTBED_OVERRIDES

    return ["task=pipeline", "model=testbed", *SMALL_TESTBED_OVERRIDES, f"paths.cache_dir={testbed_cache_dir}",
            f"paths.root_dir={run_dir.parent}", f"hydra.run.dir={run_dir}", "eval=bundled", "langs=[hi]", "layers=[4]",
            "data.max_sentences=16", "data.max_length=32", "train.max_length=32", "train.batch_size=8",
            "train.max_steps=2", "train.eval_every=0", "analysis.bootstrap=20", "analysis.batch_size=16",
            "eval.limit=4", "eval.batch_size=8", "eval.bootstrap=100", *CAUSAL_ON,
            "analysis.features.ablate.max_sentences=6", "analysis.features.steer.prompts=2",
            "analysis.features.steer.max_new_tokens=3", "analysis.features.steer.alphas=[0,4]",
            "analysis.features.dashboard.max_sentences=4", *overrides]


def _one_error_line(result) -> str:
    import re

    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_a_bad_causal_setting_is_one_line_before_the_pipeline_writes_anything(testbed_dir, testbed_cache_dir,
                                                                               tmp_path):
    from tests.helpers import run_cli

    run_dir = tmp_path / "run"
    result = run_cli(_pipeline_args(testbed_cache_dir, run_dir, "analysis.features.steer.layer=2"))
    assert "analysis.features.steer.layer=2 is not an analysed layer" in _one_error_line(result)
    assert "[1/4]" not in result.stdout
    written = {p.name for p in run_dir.iterdir()}
    assert not written & {"config.yaml", "corpus.json", "analysis_base", "COMPLETE"}, written


@pytest.mark.slow
def test_causal_outputs_are_listed_and_a_resumed_pipeline_keeps_them(testbed_dir, testbed_cache_dir, tmp_path):
    """Both analyses write the causal files where task=analyze would (analysis_base/, analysis_adapter/), summary.json
    and report.md list them; a resumed run keeps a step whose inputs are unchanged and reruns one whose are not.
    Before: report.md named only the plots, and a resume ran ablation, steering and dashboards of both models again."""
    from tests.helpers import run_cli

    run_dir = tmp_path / "run"
    first = run_cli(_pipeline_args(testbed_cache_dir, run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    files = {"ablation": {"ablation.json", "ablation.png"}, "steering": {"steering.json", "steering.png"},
             "dashboard": {"features_neuronpedia.json", "feature_dashboard.html"}}
    for folder in ("analysis_base", "analysis_adapter"):
        causal = json.loads((run_dir / folder / "summary.json").read_text())["causal"]
        assert {step: {Path(p).name for p in out["files"].values()} for step, out in causal.items()} == files
        assert all(Path(p).parent == run_dir / folder for out in causal.values() for p in out["files"].values())
    report = (run_dir / "report.md").read_text()
    for folder in ("analysis_base", "analysis_adapter"):
        assert all(f"`{folder}/{name}`" in report for names in files.values() for name in names), report
    assert "- base + adapter: English (en)" in first.stdout  # the adapted model's verdicts say whose they are

    kept = {p: p.stat().st_mtime_ns for folder in ("analysis_base", "analysis_adapter")
            for name in ("ablation.json", "ablation.png", "steering.json", "steering.png")
            for p in [run_dir / folder / name]}
    dashboard = (run_dir / "analysis_base" / "features_neuronpedia.json").stat().st_mtime_ns
    resumed = run_cli(_pipeline_args(testbed_cache_dir, run_dir, "train.resume=true",
                                     "analysis.features.dashboard.k=2"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout + resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not rewritten
    out = resumed.stdout
    assert out.count("ablating each language's specific features (and matched random ones): kept from") == 2
    assert out.count("steering English generation with each language's feature direction: kept from") == 2
    assert "feature dashboards ..." in out and "feature dashboards: kept" not in out  # its k changed: redone
    assert (run_dir / "analysis_base" / "features_neuronpedia.json").stat().st_mtime_ns != dashboard
    report = (run_dir / "report.md").read_text()
    for folder in ("analysis_base", "analysis_adapter"):
        assert all(f"`{folder}/{name}`" in report for names in files.values() for name in names), report
        causal = json.loads((run_dir / folder / "summary.json").read_text())["causal"]
        assert all(Path(p).is_file() for step in causal.values() for p in step["files"].values())
