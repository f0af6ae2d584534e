"""Load parallel sentences per language and split from the bundled FLORES-200 copy, a user's text directory, or a
Hugging Face dataset (e.g. FLORES+).

Every source goes through one path: read every language the corpus holds, normalise, drop each line (id) that is
blank in any language, split by id (the same ids in every language), and keep what was dropped and repeated for the
corpus report (`corpus.json`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlalign.errors import UserError
from mlalign.languages import LANGUAGES, get_language

BUNDLED_DATA_DIR = Path(__file__).resolve().parent
FLORES_DIR = BUNDLED_DATA_DIR / "flores200"
SPLITS = ("train", "dev", "test")
FLORES_SPLITS = SPLITS
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")


@dataclass
class CorpusInfo:
    """A whole corpus after alignment: every language it holds, every split, and what was dropped or repeated."""

    source: str
    path: str
    files: dict[str, str]
    """lang -> the file (text_dir) or folder (flores) it was read from."""
    normalize: str | None
    n_lines: int
    """Ids read per language (lines of each file; FLORES rows)."""
    blank_in: dict[str, list[str]]
    """lang -> ids blank in that language (each is dropped in every language)."""
    dropped: list[str]
    split_ids: dict[str, list[str]]
    """split -> the kept ids in it, identical for every language."""
    sizes: dict[str, int]
    """split -> ids read in it, before dropping blanks."""
    texts: dict[str, dict[str, str]]
    """lang -> kept id -> normalised sentence."""
    duplicates: dict[str, list[tuple[str, str]]]
    """lang -> (id, id of its earlier identical line) among kept ids."""


@dataclass
class ParallelCorpus:
    """Sentences per language for one split; `ids[i]` names row i, and rows with equal ids are translations."""

    split: str
    sentences: dict[str, list[str]]
    ids: dict[str, list[str]]
    info: CorpusInfo | None = field(default=None, repr=False)
    """The whole corpus this split was cut from (drops, duplicates, every split's ids)."""

    @property
    def langs(self) -> list[str]:
        return list(self.sentences)

    def __getitem__(self, lang: str) -> list[str]:
        return self.sentences[lang]

    def aligned(self, lang_a: str, lang_b: str) -> list[tuple[str, str]]:
        """Pairs (sentence in lang_a, its translation in lang_b), matched by id."""
        index_b = dict(zip(self.ids[lang_b], self.sentences[lang_b]))
        return [(s, index_b[i]) for i, s in zip(self.ids[lang_a], self.sentences[lang_a]) if i in index_b]


def check_split(split: str) -> list[str]:
    """The splits that `split` names: train, dev, test, all, or several joined with `+` (e.g. `dev+test`)."""
    parts = list(SPLITS) if split == "all" else str(split).split("+")
    for part in parts:
        if part not in SPLITS:
            raise UserError(f"unknown split {part!r}; use one of {', '.join(SPLITS)} or all, or join them with '+' "
                            f"(e.g. dev+test)")
    return parts


def split_parts(split: str) -> set[str]:
    """The disjoint pieces of text (train, dev, test) a split names, whatever the source: every source (flores,
    text_dir, hf) cuts its sentences into the same three splits, `all` is all of them and `+` joins them. Two splits
    share sentences exactly when their parts intersect."""
    return set(check_split(str(split)))


def analysis_overlap(splits) -> list[str]:
    """The parts of `data.splits.train` (the adapter's and the SAEs' training text) that `data.splits.analysis`
    also holds; empty when the analysis reads held-out sentences only."""
    return sorted(split_parts(splits["analysis"]) & split_parts(splits["train"]))


def check_normalize(normalize: str | None) -> str | None:
    if normalize in (None, "none", "None", ""):
        return None
    if normalize not in NORMALIZATIONS:
        raise UserError(f"data.normalize={normalize!r} is not a Unicode normal form; use one of "
                        f"{', '.join(NORMALIZATIONS)}, or data.normalize=null to keep the text as written")
    return normalize


def check_fractions(dev_fraction: float, test_fraction: float) -> tuple[float, float]:
    dev, test = float(dev_fraction), float(test_fraction)
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise UserError(f"data.dev_fraction={dev} and data.test_fraction={test} must each be in [0, 1) and leave "
                        f"lines for train (sum < 1); type e.g. data.dev_fraction=0.1 data.test_fraction=0.2")
    return dev, test


def split_sizes(n_lines: int, dev_fraction: float, test_fraction: float) -> dict[str, int]:
    """Lines per split by line number: the first lines train, then dev, then the last lines test. A positive
    fraction gets at least one line while there are lines left; test is served first, then dev."""
    def share(fraction: float, left: int) -> int:
        return min(left, max(1, round(n_lines * fraction))) if fraction > 0 else 0

    n_test = share(test_fraction, n_lines)
    n_dev = share(dev_fraction, n_lines - n_test)
    return {"train": n_lines - n_dev - n_test, "dev": n_dev, "test": n_test}


def _clean_line(text: str, normalize: str | None) -> str:
    text = text.strip()
    return unicodedata.normalize(normalize, text) if normalize else text


def _read_lines(file: Path) -> list[str]:
    """Lines as an editor numbers them: a leading byte-order mark and CRLF line ends removed, `\n` the only line
    break (str.splitlines would also split on U+2028, form feeds and the like, shifting every later line)."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{file} is not valid UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    return [line.rstrip("\r") for line in lines]


def _align(source: str, root: Path, texts: dict[str, dict[str, str]], split_of: dict[str, str],
           normalize: str | None, files: dict[str, str]) -> CorpusInfo:
    """Normalise every language's lines (same ids in every language, in `split_of`'s order), drop each id that is
    blank in any language, and record what was dropped and repeated."""
    order = list(split_of)
    clean = {lang: {i: _clean_line(by_id[i], normalize) for i in order} for lang, by_id in texts.items()}
    for lang, by_id in clean.items():
        if not any(by_id.values()):
            raise UserError(f"{files[lang]} holds no sentences; put one sentence per line, or move it out of {root}")
    blank_in = {lang: [i for i in order if not by_id[i]] for lang, by_id in clean.items()}
    dropped = set().union(*blank_in.values())
    kept = [i for i in order if i not in dropped]
    if not kept:
        raise UserError(f"no line of the corpus at {root} is non-blank in every language ({len(order)} lines, each "
                        f"blank in at least one of {', '.join(files.values())}); check that the files are parallel")
    duplicates = {}
    for lang, by_id in clean.items():
        first_seen: dict[str, str] = {}
        duplicates[lang] = [(i, first_seen[by_id[i]]) for i in kept if first_seen.setdefault(by_id[i], i) != i]
    return CorpusInfo(
        source=source, path=str(root), files=files, normalize=normalize, n_lines=len(order),
        blank_in=blank_in, dropped=[i for i in order if i in dropped],
        split_ids={s: [i for i in kept if split_of[i] == s] for s in SPLITS},
        sizes={s: sum(1 for i in order if split_of[i] == s) for s in SPLITS},
        texts={lang: {i: by_id[i] for i in kept} for lang, by_id in clean.items()}, duplicates=duplicates)


def _select(info: CorpusInfo, langs: list[str], split: str, max_sentences: int | None) -> ParallelCorpus:
    """Sentences of `split` for `langs`: the same ids, in the same order, in every language."""
    ids = [i for part in check_split(split) for i in info.split_ids[part]][:max_sentences]
    if not ids:
        sizes = ", ".join(f"{s} {info.sizes[s]}" for s in SPLITS)
        if info.source == "flores":
            hint = "choose another split"
        elif "train" in check_split(split):
            hint = "lower data.dev_fraction / data.test_fraction or add lines"
        else:
            hint = "raise data.dev_fraction / data.test_fraction or add lines"
        raise UserError(f"split {split!r} of the corpus at {info.path} holds no sentences (lines by split: {sizes}; "
                        f"{len(info.dropped)} dropped as blank); {hint}")
    return ParallelCorpus(split, {lang: [info.texts[lang][i] for i in ids] for lang in langs},
                          {lang: list(ids) for lang in langs}, info)


def _flores_langs(root: Path) -> dict[str, Path]:
    """Every language of the table that has a folder in this FLORES-200 copy."""
    return {code: root / lang.flores_code for code, lang in LANGUAGES.items() if (root / lang.flores_code).is_dir()}


def flores_langs(path: str | None = None) -> list[str]:
    """The languages of the table with sentences in this FLORES-200 copy (the bundled one: the study's ten)."""
    return list(_flores_langs(Path(path) if path else FLORES_DIR))


def _no_sentences_hint(lang: str) -> str:
    return (f"add its sentences (data=text_dir with a {lang}.txt, or data=hf with a dataset that has "
            f"{get_language(lang).flores_code}, e.g. FLORES+) or drop {lang} from langs")


def read_flores(path: str | None = None, normalize: str | None = "NFC") -> CorpusInfo:
    """The whole FLORES-200 copy: every language it holds, its fixed train/dev/test, aligned by index_id."""
    root = Path(path) if path else FLORES_DIR
    normalize = check_normalize(normalize)
    folders = _flores_langs(root)
    if not folders:
        raise UserError(f"{root} holds no FLORES-200 language folder (e.g. eng_Latn/); point data.path at a copy of "
                        "the bundled flores200 folder, or leave data.path=null for the bundled one")
    texts: dict[str, dict[str, str]] = {}
    split_of: dict[str, str] = {}
    reference = next(iter(folders))
    for lang, folder in folders.items():
        texts[lang] = {}
        for split in SPLITS:
            file = folder / f"{split}.tsv"
            if not file.is_file():
                raise UserError(f"FLORES-200 file {file} is missing; point data.path at a copy of the bundled "
                                "flores200 folder")
            with file.open(encoding="utf-8-sig", newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t"))
            rows.sort(key=lambda row: int(row["index_id"]))
            for row in rows:
                texts[lang][row["index_id"]] = row["text"] or ""
                if lang == reference:
                    split_of[row["index_id"]] = split
                elif split_of.get(row["index_id"]) != split:
                    raise UserError(f"FLORES-200 copy at {root} is not parallel: index_id {row['index_id']} is in "
                                    f"{file} but not in {reference}'s {split} split; restore the copy")
        if len(texts[lang]) != len(split_of):
            missing = next(i for i in split_of if i not in texts[lang])
            raise UserError(f"FLORES-200 copy at {root} is not parallel: {folder.name} lacks index_id {missing}, "
                            f"which {reference} has; restore the copy")
    files = {lang: str(folder) for lang, folder in folders.items()}
    return _align("flores", root, texts, split_of, normalize, files)


def load_flores(langs: list[str], split: str, path: str | None = None, max_sentences: int | None = None,
                normalize: str | None = "NFC") -> ParallelCorpus:
    """FLORES-200 (via SIB-200): 701/99/204 sentences per language in splits train/dev/test, aligned by index_id.

    `split` may join splits with `+` (e.g. `dev+test`); `all` is every split.
    """
    check_split(split)
    info = read_flores(path, normalize)
    for lang in langs:
        if lang not in info.texts:
            raise UserError(f"the FLORES-200 copy at {info.path} has no {lang} (no {get_language(lang).flores_code}/ "
                            f"folder; it holds {', '.join(info.texts)}); {_no_sentences_hint(lang)}")
    return _select(info, langs, split, max_sentences)


def read_text_dir(path: str | None, dev_fraction: float = 0.1, test_fraction: float = 0.2,
                  normalize: str | None = "NFC", required: list[str] = ()) -> CorpusInfo:
    """The whole text directory: every `{lang}.txt` in it (lang a code of the language table), checked to be
    parallel line for line, split by line number into train / dev / test."""
    if not path:
        raise UserError("data=text_dir needs a directory: add data.path=/path/to/dir holding one {lang}.txt per language")
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"corpus directory {root} does not exist; set data.path to a directory with one {{lang}}.txt per language")
    normalize = check_normalize(normalize)
    dev_fraction, test_fraction = check_fractions(dev_fraction, test_fraction)
    for lang in required:
        if not (root / f"{lang}.txt").is_file():
            raise UserError(f"corpus directory {root} has no {lang}.txt; add it or drop {lang} from langs")
    files = {lang: root / f"{lang}.txt" for lang in LANGUAGES if (root / f"{lang}.txt").is_file()}
    if not files:
        raise UserError(f"corpus directory {root} holds no {{lang}}.txt file (e.g. en.txt, hi.txt); add one per language")
    lines = {lang: _read_lines(file) for lang, file in files.items()}
    counts = {lang: len(ls) for lang, ls in lines.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{lang}.txt {n} lines" for lang, n in counts.items())
        raise UserError(f"the files in {root} are not parallel: {listed}; every {{lang}}.txt needs the same number "
                        f"of lines, line n of each a translation of line n of the others (blank lines count)")
    n_lines = next(iter(counts.values()))
    sizes = split_sizes(n_lines, dev_fraction, test_fraction)
    names = [s for s in SPLITS for _ in range(sizes[s])]
    # Ids are 1-based line numbers, as an editor shows them.
    split_of = {str(n + 1): names[n] for n in range(n_lines)}
    texts = {lang: {str(n + 1): line for n, line in enumerate(ls)} for lang, ls in lines.items()}
    return _align("text_dir", root, texts, split_of, normalize, {lang: str(file) for lang, file in files.items()})


def load_text_dir(
    langs: list[str], split: str, path: str | None, max_sentences: int | None = None, dev_fraction: float = 0.1,
    test_fraction: float = 0.2, normalize: str | None = "NFC",
) -> ParallelCorpus:
    """A directory holding one UTF-8 `{lang}.txt` per language, one sentence per line; line n of every file is a
    translation of line n of the others, and every file must have the same number of lines. A line blank in any
    language is dropped in all of them. Split by line number: the first lines `train`, then `dev_fraction` of them
    `dev`, the last `test_fraction` `test`; `all` is every line, `dev+test` joins splits."""
    check_split(split)
    info = read_text_dir(path, dev_fraction, test_fraction, normalize, required=langs)
    return _select(info, langs, split, max_sentences)


def _load_hf_split(path: str, config: str | None, split: str, revision: str | None, lang: str) -> dict[str, list]:
    """One split of one config as {column: values}."""
    import tempfile

    import datasets

    # A local folder is read through a throwaway cache: datasets' cache key for local files can miss a changed file
    # (rows of an earlier copy with the same folder name and layout are served instead); a corpus is small.
    local = Path(path).is_dir()
    try:
        with tempfile.TemporaryDirectory(prefix="mlalign-hf-") if local else contextlib.nullcontext() as cache_dir:
            table = datasets.load_dataset(path, config, split=split, revision=revision, cache_dir=cache_dir,
                                          keep_in_memory=local)
            return table.to_dict()
    except (ValueError, OSError) as err:  # DatasetNotFoundError and ConnectionError are OSErrors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"data=hf could not load {path!r} (config {config!r}, split {split!r}) for {lang}: {reason}; "
                        f"check data.path, data.hf_config and data.hf_splits; a gated dataset such as FLORES+ needs its "
                        f"conditions accepted on huggingface.co and `hf auth login`, offline a local copy in "
                        f"data.path") from None


def read_hf(path: str | None, required: list[str] = (), hf_config: str | None = "{flores}",
            hf_splits: list[str] = ("dev", "devtest"), text_column: str = "text", id_column: str | None = "id",
            revision: str | None = None, dev_fraction: float = 0.1, test_fraction: float = 0.2,
            normalize: str | None = "NFC") -> CorpusInfo:
    """A parallel corpus from Hugging Face `datasets` (a hub id or a local folder `load_dataset` reads), for the
    `required` languages: per language the dataset config `hf_config` names (`{flores}` its FLORES-200 code, `{lang}`
    its short code: FLORES+'s configs are `hin_Deva`, ...), the dataset splits `hf_splits` one after the other, rows
    matched across languages by `id_column` within each split (null: by row position). Rows that carry `iso_639_3`
    and `iso_15924` (FLORES+) must be in the language asked for. Then, as text_dir: train / dev / test by row position
    (`dev_fraction`, `test_fraction`), a row blank in any language dropped in all of them."""
    if not path:
        raise UserError("data=hf needs a dataset: data.path=openlanguagedata/flores_plus (a Hugging Face hub id) or a "
                        "local folder that datasets.load_dataset reads")
    if not required:
        raise UserError("data=hf reads the languages of the run; give langs (e.g. langs=[hi,bn])")
    if isinstance(hf_splits, str) or not hf_splits:
        raise UserError(f"data.hf_splits must be a list of the dataset's splits, got {hf_splits!r}; "
                        "type e.g. data.hf_splits=[dev,devtest]")
    normalize = check_normalize(normalize)
    dev_fraction, test_fraction = check_fractions(dev_fraction, test_fraction)
    texts: dict[str, dict[str, str]] = {}
    files: dict[str, str] = {}
    order: list[str] | None = None
    reference = required[0]
    for lang in required:
        language = get_language(lang)
        try:
            config = hf_config.format(flores=language.flores_code, lang=lang) if hf_config else None
        except (KeyError, IndexError, ValueError):
            raise UserError(f"data.hf_config={hf_config!r} may only use {{flores}} and {{lang}} "
                            "(e.g. data.hf_config='{flores}')") from None
        files[lang] = f"{path} ({config})" if config else str(path)
        rows: dict[str, str] = {}
        for split in hf_splits:
            table = _load_hf_split(str(path), config, str(split), revision, lang)
            if text_column not in table or (id_column and id_column not in table):
                missing = text_column if text_column not in table else id_column
                raise UserError(f"{files[lang]} split {split!r} has no column {missing!r} (it has "
                                f"{', '.join(table)}); set data.text_column / data.id_column (data.id_column=null matches "
                                f"rows by position)")
            if {"iso_639_3", "iso_15924"} <= set(table):
                found = {f"{a}_{b}" for a, b in zip(table["iso_639_3"], table["iso_15924"])}
                if found != {language.flores_code}:
                    raise UserError(f"{files[lang]} split {split!r} holds {', '.join(sorted(found))}, not "
                                    f"{lang}'s {language.flores_code}; fix languages.{lang}.flores_code or data.hf_config")
            ids = [f"{split}:{i}" for i in (table[id_column] if id_column else range(len(table[text_column])))]
            if len(set(ids)) != len(ids):
                repeated = next(i for i in ids if ids.count(i) > 1)
                raise UserError(f"{files[lang]} split {split!r} repeats {id_column} {repeated.split(':', 1)[1]}; ids "
                                f"must be unique (data.id_column=null matches rows by position)")
            rows.update(zip(ids, (text or "" for text in table[text_column])))
        if order is None:
            order = list(rows)
        elif set(rows) != set(order):
            gap = next((i for i in order if i not in rows), None)
            extra = next((i for i in rows if i not in set(order)), None)
            what = f"lacks row {gap}, which {reference} has" if gap else f"has row {extra}, which {reference} lacks"
            raise UserError(f"data=hf corpus is not parallel: {files[lang]} {what} (rows are split:{id_column or 'row'});"
                            f" use the same splits and rows in every language")
        texts[lang] = rows
    n_lines = len(order)
    sizes = split_sizes(n_lines, dev_fraction, test_fraction)
    names = [s for s in SPLITS for _ in range(sizes[s])]
    split_of = {i: names[n] for n, i in enumerate(order)}
    return _align("hf", Path(str(path)), texts, split_of, normalize, files)


def load_hf(langs: list[str], split: str, path: str | None, max_sentences: int | None = None, **options) -> ParallelCorpus:
    """`split` of a Hugging Face dataset corpus (see read_hf) for `langs`."""
    check_split(split)
    return _select(read_hf(path, required=langs, **options), langs, split, max_sentences)


READERS: dict[str, Callable[..., CorpusInfo]] = {"flores": read_flores, "text_dir": read_text_dir, "hf": read_hf}
SOURCES: dict[str, Callable[..., ParallelCorpus]] = {"flores": load_flores, "text_dir": load_text_dir, "hf": load_hf}
HF_OPTIONS = ("hf_config", "hf_splits", "text_column", "id_column", "revision")


def _get(data_cfg, key: str, default=None):
    return data_cfg.get(key, default) if hasattr(data_cfg, "get") else getattr(data_cfg, key, default)


def _source(data_cfg) -> str:
    source = data_cfg.source
    if source not in READERS:
        raise UserError(f"unknown data source {source!r}; use data=flores, data=text_dir data.path=DIR or data=hf")
    return source


def _options(data_cfg) -> dict:
    """Keyword arguments of the source's reader, from the data config (schema defaults where a key is absent)."""
    options = {"normalize": _get(data_cfg, "normalize", "NFC")}
    if _source(data_cfg) in ("text_dir", "hf"):
        options.update(dev_fraction=_get(data_cfg, "dev_fraction", 0.1), test_fraction=_get(data_cfg, "test_fraction", 0.2))
    if _source(data_cfg) == "hf":
        from omegaconf import OmegaConf

        defaults = {"hf_config": "{flores}", "hf_splits": ["dev", "devtest"], "text_column": "text",
                    "id_column": "id", "revision": None}
        for key in HF_OPTIONS:
            value = _get(data_cfg, key, defaults[key])
            options[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return options


def read_corpus(data_cfg, required: list[str] = ()) -> CorpusInfo:
    """The whole corpus that `data_cfg.source` names, aligned and split (`required`: languages that must be in it)."""
    source = _source(data_cfg)
    if source in ("text_dir", "hf"):
        return READERS[source](data_cfg.path, required=list(required), **_options(data_cfg))
    info = READERS[source](data_cfg.path, **_options(data_cfg))
    for lang in required:
        if lang not in info.texts:
            raise UserError(f"the {source} corpus at {info.path} has no {lang} (no {get_language(lang).flores_code}/ "
                            f"folder; it holds {', '.join(info.texts)}); {_no_sentences_hint(lang)}")
    return info


def load_corpus(data_cfg, langs: list[str], split: str) -> ParallelCorpus:
    """Load `split` of the corpus that `data_cfg.source` names, for `langs`."""
    source = _source(data_cfg)
    return SOURCES[source](langs, split, data_cfg.path, max_sentences=_get(data_cfg, "max_sentences"),
                           **_options(data_cfg))


def corpus_fingerprint(data_cfg) -> str:
    """Hash of the corpus files' bytes and of every setting that changes which text lands in which split: part of
    the analysis cache's key, so an edited corpus file is never answered from a stale cache."""
    source = _source(data_cfg)
    digest = hashlib.sha256(repr(sorted(_options(data_cfg).items())).encode())
    if source == "hf":
        # The dataset's identity: its id and revision (pin data.revision for a hub dataset that may change), or, for a
        # local copy, every file's bytes.
        digest.update(f"{data_cfg.path}@{_get(data_cfg, 'revision')}".encode())
        root = Path(str(data_cfg.path or ""))
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []
    elif source == "text_dir":
        root = Path(data_cfg.path or "")
        files = [root / f"{lang}.txt" for lang in LANGUAGES]
    else:
        root = Path(data_cfg.path) if data_cfg.path else FLORES_DIR
        files = [folder / f"{split}.tsv" for folder in _flores_langs(root).values() for split in SPLITS]
    for file in files:
        if file.is_file():
            digest.update(file.name.encode() + str(file.parent.name).encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _spread(values: list[int]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": round(sum(ordered) / len(ordered), 2), "median": float(ordered[len(ordered) // 2]),
            "max": int(ordered[-1])} if ordered else {"mean": None, "median": None, "max": None}


def corpus_report(info: CorpusInfo, langs: list[str], tokenizer=None, max_length: int | None = None,
                  splits_used: dict | None = None, first: int = 5) -> dict:
    """The content of `corpus.json`: per language lines read, kept, dropped (and why), duplicates, characters and
    tokens per sentence (tokens with the special tokens the analysis adds, for `langs` only when a tokenizer is
    given), lines over `max_length` tokens; and the kept ids of every split, the same in every language."""
    kept = sum(len(ids) for ids in info.split_ids.values())
    per_lang = {}
    for lang, texts in info.texts.items():
        sentences = list(texts.values())
        blank_here = set(info.blank_in[lang])
        entry = {
            "file": info.files[lang],
            "lines_read": info.n_lines,
            "kept": kept,
            "dropped": {"blank_here": len(blank_here), "blank_in_another_language": len(info.dropped) - len(blank_here)},
            "duplicates": {"n": len(info.duplicates[lang]), "first": [list(pair) for pair in info.duplicates[lang][:first]]},
            "chars_per_sentence": _spread([len(s) for s in sentences]),
        }
        if tokenizer is not None and lang in langs:
            # Full lengths (no truncation) to count what max_length cuts; verbose=False: that is no warning here.
            lengths = [len(ids) for ids in tokenizer(sentences, add_special_tokens=True, verbose=False)["input_ids"]]
            entry["tokens_per_sentence"] = _spread(lengths)
            if max_length:
                entry["over_max_length"] = sum(n > max_length for n in lengths)
        per_lang[lang] = entry
    return {
        "source": info.source,
        "path": info.path,
        "normalize": info.normalize,
        "langs_in_corpus": list(info.texts),
        "langs_used": list(langs),
        "lines_read": info.n_lines,
        "kept": kept,
        "dropped": {"n": len(info.dropped), "first": info.dropped[:first],
                    "blank_in": {lang: ids[:first] for lang, ids in info.blank_in.items() if ids}},
        "max_length": max_length,
        "splits_used": dict(splits_used or {}),
        **_held_out_analysis(splits_used or {}),
        "split_sizes_read": dict(info.sizes),
        "splits": {split: {"n": len(ids), "ids": list(ids)} for split, ids in info.split_ids.items()},
        "langs": per_lang,
    }


def _held_out_analysis(splits_used: dict) -> dict:
    """Whether the analysis reads held-out sentences only (both `analysis` and `train` in use: task=pipeline)."""
    if "analysis" not in splits_used or "train" not in splits_used:
        return {}
    overlap = analysis_overlap(splits_used)
    return {"analysis_held_out": not overlap, "analysis_train_overlap": overlap}


def report_lines(report: dict) -> list[str]:
    """A few lines for the log and report.md: what was read, dropped, repeated, and how it was split."""
    sizes = " / ".join(f"{split} {entry['n']}" for split, entry in report["splits"].items())
    line = "line" if report["source"] == "text_dir" else "id"
    lines = [f"corpus {report['source']} ({report['path']}): {report['lines_read']} {line}s in each of "
             f"{len(report['langs_in_corpus'])} language(s), {report['kept']} kept; split {sizes} "
             f"(the same ids in every language)"]
    dropped = report["dropped"]
    if dropped["n"]:
        where = "; ".join(f"blank in {lang}: {line} {', '.join(ids)}" for lang, ids in dropped["blank_in"].items())
        lines.append(f"dropped {dropped['n']} {line}(s) in every language, as blank in at least one ({where}"
                     f"{', ...' if dropped['n'] > len(dropped['first']) else ''}); unless a translation is missing "
                     f"there, a file is misaligned from that {line} on")
    over = []
    for lang, entry in report["langs"].items():
        duplicates = entry["duplicates"]
        if duplicates["n"]:
            pairs = ", ".join(f"{line} {a} = {line} {b}" for a, b in duplicates["first"])
            lines.append(f"{lang}: {duplicates['n']} exact duplicate {line}(s) kept ({pairs})")
        if entry.get("over_max_length"):
            over.append(f"{lang} {entry['over_max_length']}")
    if over:  # one line for every language: a per-language line each made the console a wall of text
        lines.append(f"sentences longer than max_length={report['max_length']} tokens are truncated: {', '.join(over)}")
    return lines


def write_corpus_report(data_cfg, langs: list[str], run_dir: str | Path, tokenizer=None,
                        uses: tuple[str, ...] = ("analysis",)) -> dict:
    """Check the corpus and that the `data.splits` entries in `uses` hold sentences (a user mistake fails here, before
    any model is loaded), write `<run_dir>/corpus.json`, log its summary, and return the report."""
    import logging

    from mlalign.io import write_json_atomic

    info = read_corpus(data_cfg, required=langs)
    splits = _get(data_cfg, "splits") or {}
    splits_used = {key: str(splits[key]) for key in uses if key in splits}
    for name in splits_used.values():
        _select(info, langs, name, None)
    report = corpus_report(info, langs, tokenizer, _get(data_cfg, "max_length"), splits_used)
    path = write_json_atomic(Path(run_dir) / "corpus.json", report)
    log = logging.getLogger(__name__)
    for line in report_lines(report):
        log.info(line)
    log.info("corpus report: %s", path)
    return report
