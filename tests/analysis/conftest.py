"""Tiny real models for the analysis tests: a 4-layer Gemma2ForCausalLM, a BPE tokenizer that prepends BOS, and
sae-lens SAEs with hand-set weights. Built once per session, all on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from mlalign.data.corpus import load_flores
from tests.analysis.testkit import D_MODEL, LANGS, N_LAYERS, jumprelu_sae

# Tiny matrices: intra-op threads only contend with each other (and with other jobs on a shared CI box).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus():
    """The bundled FLORES-200 dev split (99 parallel sentences) for three languages of different tiers."""
    return load_flores(LANGS, "dev")


@pytest.fixture(scope="session")
def tokenizer(corpus):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([s for lang in LANGS for s in corpus[lang]], trainer)
    bos = bpe.token_to_id("<bos>")
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=32, num_hidden_layers=N_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        sliding_window=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )
    lm = Gemma2ForCausalLM(config).eval()
    # The default init (std 0.02) leaves every layer close to the identity; larger weights make layers differ.
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # Like real LMs' attention sink, BOS gets a residual far larger than content tokens: counting it would show.
        lm.model.embed_tokens.weight[tokenizer.bos_token_id] *= 20
    return lm


@pytest.fixture(scope="session")
def saes():
    """One JumpReLU SAE per layer of the tiny model, with different weights per layer."""
    return {layer: jumprelu_sae(D_MODEL, 48, seed=layer) for layer in range(N_LAYERS)}


@pytest.fixture(scope="session")
def texts(corpus):
    """30 sentences per language keep the session fast while leaving room for padding and bootstrap variance."""
    return {lang: corpus[lang][:30] for lang in LANGS}


@pytest.fixture(scope="session")
def ids(corpus):
    return {lang: corpus.ids[lang][:30] for lang in LANGS}


@pytest.fixture(scope="session")
def reference_stats(model, tokenizer, saes, texts):
    """The engine's result at batch size 8, right padding: what other settings are compared against."""
    from mlalign.analysis.engine import EngineSettings, collect_stats

    return collect_stats(model, tokenizer, saes, texts, EngineSettings(batch_size=8, max_length=48, progress=False))
