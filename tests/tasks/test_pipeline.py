"""task=pipeline's split choice: the adapter is analysed on held-out sentences only, and corpus.json says so."""

from __future__ import annotations

import json

import pytest

from mlalign.data.corpus import write_corpus_report
from mlalign.tasks import CORPUS_TASKS
from mlalign.tasks.pipeline import held_out_analysis
from tests.helpers import compose_cfg


def _text_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("en", "hi"):
        (corpus / f"{lang}.txt").write_text("\n".join(f"{lang} sentence {i}" for i in range(40)) + "\n",
                                             encoding="utf-8")
    return corpus


@pytest.mark.parametrize("data", ["data=text_dir", "data=hf"])
def test_the_pipeline_analyses_held_out_sentences_where_the_analysis_split_holds_training_lines(data, tmp_path):
    cfg = compose_cfg(["task=pipeline", data, "data.path=/nowhere", "langs=[hi]"], tmp_path)
    assert str(cfg.data.splits.analysis) == "all"  # the source's default: every line, the training lines too
    held_out_analysis(cfg)
    assert str(cfg.data.splits.analysis) == str(cfg.data.splits.heldout) == "test"


def test_the_pipeline_keeps_an_analysis_split_that_is_already_held_out(tmp_path):
    cfg = compose_cfg(["task=pipeline", "data=flores", "langs=[hi]", "data.splits.analysis=dev+test"], tmp_path)
    held_out_analysis(cfg)
    assert str(cfg.data.splits.analysis) == "dev+test"


def test_corpus_json_says_whether_the_analysis_reads_held_out_sentences_only(tmp_path):
    cfg = compose_cfg(["task=pipeline", "data=text_dir", f"data.path={_text_dir(tmp_path)}", "langs=[hi]"], tmp_path)
    leaky = write_corpus_report(cfg.data, ["en", "hi"], tmp_path / "a", uses=CORPUS_TASKS["pipeline"])
    assert leaky["analysis_held_out"] is False and leaky["analysis_train_overlap"] == ["train"]
    held_out_analysis(cfg)
    write_corpus_report(cfg.data, ["en", "hi"], tmp_path / "b", uses=CORPUS_TASKS["pipeline"])
    report = json.loads((tmp_path / "b" / "corpus.json").read_text())
    assert report["analysis_held_out"] is True and report["analysis_train_overlap"] == []
    assert report["splits_used"]["analysis"] == "test"
