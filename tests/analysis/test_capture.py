"""Residual capture: the layer finder knows the common layouts, and the hooked output of decoder layer L is exactly
transformers' own `hidden_states[L + 1]` (the last layer's entry excepted: transformers applies the final norm there)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OlmoConfig, PhiConfig

from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.errors import UserError

N_LAYERS = 3
TINY = {  # random weights from a config, no download: the layouts model.layers, gpt_neox.layers, transformer.h
    "llama": lambda: LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, max_position_embeddings=64),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64),
    "phi": lambda: PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, max_position_embeddings=64),
    "olmo": lambda: OlmoConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                               num_attention_heads=4, max_position_embeddings=64, pad_token_id=0),
}
LAYOUT = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h", "phi": "model.layers",
          "olmo": "model.layers"}


def tiny_model(arch: str):
    torch.manual_seed(0)
    config = TINY[arch]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_captured_residuals_equal_output_hidden_states(arch):
    model = tiny_model(arch)
    module = model
    for name in LAYOUT[arch].split("."):
        module = getattr(module, name)
    assert decoder_layers(model) is module and len(module) == N_LAYERS
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row: the hooks see the same tensors the model passes on
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with ResidualCapture(model, list(range(N_LAYERS))) as capture:
            captured = capture.forward(input_ids=ids, attention_mask=mask)
    assert len(reference) == N_LAYERS + 1  # embeddings, then one entry per layer
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=0)
    # The last entry of hidden_states has the final norm applied; the captured block output has not.
    assert not torch.allclose(captured[N_LAYERS - 1], reference[N_LAYERS], atol=1e-3)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_stop_after_last_gives_the_same_residuals_and_works_through_peft(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), ResidualCapture(model, [0, 1]) as capture:
        full = capture.forward(input_ids=ids)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert decoder_layers(wrapped) is decoder_layers(model)
    assert decoder_layers(wrapped.base_model) is decoder_layers(model)
    with torch.no_grad(), ResidualCapture(wrapped, [0, 1], stop_after_last=True) as capture:
        early = capture.forward(input_ids=ids)
    for layer in (0, 1):  # LoRA's B starts at zero: the adapter does not change the residuals yet
        torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)


def test_an_unknown_layout_is_one_user_error():
    with pytest.raises(UserError, match="cannot find the decoder layers of Sequential"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
