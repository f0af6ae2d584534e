"""The testbed's SAEs: collect its residual stream, train one sae-lens JumpReLU SAE per layer, and score them."""

from __future__ import annotations

import contextlib
import io
from typing import Iterator

import numpy as np
import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.data.corpus import ParallelCorpus
from mlalign.testbed.build import BOS_ID, TestbedSpec
from mlalign.testbed.lm import encode, sample_sentences

CAPTURE_BATCH_SENTENCES = 32
SAE_BATCH_TOKENS = 256
SAE_THRESHOLD_TRAVEL = 1.2
"""Learning rate x steps. Adam moves a JumpReLU threshold by about lr per step, and thresholds must travel O(1)
(inputs are scaled to norm sqrt(d_in)) whatever the step budget, so short test builds get a larger rate."""
SAE_MAX_LR = 1e-2
SAE_PRE_ACT_LOSS = 0.1
"""Anthropic's pre-activation loss on dead features: without it half the features never fire on held-out text,
with it about a third."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


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


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless minibatches, reshuffled every epoch: sae-lens's DataProvider."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=generator)
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def train_layer_sae(acts: torch.Tensor, layer: int, spec: TestbedSpec, checkpoint_dir: str):
    """Train a JumpReLU SAE on one layer's residuals with sae-lens's SAETrainer; return its inference form."""
    from sae_lens import JumpReLUSAE, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    batch_size = min(SAE_BATCH_TOKENS, len(acts))
    steps = spec.sae_train_steps
    lr = min(SAE_MAX_LR, SAE_THRESHOLD_TRAVEL / steps)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=spec.hidden_size,
        d_sae=spec.sae_width_multiple * spec.hidden_size,
        # Residual norms grow with depth; scaling inputs to norm sqrt(d_in) lets one L0 coefficient suit every
        # layer. The trainer folds the scale back into the weights, so the saved SAE takes raw residuals.
        normalize_activations="expected_average_only_in",
        l0_coefficient=spec.sae_l0_coefficient,
        l0_warm_up_steps=steps // 10,
        jumprelu_init_threshold=0.01,
        jumprelu_bandwidth=0.05,
        pre_act_loss_coefficient=SAE_PRE_ACT_LOSS,
        # DeepMind's step L0 loss, as Gemma Scope used for Gemma-2.
        jumprelu_sparsity_loss_mode="step",
        metadata=SAEMetadata(
            model_name="mlalign-testbed",
            hook_name=hook_name(layer),
            hook_layer=layer,
            context_size=spec.max_length,
            prepend_bos=True,
            model_from_pretrained_kwargs={},
        ),
    ))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,  # the constant schedule ignores it, but SAETrainer requires it set
        lr_warm_up_steps=steps // 20,
        lr_scheduler_name="constant",
        dead_feature_window=max(1, steps // 2),
        feature_sampling_window=max(1, steps // 2),
        n_checkpoints=0,
        checkpoint_path=checkpoint_dir,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=max(1, min(50, len(acts) // batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, data_provider=_batches(acts, batch_size, spec.seed + layer))
    # SAETrainer opens a tqdm bar per SAE on stderr; the build shows one bar over layers instead.
    with contextlib.redirect_stderr(io.StringIO()):
        trained = trainer.fit()
    inference = JumpReLUSAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    inference.load_state_dict(state)
    return inference.eval()


@torch.no_grad()
def sae_quality(sae, acts: torch.Tensor) -> dict[str, float]:
    """L0 (features firing per token), its share of the width, explained variance and never-firing features."""
    features = sae.encode(acts)
    recon = sae.decode(features)
    fired = features > 0
    l0 = fired.sum(-1).float().mean().item()
    residual_var = (acts - recon).pow(2).sum()
    total_var = (acts - acts.mean(0)).pow(2).sum()
    return {
        "l0": round(l0, 2),
        "l0_pct": round(100 * l0 / features.shape[-1], 2),
        "explained_variance": round(1 - (residual_var / total_var).item(), 4),
        "dead_features": int((~fired.any(0)).sum().item()),
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
