import pytest
from omegaconf import OmegaConf

from mlalign.data.corpus import load_corpus, load_flores, load_text_dir
from mlalign.errors import UserError
from mlalign.languages import LANGUAGES


def test_flores_splits_are_aligned_in_all_ten_languages():
    sizes = {"train": 701, "dev": 99, "test": 204}
    for split, size in sizes.items():
        corpus = load_flores(list(LANGUAGES), split)
        assert all(len(corpus[lang]) == size for lang in LANGUAGES)
        assert all(corpus.ids[lang] == corpus.ids["en"] for lang in LANGUAGES)
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
    test = load_text_dir(["en", "hi"], "test", str(tmp_path))
    assert len(train["en"]) == 8 and len(test["hi"]) == 2 and test.aligned("hi", "en")[0] == ("वाक्य 8", "sentence 8")
    with pytest.raises(UserError, match="no mr.txt"):
        load_text_dir(["en", "mr"], "all", str(tmp_path))
    (tmp_path / "ml.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_text_dir(["ml"], "all", str(tmp_path))
    (tmp_path / "ca.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no sentences"):
        load_text_dir(["ca"], "all", str(tmp_path))


def test_load_corpus_dispatches_on_source(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\n", encoding="utf-8")
    cfg = OmegaConf.create({"source": "text_dir", "path": str(tmp_path), "max_sentences": None})
    assert load_corpus(cfg, ["en"], "all")["en"] == ["a", "b"]
    with pytest.raises(UserError, match="unknown data source"):
        load_corpus(OmegaConf.create({"source": "s3", "path": None}), ["en"], "all")
