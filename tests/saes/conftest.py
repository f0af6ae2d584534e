"""The analysis tests' tiny real model, tokenizer, corpus and SAEs, shared with the encode tests (which check that the
engine's numbers do not depend on the encode path)."""

from tests.analysis.conftest import corpus, model, saes, texts, tokenizer

__all__ = ["corpus", "model", "saes", "texts", "tokenizer"]  # pytest fixtures, re-registered for this folder
