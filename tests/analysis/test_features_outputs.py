"""The files written about features (mlalign.analysis.features_outputs): features.csv rows, the JSON files, the
markdown tables, the plots and the Neuronpedia links."""

import csv
import io
import json

import pytest

from mlalign.analysis.features import adapter_changes, analyze_features
from mlalign.analysis.features_outputs import (
    FEATURES_CSV_COLUMNS,
    adapter_changes_markdown,
    feature_rows,
    features_markdown,
    features_summary,
    neuronpedia_ids,
    overlap_json,
    plot_features,
)
from tests.analysis.test_features import LANGS, raised, synthetic_data


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_data()


def test_outputs_contract(synthetic, tmp_path):
    _, stats = synthetic
    report = analyze_features(stats, "en", LANGS, top_k=2, min_sentences=2)
    rows = feature_rows(report)
    assert set(FEATURES_CSV_COLUMNS) >= {"lang", "layer", "feature", "firing_rate", "mean_act", "selectivity"}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FEATURES_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    parsed = list(csv.DictReader(io.StringIO(buffer.getvalue())))
    assert {(r["lang"], r["feature"]) for r in parsed} >= {("hi", "3"), ("en", "5")}
    assert ("en", "3") not in {(r["lang"], r["feature"]) for r in parsed}  # never fires in en: no row
    hi3 = next(r for r in parsed if r["lang"] == "hi" and r["feature"] == "3")
    assert float(hi3["selectivity"]) == 1.0 and hi3["specific"] == "True" and "specific" in hi3["listed"]
    overlap = json.loads(json.dumps(overlap_json(report)))
    assert overlap["0"]["hi"]["hi"] == 1.0 and all(0 <= v <= 1 for row in overlap["0"].values() for v in row.values())
    text = features_markdown(report, {"early": [0]}, "synthetic")
    assert "## hi" in text and "specific to hi" in text and "| 0 | 3 |" in text
    paths = plot_features(report, {"early": [0]}, tmp_path)
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_neuronpedia_ids_from_the_registry():
    from omegaconf import OmegaConf

    gemma = OmegaConf.create({"release": "gemma-scope-2b-pt-res-canonical", "id_template": "layer_{layer}/width_16k/canonical"})
    assert neuronpedia_ids(gemma, [3]) == {3: "gemma-2-2b/3-gemmascope-res-16k"}
    local = OmegaConf.create({"release": None, "id_template": None, "path_template": "/x/layer_{layer}"})
    assert neuronpedia_ids(local, [0, 1]) == {0: None, 1: None}
    no_ids = OmegaConf.create({"release": "gemma-scope-2-270m-pt-res-all", "id_template": "layer_{layer}_width_16k_l0_small"})
    assert neuronpedia_ids(no_ids, [2]) == {2: None}


def test_adapter_changes_markdown_lists_the_raised_feature(synthetic):
    sentences, base = synthetic
    changes = adapter_changes(base, raised(sentences, base, 3, 2.0), ["hi", "en"], "en", top_k=1, min_sentences=2)
    text = adapter_changes_markdown(changes, {"early": [0]}, 1)
    assert "## hi" in text and "| 0 | 3 |" in text and "| yes |" in text


def test_features_link_to_neuronpedia_where_the_sae_has_an_id(synthetic):
    sentences, stats = synthetic
    report = analyze_features(stats, "en", LANGS, top_k=2, min_sentences=2)
    url = "https://www.neuronpedia.org/model/0-res/3"
    plain = features_markdown(report, {"early": [0]})
    assert "| 0 | 3 |" in plain and url not in plain
    report.neuronpedia = {0: "model/0-res"}
    assert f"| 0 | [3]({url}) |" in features_markdown(report, {"early": [0]})
    hi3 = next(r for r in feature_rows(report) if r["lang"] == "hi" and r["feature"] == 3)
    assert hi3["neuronpedia_url"] == url
    listed = features_summary(report, {"early": [0]})["lists"]["hi"]["0"]["specific"]
    assert {"feature": 3, "url": url} == {"feature": listed[0]["feature"], "url": listed[0]["neuronpedia_url"]}
    changes = adapter_changes(stats, raised(sentences, stats, 3, 2.0), ["hi"], "en", top_k=1, min_sentences=2)
    assert f"| 0 | [3]({url}) |" in adapter_changes_markdown(changes, {"early": [0]}, 1, {0: "model/0-res"})
    assert "| 0 | 3 |" in adapter_changes_markdown(changes, {"early": [0]}, 1)
