"""Steering: greedy generation from English prompts with alpha x a language's SAE feature direction added to the
residual stream at one layer, and the share of generations an offline identifier calls that language.

The direction of a feature set S is the normalised mean of its unit decoder rows, d = mean_f (W_dec[f] / |W_dec[f]|),
d̂ = d / |d|, so features with long decoder rows do not dominate it. The added vector is alpha x s x d̂ with s the
centred RMS residual of the English prompts at the layer, sqrt(mean_t ||x_t - x̄||²) (`centred_residual_scale`):
**alpha is in units of how far a typical residual lies from the mean residual**, whatever the model's scale. Not the
uncentred norm ||x||: where a near-constant component dominates it (Gemma 3 270M: 93-98% of the norm), alpha 1 would
be several times everything that varies between tokens and languages. It is added at every prompt position but BOS and padding (the positions every other statistic analyses) and at every
generated token. Alpha 0 adds exact zeros, so it reproduces unsteered generation token for token (tested).
docs/method.md §8c.

A large push can break generation into repetition ("iliiliili..."), which an identifier still labels with some
language: each row also gives the share of generations that are repetitive (`compression_ratio` above
REPETITIVE_COMPRESSION) and the share in the language *and* not repetitive, for both arms. Garbled text that does not
repeat is not caught by this.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.analysis.engine import analysed_positions, pad_batch


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def centred_residual_scale(model: nn.Module, tokenizer, prompts: list[str], layer: int, *, max_length: int, device,
                           batch_size: int = 16) -> float:
    """sqrt(mean_t ||x_t - x̄||²) of decoder layer `layer`'s output over the prompts' analysed positions (real tokens
    but BOS), x̄ their mean: the typical distance of a residual from the mean residual, steering's unit of alpha."""
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    kept = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            inputs = pad_batch(encoded[start:start + batch_size], _pad_id(tokenizer), "right", torch.device(device))
            keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
            with ResidualCapture(model, [layer], stop_after_last=True) as capture:
                kept.append(capture.forward(**inputs)[layer][keep].double().cpu())
    finally:
        model.train(was_training)
    x = torch.cat(kept) if kept else torch.zeros(0)
    if len(x) < 2:
        raise ValueError("the centred residual scale needs at least two analysed tokens")
    return float(((x - x.mean(dim=0)) ** 2).sum(dim=1).mean().sqrt())


def feature_direction(sae, features: list[int]) -> torch.Tensor:
    """[d_in] float32 unit vector: the normalised mean of the features' unit decoder rows (zeros for no feature)."""
    if not features:
        return torch.zeros(sae.W_dec.shape[1])
    rows = sae.W_dec.detach().float().cpu()[torch.tensor(list(features), dtype=torch.long)]
    mean = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(dim=0)
    return mean / mean.norm().clamp_min(1e-12)


