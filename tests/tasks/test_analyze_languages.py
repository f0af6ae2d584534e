"""task=analyze beyond the study's ten: a language from the table (bn) and one added on the command line (sw), each with
its own corpus, on the testbed; and the one error line when the corpus has no sentences for a language."""

import json

import pytest

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import run_cli

ENGLISH = ["I eat rice.", "She reads a book.", "The sky is blue.", "It will rain today.", "We go to school.",
           "The river is big.", "He sings songs.", "The market opens early.", "My brother works here.",
           "The tea is hot."]
BENGALI = ["আমি ভাত খাই।", "সে বই পড়ে।", "আকাশ নীল।", "আজ বৃষ্টি হবে।", "আমরা স্কুলে যাই।", "নদীটি বড়।", "তিনি গান গান।",
           "বাজার সকালে খোলে।", "আমার ভাই এখানে কাজ করে।", "চা গরম।"]
SWAHILI = ["Ninakula wali.", "Anasoma kitabu.", "Anga ni la buluu.", "Mvua itanyesha leo.", "Tunakwenda shuleni.",
           "Mto ni mkubwa.", "Anaimba nyimbo.", "Soko hufunguliwa mapema.", "Kaka yangu anafanya kazi hapa.",
           "Chai ni moto."]
SWAHILI_ENTRY = "+languages.sw={name:Swahili,flores_code:swh_Latn,script:Latin,tier:medium_low}"


def _common(testbed_cache_dir, tmp_path):
    (tmp_path / "cache").mkdir(exist_ok=True)
    if not (tmp_path / "cache" / "testbed").exists():  # the session's small testbed, this test's own analysis cache
        (tmp_path / "cache" / "testbed").symlink_to(testbed_cache_dir / "testbed")
    return ["task=analyze", "model=testbed", "layers=[0,3]", "analysis.bootstrap=20", "analysis.features.enabled=false",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}", *SMALL_TESTBED_OVERRIDES]


@pytest.mark.slow
def test_a_table_language_and_a_command_line_language_are_analysed_from_their_corpus(testbed_dir, testbed_cache_dir,
                                                                                    tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for code, lines in {"en": ENGLISH, "bn": BENGALI, "sw": SWAHILI}.items():
        (corpus / f"{code}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli([*_common(testbed_cache_dir, tmp_path), "data=text_dir", f"data.path={corpus}", "langs=[bn,sw]",
                      SWAHILI_ENTRY])
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = sorted((tmp_path / "outputs" / "analyze").iterdir())[-1]
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    assert summary["langs"] == ["en", "bn", "sw"] and summary["layers"] == [0, 3]
    for lang in ("bn", "sw"):
        assert set(summary["disparity_pct"][lang]) == {"0", "3"}
        assert all(value == value for value in summary["disparity_pct"][lang].values())  # numbers, not NaN
    # The run's table (with sw) reached the tier-aware summary: both are named as medium-to-low resource languages.
    assert any(s.startswith("Medium-to-low resource languages (bn, sw)") for s in summary["statements"])
    report = json.loads((run_dir / "corpus.json").read_text())
    assert report["langs_used"] == ["en", "bn", "sw"] and report["langs"]["sw"]["kept"] == 10
    # Without its entry, sw is refused with the way to add it.
    refused = run_cli([*_common(testbed_cache_dir, tmp_path), "data=text_dir", f"data.path={corpus}", "langs=[sw]"])
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown language 'sw'") and "conf/languages/default.yaml" in last


@pytest.mark.slow
def test_a_language_the_bundled_corpus_lacks_is_one_error_line(testbed_dir, testbed_cache_dir, tmp_path):
    result = run_cli([*_common(testbed_cache_dir, tmp_path), "langs=[bn]"])
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the flores corpus at") and "has no bn" in lines[0], lines
    assert "data=hf" in lines[0] and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("summary.json"))
