"""Fixtures for the evaluation tests: offline environment, one reused TaskManager, a tiny Gemma-2 with its tokenizer."""

from __future__ import annotations

import json
import os

import pytest

from mlalign.data.corpus import BUNDLED_DATA_DIR

# Set before lm-eval/datasets/transformers are imported by any test module: nothing may download.
for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                      "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_name, _value)

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run ~10x faster on one thread on the shared CI cores (no OpenMP spin-waits); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def builtin_task_manager():
    """lm-eval's index of built-in tasks, built once (about 6 s) and shared with mlalign's own cache."""
    from mlalign.evaluation.harness import get_task_manager

    return get_task_manager()


def _training_text() -> list[str]:
    texts = []
    for path in sorted((BUNDLED_DATA_DIR / "okapi").glob("*/*.json")):
        for item in json.loads(path.read_text(encoding="utf-8"))[:30]:
            texts.append(item["instruction"])
            texts.extend(item.get(f"option_{k}") or "" for k in "abcde")
    return [t for t in texts if t]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (any script encodes) trained on a few hundred bundled benchmark sentences; adds BOS like Gemma."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_training_text(), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A randomly initialised two-layer Gemma-2 that fits the tokenizer (eager attention, as Gemma-2 wants)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        sliding_window=512, pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config).eval()
