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


def _tiny_gpt2_folder(root, testbed_dir):
    """A random-weight GPT-2 (transformer.h layout, no `num_hidden_layers` key in its config.json) saved like a hub
    model, with the testbed's tokenizer: what `model=hf model.hf_id=DIR` reads, no download."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(testbed_dir / "model")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=3, n_head=4, n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_model_hf_reads_layers_and_width_from_the_config(testbed_dir, tmp_path):
    from mlalign.models import resolve_model_shape

    folder = _tiny_gpt2_folder(tmp_path / "gpt2", testbed_dir)
    assert "num_hidden_layers" not in json.loads((folder / "config.json").read_text())  # GPT-2 names it n_layer
    cfg = compose_cfg(["model=hf", f"model.hf_id={folder}"])
    assert cfg.model.num_layers is None and cfg.model.hidden_size is None and cfg.sae.name == "none"
    resolve_model_shape(cfg.model)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (3, 48)
    typed = compose_cfg(["model=hf", f"model.hf_id={folder}", "model.num_layers=7"])
    resolve_model_shape(typed.model)  # a typed value is kept (and checked against the weights when they load)
    assert (typed.model.num_layers, typed.model.hidden_size) == (7, 48)


@pytest.mark.slow
def test_bring_your_own_model_from_no_saes_to_an_analysis(testbed_dir, tmp_path):
    """model=hf without public SAEs: one line saying what to run; train_saes; then analyze with sae=local."""
    from tests.helpers import run_cli

    folder = _tiny_gpt2_folder(tmp_path / "gpt2", testbed_dir)
    common = ["model=hf", f"model.hf_id={folder}", "model.dtype=float32", "model.device=cpu", "langs=[hi]",
              "layers=[1]", f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"]
    missing = run_cli(["task=analyze", *common, "data.max_sentences=8"])
    assert missing.returncode == 1
    line = missing.stderr.strip().splitlines()[-1]
    assert line.startswith("error: sae=none: no SAEs for this model") and "task=train_saes" in line
    assert "sae=local sae.path_template=<that run dir>/saes" in line

    trained = run_cli(["task=train_saes", *common, "sae_train.tokens=2000", "sae_train.epochs=2",
                       "sae_train.width=96", "sae_train.eval_sentences=8"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train_saes").iterdir()
    analysed = run_cli(["task=analyze", *common, "sae=local", f"sae.path_template={run / 'saes'}",
                        "data.max_sentences=8", "analysis.bootstrap=20", "analysis.plots=false"])
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    (analysis,) = [d for d in (tmp_path / "outputs" / "analyze").iterdir() if (d / "COMPLETE").is_file()]
    summary = json.loads((analysis / "analysis" / "summary.json").read_text())
    assert summary["layers"] == [1] and summary["sae"] == "local"
    config = (analysis / "config.yaml").read_text()
    assert "num_layers: 3" in config and "hidden_size: 48" in config  # read from config.json, written down


def test_swapped_adapters_give_the_outputs_of_freshly_attached_ones(tmp_path):
    """adapters=[A,B,...] keeps one base model and swaps adapters through peft: each adapter's logits equal those of
    the same adapter attached to a fresh copy of the base, and only the active adapter stays loaded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mlalign.models import swap_adapter

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)

    def base():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        model.config._name_or_path = str(tmp_path / "base")
        return model

    folders = []
    for k, targets in enumerate((["q_proj", "v_proj"], ["o_proj"], ["q_proj", "v_proj"])):
        torch.manual_seed(10 + k)
        wrapped = get_peft_model(base(), LoraConfig(r=2 + k, target_modules=targets, init_lora_weights=False))
        wrapped.save_pretrained(tmp_path / f"a{k}")
        folders.append(tmp_path / f"a{k}")
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    shared = base()
    with torch.no_grad():
        plain = shared(input_ids=ids).logits
    outputs = []
    for k, folder in enumerate(folders):
        shared = swap_adapter(shared, folder, f"adapter_{k}")
        assert list(shared.peft_config) == [f"adapter_{k}"]
        with torch.no_grad():
            outputs.append(shared(input_ids=ids).logits)
    for k, folder in enumerate(folders):
        fresh = attach_adapter(base(), folder)
        with torch.no_grad():
            torch.testing.assert_close(outputs[k], fresh(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.allclose(outputs[k], plain)  # random B: the adapter changes the logits
