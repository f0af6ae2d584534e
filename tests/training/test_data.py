"""Training batches: parallel rows, languages in turn, and an order that depends on the step alone."""

from collections import Counter

from mlalign.training.data import ParallelStream


def stream(seed=0) -> ParallelStream:
    target = {"hi": [[1, 10 + i] for i in range(10)], "ml": [[1, 30 + i, 31] for i in range(7)]}
    reference = {"hi": [[1, 50 + i] for i in range(10)], "ml": [[1, 80 + i] for i in range(7)]}
    return ParallelStream(["hi", "ml"], target, reference, pad_id=0, seed=seed)


def test_batches_alternate_languages_and_keep_pairs_aligned():
    s = stream()
    for k in range(6):
        batch = s.batch(k, 4, "cpu")
        assert batch.lang == ["hi", "ml"][k % 2]
        offset = 10 if batch.lang == "hi" else 30
        ref_offset = 50 if batch.lang == "hi" else 80
        rows_t = (batch.target["input_ids"][:, 1] - offset).tolist()
        rows_r = (batch.reference["input_ids"][:, 1] - ref_offset).tolist()
        assert rows_t == rows_r


def test_order_is_a_function_of_the_index_alone():
    fresh = stream()
    late = [stream().indices(k, 3) for k in range(20)]
    # A new stream asked only for late batches gives the same rows as one that drew every batch before them.
    assert [fresh.indices(k, 3) for k in reversed(range(20))][::-1] == late
    assert [stream(seed=1).indices(k, 3) for k in range(20)] != late  # the seed changes the order


def test_each_epoch_visits_every_row_once():
    s = stream()
    rows = [r for k in range(0, 10, 2) for r in s.indices(k, 2)[1]]  # 5 hi batches of 2 = one hi epoch
    assert Counter(rows) == Counter(range(10))
