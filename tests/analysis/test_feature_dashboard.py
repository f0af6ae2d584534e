"""Feature dashboards: the Neuronpedia quick-list URL is the one sae-lens builds, SAEs Neuronpedia does not host get a
note and no URL, and the offline page of testbed features holds their contexts, histograms and logit effects."""

from __future__ import annotations

import json
import urllib.parse
import webbrowser

import numpy as np
import pytest

from mlalign.analysis.feature_dashboard import (NOT_HOSTED, dashboard_html, feature_activations, logit_effects,
                                                neuronpedia_export, neuronpedia_quick_list_url)
from mlalign.analysis.spliced import token_batches
from tests.analysis.testkit import jumprelu_sae

LAYER = 13


def test_the_quick_list_url_is_the_one_sae_lens_builds(monkeypatch):
    from sae_lens.analysis.neuronpedia_integration import get_neuronpedia_quick_list

    monkeypatch.setattr(webbrowser, "open", lambda url: True)  # sae-lens opens a browser; here nothing is opened
    sae = jumprelu_sae(16, 32, seed=0)
    sae.cfg.metadata.neuronpedia_id = "gemma-2-2b/3-gemmascope-res-16k"
    sae.cfg.metadata.model_name = "gemma-2-2b"
    expected = get_neuronpedia_quick_list(sae, [5, 17], name="hi specific, layer 3")
    assert neuronpedia_quick_list_url("gemma-2-2b/3-gemmascope-res-16k", "gemma-2-2b", [5, 17],
                                      "hi specific, layer 3") == expected


def test_hosted_layers_get_urls_and_local_saes_a_note_instead():
    lists = {"hi": {3: [5, 17], 4: [2]}}
    hosted = neuronpedia_export(lists, {3: "gemma-2-2b/3-gemmascope-res-16k", 4: None}, "t")
    url = hosted["lists"]["hi"]["3"]["quick_list_url"]
    features = json.loads(urllib.parse.unquote(url.split("&features=")[1]))
    assert [f["index"] for f in features] == ["5", "17"] and features[0]["layer"] == "3-gemmascope-res-16k"
    assert hosted["lists"]["hi"]["4"]["quick_list_url"] is None and hosted["hosted"] == {"3": True, "4": False}
    local = neuronpedia_export(lists, {3: None, 4: None}, "t")
    assert local["note"] == NOT_HOSTED and "does not host" in local["note"]
    assert all(cell["quick_list_url"] is None for cell in local["lists"]["hi"].values())


@pytest.fixture(scope="module")
def bed(testbed_dir):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from mlalign.saes import load_saes
    from tests.helpers import compose_cfg
    from tests.tasks.test_train import bed_overrides

    cfg = compose_cfg(["model=testbed", *bed_overrides(testbed_dir)])
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    sae = load_saes(cfg.sae, [LAYER], model.config.hidden_size, progress=False)[LAYER]
    corpus = load_corpus(cfg.data, ["en", "hi"], "dev")
    return model, tokenizer, sae, {lang: corpus[lang][:8] for lang in ("en", "hi")}


def test_the_offline_page_shows_contexts_histograms_and_logit_effects(bed):
    model, tokenizer, sae, texts = bed
    batches = {lang: token_batches(tokenizer, texts[lang], 4, 48) for lang in texts}
    code = feature_activations(model, sae, LAYER, batches["hi"], list(range(sae.cfg.d_sae)), device="cpu")
    fired = np.concatenate([acts for _, acts in code]).sum(0)
    features = [int(f) for f in np.argsort(-fired)[:2]]  # the two features most active on Hindi
    activations = {lang: feature_activations(model, sae, LAYER, batches[lang], features, device="cpu") for lang in texts}
    assert len(activations["hi"]) == len(texts["hi"])
    ids, acts = activations["hi"][0]
    assert acts.shape == (len(ids), 2) and ids[0] == tokenizer.bos_token_id and np.all(acts[0] == 0)  # BOS not shown
    effects = dict(zip(features, logit_effects(model, sae, features, 4)))
    assert all(len(e["up"]) == 4 and e["up"][0][1] >= e["down"][0][1] for e in effects.values())
    stats = {"hi": {f: {"selectivity": 0.9, "specificity": 0.8, "mean_act": 1.0, "firing_rate": 0.1} for f in features},
             "en": {}}
    page = dashboard_html(tokenizer, LAYER, "testbed", {"hi": features, "en": []}, activations,
                          {f: i for i, f in enumerate(features)}, effects, stats, contexts=3)
    assert page.startswith("<!doctype html>") and "http" not in page  # self-contained, nothing to fetch
    for f in features:
        assert f"feature {f}</h3>" in page
    assert page.count("<svg") == 2 and "<b>raises</b>" in page and "No feature is specific" in page
