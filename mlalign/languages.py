"""The study's languages: one table of code, name, FLORES-200 code, script and resource tier."""

from dataclasses import dataclass

from mlalign.errors import UserError


@dataclass(frozen=True)
class Language:
    code: str
    """Short ISO 639-1 code used everywhere in configs and outputs (`hi`)."""
    name: str
    flores_code: str
    """FLORES-200 code (`hin_Deva`), which names the corpus folder."""
    script: str
    tier: str
    """Resource tier as in the study: `reference`, `high` or `medium_low`."""


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        Language("en", "English", "eng_Latn", "Latin", "reference"),
        Language("zh", "Chinese (Simplified)", "zho_Hans", "Han", "high"),
        Language("ru", "Russian", "rus_Cyrl", "Cyrillic", "high"),
        Language("es", "Spanish", "spa_Latn", "Latin", "high"),
        Language("it", "Italian", "ita_Latn", "Latin", "high"),
        Language("id", "Indonesian", "ind_Latn", "Latin", "medium_low"),
        Language("ca", "Catalan", "cat_Latn", "Latin", "medium_low"),
        Language("mr", "Marathi", "mar_Deva", "Devanagari", "medium_low"),
        Language("ml", "Malayalam", "mal_Mlym", "Malayalam", "medium_low"),
        Language("hi", "Hindi", "hin_Deva", "Devanagari", "medium_low"),
    ]
}

STUDY_LANGS: list[str] = [code for code, lang in LANGUAGES.items() if lang.tier != "reference"]


def get_language(code: str) -> Language:
    if code not in LANGUAGES:
        raise UserError(
            f"unknown language {code!r}; valid codes are {', '.join(LANGUAGES)} (e.g. langs=[hi,mr])"
        )
    return LANGUAGES[code]


def resolve_langs(langs, reference_lang: str = "en") -> list[str]:
    """Validate the requested languages and return them with the reference language first, without duplicates."""
    if langs is None or isinstance(langs, str):
        raise UserError(f"langs must be a list of language codes, got {langs!r}; type e.g. langs=[hi,mr]")
    langs = [str(code) for code in langs]
    if not langs:
        raise UserError(
            f"langs is empty; give at least one language, e.g. langs=[hi,mr] (valid: {', '.join(STUDY_LANGS)})"
        )
    get_language(reference_lang)
    for code in langs:
        get_language(code)
    ordered = [reference_lang] + [code for code in langs if code != reference_lang]
    return list(dict.fromkeys(ordered))
