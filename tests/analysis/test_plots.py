"""The figures are written, are real PNGs, and survive missing CIs and undefined disparities."""

import copy

import matplotlib.image

from mlalign.analysis.summary import summarize
from mlalign.analysis.plots import make_plots
from mlalign.config import AnalysisConfig


def test_make_plots_writes_both_pngs(reference_stats, ids, tmp_path):
    summary = summarize(reference_stats, "en", AnalysisConfig(bootstrap=50), ids_by_lang=ids, model="tiny",
                        sae="rand")
    paths = make_plots(summary, tmp_path / "plots")
    assert [p.name for p in paths] == ["disparity_heatmap.png", "layer_curves.png"]
    for path in paths:
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 400


def test_plots_tolerate_missing_values(reference_stats, tmp_path):
    summary = summarize(reference_stats, "en", AnalysisConfig(bootstrap=0))
    summary = copy.deepcopy(summary)
    summary["disparity_pct"]["hi"]["2"] = None
    assert all(p.stat().st_size > 0 for p in make_plots(summary, tmp_path))


def test_reference_only_summary_plots_curves_and_no_heatmap(reference_stats, ids, tmp_path):
    summary = summarize({"en": reference_stats["en"]}, "en", AnalysisConfig(bootstrap=20),
                        ids_by_lang={"en": ids["en"]})
    assert not any("than English" in statement for statement in summary["statements"])  # no disparity claims
    paths = make_plots(summary, tmp_path)
    assert [p.name for p in paths] == ["layer_curves.png"] and matplotlib.image.imread(paths[0]).shape[0] > 200
