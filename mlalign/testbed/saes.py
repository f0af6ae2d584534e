"""The testbed's SAEs: collect its residual stream, train one JumpReLU SAE per layer (mlalign.saes.training), score them."""

from __future__ import annotations

import numpy as np
import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.data.corpus import ParallelCorpus
from mlalign.saes.training import SAETrainSettings, fidelity, train_sae
from mlalign.testbed.spec import BOS_ID, TestbedSpec
from mlalign.testbed.lm import encode, sample_sentences

CAPTURE_BATCH_SENTENCES = 32
SAE_BATCH_TOKENS = 256


def _token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions that count in every statistic: real tokens, BOS excluded."""
    return batch["attention_mask"].bool() & (batch["input_ids"] != BOS_ID)


@torch.no_grad()
def capture_tokens(model, tokenizer, spec: TestbedSpec, sentences: list[str]) -> dict[int, torch.Tensor]:
    """Residuals of every layer at every non-BOS, non-padding position: `{layer: [tokens, hidden]}`, one forward
    pass per batch for all layers."""
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(spec.num_layers)}
    with ResidualCapture(model, list(range(spec.num_layers)), stop_after_last=True) as capture:
        for start in range(0, len(sentences), CAPTURE_BATCH_SENTENCES):
            batch = encode(tokenizer, sentences[start:start + CAPTURE_BATCH_SENTENCES], spec)
            mask = _token_mask(batch)
            for layer, hidden in capture.forward(**batch).items():
                per_layer[layer].append(hidden[mask].float())
    return {layer: torch.cat(chunks) for layer, chunks in per_layer.items()}


def collect_residuals(model, tokenizer, spec: TestbedSpec, corpus: ParallelCorpus,
                      rng: np.random.Generator) -> dict[int, torch.Tensor]:
    """`spec.sae_train_tokens` shuffled residual positions per layer, from train sentences drawn with the mix."""
    chunks: list[dict[int, torch.Tensor]] = []
    n_tokens = 0
    while n_tokens < spec.sae_train_tokens:
        acts = capture_tokens(model, tokenizer, spec, sample_sentences(corpus, spec, rng, 4 * CAPTURE_BATCH_SENTENCES))
        chunks.append(acts)
        n_tokens += len(acts[0])
    order = torch.from_numpy(rng.permutation(n_tokens)[: spec.sae_train_tokens])
    return {layer: torch.cat([chunk[layer] for chunk in chunks])[order] for layer in range(spec.num_layers)}


def train_layer_sae(acts: torch.Tensor, layer: int, spec: TestbedSpec, checkpoint_dir: str):
    """Train a JumpReLU SAE on one layer's residuals with mlalign's one SAE training path (sae-lens's SAETrainer)."""
    settings = SAETrainSettings(width=spec.sae_width_multiple * spec.hidden_size, steps=spec.sae_train_steps,
                                batch_size=SAE_BATCH_TOKENS, l0_coefficient=spec.sae_l0_coefficient,
                                model_name="mlalign-testbed", context_size=spec.max_length)
    return train_sae(acts, layer, settings, seed=spec.seed + layer, checkpoint_dir=checkpoint_dir)


def sae_quality(sae, acts: torch.Tensor) -> dict[str, float]:
    """L0 (features firing per token), its share of the width, explained variance and never-firing features."""
    stats = fidelity(sae, acts)
    return {
        "l0": round(stats["l0"], 2),
        "l0_pct": round(stats["l0_pct"], 2),
        "explained_variance": round(1 - stats["fvu"], 4),
        "dead_features": stats["dead_features"],
    }


def evaluate_saes(model, tokenizer, spec: TestbedSpec, heldout: ParallelCorpus, saes: dict) -> dict:
    """Per-layer SAE quality on held-out sentences of every language in the mix."""
    sentences = [s for lang in heldout.langs for s in heldout[lang]]
    acts = capture_tokens(model, tokenizer, spec, sentences)
    per_layer = {str(layer): sae_quality(saes[layer], acts[layer]) for layer in sorted(saes)}
    ev = [stats["explained_variance"] for stats in per_layer.values()]
    l0 = [stats["l0_pct"] for stats in per_layer.values()]
    return {
        "heldout_tokens": len(acts[0]),
        "explained_variance_range": [min(ev), max(ev)],
        "l0_pct_range": [min(l0), max(l0)],
        "per_layer": per_layer,
    }
