"""Load parallel sentences per language and split from the bundled FLORES-200 copy or a user's text directory."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlalign.errors import UserError
from mlalign.languages import get_language

BUNDLED_DATA_DIR = Path(__file__).resolve().parent
FLORES_DIR = BUNDLED_DATA_DIR / "flores200"
FLORES_SPLITS = ("train", "dev", "test")


@dataclass
class ParallelCorpus:
    """Sentences per language for one split; `ids[i]` names row i, and rows with equal ids are translations."""

    split: str
    sentences: dict[str, list[str]]
    ids: dict[str, list[str]]

    @property
    def langs(self) -> list[str]:
        return list(self.sentences)

    def __getitem__(self, lang: str) -> list[str]:
        return self.sentences[lang]

    def aligned(self, lang_a: str, lang_b: str) -> list[tuple[str, str]]:
        """Pairs (sentence in lang_a, its translation in lang_b), matched by id."""
        index_b = dict(zip(self.ids[lang_b], self.sentences[lang_b]))
        return [(s, index_b[i]) for i, s in zip(self.ids[lang_a], self.sentences[lang_a]) if i in index_b]


def _read_flores_split(lang: str, split: str, root: Path) -> tuple[list[str], list[str]]:
    path = root / get_language(lang).flores_code / f"{split}.tsv"
    if not path.is_file():
        raise UserError(f"FLORES-200 file {path} is missing; point data.path at a copy of the bundled flores200 folder")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    rows.sort(key=lambda row: int(row["index_id"]))
    return [row["text"] for row in rows], [row["index_id"] for row in rows]


def load_flores(langs: list[str], split: str, path: str | None = None, max_sentences: int | None = None) -> ParallelCorpus:
    """FLORES-200 (via SIB-200): 701/99/204 sentences per language in splits train/dev/test, aligned by index_id.

    `split` may join splits with `+` (e.g. `dev+test`).
    """
    root = Path(path) if path else FLORES_DIR
    parts = split.split("+")
    for part in parts:
        if part not in FLORES_SPLITS:
            raise UserError(f"unknown FLORES split {part!r}; use one of {', '.join(FLORES_SPLITS)} or join them with '+'")
    sentences, ids = {}, {}
    for lang in langs:
        texts, index_ids = [], []
        for part in parts:
            t, i = _read_flores_split(lang, part, root)
            texts += t
            index_ids += i
        sentences[lang], ids[lang] = texts[:max_sentences], index_ids[:max_sentences]
    return ParallelCorpus(split, sentences, ids)


def load_text_dir(
    langs: list[str], split: str, path: str | None, max_sentences: int | None = None, heldout_fraction: float = 0.2
) -> ParallelCorpus:
    """A directory holding one UTF-8 `{lang}.txt` per language, one sentence per line; line n of every file is
    taken to be a translation of line n of the others. The last `heldout_fraction` of lines form split `test`
    (`dev` is the same held-out part), the rest `train`; `all` is every line."""
    if not path:
        raise UserError("data=text_dir needs a directory: add data.path=/path/to/dir holding one {lang}.txt per language")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"corpus directory {root} does not exist; set data.path to a directory with one {{lang}}.txt per language")
    if split not in ("train", "dev", "test", "all"):
        raise UserError(f"unknown split {split!r} for data=text_dir; use train, dev, test or all")
    sentences, ids = {}, {}
    for lang in langs:
        file = root / f"{lang}.txt"
        if not file.is_file():
            raise UserError(f"corpus directory {root} has no {lang}.txt; add it or drop {lang} from langs")
        try:
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise UserError(f"{file} is not valid UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
        numbered = [(str(n), line) for n, line in enumerate(lines) if line]
        if not numbered:
            raise UserError(f"{file} holds no sentences; put one sentence per line")
        cut = len(numbered) - max(1, int(round(len(numbered) * heldout_fraction)))
        if split == "train":
            numbered = numbered[:cut]
        elif split in ("dev", "test"):
            numbered = numbered[cut:]
        numbered = numbered[:max_sentences]
        ids[lang] = [n for n, _ in numbered]
        sentences[lang] = [s for _, s in numbered]
    return ParallelCorpus(split, sentences, ids)


# A Hugging Face `datasets` source for larger corpora slots in here: a loader with the same signature.
SOURCES: dict[str, Callable[..., ParallelCorpus]] = {"flores": load_flores, "text_dir": load_text_dir}


def load_corpus(data_cfg, langs: list[str], split: str) -> ParallelCorpus:
    """Load `split` of the corpus that `data_cfg.source` names, for `langs`."""
    source = data_cfg.source
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; use data=flores or data=text_dir data.path=DIR")
    max_sentences = data_cfg.get("max_sentences") if hasattr(data_cfg, "get") else getattr(data_cfg, "max_sentences", None)
    return SOURCES[source](langs, split, data_cfg.path, max_sentences=max_sentences)
