"""Cross-lingual retrieval: a language against itself is 1.0; a shuffled key set is at chance."""

from __future__ import annotations

import numpy as np

from mlalign.analysis.retrieval import retrieval_ranks, retrieval_scores


def test_retrieval_of_a_language_against_itself_is_perfect():
    x = np.random.default_rng(0).standard_normal((50, 16))
    scores = retrieval_scores(retrieval_ranks(x, x))
    assert scores["hit"].mean() == 1.0 and scores["reciprocal_rank"].mean() == 1.0


def test_unrelated_keys_rank_at_chance_and_ties_count_against_the_query():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    ranks = retrieval_ranks(q, k)
    assert abs(ranks.mean() - 200.5) < 25  # uniform over 1..400
    same = np.ones((5, 3))  # every key equally similar: the right one is ranked last
    assert (retrieval_ranks(same, same) == 5).all()


def test_a_noisy_translation_is_found_by_cosine_not_by_norm():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 32))
    y = 10.0 * (x + 0.1 * rng.standard_normal(x.shape))  # scaled: cosine ignores it
    assert retrieval_scores(retrieval_ranks(x, y))["hit"].mean() == 1.0
