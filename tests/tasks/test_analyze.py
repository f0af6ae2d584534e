"""task=analyze on the testbed: all layers x all languages, the files it promises, and the cache across runs."""

import csv
import json

import pytest

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import run_cli

ALL = "[zh,ru,es,it,id,ca,mr,ml,hi]"


@pytest.mark.slow
def test_all_layers_and_languages_then_one_more_language_from_cache(testbed_dir, testbed_cache_dir, tmp_path):
    common = ["task=analyze", "model=testbed", "data.max_sentences=24", "analysis.bootstrap=50",
              f"paths.cache_dir={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES]
    # The small testbed lives in the session cache; link it so this test's own analysis cache starts empty.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")
    first = run_cli([*common, "langs=[hi,mr]"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert "analyzing 3 language(s) x 26 layer(s)" in first.stdout
    second = run_cli([*common, f"langs={ALL}"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "analyzing 7 language(s) x 26 layer(s) (78 (language, layer) results from the cache)" in second.stdout
    run_dir = sorted((tmp_path / "outputs" / "analyze").iterdir())[-1]
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["layers"] == list(range(26)) and len(summary["langs"]) == 10
    assert summary["reference_lang"] == "en" and summary["metric"] == "mean_act"
    assert all(summary["disparity_pct"]["en"][str(layer)] == 0 for layer in range(26))
    low, high = summary["disparity_ci"]["hi"]["3"]
    assert low <= summary["disparity_pct"]["hi"]["3"] <= high
    assert summary["statements"] and set(summary["bands"]) == {"early", "middle", "deep"}
    with (run_dir / "analysis" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["metric"] for r in rows} >= {"mean_act", "l1", "l0", "feature_coverage", "fvu", "resid_norm", "disparity_pct"}
    assert len({(r["lang"], r["layer"]) for r in rows}) == 260
    for name in ("disparity_heatmap.png", "layer_curves.png"):
        assert (run_dir / "analysis" / name).stat().st_size > 10_000
    assert (run_dir / "COMPLETE").is_file()
    # Which features (docs/method.md §8): the contract scripts read.
    with (run_dir / "analysis" / "features.csv").open() as handle:
        features = list(csv.DictReader(handle))
    assert {"lang", "layer", "feature", "firing_rate", "mean_act", "selectivity"} <= set(features[0])
    assert {r["lang"] for r in features} == set(summary["langs"]) and {int(r["layer"]) for r in features} == set(range(26))
    assert all(0 <= float(r["selectivity"]) <= 1 for r in features if r["selectivity"])
    listed = [r for r in features if r["listed"] and r["lang"] != "en" and ("under" in r["listed"] or "over" in r["listed"])]
    assert listed and all(float(r["diff_ci_low"]) <= float(r["diff_vs_reference"]) <= float(r["diff_ci_high"]) for r in listed)
    assert all(r["neuronpedia_url"] == "" for r in features)  # the testbed's local SAEs have no Neuronpedia id
    overlap = json.loads((run_dir / "analysis" / "feature_overlap.json").read_text())
    assert set(overlap) == {str(layer) for layer in range(26)}
    for by_lang in overlap.values():
        assert all(by_lang[lang][lang] == 1.0 for lang in by_lang)
        assert all(0 <= v <= 1 for row in by_lang.values() for v in row.values())
    top = (run_dir / "analysis" / "features_top.md").read_text()
    assert "## hi" in top and "under-active vs en" in top
    for name in ("feature_overlap.png", "selective_features.png"):
        assert (run_dir / "analysis" / name).stat().st_size > 10_000
    # The same numbers whether they came from the cache or not.
    first_dir = sorted((tmp_path / "outputs" / "analyze").iterdir())[0]
    before = json.loads((first_dir / "analysis" / "summary.json").read_text())
    assert before["values"]["hi"] == summary["values"]["hi"]
    # The position-matched window (docs/method.md §1): one cap, English's, for the cached languages and the new ones.
    assert before["position_cap"] == summary["position_cap"] and isinstance(summary["position_cap"], int)
    matched = summary["disparity_pct_position_matched"]
    assert set(matched) == set(summary["langs"]) and all(len(matched[lang]) == 26 for lang in matched)
    assert before["disparity_pct_position_matched"]["hi"] == matched["hi"]
    kept = summary["n_tokens_position_matched"]
    assert all(0 < kept[lang] <= summary["n_tokens"][lang] for lang in summary["langs"])
    assert kept["en"] >= 0.9 * summary["n_tokens"]["en"]
    # summary.md: the tables starred after Holm; 50 resamples over ~234 cells cannot reach a star, and it says so.
    report = (run_dir / "analysis" / "summary.md").read_text()
    n_cells = sum(p is not None for by_layer in summary["disparity_p_holm"].values() for p in by_layer.values())
    assert n_cells > 100 and f"Holm's correction across the {n_cells} cells" in report
    assert "## Disparity vs en (token aggregate)" in report
    assert "no cell can reach `*`" in report and f"positions <= {summary['position_cap']}" in report


@pytest.mark.slow
@pytest.mark.slow
def test_norm_matched_pass_removes_the_testbeds_planted_scale_gap_and_is_cached(testbed_dir, testbed_cache_dir,
                                                                               tmp_path):
    """The testbed plants hi's gap as residual scale (its norm pushed to ~80% of English's at every layer): norm-matched
    (docs/method.md §1c), most of the deficit goes. A rerun reads the pass from the cache, with the same numbers."""
    common = ["task=analyze", "model=testbed", "langs=[hi,es]", "layers=[3,20]", "data.max_sentences=24",
              "analysis.bootstrap=50", "analysis.features.enabled=false", "analysis.norm_matched=true",
              f"paths.cache_dir={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")
    first = run_cli(common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "norm-matched pass: 3 language(s) x 2 layer(s)" in first.stdout
    second = run_cli(common)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "norm-matched: all 3 x 2 (language, layer) results come from the cache" in second.stdout
    runs = sorted((tmp_path / "outputs" / "analyze").iterdir())
    before, summary = (json.loads((run / "analysis" / "summary.json").read_text()) for run in runs)
    raw, matched = summary["disparity_pct"], summary["disparity_pct_norm_matched"]
    assert matched == before["disparity_pct_norm_matched"]
    assert summary["norm_matched_centre"] == "sae_b_dec" and set(summary["norm_matched_target"]) == {"3", "20"}
    for layer in ("3", "20"):
        assert matched["en"][layer] == 0
        assert raw["hi"][layer] < -10 and matched["hi"][layer] > raw["hi"][layer] + 15, (raw["hi"], matched["hi"])
        for lang in ("hi", "es"):
            low, high = summary["disparity_ci_norm_matched"][lang][layer]
            assert low <= matched[lang][layer] <= high
    assert "## Norm-matched" in (runs[-1] / "analysis" / "summary.md").read_text()


def test_text_dir_corpus_missing_a_language_is_one_line(testbed_dir, testbed_cache_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "en.txt").write_text("Hello there.\nGood morning.\n", encoding="utf-8")
    result = run_cli(["task=analyze", "model=testbed", "langs=[hi]", "data=text_dir", f"data.path={tmp_path / 'corpus'}",
                      f"paths.cache_dir={testbed_cache_dir}", f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: corpus directory") and "hi.txt" in result.stderr


def identity_adapter(testbed_dir, out_dir):
    """A peft LoRA adapter as initialised (B = 0): it changes no weight, so no SAE feature may change."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(testbed_dir / "model")
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    lora.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_adapter_view_with_the_base_from_the_cache(testbed_dir, testbed_cache_dir, tmp_path):
    """task=analyze adapter=DIR also writes which features the adapter changed, against the base model's statistics
    taken from the analysis cache an earlier base run filled; an identity adapter changes none."""
    common = ["task=analyze", "model=testbed", "data.max_sentences=24", "analysis.bootstrap=20", "langs=[hi]",
              "layers=[1,4,7]", f"paths.cache_dir={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}",
              *SMALL_TESTBED_OVERRIDES]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")
    base = run_cli(common)
    assert base.returncode == 0, base.stderr[-2000:]
    adapter = identity_adapter(testbed_dir, tmp_path / "identity")
    result = run_cli([*common, f"adapter={adapter}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "base model: all 2 x 3 (language, layer) results come from the cache" in result.stdout
    assert "analyzing 2 language(s) x 3 layer(s)" in result.stdout  # the adapted model: a new cache key
    run_dir = sorted((tmp_path / "outputs" / "analyze").iterdir())[-1]
    changes = json.loads((run_dir / "analysis" / "feature_changes.json").read_text())
    assert set(changes) == {"hi", "en"} and set(changes["hi"]) == {"1", "4", "7"}
    for by_layer in changes.values():
        for cell in by_layer.values():
            assert cell["up"] == [] and cell["down"] == [] and cell["total_rise"] == 0 == cell["total_fall"]
            assert cell["turned_on"] == 0 == cell["turned_off"]
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["feature_changes"]["md"].endswith("feature_changes.md")
    assert all(row["turned_on"] == 0 for row in summary["feature_changes"]["by_band"]["hi"].values())
    text = (run_dir / "analysis" / "feature_changes.md").read_text()
    assert "# Which features the adapter changed" in text and "## hi" in text and ", raised**" not in text
    assert "No feature counting in either model changed" in text
    assert "feature changes:" in result.stdout
