"""Capture the residual stream of many decoder layers in one forward pass with forward hooks.

`blocks.L.hook_resid_post` (TransformerLens / sae-lens naming) is the output of decoder layer L. We hook the decoder
layers themselves rather than reading `output_hidden_states`: the last entry of `hidden_states` has the final norm
applied, and the hooks let the pass stop right after the deepest requested layer.
"""

from __future__ import annotations

import torch
from torch import nn


LAYER_PATHS = (
    "model.layers",                 # Llama, Qwen, Mistral, Gemma, Phi, OLMo (and their bare decoders' `.layers`)
    "model.language_model.layers",  # Gemma-3 and other multimodal wrappers around a text decoder
    "gpt_neox.layers",              # GPT-NeoX, Pythia
    "transformer.h",                # GPT-2, GPT-J, Falcon, BLOOM
    "model.decoder.layers",         # OPT
    "transformer.blocks",           # MPT
    "layers", "h", "decoder.layers", "language_model.layers",  # the same, given the bare decoder
)
"""Where common Hugging Face causal LMs keep their decoder blocks, tried in order (the first that exists wins)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrappers (PeftModel -> LoraModel -> the model)."""
    for _ in range(3):
        if hasattr(model, "get_base_model"):  # PeftModel
            inner = model.get_base_model()
        elif hasattr(model, "peft_config") and isinstance(getattr(model, "model", None), nn.Module):  # LoraModel
            inner = model.model
        else:
            inner = None
        if inner is None or inner is model:
            break
        model = inner
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (any layout in LAYER_PATHS), a bare decoder, or either wrapped by peft."""
    from mlalign.errors import UserError

    base = _unwrap(model)
    for path in LAYER_PATHS:
        module = base
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise UserError(f"cannot find the decoder layers of {type(base).__name__}: mlalign knows the layouts "
                    f"{', '.join(LAYER_PATHS[:6])}; use a model with one of them (or add its path to "
                    "mlalign.analysis.capture.LAYER_PATHS)")


class _StopForward(Exception):
    """Raised from the deepest requested layer's hook to skip the rest of the model."""


class ResidualCapture:
    """Context manager: while active, each forward pass stores `activations[L]` = output of decoder layer L.

    detach=True stores detached tensors (analysis); detach=False keeps the graph (training losses).
    stop_after_last=True makes `forward()` stop after the deepest requested layer (no LM head, no later layers).
    """

    def __init__(self, model: nn.Module, layers: list[int], detach: bool = True, stop_after_last: bool = False):
        self.model = model
        self.layers = sorted(set(int(layer) for layer in layers))
        self.detach = detach
        self.stop_after_last = stop_after_last
        self.activations: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        last = self.layers[-1]

        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.activations[layer] = hidden.detach() if self.detach else hidden
            if self.stop_after_last and layer == last:
                raise _StopForward

        return hook

    def __enter__(self) -> "ResidualCapture":
        blocks = decoder_layers(self.model)
        for layer in self.layers:
            if not 0 <= layer < len(blocks):
                raise IndexError(f"layer {layer} out of range for a model with {len(blocks)} layers")
            self._handles.append(blocks[layer].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def forward(self, **inputs) -> dict[int, torch.Tensor]:
        """Run the model on `inputs` and return the captured activations of this pass."""
        self.activations = {}
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        return self.activations
