"""Forward passes task=compare needs beyond the paired outcome pass: mean-pooled residuals per sentence, base-model
token samples (placebo calibration, steering vectors), and the steering intervention itself."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.analysis.engine import analysed_positions, pad_batch, tokenize_sorted


def _batches(model, tokenizer, texts: list[str], batch_size: int, max_length: int):
    """(sentence indices, inputs, analysed-position mask) per batch, shortest sentences first."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    items = tokenize_sorted(tokenizer, texts, max_length)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        inputs = pad_batch([ids for _, ids in batch], pad_id, "right", device)
        keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
        yield [i for i, _ in batch], inputs, keep


@torch.no_grad()
def pooled_residuals(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16,
                     max_length: int = 128) -> dict[int, np.ndarray]:
    """{layer: [sentences, d_model]} each sentence's residual (decoder layer output) averaged over its analysed tokens
    (no BOS, no padding), in the order of `texts`; `model` runs as it is (adapter, hooks)."""
    layers = sorted(set(int(layer) for layer in layers))
    out: dict[int, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for rows, inputs, keep in _batches(model, tokenizer, texts, batch_size, max_length):
            with ResidualCapture(model, layers, stop_after_last=True) as capture:
                acts = capture.forward(**inputs, use_cache=False)
            weight = keep.unsqueeze(-1).float()
            counts = weight.sum(dim=1).clamp_min(1.0)
            for layer in layers:
                pooled = ((acts[layer].float() * weight).sum(dim=1) / counts).double().cpu().numpy()
                if layer not in out:
                    out[layer] = np.zeros((len(texts), pooled.shape[1]))
                out[layer][rows] = pooled
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def residual_tokens(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16,
                    max_length: int = 128) -> dict[int, torch.Tensor]:
    """{layer: [tokens, d_model]} every analysed token's residual (float32, CPU), sentences in the order of `texts`."""
    layers = sorted(set(int(layer) for layer in layers))
    parts: dict[int, list[tuple[int, torch.Tensor]]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        for rows, inputs, keep in _batches(model, tokenizer, texts, batch_size, max_length):
            with ResidualCapture(model, layers, stop_after_last=True) as capture:
                acts = capture.forward(**inputs, use_cache=False)
            for layer in layers:
                for r, row in enumerate(rows):
                    parts[layer].append((row, acts[layer][r][keep[r]].float().cpu()))
    finally:
        model.train(was_training)
    return {layer: torch.cat([t for _, t in sorted(chunks, key=lambda c: c[0])]) for layer, chunks in parts.items()}


@contextlib.contextmanager
def steering(model, vectors: dict[int, torch.Tensor] | None, alpha: float):
    """While active, decoder layer L's output gets alpha · vectors[L] added at every position (ActAdd-style
    representation steering). At alpha = 0 the hooks run and add exact zeros: the base model bit for bit."""
    handles = []
    if vectors:
        blocks = decoder_layers(model)

        def hook_for(vector):
            def hook(_module, _inputs, output):
                if isinstance(output, tuple):
                    return (output[0] + alpha * vector.to(output[0].dtype), *output[1:])
                return output + alpha * vector.to(output.dtype)
            return hook

        for layer, vector in sorted(vectors.items()):
            handles.append(blocks[int(layer)].register_forward_hook(hook_for(vector.to(next(model.parameters()).device))))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def steering_vectors(reference_tokens: dict[int, torch.Tensor], target_tokens: dict[int, torch.Tensor]
                     ) -> dict[int, torch.Tensor]:
    """{layer: mean reference residual − mean target residual} over analysed tokens (the train split)."""
    return {layer: reference_tokens[layer].double().mean(dim=0).float() - target_tokens[layer].double().mean(dim=0).float()
            for layer in reference_tokens}
