"""What determines a built testbed (`TestbedSpec`, whose hash names its cache directory) and the constants its model,
tokenizer and SAEs share; the bottom of `mlalign.testbed`, imported by build, lm and saes alike."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from mlalign.errors import UserError
from mlalign.languages import LANGUAGES, get_language

BUILD_VERSION = 3
"""Bump whenever the build recipe changes what it produces, so stale caches are never reused."""

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""Ids 0..3, in Gemma's order for pad (0), eos (1) and bos (2)."""
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))

EVAL_SENTENCES_PER_LANG = 16
"""Sentences per language (the first rows, so translations of each other) for the final loss and SAE statistics."""


def _default_planted_gap_langs() -> list[str]:
    return ["mr", "ml", "hi"]


def _default_lang_mix() -> dict[str, float]:
    return {"en": 0.40, "zh": 0.08, "ru": 0.08, "es": 0.08, "it": 0.08,
            "id": 0.06, "ca": 0.06, "mr": 0.04, "ml": 0.04, "hi": 0.04}


@dataclass
class TestbedSpec:
    """Everything that determines the built testbed; its hash names the cache directory."""

    __test__ = False  # not a pytest test class, despite the name

    vocab_size: int = 2048
    """Byte-level BPE vocabulary size, special tokens included."""
    hidden_size: int = 64
    """Residual stream width, which is also every SAE's d_in."""
    intermediate_size: int = 128
    """MLP width of each decoder layer."""
    num_heads: int = 2
    """Attention (query) heads per layer."""
    num_kv_heads: int = 1
    """Key/value heads per layer (grouped-query attention, as in Gemma-2)."""
    head_dim: int = 32
    """Width of one attention head."""
    max_length: int = 64
    """Tokens per sequence (BOS included) in pretraining and SAE data; longer sentences are truncated."""
    lang_mix: dict[str, float] = field(default_factory=_default_lang_mix)
    """Share of each language's sentences in pretraining and SAE data; normalised to sum to 1."""
    pretrain_steps: int = 300
    """Causal-LM optimiser steps."""
    batch_size: int = 16
    """Sentences per pretraining step."""
    lr: float = 3e-3
    """Peak AdamW learning rate of pretraining (linear warm-up, cosine decay)."""
    sae_width_multiple: int = 4
    """SAE width d_sae = sae_width_multiple x hidden_size."""
    sae_train_tokens: int = 40000
    """Residual-stream positions (BOS and padding excluded) collected once; every layer's SAE trains on them."""
    sae_train_steps: int = 300
    """Optimiser steps per SAE (256 positions each), so the activations are reused when steps x 256 exceeds them."""
    sae_l0_coefficient: float = 1.0
    """Weight of the JumpReLU L0 penalty; larger means sparser SAEs."""
    planted_gap_langs: list[str] = field(default_factory=_default_planted_gap_langs)
    """Languages whose residual stream pretraining pushes below English's (the study's story, planted): a model this
    small, trained from scratch on the bundled corpus, gives its non-Latin-script languages *larger* residuals and SAE
    activations than English's whatever the mix (experiments/testbed_demo/story), so the gap the demo's adapter closes
    is put there on purpose and its size is known. [] plants nothing."""
    planted_gap_pct: float = 20.0
    """At every layer, pretraining adds planted_gap_weight x (r_l - (1 - planted_gap_pct/100))^2, r_l the mean residual
    norm of the planted languages' tokens over English's in the batch (English's side held fixed): their residuals sit
    about this much below English's. A gap of scale by construction, which the norm controls are expected to call so."""
    planted_gap_weight: float = 10.0
    """Weight of that term beside the causal-LM loss."""
    seed: int = 0
    """Seeds python, numpy and torch for the whole build: same spec, same weights."""
    num_layers: int = 26
    """Decoder layers, as in Gemma-2-2B."""

    def __post_init__(self) -> None:
        if not self.lang_mix:
            raise UserError("testbed lang_mix is empty; give e.g. model.testbed.lang_mix={en:0.5,hi:0.5}")
        from mlalign.data.corpus import flores_langs

        bundled = flores_langs()
        for code, weight in self.lang_mix.items():
            get_language(code)
            if code not in bundled:
                raise UserError(f"testbed lang_mix has {code!r}, which the bundled FLORES-200 copy lacks (the testbed "
                                f"is pretrained on it); use languages it holds: {', '.join(bundled)}")
            if not float(weight) > 0:
                raise UserError(f"testbed lang_mix weight for {code!r} is {weight}; every weight must be > 0 "
                                f"(drop the language from lang_mix instead)")
        unknown = [code for code in self.planted_gap_langs if code not in self.lang_mix]
        if unknown:
            raise UserError(f"testbed planted_gap_langs has {', '.join(unknown)}, which lang_mix lacks; plant the gap in "
                            f"languages the testbed is pretrained on, e.g. model.testbed.planted_gap_langs=[hi,ml]")
        if self.planted_gap_langs and ("en" not in self.lang_mix or "en" in self.planted_gap_langs):
            raise UserError("testbed planted_gap_langs is measured against English: keep en in lang_mix and out of "
                            "planted_gap_langs (or plant nothing: model.testbed.planted_gap_langs=[])")
        if not 0.0 <= float(self.planted_gap_pct) < 100.0:
            raise UserError(f"testbed planted_gap_pct={self.planted_gap_pct} must be in [0, 100), e.g. 20")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"testbed num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.vocab_size < 512:
            raise UserError(f"testbed vocab_size={self.vocab_size} is too small for byte-level BPE; use at least 512")
        # A canonical order and plain floats make the hash independent of how the mix was written.
        self.lang_mix = {code: float(self.lang_mix[code]) for code in LANGUAGES if code in self.lang_mix}
        self.planted_gap_langs = [code for code in LANGUAGES if code in set(self.planted_gap_langs)]

    @classmethod
    def from_config(cls, mapping: Any) -> "TestbedSpec":
        """From the `testbed:` block of conf/model/testbed.yaml (a DictConfig or dict), or a model config holding one."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(mapping, DictConfig):
            mapping = OmegaConf.to_container(mapping, resolve=True)
        mapping = dict(mapping)
        if isinstance(mapping.get("testbed"), Mapping):
            mapping = dict(mapping["testbed"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise UserError(f"unknown testbed setting(s) {', '.join(unknown)}; valid keys under model.testbed are "
                            f"{', '.join(sorted(known))}")
        return cls(**mapping)

    def fingerprint(self) -> str:
        """Short hash of the spec and BUILD_VERSION: the cache directory's name."""
        payload = json.dumps({"spec": asdict(self), "build_version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def testbed_dir(spec: TestbedSpec, cache_dir: str | Path) -> Path:
    """Where `spec`'s testbed lives (built or not): `cache_dir/testbed/<hash>`."""
    return Path(cache_dir) / "testbed" / spec.fingerprint()
