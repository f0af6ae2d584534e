import pytest
from omegaconf import OmegaConf

from mlalign.data.corpus import (FLORES_DIR, corpus_fingerprint, corpus_report, flores_langs, load_corpus,
                                 load_flores, load_text_dir, report_lines, split_sizes)
from mlalign.errors import UserError


def test_flores_splits_are_aligned_in_all_ten_languages():
    ten = flores_langs()
    assert ten == ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]  # the bundled copy: the study's ten
    sizes = {"train": 701, "dev": 99, "test": 204}
    for split, size in sizes.items():
        corpus = load_flores(ten, split)
        assert all(len(corpus[lang]) == size for lang in ten)
        assert all(corpus.ids[lang] == corpus.ids["en"] for lang in ten)
    train, test = load_flores(["en"], "train"), load_flores(["en"], "test")
    assert not set(train.ids["en"]) & set(test.ids["en"])


def test_flores_parses_quoted_fields_and_joins_splits():
    corpus = load_flores(["en", "hi"], "dev+test", max_sentences=5)
    assert len(corpus["en"]) == 5
    assert not any('""' in s for s in load_flores(["en"], "train")["en"])  # CSV-doubled quotes undone
    hi, en = corpus.aligned("hi", "en")[0]
    assert hi != en and any("\u0900" <= ch <= "\u097f" for ch in hi)


