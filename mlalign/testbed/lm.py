"""The testbed's language model: byte-level BPE tokenizer, tiny Gemma-2, and its brief English-heavy pretraining."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from mlalign.analysis.capture import ResidualCapture
from mlalign.data.corpus import ParallelCorpus
from mlalign.testbed.spec import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, TestbedSpec


def build_tokenizer(spec: TestbedSpec, sentences: list[str]):
    """Byte-level BPE trained on `sentences`, prepending `<bos>` on encode and padding with `<pad>` like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(sentences, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=spec.max_length,
        padding_side="right",
        # Byte-level BPE decodes exactly; the default clean-up would rewrite spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )


CONTEXT_LENGTH = 1024
"""The testbed's context window (pretraining itself uses `spec.max_length`-token sentences)."""


def new_model(spec: TestbedSpec):
    """A randomly initialised Gemma2ForCausalLM of `spec`'s shape (seed the torch RNG first)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        # Rotary positions have no learned table, so the context can exceed the pretraining length; lm-eval sizes its
        # prompts by this number, and byte-level ARC/MMLU items in Devanagari or Malayalam run to a few hundred tokens.
        max_position_embeddings=CONTEXT_LENGTH,
        query_pre_attn_scalar=spec.head_dim,
        # Gemma-2 alternates local and global attention; a window of the whole context keeps the layer types
        # while no sequence the testbed sees is long enough for the window to cut in.
        sliding_window=spec.max_length,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        attn_implementation="eager",  # the only Gemma-2 attention that works on CPU in transformers 5
    )
    return Gemma2ForCausalLM(config)


def sample_batch(corpus: ParallelCorpus, spec: TestbedSpec, rng: np.random.Generator,
                 n: int) -> tuple[list[str], list[str]]:
    """`n` sentences drawn with replacement, the language of each drawn with `spec.lang_mix`'s probabilities, and the
    language of each."""
    langs = list(spec.lang_mix)
    weights = np.array([spec.lang_mix[lang] for lang in langs])
    picks = rng.choice(len(langs), size=n, p=weights / weights.sum())
    return [corpus[langs[i]][rng.integers(len(corpus[langs[i]]))] for i in picks], [langs[i] for i in picks]


def sample_sentences(corpus: ParallelCorpus, spec: TestbedSpec, rng: np.random.Generator, n: int) -> list[str]:
    """`sample_batch`'s sentences alone."""
    return sample_batch(corpus, spec, rng, n)[0]


def encode(tokenizer, sentences: list[str], spec: TestbedSpec) -> dict[str, torch.Tensor]:
    return tokenizer(sentences, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt")


def _lm_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def planted_gap_penalty(residuals: list[torch.Tensor], batch: dict[str, torch.Tensor], langs: list[str],
                        spec: TestbedSpec) -> torch.Tensor:
    """`spec.planted_gap_weight` x Σ_l (r_l − (1 − planted_gap_pct/100))², r_l = mean residual norm at layer l of the
    batch's planted-language tokens over the mean of its English tokens (held fixed: only the planted side moves).
    BOS and padding count nowhere; 0 for a batch without both kinds of sentence."""
    tokens = batch["attention_mask"].bool().clone()
    tokens[:, 0] = False  # BOS
    planted = tokens & torch.tensor([lang in spec.planted_gap_langs for lang in langs])[:, None]
    english = tokens & torch.tensor([lang == "en" for lang in langs])[:, None]
    if not (planted.any() and english.any()):
        return torch.zeros(())
    target = 1.0 - float(spec.planted_gap_pct) / 100.0
    ratios = torch.stack([h[planted].norm(dim=-1).mean() / h[english].norm(dim=-1).mean().detach()
                          for h in residuals])
    return float(spec.planted_gap_weight) * ((ratios - target) ** 2).sum()


def pretrain(model, tokenizer, spec: TestbedSpec, corpus: ParallelCorpus, rng: np.random.Generator, progress: bool) -> None:
    """Causal-LM training on sentences sampled with the language mix: AdamW, linear warm-up, cosine decay; with
    `spec.planted_gap_langs`, plus `planted_gap_penalty`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(range(spec.pretrain_steps), desc="testbed pretrain", unit="step", disable=not progress)
    # The residual hooks (graph kept) only when planting: otherwise they would hold every layer's activations for
    # nothing.
    capture = (ResidualCapture(model, list(range(spec.num_layers)), detach=False) if spec.planted_gap_langs
               else contextlib.nullcontext())
    with capture:
        for _ in bar:
            sentences, langs = sample_batch(corpus, spec, rng, spec.batch_size)
            batch = encode(tokenizer, sentences, spec)
            loss = model(**batch, labels=_lm_labels(batch)).loss
            if spec.planted_gap_langs:
                residuals = [capture.activations[layer] for layer in range(spec.num_layers)]
                loss_total = loss + planted_gap_penalty(residuals, batch, langs, spec)
            else:
                loss_total = loss
            loss_total.backward()
            _step(model, optimizer, scheduler)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _step(model, optimizer, scheduler) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def final_loss_per_lang(model, tokenizer, spec: TestbedSpec, corpus: ParallelCorpus, n_sentences: int) -> dict[str, float]:
    """Mean next-token loss (nats per token) on each language's first `n_sentences` train rows, which are
    translations of one another, so languages are compared on the same content."""
    losses = {}
    for lang in spec.lang_mix:
        batch = encode(tokenizer, corpus[lang][:n_sentences], spec)
        labels = _lm_labels(batch)
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        losses[lang] = round(loss.item(), 4)
    return losses
