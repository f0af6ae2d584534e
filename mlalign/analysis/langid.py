"""Offline language identification of generated text (py3langid), over the languages table's languages.

py3langid (a numpy port of langid.py, Lui & Baldwin 2012) knows every language of conf/languages/default.yaml,
Malayalam and Marathi included; lingua-language-detector has no Malayalam. Its full label set also holds close
varieties the bundled corpus never contains (Wu Chinese, Malay), which take a few percent of the bundled Chinese and
Indonesian lines; closed over the languages table (`candidates`) it labels at least 95% of each language's bundled
lines correctly (tests/analysis/test_langid.py; the measured table: experiments/langid_check/accuracy.json).
"""

from __future__ import annotations

from functools import lru_cache

from mlalign.errors import UserError

UNDETERMINED = "und"
"""The label of a text with no letter in it (empty, digits, punctuation): no language to identify."""


@lru_cache(maxsize=8)
def _identifier(candidates: tuple[str, ...]):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    unknown = sorted(set(candidates) - set(identifier.labels))
    if unknown:
        raise UserError(f"the language identifier (py3langid) does not know {', '.join(unknown)}; steering can only "
                        "measure languages it knows (its labels are ISO 639-1 codes)")
    identifier.set_languages(list(candidates))
    return identifier


def table_candidates() -> tuple[str, ...]:
    """The languages table's codes (conf/languages/): the closed set texts are identified among."""
    from mlalign.languages import load_table

    return tuple(load_table())


def identify(texts: list[str], candidates: tuple[str, ...] | None = None) -> list[str]:
    """The language code of each text among `candidates` (default: the languages table), or `UNDETERMINED` where a text
    has no letter."""
    identifier = _identifier(tuple(candidates or table_candidates()))
    return [identifier.classify(text)[0] if any(ch.isalpha() for ch in text) else UNDETERMINED for text in texts]
