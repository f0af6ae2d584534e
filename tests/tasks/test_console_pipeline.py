"""A short task=pipeline on the testbed, through run.py as a user starts it: the console tells the story (each stage's
start and end with its wall time, the closing block with the headline and the paths) and none of the other
libraries' chatter, which is in run.log instead; the W&B offline run's summary holds the headline names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.wandb_offline import offline_summary

PIPELINE = ["task=pipeline", "model=testbed", "eval=bundled", "langs=[hi]", "layers=[1,4]", "data.max_sentences=48",
            "data.max_length=48", "train.max_length=48", "train.batch_size=8", "train.max_steps=4",
            "train.save_every=0", "train.eval_every=0", "analysis.bootstrap=20", "analysis.batch_size=48",
            "eval.limit=8", "eval.batch_size=8", "eval.bootstrap=200", "logger=wandb"]

STAGES = ["[1/4] analysing the base model", "[2/4] training the adapter", "[3/4] analysing base + adapter",
          "[4/4] evaluating base vs adapter", "loading model testbed", "loading 2 SAE(s) (testbed)",
          "training the adapter (4 steps", "measuring base vs adapter on the dev split",
          "measuring base vs adapter on the test split", "evaluating the base model on 4 lm-eval task(s)",
          "evaluating base + adapter"]

CHATTER = ["Truncating", "wandb: Run summary", "wandb: Run history", "is_gradient_checkpointing",
           "Setting random seed", "`pretrained` model kwarg is not of type", "[INFO]", "[WARNING]"]
"""Other libraries' messages: in run.log, not on the console."""
BARS_OFF = ["Generating test split", "Map:", "Map (num_proc"]
"""datasets' progress bars: off altogether (lm-eval builds a dataset per task and side)."""