class _Steer:
    """Forward hook on one decoder layer: adds `vector` at the prompt's `mask`ed positions on the first (prefill) call
    and at every position of the later (one-token) calls of generation."""

    def __init__(self, vector: torch.Tensor, mask: torch.Tensor):
        self.vector, self.mask, self.prefilled = vector, mask, False

    def __call__(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        add = self.vector.to(device=hidden.device, dtype=hidden.dtype)
        if not self.prefilled:
            self.prefilled = True
            steered = hidden + self.mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype) * add
        else:
            steered = hidden + add
        return (steered, *output[1:]) if isinstance(output, tuple) else steered


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, *, max_length: int,
                    device, layer: int | None = None, vector: torch.Tensor | None = None, batch_size: int = 16
                    ) -> list[list[int]]:
    """The greedily generated token ids after each prompt (prompts truncated to max_length tokens, left-padded),
    with `vector` added at decoder layer `layer` (`_Steer`) when given. Stops at EOS or max_new_tokens."""
    pad_id = _pad_id(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    out: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            inputs = pad_batch(encoded[start:start + batch_size], pad_id, "left", torch.device(device))
            handle = None
            if vector is not None:
                mask = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
                handle = decoder_layers(model)[layer].register_forward_hook(_Steer(vector, mask))
            try:
                generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                           max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            finally:
                if handle is not None:
                    handle.remove()
            width = inputs["input_ids"].shape[1]
            for row in generated[:, width:].tolist():
                out.append(_until_eos(row, tokenizer.eos_token_id))
    finally:
        model.train(was_training)
    return out


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    return row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row


def steering_results(generate, identify, directions: dict[str, tuple[torch.Tensor, torch.Tensor]], alphas: list[float],
                     scale: float, examples: int = 3, *, progress: bool = False) -> dict:
    """results[lang] = [{alpha, share_in_lang, share_in_lang_random, examples}] for every alpha (0 first: the unsteered
    English baseline, one generation shared by every language and both arms).

    generate(vector or None) -> list of generated texts; identify(texts) -> their language codes; directions[lang] =
    (unit direction of its specific features, of its matched random features); scale: alpha's unit (`centred_residual_scale`);
    progress: a bar over the steered languages (each: two generations per non-zero alpha)."""
    from mlalign.analysis.engine import progress_bar

    alphas = sorted({0.0, *(float(a) for a in alphas)})
    baseline = generate(None)
    baseline_labels = identify(baseline)
    results: dict[str, list[dict]] = {}
    for lang, (direction, random_direction) in progress_bar(list(directions.items()), progress, unit="language",
                                                            desc="steering"):
        rows = []
        for alpha in alphas:
            if alpha == 0.0:
                texts, labels, texts_random, labels_random = baseline, baseline_labels, baseline, baseline_labels
            else:
                texts = generate(alpha * scale * direction)
                labels = identify(texts)
                texts_random = generate(alpha * scale * random_direction)
                labels_random = identify(texts_random)
            fluent, fluent_random = ([not r for r in _repetitive(t)] for t in (texts, texts_random))
            rows.append({"alpha": alpha, "share_in_lang": _share(labels, lang),
                         "share_in_lang_random": _share(labels_random, lang),
                         "share_repetitive": 1.0 - float(np.mean(fluent)) if fluent else None,
                         "share_repetitive_random": 1.0 - float(np.mean(fluent_random)) if fluent_random else None,
                         "share_in_lang_not_repetitive": _share_where(labels, fluent, lang),
                         "share_in_lang_not_repetitive_random": _share_where(labels_random, fluent_random, lang),
                         "examples": texts[:examples]})
        results[lang] = rows
    return results


def _share(labels: list[str], lang: str) -> float | None:
    return float(np.mean([label == lang for label in labels])) if labels else None


REPETITIVE_COMPRESSION = 2.4
"""A generation whose UTF-8 bytes compress by more than this (zlib) counts as repetitive: the threshold Whisper uses
to reject degenerate, looping decodes (`compression_ratio_threshold`). Unsteered Gemma 3 270M continuations of
English FLORES sentences sit around 1.1-1.6."""


def compression_ratio(text: str) -> float:
    """len(UTF-8 bytes) / len(zlib-compressed bytes); 0 for an empty text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _repetitive(texts: list[str]) -> list[bool]:
    return [compression_ratio(text) > REPETITIVE_COMPRESSION for text in texts]


def _share_where(labels: list[str], keep: list[bool], lang: str) -> float | None:
    """The share of all generations that are in `lang` and kept."""
    return float(np.mean([label == lang and k for label, k in zip(labels, keep)])) if labels else None


def plot_steering(results: dict, layer: int, path, title: str = ""):
    """analysis/steering.png: per language the share of generations identified as it vs alpha, its specific features'
    direction (solid) against the matched-random direction (dashed); alpha 0 is the unsteered English baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlalign.io import save_figure

    langs = list(results)
    cols = min(5, max(1, len(langs)))
    n_rows = (len(langs) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.6 * cols, 2.2 * n_rows), squeeze=False, sharey=True)
    for ax, lang in zip(axes.flat, langs):
        alphas = [r["alpha"] for r in results[lang]]
        ax.plot(alphas, [r["share_in_lang"] for r in results[lang]], "o-", label="its features")
        ax.plot(alphas, [r["share_in_lang_random"] for r in results[lang]], "s--", label="matched random")
        if all("share_in_lang_not_repetitive" in r for r in results[lang]):
            ax.plot(alphas, [r["share_in_lang_not_repetitive"] for r in results[lang]], "^:",
                    label="its features, not repetitive")
        ax.set_title(lang, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("alpha (x centred RMS residual)", fontsize=8)
    for ax in list(axes.flat)[len(langs):]:
        ax.axis("off")
    axes[0][0].set_ylabel("share identified as lang")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title + ', ' if title else ''}steering at layer {layer} from English prompts", fontsize=10)
    fig.tight_layout()
    saved = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return saved
