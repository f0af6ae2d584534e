"""The metric registry: one record per metric, read by statistics, metric maths, bootstrap, wording and the loss."""

import numpy as np
import pytest
import torch

from mlalign.analysis import registry
from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.analysis.metrics import bootstrap_ci, compute_metrics, disparity
from mlalign.analysis.registry import REGISTRY, DenseView, Metric, SoftView, SparseView, get_metric, register_metric
from mlalign.saes.encode import SparseCode
from mlalign.errors import UserError
from mlalign.training import losses as L


@pytest.fixture
def mean_active_value():
    """A metric registered in one place only (mean value of a token's active features), removed afterwards."""
    metric = register_metric(Metric("mean_active_value", "mean active-feature value",
                                    per_token=lambda code: code.row_sum() / code.row_count().clamp_min(1)))
    yield metric
    registry.REGISTRY.pop(metric.name)


def test_a_metric_registered_once_reaches_statistics_metrics_bootstrap_and_loss(mean_active_value, model, tokenizer,
                                                                                 saes, texts):
    """Registering a record is all it takes: the engine keeps its per-sentence sums, compute_metrics and the bootstrap
    report it, the summary words come from it, and the loss can align it."""
    small = {lang: sentences[:6] for lang, sentences in texts.items()}
    stats = collect_stats(model, tokenizer, saes, small, EngineSettings(batch_size=3, max_length=48, progress=False))
    layer = next(iter(saes))
    sums = stats["en"][layer]
    assert sums.sum_of("mean_active_value").shape == (6,)
    # Its own formula, not another metric's: the mean over a token's active features exceeds the mean over all of them.
    assert np.all(sums.sum_of("mean_active_value") > sums.sum_of("mean_act"))
    values = compute_metrics(stats)
    assert "mean_active_value" in values["hi"][layer]
    assert values["en"][layer]["mean_active_value"] != pytest.approx(values["en"][layer]["mean_act"])
    boot = bootstrap_ci(stats, "en", "mean_active_value", n_resamples=50, seed=1)
    low, high = boot["disparity_ci"]["hi"][layer]
    point = disparity(values, "en", "mean_active_value")["hi"][layer]
    assert low <= point <= high
    assert get_metric("mean_active_value").words == "mean active-feature value"
    assert "mean_active_value" in L.alignable_metrics()


def test_the_one_formula_gives_the_same_value_on_dense_sparse_and_surrogate_views():
    acts = torch.tensor([[1.5, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0], [1.0, 0.5, 0.0, 0.0]])
    dense, sparse = DenseView(acts, dtype=torch.float64), SparseView(SparseCode.from_dense(acts), dtype=torch.float64)
    for name in ("mean_act", "l1", "l0"):
        metric = get_metric(name)
        assert torch.allclose(metric.per_token(dense).double(), metric.per_token(sparse).double())
    assert torch.equal(get_metric("mean_act").per_token(DenseView(acts)), torch.tensor([3.5, 3.0, 1.5]) / 4)
    assert torch.equal(get_metric("l0").per_token(DenseView(acts)), torch.tensor([2.0, 1.0, 2.0]))
    # The smooth view counts by summing, so l0's surrogate has a gradient for every feature.
    soft = torch.full((2, 4), 0.25, requires_grad=True)
    get_metric("l0").per_token(SoftView(soft)).sum().backward()
    assert torch.equal(soft.grad, torch.ones(2, 4))


def test_pooled_metric_point_and_bootstrap_come_from_one_function(reference_stats, ids):
    values = compute_metrics(reference_stats)
    sums = reference_stats["hi"][1]
    assert values["hi"][1]["fvu_raw"] == pytest.approx(sums.sq_err.sum() / sums.sq_norm.sum())
    boot = bootstrap_ci(reference_stats, "en", "fvu", ids_by_lang=ids, n_resamples=100, seed=0)
    assert boot["values_ci"]["hi"][1]["feature_coverage"] is None  # registered as not bootstrappable
    low, high = boot["values_ci"]["hi"][1]["fvu"]
    assert low <= values["hi"][1]["fvu"] <= high


def test_registry_refuses_duplicates_ambiguous_records_and_unknown_names():
    with pytest.raises(ValueError, match="twice"):
        register_metric(Metric("mean_act", "again", per_token=lambda code: code.row_sum()))
    with pytest.raises(ValueError, match="exactly one"):
        register_metric(Metric("both", "both", per_token=lambda code: code.row_sum(), residual_sum="resid_norm"))
    with pytest.raises(UserError, match="analysis.metric=one of mean_act"):
        get_metric("mean_activation")
    with pytest.raises(UserError, match="loss alignment supports"):
        L.per_token_metric(torch.ones(2, 3), "fvu")
    assert [m for m in REGISTRY if REGISTRY[m].lower_is_better] == ["fvu", "fvu_raw"]
