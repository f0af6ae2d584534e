"""The languages table (code, name, FLORES-200 code, script, resource tier, lm-eval task names), read from config.

The table lives in `conf/languages/default.yaml`; this module is the one place code reads it from. At import it holds
that file; a task run holds the composed `cfg.languages` (with a user's own entries) for as long as the run lasts
(`use_languages`, called by `mlalign.tasks.dispatch`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

from mlalign.errors import UserError

DEFAULT_TABLE_FILE = Path(__file__).resolve().parent.parent / "conf" / "languages" / "default.yaml"
"""The table a run starts from; `languages=<name>` picks another file of the `conf/languages/` group."""

TIERS: tuple[str, ...] = ("reference", "high", "medium_low")
"""Resource tiers as in the study; results are ordered and coloured by them."""

BENCHMARK_KEYS: tuple[str, ...] = ("arc_challenge", "mmlu", "hellaswag", "belebele")
"""The benchmarks an entry's `tasks` may name (the `eval.benchmarks` table)."""

STUDY_LANGS: list[str] = ["zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
"""The nine languages the study compares with English (conf/config.yaml's default `langs`)."""

_FLORES_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_LANG_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HOW_TO_ADD = ("to add a language, give it an entry in conf/languages/default.yaml (name, flores_code, script, tier, "
               "tasks) and sentences in the corpus (README: Adding a language)")


@dataclass(frozen=True)
class Language:
    code: str
    """Short code used everywhere in configs, corpus file names and outputs (`hi`)."""
    name: str
    """English name (`Hindi`)."""
    flores_code: str
    """FLORES-200 code (`hin_Deva`): the folder of data=flores, the dataset config of data=hf, Belebele's suffix."""
    script: str
    """Writing system (`Devanagari`)."""
    tier: str
    """Resource tier as in the study: `reference`, `high` or `medium_low`."""
    tasks: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    """Benchmark (`arc_challenge`, `mmlu`, `hellaswag`, `belebele`) -> lm-eval task name; absent or null where lm-eval
    has none for this language."""


_REQUIRED = tuple(f.name for f in fields(Language) if f.name not in ("code", "tasks"))
_KEYS = (*_REQUIRED, "tasks")


def _language(code: Any, entry: Any) -> Language:
    """One table entry, checked: every mistake is one line that names the entry and what to write instead."""
    if not isinstance(code, str):
        raise UserError(f"language code {code!r} in the languages table is not a string; quote it in the YAML "
                        f"(e.g. 'no': for Norwegian, which YAML reads as false)")
    if not _LANG_CODE.match(code):
        raise UserError(f"language code {code!r} must be letters, digits, '-' or '_' (it names files like {{lang}}.txt)")
    where = f"languages.{code}"
    if not isinstance(entry, Mapping):
        raise UserError(f"{where} must be a mapping with keys {', '.join(_KEYS)}, got {entry!r}")
    unknown = sorted(str(key) for key in entry if key not in _KEYS)
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(_KEYS)}")
    missing = [key for key in _REQUIRED if entry.get(key) in (None, "")]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}; every entry needs {', '.join(_REQUIRED)} "
                        f"(see conf/languages/default.yaml)")
    if entry["tier"] not in TIERS:
        raise UserError(f"{where}.tier is {entry['tier']!r}; use one of {', '.join(TIERS)}")
    if not _FLORES_CODE.match(str(entry["flores_code"])):
        raise UserError(f"{where}.flores_code is {entry['flores_code']!r}, not a FLORES-200 code (language_Script, "
                        f"e.g. ben_Beng)")
    tasks = entry.get("tasks") or {}
    if not isinstance(tasks, Mapping):
        raise UserError(f"{where}.tasks must map benchmarks to lm-eval task names, e.g. "
                        f"{{arc_challenge: arc_{code}, belebele: belebele_{entry['flores_code']}}}")
    wrong = sorted(str(key) for key in tasks if key not in BENCHMARK_KEYS)
    if wrong:
        raise UserError(f"{where}.tasks has unknown benchmark(s) {', '.join(wrong)}; valid are "
                        f"{', '.join(BENCHMARK_KEYS)} (other lm-eval tasks go in eval.tasks)")
    return Language(code, str(entry["name"]), str(entry["flores_code"]), str(entry["script"]), str(entry["tier"]),
                    {str(key): (str(name) if name else None) for key, name in tasks.items()})


