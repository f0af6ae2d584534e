"""report.md pieces (mlalign.report) from hand-made inputs."""

from pathlib import Path

from mlalign.analysis.features import adapter_changes_by_band
from mlalign.report import _causal_section, _feature_changes_section


def test_feature_changes_section_shows_the_band_numbers_and_links_the_file(tmp_path):
    cell = {"up": [], "down": [], "total_rise": 2.0, "total_fall": 0.5, "gain_top_k_share": 0.9,
            "gain_specific_share": 0.6, "base_specific_share": 0.1, "turned_on": 3, "turned_off": 1}
    quiet = {**cell, "total_rise": 0.0, "gain_top_k_share": None, "gain_specific_share": None}
    changes = {"hi": {0: cell, 1: dict(cell, gain_top_k_share=0.7), 2: quiet}}
    by_band = adapter_changes_by_band(changes, {"early": [0, 1], "deep": [2]})
    assert by_band["hi"]["early"]["gain_top_k_share"] == 0.8 and by_band["hi"]["early"]["turned_on"] == 6
    assert by_band["hi"]["deep"]["gain_specific_share"] is None  # no rise: no share, not 0
    md = tmp_path / "analysis_adapter" / "feature_changes.md"
    lines = _feature_changes_section(tmp_path, {"md": str(md), "top_k": 10, "by_band": by_band})
    text = "\n".join(lines)
    assert "## Which features the adapter changed" in text and "`analysis_adapter/feature_changes.md`" in text
    assert "| hi | early | 4 | 1 | 0.80 | 0.60 | 0.10 | 6 / 2 |" in text
    assert "| hi | deep | 0 | 0.5 | n/a | n/a | n/a | 3 / 1 |" in text
    assert _feature_changes_section(Path("."), None) == []


def test_causal_section_lists_each_models_files_and_verdicts(tmp_path):
    def causal(folder, verdict):
        d = tmp_path / folder
        return {"ablation": {"statements": [verdict], "files": {"json": str(d / "ablation.json")}},
                "dashboard": {"files": {"html": str(d / "feature_dashboard.html")}}}

    before = {"causal": causal("analysis_base", "Hindi (hi): not shown")}
    after = {"causal": causal("analysis_adapter", "Hindi (hi): these are Hindi's features")}
    text = "\n".join(_causal_section(tmp_path, before, after))
    base, adapted = text.index("**base model**"), text.index("**base + adapter**")
    assert base < text.index("`analysis_base/ablation.json`") < text.index("- Hindi (hi): not shown") < adapted
    assert adapted < text.index("`analysis_adapter/feature_dashboard.html`") < text.index("- Hindi (hi): these are")
    assert _causal_section(tmp_path, {}, {"causal": {}}) == []  # steps off: no section
