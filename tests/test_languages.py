import pytest

from mlalign.errors import UserError
from mlalign.languages import LANGUAGES, STUDY_LANGS, resolve_langs


def test_table_matches_the_study_tiers():
    assert [c for c, lang in LANGUAGES.items() if lang.tier == "high"] == ["zh", "ru", "es", "it"]
    assert [c for c, lang in LANGUAGES.items() if lang.tier == "medium_low"] == ["id", "ca", "mr", "ml", "hi"]
    assert STUDY_LANGS == ["zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
    assert LANGUAGES["hi"].flores_code == "hin_Deva" and LANGUAGES["ml"].script == "Malayalam"


def test_reference_first_and_deduplicated():
    assert resolve_langs(["hi", "en", "mr", "hi"], "en") == ["en", "hi", "mr"]


@pytest.mark.parametrize("langs, needle", [(["xx"], "unknown language 'xx'"), ([], "langs is empty"), ("hi", "must be a list")])
def test_bad_languages_are_user_errors(langs, needle):
    with pytest.raises(UserError, match=needle) as err:
        resolve_langs(langs, "en")
    assert "\n" not in str(err.value)
