"""Cross-lingual sentence retrieval by cosine of mean-pooled residuals: each query's translation ranked among all keys."""

from __future__ import annotations

import numpy as np


def retrieval_ranks(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[n] 1-based rank of key i among all keys by cosine to query i (row i of both is one sentence and its
    translation). Ties count against the query: a key as similar as the right one ranks before it."""
    queries, keys = np.asarray(queries, dtype=np.float64), np.asarray(keys, dtype=np.float64)
    if queries.shape != keys.shape:
        raise ValueError(f"queries {queries.shape} and keys {keys.shape} must be parallel")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    sims = q @ k.T
    right = np.diag(sims)
    others = sims >= right[:, None]
    np.fill_diagonal(others, False)
    return others.sum(axis=1) + 1


def retrieval_scores(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per sentence: `hit` (rank 1: accuracy@1 is its mean) and `reciprocal_rank` (MRR is its mean)."""
    ranks = np.asarray(ranks, dtype=float)
    return {"hit": (ranks == 1).astype(float), "reciprocal_rank": 1.0 / ranks}