@pytest.fixture(scope="module")
def pipeline_run(testbed_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("console") / "run"
    d = Path(testbed_dir)
    result = run_cli([*PIPELINE, f"model.hf_id={d / 'model'}", f"sae.path_template='{d}/saes/layer_{{layer}}'",
                      f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}"],
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_dir


def _lines(text: str) -> list[str]:
    """Non-blank lines. run_cli reads text with universal newlines, so every redrawn state of a progress bar is a
    line here: whether a bar vanishes when done (leave=False) is not visible, only which bars were drawn."""
    return [line for line in text.splitlines() if line.strip()]


def _is_bar(line: str) -> bool:
    return "%|" in line and "/s" in line


@pytest.mark.slow
def test_console_has_every_stage_and_the_closing_block(pipeline_run):
    result, run_dir = pipeline_run
    out = result.stdout
    for title in STAGES:
        starts = [line for line in out.splitlines() if line.strip().startswith(title) and line.endswith(" ...")]
        ends = [line for line in out.splitlines() if line.strip().startswith(title) and ": done in " in line]
        if title.startswith("loading"):  # their own progress bars show them running: the end line only
            assert ends and not starts, (title, out)
        else:
            assert starts and len(starts) == len(ends), (title, out)
    closing = out[out.index("task=pipeline finished in"):]
    assert "report:" in closing and str(run_dir / "report.md") in closing
    assert "analysis_base/ disparity_heatmap.png" in closing and "train/ activation_before_after.png" in closing
    assert str(run_dir / "run.log") in closing and "wandb sync" in closing
    assert "- hi: " in closing and "English: retention" in closing and "disparity vs en" in closing
    assert "arc_challenge: base acc" in closing


@pytest.mark.slow
def test_console_has_none_of_the_libraries_chatter_which_is_in_run_log(pipeline_run):
    result, run_dir = pipeline_run
    shown = _lines(result.stdout) + _lines(result.stderr)
    for needle in BARS_OFF:
        assert not [line for line in shown if needle in line], (needle, result.stderr)
    messages = [line for line in shown if not _is_bar(line)]
    for needle in CHATTER:
        assert not [line for line in messages if needle in line], (needle, result.stdout, result.stderr)
    assert not [line for line in shown if line.startswith("wandb:")], result.stderr
    log = (run_dir / "run.log").read_text()
    assert "[lm_eval." in log and "Running loglikelihood requests" in log  # held back, not lost
    assert "[1/4] analysing the base model: done in" in log  # the stage lines are in the log too


@pytest.mark.slow
def test_wandb_summary_holds_the_headline_names(pipeline_run):
    _, run_dir = pipeline_run
    summary = offline_summary(run_dir)
    expected = [
        # train (dev drives sweeps; test reported once)
        "alignment_score", "dev_activation_gain_pct_hi", "dev_norm_matched_gain_pct_hi", "dev_fvu_ratio_hi",
        "dev_fvu_ratio_en", "dev_english_retention_pct", "dev_all_valid", "test/hi/gain_pct", "test/hi/valid",
        "dev/hi/fvu_ratio", "test/english_retention_pct",
        # analysis before and after, per language and per band x language
        "before_disparity_pct_hi", "after_disparity_pct_hi", "before_band_early_disparity_pct_hi",
        "after_band_early_disparity_pct_hi", "before_mean_disparity_pct",
        # eval
        "mean_diff_acc", "arc_challenge/mean_diff_acc", "arc_challenge/hi/diff_acc", "n_significant", "n_tests",
    ]
    missing = [key for key in expected if key not in summary]
    assert not missing, (missing, sorted(summary))


@pytest.mark.slow
def test_report_says_which_features_the_adapter_changed(pipeline_run):
    """The adapter view (docs/method.md §8) through the pipeline: feature_changes.md/json beside the adapted analysis,
    its key numbers in report.md, its path in the closing block."""
    import json

    result, run_dir = pipeline_run
    changes = json.loads((run_dir / "analysis_adapter" / "feature_changes.json").read_text())
    assert set(changes) == {"hi", "en"} and set(changes["hi"]) == {"1", "4"}
    report = (run_dir / "report.md").read_text()
    assert "## Which features the adapter changed" in report and "`analysis_adapter/feature_changes.md`" in report
    assert "| hi | early |" in report and "| en | early |" in report
    # The base model's per-layer table, starred after Holm (docs/method.md §7), with the legend under it.
    assert "## Disparity vs en per layer (base model, %)\n\n| lang | 1 | 4 |" in report
    assert "Holm's correction across the" in report or "No stars: no p-values" in report
    summary = json.loads((run_dir / "analysis_adapter" / "summary.json").read_text())
    assert set(summary["feature_changes"]["by_band"]) == {"hi", "en"}
    assert str(run_dir / "analysis_adapter" / "feature_changes.md") in result.stdout


@pytest.mark.slow
def test_each_model_runs_over_the_test_split_once(pipeline_run):
    """Step 1's analysis pass over the test split also records the base side of step 2's paired pass: step 2 measures
    the base model on the dev split only; step 2's adapted side on the test split is the adapted model's analysis pass,
    which step 3 reuses (docs/training.md#what-is-measured-where)."""
    result, run_dir = pipeline_run
    out = result.stdout
    analysing = [line.strip() for line in out.splitlines() if "analyzing " in line and line.endswith(" ...")]
    assert analysing == ["analyzing 2 language(s) x 2 layer(s) ...",  # step 1: base
                         "base + adapter: analyzing 2 language(s) x 2 layer(s) ..."], out  # step 2 (test split)
    step3 = out[out.index("[3/4] analysing base + adapter ..."):out.index("[4/4] evaluating base vs adapter ...")]
    assert "all 2 x 2 (language, layer) results were computed in step 2's pass over the same sentences" in step3
    assert "base model: recorded in step 1's analysis pass over the same sentences (2 language(s) x 2 layer(s))" in out
    measuring = [line for line in out.splitlines() if line.strip().startswith("base model: measuring") and
                 line.endswith(" ...")]
    assert len(measuring) == 1, out  # dev
    dev = out.index("measuring base vs adapter on the dev split")
    test = out.index("measuring base vs adapter on the test split")
    assert dev < out.index("base model: measuring") < test < out.index("base model: recorded in step 1")
    # Cached for a later train or sweep job: (dev, test) x (hi, en) x 2 layers.
    assert len(list((run_dir.parent / "cache" / "paired_base").rglob("*.npz"))) == 8
