"""The languages table: read from conf/languages/, the study's ten unchanged, checked entries, a run's own table."""

import pytest

from mlalign.errors import UserError
from mlalign.languages import (DEFAULT_TABLE_FILE, LANGUAGES, STUDY_LANGS, TIERS, Language, load_table, resolve_langs,
                               table_from_config, use_languages)
from tests.helpers import CONF_DIR, compose_cfg

STUDY_TABLE = [
    ("en", "English", "eng_Latn", "Latin", "reference"),
    ("zh", "Chinese (Simplified)", "zho_Hans", "Han", "high"),
    ("ru", "Russian", "rus_Cyrl", "Cyrillic", "high"),
    ("es", "Spanish", "spa_Latn", "Latin", "high"),
    ("it", "Italian", "ita_Latn", "Latin", "high"),
    ("id", "Indonesian", "ind_Latn", "Latin", "medium_low"),
    ("ca", "Catalan", "cat_Latn", "Latin", "medium_low"),
    ("mr", "Marathi", "mar_Deva", "Devanagari", "medium_low"),
    ("ml", "Malayalam", "mal_Mlym", "Malayalam", "medium_low"),
    ("hi", "Hindi", "hin_Deva", "Devanagari", "medium_low"),
]
"""The table as it was hard-coded before it moved to config: the study's ten, in this order."""

BENGALI = {"name": "Bengali", "flores_code": "ben_Beng", "script": "Bengali", "tier": "medium_low"}


def test_the_study_languages_keep_their_values_and_order():
    assert [(c, lang.name, lang.flores_code, lang.script, lang.tier) for c, lang in LANGUAGES.items()][:10] == STUDY_TABLE
    assert STUDY_LANGS == [row[0] for row in STUDY_TABLE if row[4] != "reference"]
    assert list(compose_cfg().langs) == STUDY_LANGS  # the default `langs` are the study's nine


def test_table_comes_from_the_config_group_and_adds_okapi_belebele_languages():
    assert DEFAULT_TABLE_FILE == CONF_DIR / "languages" / "default.yaml"
    assert load_table() == LANGUAGES == table_from_config(compose_cfg().languages)
    bn = LANGUAGES["bn"]
    assert (bn.flores_code, bn.script, bn.tier) == ("ben_Beng", "Bengali", "medium_low")
    assert dict(bn.tasks) == {"arc_challenge": "arc_bn", "mmlu": "m_mmlu_bn", "hellaswag": "hellaswag_bn",
                              "belebele": "belebele_ben_Beng"}
    assert {"ar", "vi", "de", "fr"} <= set(LANGUAGES)
    assert "hellaswag" not in LANGUAGES["zh"].tasks  # Okapi has no Chinese HellaSwag
    assert len({lang.flores_code for lang in LANGUAGES.values()}) == len(LANGUAGES)


def test_tiers_are_the_ones_results_are_ordered_by():
    from mlalign.analysis.summary import TIER_ORDER

    assert TIERS == TIER_ORDER
    assert {lang.tier for lang in LANGUAGES.values()} == set(TIERS)


def test_reference_first_and_deduplicated():
    assert resolve_langs(["hi", "en", "mr", "hi"], "en") == ["en", "hi", "mr"]
    assert resolve_langs(["bn"], "en") == ["en", "bn"]  # refused while the table was the fixed ten


@pytest.mark.parametrize("langs, needle", [(["xx"], "unknown language 'xx'"), ([], "langs is empty"), ("hi", "must be a list")])
def test_bad_languages_are_user_errors(langs, needle):
    with pytest.raises(UserError, match=needle) as err:
        resolve_langs(langs, "en")
    assert "\n" not in str(err.value)


def test_unknown_language_names_the_known_codes_and_how_to_add_one():
    with pytest.raises(UserError) as err:
        resolve_langs(["sw"], "en")
    message = str(err.value)
    assert "valid codes are en, zh," in message and ", bn" in message
    assert "conf/languages/default.yaml" in message and "corpus" in message


def test_a_run_table_replaces_the_table_for_its_duration_only():
    run_table = {"en": dict(BENGALI, name="English", flores_code="eng_Latn", script="Latin", tier="reference"),
                 "sw": dict(BENGALI, name="Swahili", flores_code="swh_Latn", script="Latin")}
    before = dict(LANGUAGES)
    with use_languages(run_table):
        assert list(LANGUAGES) == ["en", "sw"] and LANGUAGES["sw"].tasks == {}
        assert resolve_langs(["sw"]) == ["en", "sw"]
        with pytest.raises(UserError, match="unknown language 'hi'"):
            resolve_langs(["hi"])
    assert LANGUAGES == before


def test_a_user_file_extends_the_default_table(tmp_path):
    # What README "Adding a language" describes: conf/languages/<name>.yaml with the default table as its defaults.
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, conf)
    (conf / "languages" / "mine.yaml").write_text(
        "defaults:\n  - default\n  - _self_\n"
        "sw: {name: Swahili, flores_code: swh_Latn, script: Latin, tier: medium_low, "
        "tasks: {belebele: belebele_swh_Latn}}\n", encoding="utf-8")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["languages=mine"])
    table = table_from_config(cfg.languages)
    assert list(table)[:10] == [row[0] for row in STUDY_TABLE] and list(table)[-1] == "sw"
    assert table["sw"] == Language("sw", "Swahili", "swh_Latn", "Latin", "medium_low", {"belebele": "belebele_swh_Latn"})
    # ... and one language from the command line.
    cfg = compose_cfg(["+languages.sw={name:Swahili,flores_code:swh_Latn,script:Latin,tier:medium_low}"])
    assert table_from_config(cfg.languages)["sw"].flores_code == "swh_Latn"


@pytest.mark.parametrize("entry, needle", [
    ({**BENGALI, "flores": "ben_Beng"}, "unknown key\\(s\\) flores"),
    ({k: v for k, v in BENGALI.items() if k != "script"}, "lacks script"),
    ({**BENGALI, "tier": "low"}, "tier is 'low'; use one of reference, high, medium_low"),
    ({**BENGALI, "flores_code": "bn"}, "not a FLORES-200 code"),
    ({**BENGALI, "tasks": {"arc": "arc_bn"}}, "unknown benchmark\\(s\\) arc"),
    ("Bengali", "must be a mapping"),
])
def test_bad_entries_are_one_line_user_errors(entry, needle):
    with pytest.raises(UserError, match=needle) as err:
        table_from_config({"bn": entry})
    assert "languages.bn" in str(err.value) and "\n" not in str(err.value)


def test_a_yaml_boolean_code_says_to_quote_it():
    with pytest.raises(UserError, match="quote it"):
        table_from_config({False: BENGALI})
