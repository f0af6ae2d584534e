"""The language identifier of steering (mlalign/analysis/langid.py) on the bundled corpus's own sentences: the share
of each language's lines it labels correctly, closed over the languages table (what steering uses) and over all of
py3langid's labels. Writes experiments/langid_check/accuracy.json; `table()` is docs/method.md's table.

    HF_HUB_OFFLINE=1 python experiments/langid_check/check.py
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "accuracy.json"
LANGS = ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]


def measure(candidates: tuple[str, ...] | None) -> dict:
    from mlalign.analysis.langid import identify
    from mlalign.data.corpus import load_flores

    corpus = load_flores(LANGS, "all")
    out = {}
    for lang in LANGS:
        labels = identify(corpus[lang], candidates)
        wrong = Counter(label for label in labels if label != lang)
        out[lang] = {"lines": len(labels), "correct_pct": 100 * (len(labels) - sum(wrong.values())) / len(labels),
                     "confused_with": dict(wrong.most_common(3))}
    return out


def table() -> str:
    """docs/method.md §8c: per language, the share of its bundled lines labelled correctly."""
    result = json.loads(RESULT.read_text())
    rows = ["| language | lines | correct, languages table (used) | correct, all py3langid labels |",
            "| --- | --- | --- | --- |"]
    for lang in LANGS:
        closed, open_ = result["table"][lang], result["all_labels"][lang]
        rows.append(f"| {lang} | {closed['lines']} | {closed['correct_pct']:.1f}% | {open_['correct_pct']:.1f}%"
                    + (f" ({', '.join(open_['confused_with'])})" if open_["confused_with"] else "") + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    all_labels = tuple(LanguageIdentifier.from_model_file(MODEL_FILE).labels)
    from mlalign.analysis.langid import table_candidates

    result = {"identifier": "py3langid==0.4.0", "corpus": "bundled FLORES-200, splits train+dev+test",
              "table": measure(table_candidates()), "all_labels": measure(all_labels)}
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(table())
