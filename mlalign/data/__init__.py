"""Corpora: the bundled FLORES-200 parallel sentences, a user's text directory, and the bundled Okapi benchmark items."""

from mlalign.data.corpus import BUNDLED_DATA_DIR, ParallelCorpus, load_corpus

__all__ = ["BUNDLED_DATA_DIR", "ParallelCorpus", "load_corpus"]
