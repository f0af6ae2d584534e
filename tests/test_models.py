"""Model loading: the testbed loads through the same path as a hub model; bad paths and adapters are user errors."""

import json

import pytest
import torch

from mlalign.errors import UserError
from mlalign.models import attach_adapter, load_model, load_tokenizer, model_source, num_layers
from tests.helpers import compose_cfg


def test_testbed_loads_in_eval_mode_with_eager_attention(testbed_dir):
    cfg = compose_cfg(["model=testbed"])
    model = load_model(cfg.model, testbed_dir)
    tokenizer = load_tokenizer(cfg.model, testbed_dir)
    assert num_layers(model) == 26 and not model.training
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    assert tokenizer("hola")["input_ids"][0] == tokenizer.bos_token_id


def test_missing_local_model_is_a_user_error(tmp_path):
    cfg = compose_cfg(["model=testbed", f"model.hf_id={tmp_path}/nowhere"])
    with pytest.raises(UserError, match="cannot load a model from"):
        load_model(cfg.model)


def test_uncached_hub_model_offline_says_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model=gemma2_2b"])
    with pytest.raises(UserError) as err:
        load_tokenizer(cfg.model)
    message = str(err.value)
    assert "hf auth login" in message and "model=testbed" in message and "\n" not in message


def test_testbed_without_a_build_has_no_source():
    cfg = compose_cfg(["model=testbed"])
    with pytest.raises(UserError, match="has no hf_id"):
        model_source(cfg.model, None)


def test_adapter_that_is_not_peft_or_for_another_model_is_a_user_error(testbed_dir, tmp_path):
    cfg = compose_cfg(["model=testbed"])
    model = load_model(cfg.model, testbed_dir)
    with pytest.raises(UserError, match="is not a peft adapter"):
        attach_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "google/gemma-2-2b",
                                                             "peft_type": "LORA"}))
    with pytest.raises(UserError, match="was trained on google/gemma-2-2b"):
        attach_adapter(model, tmp_path, model_source(cfg.model, testbed_dir))