def table_from_config(mapping: Any) -> dict[str, Language]:
    """The table from a `languages` config node (a DictConfig or a dict of code -> entry), in its order."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(mapping, DictConfig):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    if not isinstance(mapping, Mapping) or not mapping:
        raise UserError(f"the languages table is empty or not a mapping ({mapping!r}); use languages=default "
                        f"or a file in conf/languages/ with one entry per language")
    table = {}
    for code, entry in mapping.items():
        if code == "defaults":  # a group file's own defaults list, when read without Hydra
            continue
        language = _language(code, entry)
        table[language.code] = language
    return table


def load_table(path: str | Path = DEFAULT_TABLE_FILE) -> dict[str, Language]:
    """The table in a YAML file of the `conf/languages/` group (its own entries; a defaults list is not followed)."""
    from omegaconf import OmegaConf

    return table_from_config(OmegaConf.load(Path(path)))


LANGUAGES: dict[str, Language] = load_table()
"""code -> Language. One dict for the whole process: `use_languages` swaps its contents, so every
`from mlalign.languages import LANGUAGES` sees the run's table."""


@contextlib.contextmanager
def use_languages(mapping: Any) -> Iterator[dict[str, Language]]:
    """Within the block, LANGUAGES is the table of `mapping` (a run's `cfg.languages`); the previous one after it.
    None keeps the current table (a config composed without the group)."""
    if mapping is None:
        yield LANGUAGES
        return
    table = table_from_config(mapping)
    previous = dict(LANGUAGES)
    LANGUAGES.clear()
    LANGUAGES.update(table)
    try:
        yield LANGUAGES
    finally:
        LANGUAGES.clear()
        LANGUAGES.update(previous)


def get_language(code: str) -> Language:
    if code not in LANGUAGES:
        raise UserError(f"unknown language {code!r}; valid codes are {', '.join(LANGUAGES)} (e.g. langs=[hi,mr]); "
                        f"{_HOW_TO_ADD}")
    return LANGUAGES[code]


def resolve_langs(langs, reference_lang: str = "en") -> list[str]:
    """Validate the requested languages and return them with the reference language first, without duplicates."""
    if langs is None or isinstance(langs, str):
        raise UserError(f"langs must be a list of language codes, got {langs!r}; type e.g. langs=[hi,mr]")
    langs = [str(code) for code in langs]
    if not langs:
        raise UserError(
            f"langs is empty; give at least one language, e.g. langs=[hi,mr] (the study's: {', '.join(STUDY_LANGS)})"
        )
    get_language(reference_lang)
    for code in langs:
        get_language(code)
    ordered = [reference_lang] + [code for code in langs if code != reference_lang]
    return list(dict.fromkeys(ordered))


def target_langs(cfg, langs: list[str]) -> list[str]:
    """The languages an adapter is trained to lift: `train.target_langs`, or every analysed language but the reference
    (`cfg.reference_lang`)."""
    reference = str(cfg.reference_lang)
    chosen = cfg.train.get("target_langs")
    if chosen is None:
        return [lang for lang in langs if lang != reference]
    chosen = [str(lang) for lang in chosen]
    outside = [lang for lang in chosen if lang not in langs or lang == reference]
    if outside:
        raise UserError(f"train.target_langs has {outside[0]!r}, which is not among the non-reference langs "
                        f"{[lang for lang in langs if lang != reference]}; add it to langs or drop it")
    return chosen
