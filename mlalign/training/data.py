"""Parallel training batches (target sentence, English translation) whose order is a pure function of the step.

Micro-batch k trains target language `langs[k % n_langs]` on the next `batch_size` pairs of that language's stream;
the stream is the concatenation of per-epoch permutations seeded by (seed, language index, epoch). Nothing depends on
how many batches were drawn before, so a run resumed at step s sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mlalign.analysis.engine import pad_batch
from mlalign.data.corpus import load_corpus
from mlalign.errors import UserError


@dataclass
class ParallelBatch:
    lang: str
    target: dict[str, torch.Tensor]
    """input_ids, attention_mask, position_ids of the target-language sentences."""
    reference: dict[str, torch.Tensor]
    """The same for their English translations, row for row."""


@dataclass
class ParallelStream:
    """Tokenised (target, reference) pairs per target language and the step -> batch schedule."""

    langs: list[str]
    target_ids: dict[str, list[list[int]]]
    reference_ids: dict[str, list[list[int]]]
    pad_id: int
    seed: int
    _perms: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.target_ids.values())

    def _row(self, lang_index: int, position: int) -> int:
        n = len(self.target_ids[self.langs[lang_index]])
        epoch, offset = divmod(position, n)
        key = (lang_index, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, lang_index, epoch]).permutation(n)
        return int(self._perms[key][offset])

    def indices(self, micro_batch: int, batch_size: int) -> tuple[str, list[int]]:
        """(language, row indices) of global micro-batch `micro_batch`."""
        lang_index = micro_batch % len(self.langs)
        start = (micro_batch // len(self.langs)) * batch_size
        return self.langs[lang_index], [self._row(lang_index, start + i) for i in range(batch_size)]

    def batch(self, micro_batch: int, batch_size: int, device: torch.device) -> ParallelBatch:
        lang, rows = self.indices(micro_batch, batch_size)
        target = pad_batch([self.target_ids[lang][r] for r in rows], self.pad_id, "right", device)
        reference = pad_batch([self.reference_ids[lang][r] for r in rows], self.pad_id, "right", device)
        return ParallelBatch(lang, target, reference)


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                            max_length=max_length)["input_ids"]]


def load_parallel_stream(data_cfg, targets: list[str], reference_lang: str, split: str, tokenizer, max_length: int,
                         seed: int) -> ParallelStream:
    """Pairs (target sentence, English translation) of `split` for every target language, tokenised once."""
    corpus = load_corpus(data_cfg, [reference_lang, *targets], split)
    target_ids, reference_ids = {}, {}
    for lang in targets:
        pairs = corpus.aligned(lang, reference_lang)
        if not pairs:
            raise UserError(f"split {split!r} has no {lang} sentence with an {reference_lang} translation; "
                            f"set data.splits.train to a split that holds parallel text")
        target_ids[lang] = tokenize(tokenizer, [t for t, _ in pairs], max_length)
        reference_ids[lang] = tokenize(tokenizer, [r for _, r in pairs], max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return ParallelStream(list(targets), target_ids, reference_ids, int(pad_id), int(seed))
