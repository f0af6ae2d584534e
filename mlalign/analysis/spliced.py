"""Spliced-in LM loss: the model's next-token loss with one layer's residual stream replaced by its SAE's
reconstruction, minus the clean loss, per sentence (how much of what the model uses the SAE fails to reconstruct).

For each batch, one clean forward captures every requested layer's residual (`blocks.L.hook_resid_post`, the output
of decoder layer L) and gives the clean loss; then, per layer, one more forward whose forward hook on decoder layer L
swaps that output for x̂ = decode(encode(x)). Layers before L run exactly as in the clean pass, so x̂ computed from the
clean pass's residual is the spliced pass's own reconstruction.

Only analysed positions are spliced (real tokens but BOS): the BOS residual is an attention sink orders of magnitude
larger than content tokens that SAEs reconstruct badly and every other statistic of the project drops; padding never
reaches a real token. The loss is the mean next-token cross-entropy (nats/token) of each sentence's real tokens after
BOS (BOS is never a target; `engine.lm_loss_per_row`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.analysis.engine import analysed_positions, lm_loss_per_row, pad_batch, tokenize_sorted
from mlalign.saes.encode import decode_active


@dataclass
class TokenBatch:
    """One padded batch of sentences: `rows[b]` is row b's sentence index (sentence order across all batches), `keep`
    the positions spliced (`engine.analysed_positions`: real tokens but BOS)."""

    rows: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    keep: torch.Tensor

    def inputs(self, device) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "position_ids": self.position_ids.to(device)}


def token_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[TokenBatch]:
    """`texts` tokenized (BOS first, as the tokenizer adds it), sorted by length into right-padded batches."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    items = tokenize_sorted(tokenizer, texts, max_length)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        padded = pad_batch([ids for _, ids in chunk], pad_id, "right", torch.device("cpu"))
        keep = analysed_positions(padded["input_ids"], padded["attention_mask"], tokenizer.bos_token_id)
        out.append(TokenBatch(rows=torch.tensor([i for i, _ in chunk], dtype=torch.long), keep=keep, **padded))
    return out


def n_sentences(batches: list[TokenBatch]) -> int:
    rows = torch.cat([b.rows for b in batches]) if batches else torch.zeros(0, dtype=torch.long)
    n = len(rows)
    if n and not torch.equal(torch.sort(rows).values, torch.arange(n)):
        raise ValueError("the batches' `rows` must number the sentences 0..n-1, each once")
    return n


def sae_device(sae) -> torch.device:
    param = next(iter(sae.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def reconstruct(sae, x: torch.Tensor) -> torch.Tensor:
    """x̂ = the SAE's reconstruction of residuals x [tokens, d_model], in x's dtype and on x's device."""
    x_in = x.to(sae_device(sae)).float()
    return decode_active(sae, sae.encode(x_in)).to(device=x.device, dtype=x.dtype)


class _Splice:
    """Forward hook on one decoder layer: its output at the flat positions `flat` becomes `x_hat`."""

    def __init__(self, flat: torch.Tensor, x_hat: torch.Tensor):
        self.flat, self.x_hat = flat, x_hat

    def __call__(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        spliced = hidden.flatten(0, 1).index_copy(0, self.flat, self.x_hat.to(hidden.dtype)).view_as(hidden)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced


LOGITS_BUDGET_BYTES = 512 * 2**20
"""The spliced passes of several layers run as one forward over that many copies of the batch (copy j spliced at its
own layer only) while the copies' float32 logits stay under this: a small-vocabulary model (the testbed) runs a
whole group of layers per forward, a 262k-vocabulary one (Gemma 3) one layer at a time, as before."""


def copy_groups(items: list, rows: int, positions: int, vocab: int) -> list[list]:
    """`items` (one copy of a [rows, positions] batch each) in groups whose stacked float32 logits fit
    LOGITS_BUDGET_BYTES."""
    per_copy = max(1, rows * positions * vocab * 4)
    size = max(1, min(len(items), LOGITS_BUDGET_BYTES // per_copy))
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def clean_and_spliced_loss(model: nn.Module, saes: dict, batches: list[TokenBatch], layers: list[int], *, device
                           ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(clean [sentences], {layer: spliced [sentences]}) mean next-token loss per sentence (nats/token; NaN for a
    sentence with no predicted token), sentences in `rows` order. One clean forward per batch serves every layer."""
    layers = sorted(set(int(layer) for layer in layers))
    missing = [layer for layer in layers if layer not in saes]
    if missing:
        raise KeyError(f"no SAE for layer(s) {missing}")
    n = n_sentences(batches)
    clean_sum = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    spliced_sum = {layer: torch.zeros(n, dtype=torch.float64) for layer in layers}
    blocks = decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = batch.inputs(device)
            flat = batch.keep.to(device).flatten().nonzero().squeeze(1)
            with ResidualCapture(model, layers) as capture:
                logits = model(**inputs, use_cache=False).logits
                acts = dict(capture.activations)
            total, predicted = lm_loss_per_row(logits, inputs)
            clean_sum.index_add_(0, batch.rows, total.cpu())
            count.index_add_(0, batch.rows, predicted.cpu())
            rows, positions = inputs["input_ids"].shape
            for group in copy_groups(layers, rows, positions, logits.shape[-1]):
                # Copy j of the batch is spliced at group[j] only: its rows sit at j * rows.. in the stacked batch,
                # so its flat positions are offset by j * rows * positions; the other copies pass that layer clean.
                stacked = {key: value.repeat(len(group), 1) for key, value in inputs.items()}
                handles = [blocks[layer].register_forward_hook(_Splice(
                    flat + j * rows * positions, reconstruct(saes[layer], acts[layer].flatten(0, 1).index_select(0, flat))))
                    for j, layer in enumerate(group)]
                try:
                    spliced_logits = model(**stacked, use_cache=False).logits
                finally:
                    for handle in handles:
                        handle.remove()
                per_row = lm_loss_per_row(spliced_logits, stacked)[0].view(len(group), rows).cpu()
                for j, layer in enumerate(group):
                    spliced_sum[layer].index_add_(0, batch.rows, per_row[j])
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        clean = clean_sum.numpy() / count.numpy()
        return clean, {layer: spliced_sum[layer].numpy() / count.numpy() for layer in layers}


def clean_lm_loss(model: nn.Module, batches: list[TokenBatch], *, device) -> np.ndarray:
    """[sentences] the model's own mean next-token loss per sentence (nats/token), in sentence order."""
    return clean_and_spliced_loss(model, {}, batches, [], device=device)[0]


def spliced_dlm_loss(model: nn.Module, saes: dict, batches: list[TokenBatch], layers: list[int], *, device
                     ) -> dict[int, np.ndarray]:
    """{layer: [sentences]} spliced-in minus clean mean next-token loss per sentence (nats/token), sentence order."""
    clean, spliced = clean_and_spliced_loss(model, saes, batches, layers, device=device)
    return {layer: values - clean for layer, values in spliced.items()}