def test_text_dir_splits_and_errors(tmp_path):
    (tmp_path / "en.txt").write_text("\n".join(f"sentence {i}" for i in range(10)) + "\n", encoding="utf-8")
    (tmp_path / "hi.txt").write_text("\n".join(f"वाक्य {i}" for i in range(10)) + "\n", encoding="utf-8")
    train = load_text_dir(["en", "hi"], "train", str(tmp_path))
    dev = load_text_dir(["en", "hi"], "dev", str(tmp_path))
    test = load_text_dir(["en", "hi"], "test", str(tmp_path))
    assert (len(train["en"]), len(dev["en"]), len(test["hi"])) == (7, 1, 2)
    assert test.aligned("hi", "en")[0] == ("वाक्य 8", "sentence 8") and dev["en"] == ["sentence 7"]
    with pytest.raises(UserError, match="no mr.txt"):
        load_text_dir(["en", "mr"], "all", str(tmp_path))
    (tmp_path / "ml.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_text_dir(["en"], "all", str(tmp_path))  # every {lang}.txt in the directory is part of the corpus
    (tmp_path / "ml.txt").write_text("\n" * 10, encoding="utf-8")
    with pytest.raises(UserError, match="ml.txt holds no sentences"):
        load_text_dir(["en"], "all", str(tmp_path))


def test_load_corpus_dispatches_on_source(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\n", encoding="utf-8")
    cfg = OmegaConf.create({"source": "text_dir", "path": str(tmp_path), "max_sentences": None})
    assert load_corpus(cfg, ["en"], "all")["en"] == ["a", "b"]
    with pytest.raises(UserError, match="unknown data source"):
        load_corpus(OmegaConf.create({"source": "s3", "path": None}), ["en"], "all")


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for lang, text in files.items():
        path = folder / f"{lang}.txt"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    return str(folder)


def test_text_dir_files_of_different_length_are_one_error_naming_files_and_counts(tmp_path):
    path = _write(tmp_path, en="a\nb\nc\n", hi="क\nख\n")
    with pytest.raises(UserError, match=r"not parallel: en.txt 3 lines, hi.txt 2 lines"):
        load_text_dir(["en", "hi"], "all", path)


def test_a_line_blank_in_any_language_is_dropped_in_every_language(tmp_path):
    # en's blank is in the middle, hi's at the end: same count of non-empty lines, but line 3 must stay line 3.
    path = _write(tmp_path, en="e1\n\ne3\ne4\n", hi="h1\nh2\nh3\n\n")
    corpus = load_text_dir(["en", "hi"], "all", path)
    assert corpus.ids["en"] == corpus.ids["hi"] == ["1", "3"]
    assert corpus.aligned("en", "hi") == [("e1", "h1"), ("e3", "h3")]
    assert corpus.info.dropped == ["2", "4"] and corpus.info.blank_in == {"en": ["2"], "hi": ["4"]}
    # The drop is corpus-wide: the reference alone has the same lines whichever languages are requested.
    assert load_text_dir(["en"], "all", path)["en"] == ["e1", "e3"]
    lines = report_lines(corpus_report(corpus.info, ["en", "hi"]))
    assert any("dropped 2 line(s)" in line and "blank in en: line 2" in line and "blank in hi: line 4" in line
               for line in lines)


def test_one_split_for_all_languages_by_line_number_disjoint_and_configurable(tmp_path):
    en = [f"e{n}" for n in range(1, 21)]
    hi = [f"h{n}" for n in range(1, 21)]
    en[4], hi[18] = "", ""  # line 5 blank in en (train), line 19 blank in hi (test)
    path = _write(tmp_path, en="\n".join(en) + "\n", hi="\n".join(hi) + "\n")
    parts = {split: load_text_dir(["en", "hi"], split, path) for split in ("train", "dev", "test")}
    for corpus in parts.values():
        assert corpus.ids["en"] == corpus.ids["hi"]
        assert all(e[1:] == h[1:] for e, h in corpus.aligned("en", "hi"))  # e7 with h7: the same line
    ids = {split: set(corpus.ids["en"]) for split, corpus in parts.items()}
    assert not ids["train"] & ids["dev"] and not ids["train"] & ids["test"] and not ids["dev"] & ids["test"]
    assert ids["dev"] == {"15", "16"} and ids["test"] == {"17", "18", "20"} and len(ids["train"]) == 13
    assert load_text_dir(["en", "hi"], "dev+test", path).ids["en"] == ["15", "16", "17", "18", "20"]
    wider = load_text_dir(["en"], "dev", path, dev_fraction=0.25, test_fraction=0.25)
    assert wider.ids["en"] == [str(n) for n in range(11, 16)]
    assert load_text_dir(["en"], "all", path, max_sentences=3).ids["en"] == ["1", "2", "3"]
    with pytest.raises(UserError, match="must each be in"):
        load_text_dir(["en"], "all", path, dev_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="split 'dev' of the corpus at .* holds no sentences"):
        load_text_dir(["en"], "dev", path, dev_fraction=0.0)
    with pytest.raises(UserError, match="unknown split 'valid'"):
        load_text_dir(["en"], "valid", path)


def test_split_sizes_serve_test_then_dev_then_train():
    assert split_sizes(10, 0.1, 0.2) == {"train": 7, "dev": 1, "test": 2}
    assert split_sizes(3, 0.1, 0.2) == {"train": 1, "dev": 1, "test": 1}
    assert split_sizes(1, 0.1, 0.2) == {"train": 0, "dev": 0, "test": 1}
    assert split_sizes(5, 0.0, 0.2) == {"train": 4, "dev": 0, "test": 1}


def test_byte_order_mark_crlf_and_unicode_normalisation(tmp_path):
    decomposed = "e\u0301te\u0301"  # "été" as e + combining acute
    path = _write(tmp_path, en=b"\xef\xbb\xbfHello\r\nWorld\r\n", es=(decomposed + "\r\nmundo").encode())
    corpus = load_text_dir(["en", "es"], "all", path)
    assert corpus["en"] == ["Hello", "World"] and corpus["es"] == ["\u00e9t\u00e9", "mundo"]
    assert load_text_dir(["es"], "all", path, normalize=None)["es"][0] == decomposed
    with pytest.raises(UserError, match="data.normalize='NFX' is not a Unicode normal form"):
        load_text_dir(["es"], "all", path, normalize="NFX")
    # Only \n breaks lines: a U+2028 inside a sentence must not shift every later line.
    _write(tmp_path / "sep", en="one\u2028still one\ntwo\n", hi="एक\nदो\n")
    assert load_text_dir(["en", "hi"], "all", str(tmp_path / "sep")).aligned("en", "hi")[1] == ("two", "दो")


def test_duplicates_are_reported_and_the_report_counts_tokens_over_max_length(tmp_path):
    path = _write(tmp_path, en="same\nother\nsame\nlong long long long\n", hi="क\nख\nग\nघ\n")
    corpus = load_text_dir(["en", "hi"], "all", path)
    assert corpus["en"] == ["same", "other", "same", "long long long long"]  # reported, never dropped
    assert corpus.info.duplicates == {"en": [("3", "1")], "hi": []}

    def whitespace_tokenizer(texts, add_special_tokens=True, verbose=True):
        return {"input_ids": [[0] * (len(text.split()) + int(add_special_tokens)) for text in texts]}

    report = corpus_report(corpus.info, ["en"], whitespace_tokenizer, max_length=3,
                           splits_used={"analysis": "all"})
    en = report["langs"]["en"]
    assert en["duplicates"] == {"n": 1, "first": [["3", "1"]]} and en["over_max_length"] == 1
    assert en["tokens_per_sentence"]["max"] == 5 and en["chars_per_sentence"]["max"] == 19
    assert "tokens_per_sentence" not in report["langs"]["hi"]  # tokens only for the languages in use
    assert report["splits"]["test"]["ids"] == ["4"] and report["splits_used"] == {"analysis": "all"}
    assert any("en: 1 exact duplicate line(s) kept (line 3 = line 1)" in line for line in report_lines(report))


def test_flores_ids_behave_like_a_text_dir(tmp_path):
    full = load_flores(flores_langs(), "all")
    assert len(full["en"]) == 1004 and all(full.ids[lang] == full.ids["en"] for lang in flores_langs())
    info = full.info
    assert not info.dropped and [len(info.split_ids[s]) for s in ("train", "dev", "test")] == [701, 99, 204]
    assert not set(info.split_ids["dev"]) & set(info.split_ids["test"])
    # A broken copy (a row missing in one language) is an error, never a silent mispairing.
    import shutil

    for code in ("eng_Latn", "hin_Deva"):
        shutil.copytree(FLORES_DIR / code, tmp_path / code)
    rows = (tmp_path / "hin_Deva" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "hin_Deva" / "dev.tsv").write_text("".join(rows[:-1]), encoding="utf-8")
    with pytest.raises(UserError, match="not parallel: hin_Deva lacks index_id"):
        load_flores(["en", "hi"], "dev", str(tmp_path))


def test_corpus_fingerprint_follows_the_files_and_settings(tmp_path):
    path = _write(tmp_path, en="a\nb\n")
    cfg = OmegaConf.create({"source": "text_dir", "path": path, "normalize": "NFC", "dev_fraction": 0.1,
                            "test_fraction": 0.2})
    first = corpus_fingerprint(cfg)
    assert corpus_fingerprint(OmegaConf.merge(cfg, {"test_fraction": 0.3})) != first
    _write(tmp_path, en="a\nc\n")
    assert corpus_fingerprint(cfg) != first


BENGALI = ["আমি ভাত খাই।", "সে বই পড়ে।", "আকাশ নীল।", "আজ বৃষ্টি হবে।", "আমরা স্কুলে যাই।", "নদীটি বড়।", "তিনি গান গান।"]
"""Seven Bengali sentences standing in for FLORES+ rows (4 dev, 3 devtest)."""


def _flores_plus(tmp_path, **overrides):
    from tests.helpers import write_flores_plus

    sentences = {"eng_Latn": {"dev": [f"en {i}" for i in range(4)], "devtest": [f"en {i}" for i in range(4, 7)]},
                 "ben_Beng": {"dev": BENGALI[:4], "devtest": BENGALI[4:]}}
    sentences.update(overrides)
    return write_flores_plus(tmp_path / "flores_plus", sentences)


def _hf_cfg(path, **extra):
    from tests.helpers import compose_cfg

    return OmegaConf.merge(compose_cfg(["data=hf"]).data, {"path": str(path), **extra})


def test_hf_reads_flores_plus_layout_by_flores_code_and_splits_like_text_dir(tmp_path):
    cfg = _hf_cfg(_flores_plus(tmp_path), dev_fraction=0.2, test_fraction=0.3)
    everything = load_corpus(cfg, ["en", "bn"], "all")
    assert everything["bn"] == BENGALI and everything["en"] == [f"en {i}" for i in range(7)]
    assert everything.ids["bn"][:2] == ["dev:0", "dev:1"] and everything.ids["bn"][4] == "devtest:0"
    parts = {split: load_corpus(cfg, ["en", "bn"], split) for split in ("train", "dev", "test")}
    assert [len(parts[s]["bn"]) for s in ("train", "dev", "test")] == [4, 1, 2]  # by row position, test last
    assert parts["test"].aligned("en", "bn") == [("en 5", BENGALI[5]), ("en 6", BENGALI[6])]
    info = everything.info
    assert info.source == "hf" and info.files["bn"].endswith("(ben_Beng)")
    report = corpus_report(info, ["en", "bn"])
    assert report["langs"]["bn"]["kept"] == 7 and report["split_sizes_read"] == {"train": 4, "dev": 1, "test": 2}


def test_hf_runs_the_same_checks_as_the_bundled_corpus(tmp_path):
    # A row blank in one language is dropped in every language, by its id.
    blank = _flores_plus(tmp_path, ben_Beng={"dev": BENGALI[:3] + [" "], "devtest": BENGALI[4:]})
    corpus = load_corpus(_hf_cfg(blank), ["en", "bn"], "all")
    assert corpus.info.dropped == ["dev:3"] and "en 3" not in corpus["en"] and len(corpus["bn"]) == 6
    # Rows that do not match across languages are refused, naming the row.
    (tmp_path / "flores_plus").rename(tmp_path / "old")
    short = _flores_plus(tmp_path, ben_Beng={"dev": BENGALI[:3], "devtest": BENGALI[4:]})
    with pytest.raises(UserError, match=r"not parallel: .*\(ben_Beng\) lacks row dev:3, which en has"):
        load_corpus(_hf_cfg(short), ["en", "bn"], "all")


@pytest.mark.parametrize("langs, extra, needle", [
    (["en", "hi"], {}, "could not load .*config 'hin_Deva'.*for hi: BuilderConfig 'hin_Deva' not found"),
    (["en", "bn"], {"hf_splits": ["dev", "test"]}, "split 'test'.*Unknown split"),
    (["en", "bn"], {"text_column": "sentence"}, "has no column 'sentence'"),
    (["en", "bn"], {"hf_config": "{code}"}, "may only use {flores} and {lang}"),
])
def test_hf_mistakes_are_one_line_user_errors(tmp_path, langs, extra, needle):
    with pytest.raises(UserError, match=needle) as err:
        load_corpus(_hf_cfg(_flores_plus(tmp_path), **extra), langs, "all")
    assert "\n" not in str(err.value)


def test_hf_rows_in_another_language_than_the_flores_code_are_refused(tmp_path):
    from tests.helpers import write_flores_plus

    path = write_flores_plus(tmp_path / "fp", {"eng_Latn": {"dev": ["a", "b"]}, "ben_Beng": {"dev": ["c", "d"]}},
                             iso={"ben_Beng": "hin_Deva"})
    with pytest.raises(UserError, match="holds hin_Deva, not bn's ben_Beng"):
        load_corpus(_hf_cfg(path, hf_splits=["dev"]), ["en", "bn"], "all")


def test_hub_dataset_offline_is_a_user_error_not_a_download():
    # HF_DATASETS_OFFLINE=1 (tests/conftest.py): the default FLORES+ hub id cannot be reached, and says so in one line.
    from tests.helpers import compose_cfg

    with pytest.raises(UserError, match="openlanguagedata/flores_plus.*hf auth login"):
        load_corpus(compose_cfg(["data=hf"]).data, ["en", "bn"], "all")


def test_hf_fingerprint_follows_the_local_copy(tmp_path):
    path = _flores_plus(tmp_path)
    first = corpus_fingerprint(_hf_cfg(path))
    assert corpus_fingerprint(_hf_cfg(path)) == first
    assert corpus_fingerprint(_hf_cfg(path, revision="v2")) != first
    _flores_plus(tmp_path, ben_Beng={"dev": BENGALI[:4], "devtest": BENGALI[4:6] + ["অন্য বাক্য।"]})
    assert corpus_fingerprint(_hf_cfg(path)) != first
    # ... and the edited copy is what is read (datasets' own cache would serve the first copy's rows).
    assert load_corpus(_hf_cfg(path), ["en", "bn"], "all")["bn"][-1] == "অন্য বাক্য।"


def test_a_language_without_sentences_in_the_bundled_corpus_says_where_to_get_them():
    from mlalign.data.corpus import read_corpus
    from tests.helpers import compose_cfg

    with pytest.raises(UserError, match="has no bn .*ben_Beng/.*data=text_dir with a bn.txt, or data=hf") as err:
        read_corpus(compose_cfg().data, required=["en", "bn"])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="has no bn"):
        load_flores(["en", "bn"], "dev")
