"""Stream each language's sentences through the model once and accumulate SAE statistics for every requested layer."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlalign.analysis.capture import ResidualCapture, decoder_layers
from mlalign.saes.encode import DECODE_MODES, StackedSAEs, elementwise_encoder, sparse_decode_wanted, stack_groups
from mlalign.analysis.features import FeatureStats, ListedSums, SentenceFeatureStats
from mlalign.analysis.stats import POSITION_CAP_QUANTILE, LayerStats, SentenceSums
from mlalign.errors import UserError

log = logging.getLogger(__name__)


def progress_bar(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return iterable
    return tqdm(iterable, **kwargs)


def tokenize_sorted(tokenizer, texts: list[str], max_length: int) -> list[tuple[int, list[int]]]:
    """(text index, token ids) for every text, shortest first (ties by index) so that batches need little padding.

    Special tokens are added as the tokenizer defines them (BOS for Gemma and Llama); `max_length` truncates.
    """
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: (len(encoded[i]), i))
    return [(i, list(encoded[i])) for i in order]


def truncated_flags(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """[n_texts] bool: the text has more than `max_length` tokens (special tokens included), so it is cut."""
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    return np.array([len(ids) > max_length for ids in full], dtype=bool)


def check_bos(tokenizer, saes: dict, rows: list[list[int]], min_position: int = 0) -> None:
    """Check that BOS is where the statistics assume it is, instead of trusting it.

    Without BOS the first content token becomes the attention sink (a residual norm far above the rest) and
    dominates every mean. If the tokenizer has a BOS token and the SAEs were trained with it (sae-lens metadata
    `prepend_bos`), every non-empty row must start with it, unless `min_position >= 1` drops the first token anyway.
    A tokenizer without any BOS (Qwen) gets a warning that the first token is counted unless min_position=1.
    """
    bos_id = tokenizer.bos_token_id
    rows = [row for row in rows if row]
    if bos_id is None:
        if min_position < 1 and rows:
            log.warning("the tokenizer has no BOS token, so each sentence's first token (the attention sink) is "
                        "analysed; analysis.min_position=1 drops it")
        return
    missing = sum(row[0] != bos_id for row in rows)
    if not missing or min_position >= 1:
        return
    trained_with_bos = any(getattr(sae.cfg.metadata, "prepend_bos", None) is True for sae in saes.values())
    message = (f"the tokenizer did not put its BOS token {tokenizer.bos_token!r} first in {missing} of {len(rows)} "
               f"sentences, so their first content token becomes the attention sink")
    if trained_with_bos:
        raise UserError(f"{message}, but the SAEs were trained with BOS prepended (prepend_bos); use the model's own "
                        "tokenizer (one that adds BOS), or set analysis.min_position=1 to drop each first token")
    log.warning("%s and is analysed; analysis.min_position=1 drops it", message)


def pad_batch(
    rows: list[list[int]], pad_id: int, padding_side: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids for one batch.

    position_ids count real tokens only: without them a left-padded row would see shifted rotary positions (HF
    models default to 0..T-1 regardless of the mask), and left padding would change the numbers.
    """
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


def analysed_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None,
                       min_position: int = 0, max_position: int | None = None) -> torch.Tensor:
    """[batch, seq] bool: real tokens minus each row's leading BOS (found from the mask, so either padding side works),
    and only positions min_position <= pos < max_position (pos counted from the mask, 0 = the row's first token).

    The BOS residual is an attention sink with a norm orders of magnitude above content tokens; it carries no
    language and would dominate every mean. `max_position` compares languages over the same position window;
    `min_position=1` drops the first token of models without BOS (their attention sink).
    """
    keep = attention_mask.bool()
    if min_position > 0 or max_position is not None:
        position = attention_mask.cumsum(dim=1) - 1
        keep = keep & (position >= min_position)
        if max_position is not None:
            keep = keep & (position < max_position)
    if bos_token_id is None:
        return keep
    first_real = keep.int().argmax(dim=1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    is_bos = keep[rows, first_real] & (input_ids[rows, first_real] == bos_token_id)
    keep = keep.clone()
    keep[rows[is_bos], first_real[is_bos]] = False
    return keep


def position_cap(tokenizer, texts: list[str], max_length: int, min_position: int = 0, max_position: int | None = None,
                 quantile: float = POSITION_CAP_QUANTILE) -> int | None:
    """The last position of the position-matched window: the `quantile` point of the analysed positions of `texts`'
    tokens, i.e. the smallest position p with at least `quantile` of them at positions <= p (inverted CDF).

    Tokens and positions as the engine analyses them (`analysed_positions` of the length-sorted, truncated rows: BOS
    dropped, the min_position/max_position window applied), from tokenization alone, so the cap is known before any
    forward pass. None if no token is analysed.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    rows = [ids for _, ids in tokenize_sorted(tokenizer, texts, max_length)]
    counts = np.zeros(max(1, max_length), dtype=np.int64)
    for batch in _batches(rows, 256):
        inputs = pad_batch(batch, 0, "right", torch.device("cpu"))
        keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id,
                                  min_position, max_position)
        found = np.bincount(inputs["position_ids"][keep].numpy(), minlength=len(counts))
        counts[: len(found)] += found[: len(counts)]
    total = int(counts.sum())
    if total == 0:
        return None
    # The ceiling of quantile x total, rounded first: 0.55 x 100 is 55.00000000000001 in floats.
    need = math.ceil(round(quantile * total, 9))
    return int(np.searchsorted(np.cumsum(counts), need, side="left"))


def token_order(keep: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat, sentence, rank) of a batch's analysed tokens in row-major order: their flat [batch * seq] index, their
    sentence and their place among that sentence's analysed tokens."""
    flat = keep.flatten().nonzero().squeeze(1)
    sentence = rows.repeat_interleave(keep.shape[1]).index_select(0, flat)
    rank = (keep.long().cumsum(dim=1) - 1).flatten().index_select(0, flat)
    return flat, sentence, rank


def lm_loss_per_row(logits, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch] summed next-token cross-entropy and the number of predicted tokens of each row."""
    # A label counts where it and the token predicting it are real: right padding (the paired pass) and left padding
    # (the analysis engine may use either) give the same per-row sums.
    mask = inputs["attention_mask"]
    labels = inputs["input_ids"][:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return per_token.sum(dim=1).double(), (labels != -100).sum(dim=1).double()


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_inputs(model: nn.Module, saes: dict, settings: EngineSettings) -> None:
    batch_size, max_length, sae_chunk, padding_side = (settings.batch_size, settings.max_length, settings.sae_chunk,
                                                       settings.padding_side)
    n_layers = len(decoder_layers(model))
    bad = [layer for layer in saes if not 0 <= int(layer) < n_layers]
    if bad:
        raise UserError(f"layers {bad} are out of range for a model with {n_layers} layers; use layers between 0 and {n_layers - 1}")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for layer, sae in saes.items():
        if hidden is not None and sae.cfg.d_in != hidden:
            raise UserError(
                f"the SAE for layer {layer} expects d_in={sae.cfg.d_in} but the model's residual stream has {hidden} "
                f"dimensions; pick the SAE set that belongs to the model (e.g. sae=<same name as model>)"
            )
    if batch_size < 1:
        raise UserError(f"analysis.batch_size must be a positive integer, got {batch_size}")
    if max_length < 2:
        raise UserError(f"max_length must be at least 2 (BOS plus one token), got {max_length}")
    if sae_chunk is not None and int(sae_chunk) < 1:
        raise UserError(f"analysis.sae_chunk must be null or a positive integer, got {sae_chunk}")
    if not saes:
        raise UserError("no layers to analyse; set layers=null (all) or e.g. layers=[0,5,10]")
    if padding_side not in ("left", "right"):
        raise UserError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def decoder_norms(saes: dict, group: list[int]) -> torch.Tensor:
    """[layers, d_sae] ||W_dec,f|| of a group's SAEs (for metrics that weight a feature by what it writes)."""
    return torch.stack([saes[layer].W_dec.detach().norm(dim=-1) for layer in group])


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches, windows and places its work, shared by `collect_stats` and `collect_listed_sums` (the
    same tokens and batches). Only the position window (min_position, max_position) and max_length change a number;
    the rest change none beyond float rounding. task=analyze builds it from analysis.*, data.max_length and sae.device
    (`analysis.sources.LazyEngine`)."""

    batch_size: int = 16
    """Sentences per forward pass."""
    max_length: int = 128
    """Tokens per sentence, BOS included; longer texts are truncated (and recorded as such)."""
    sae_chunk: int | None = None
    """At most this many SAEs on the device at once; the corpus runs once per chunk of layers. None = all."""
    padding_side: str = "right"
    """left or right (positions are set from the mask, so either gives the same numbers)."""
    progress: bool = True
    """A tqdm bar per language and layer chunk."""
    min_position: int = 0
    """Only tokens at positions >= this count (`analysed_positions`)."""
    max_position: int | None = None
    """Only tokens at positions < this count; None = all."""
    sae_device: torch.device | str | None = None
    """Where SAEs encode and sums accumulate; None = the model's device (`cpu` saves accelerator memory at the cost of
    one residual copy per layer and batch)."""
    decode: str = "auto"
    """How x̂ (for FVU) is computed: sparse, dense or auto (`collect_stats`); `collect_listed_sums` does not decode."""


@dataclass
class _Pass:
    """What every batch of one engine pass shares: the model, its SAEs, the settings, and where things run."""

    model: nn.Module
    saes: dict
    settings: EngineSettings
    device: torch.device
    sae_device: torch.device
    pad_id: int
    bos_id: int | None

    @classmethod
    def of(cls, model: nn.Module, tokenizer, saes: dict, settings: EngineSettings) -> "_Pass":
        device = _model_device(model)
        sae_device = device if settings.sae_device is None else torch.device(settings.sae_device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return cls(model, saes, settings, device, sae_device, pad_id, tokenizer.bos_token_id)

    def chunks(self, layers: list[int]) -> Iterator[list[int]]:
        """`layers` in chunks of `settings.sae_chunk` (all at once without one)."""
        size = len(layers) if self.settings.sae_chunk is None else int(self.settings.sae_chunk)
        for start in range(0, len(layers), size):
            yield layers[start : start + size]

    def batch_inputs(self, batch):
        """`_batch_inputs` of one batch under this pass's settings."""
        s = self.settings
        return _batch_inputs(batch, self.pad_id, self.bos_id, s.padding_side, self.device, self.sae_device,
                             s.min_position, s.max_position)

    def batches(self, items: list, desc: str):
        """The language's batches, with a progress bar if the settings ask for one."""
        return progress_bar(list(_batches(items, self.settings.batch_size)), self.settings.progress, desc=desc,
                         leave=False)


@dataclass
class _Chunk:
    """One layer chunk's SAE steps: the layer groups that encode together, each group's `StackedSAEs` (None where its
    SAE does not stack) and the shared work buffer (`_work_buffer`)."""

    layers: list[int]
    groups: list[list[int]]
    stacks: list
    work: torch.Tensor | None
    first: bool
    """The pass's first chunk: the one whose batches feed a recorder its tokens (`_run_batch`'s record_tokens)."""


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block, in its former mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_stats_inputs(model, saes: dict, texts_by_lang: dict, s: EngineSettings, token_recorders: dict) -> None:
    _check_inputs(model, saes, s)
    if token_recorders and (s.min_position != 0 or s.max_position is not None):
        raise ValueError("the paired outcome pass covers every token but BOS; record it only with "
                         "min_position=0 and max_position=None")
    if s.decode not in DECODE_MODES:
        raise UserError(f"analysis.decode must be one of {', '.join(DECODE_MODES)}, got {s.decode!r}")
    empty = [lang for lang, texts in texts_by_lang.items() if not texts]
    if empty:
        raise UserError(f"no sentences for {', '.join(empty)}; check data.path / the split, or drop them from langs")
    if s.min_position < 0 or (s.max_position is not None and s.max_position <= s.min_position):
        raise UserError(f"need 0 <= analysis.min_position < analysis.max_position, got {s.min_position} and "
                        f"{s.max_position}")


@torch.inference_mode()
def collect_stats(
    model: nn.Module,
    tokenizer,
    saes: dict[int, nn.Module],
    texts_by_lang: dict[str, list[str]],
    settings: EngineSettings = EngineSettings(),
    *,
    feature_stats: dict | None = None,
    feature_ids: dict | None = None,
    token_recorders: dict | None = None,
    position_cap: int | None = None,
) -> dict[str, dict[int, SentenceSums]]:
    """Per-sentence SAE statistics for every (language, layer): `result[lang][layer]` is a `SentenceSums`.

    model: a HF causal LM (or bare decoder) in eval mode; its device is where everything is computed and summed.
    tokenizer: adds BOS itself (Gemma, Llama); texts are truncated to `settings.max_length` tokens including BOS.
    saes: layer -> sae-lens SAE whose input is the output of that decoder layer (`blocks.L.hook_resid_post`).
    texts_by_lang: sentences per language; per-sentence arrays follow this order.
    settings: batching, position window, SAE placement and decode (`EngineSettings`).

    One forward pass per batch captures every layer of the current chunk (`stop_after_last`: no later layers, no
    LM head). The kept positions (no BOS, no padding) of every layer of a group are encoded in one batched SAE step
    (`saes.encode.StackedSAEs`; SAEs that cannot be stacked use their own `encode`/`decode`). With `sae_chunk=k`, at
    most k SAEs sit on the model's device at once and the corpus is run once per chunk of k layers (k times fewer SAE
    bytes resident, ceil(L/k) times the forward passes); results are identical.
    SAEs are moved to the model's device for their chunk and returned to where they were afterwards.
    Batch size and padding side change no number beyond float rounding (positions are set from the mask).
    min_position / max_position: only tokens at positions min_position <= pos < max_position count (see
    `analysed_positions`).
    BOS is checked (`check_bos`), and each sentence's truncation at `max_length` is recorded.
    feature_stats: a dict to fill with per-feature statistics, `feature_stats[lang][layer]` = `features.FeatureSums`
    (O(d_sae) each; off when None). feature_ids: {lang: {layer: [features]}} whose per-sentence sums those also keep
    (`FeatureSums.sentence_sums`, O(sentences x k)); implies feature_stats.
    decode: how x̂ (for FVU) is computed: "sparse" reads only the decoder rows of features that fired
    (`saes.encode.decode_active`), "dense" is a dense matmul, "auto" is sparse on the CPU and dense on an
    accelerator; the numbers agree to float rounding.
    token_recorders: {lang: recorder} fed in the same pass with what task=train's paired outcome pass needs of these
    sentences, token by token (`training.outcomes.BaseSideRecorder`: the base side; `AdaptedSideRecorder`: the
    adapted side against it; task=pipeline uses them so that each model runs over the held-out split once,
    `training.shared_pass`). Those languages' batches run the whole model (the LM loss needs the LM head) in the
    first layer chunk. Only with the paired pass's positions: every token but BOS (min_position=0, max_position=None).
    position_cap: also keep every statistic over only the tokens at positions <= position_cap (`SentenceSums.within_cap`,
    read as `SentenceSums.position_matched()`), in the same pass: the summary's position-matched disparity, with the
    cap at the reference language's 90th-percentile position (`position_cap`). None keeps no window.
    """
    token_recorders = token_recorders or {}
    _check_stats_inputs(model, saes, texts_by_lang, settings, token_recorders)
    run = _Pass.of(model, tokenizer, saes, settings)
    max_length = settings.max_length
    tokenized = {lang: tokenize_sorted(tokenizer, texts, max_length) for lang, texts in texts_by_lang.items()}
    truncated = {lang: truncated_flags(tokenizer, texts, max_length) for lang, texts in texts_by_lang.items()}
    check_bos(tokenizer, saes, [ids for items in tokenized.values() for _, ids in items], settings.min_position)
    result: dict[str, dict[int, SentenceSums]] = {lang: {} for lang in texts_by_lang}
    if feature_ids is not None and feature_stats is None:
        feature_stats = {}
    if feature_stats is not None:
        for lang in texts_by_lang:
            feature_stats.setdefault(lang, {})
    layers = sorted(int(layer) for layer in saes)
    with eval_mode(model):
        for chunk_layers in run.chunks(layers):
            with _saes_on(saes, chunk_layers, run.sae_device):
                chunk = _plan_chunk(run, chunk_layers, tokenized, per_layer=feature_ids is not None,
                                    first=chunk_layers[0] == layers[0])
                for lang, items in tokenized.items():
                    accs, faccs = _language_accumulators(run, chunk, len(items), truncated[lang], position_cap,
                                                         feature_stats, (feature_ids or {}).get(lang) or {})
                    desc = f"{lang} layers {chunk_layers[0]}-{chunk_layers[-1]}"
                    for number, batch in enumerate(run.batches(items, desc)):
                        _run_batch(run, chunk, accs, batch, faccs, token_recorders.get(lang), number)
                    _finalize_language(chunk, accs, faccs, result[lang],
                                       None if feature_stats is None else feature_stats[lang])
    return result


def _plan_chunk(run: _Pass, chunk_layers: list[int], tokenized: dict, per_layer: bool, first: bool) -> _Chunk:
    """A layer chunk's groups, stacks and work buffer. Layers whose SAEs stack run as one batched step
    (saes.encode.StackedSAEs); the group size keeps the per-batch [layers, tokens, d_sae] work tensor bounded.
    per_layer (listed features, which are per layer): one layer per group, no stacking."""
    saes = run.saes
    max_tokens = max(sum(len(ids) for _, ids in batch) for items in tokenized.values()
                     for batch in _batches(items, run.settings.batch_size))
    groups = ([[layer] for layer in chunk_layers] if per_layer
              else stack_groups(chunk_layers, saes, max_tokens, run.sae_device))
    stacks = [StackedSAEs([saes[layer] for layer in group]) if StackedSAEs.stackable(
        [saes[layer] for layer in group]) else None for group in groups]
    work = _work_buffer(groups, stacks, max_tokens, torch.device(run.sae_device))
    return _Chunk(chunk_layers, groups, stacks, work, first)


def _language_accumulators(run: _Pass, chunk: _Chunk, n_sentences: int, truncated, position_cap,
                           feature_stats, wanted: dict) -> tuple[list[LayerStats], list[FeatureStats] | None]:
    """One language's streaming sums per group of the chunk, and (with `feature_stats`) its per-feature sums, keeping
    per-sentence sums of the `wanted` {layer: [features]}."""
    saes, sae_device = run.saes, run.sae_device
    hidden = getattr(getattr(run.model, "config", None), "hidden_size", None)
    accs = [
        LayerStats(n_sentences, saes[group[0]].cfg.d_in if hidden is None else hidden,
                   saes[group[0]].cfg.d_sae, sae_device, truncated=truncated, n_layers=len(group),
                   decoder_norms=decoder_norms(saes, group), position_cap=position_cap)
        for group in chunk.groups
    ]
    if feature_stats is None:
        return accs, None
    faccs = [FeatureStats(n_sentences, saes[group[0]].cfg.d_sae, sae_device,
                          feature_ids=wanted.get(group[0]) if len(group) == 1 else None,
                          n_layers=len(group)) for group in chunk.groups]
    return accs, faccs


def _finalize_language(chunk: _Chunk, accs, faccs, result: dict, feature_result: dict | None) -> None:
    """One language's finished sums of the chunk's layers into `result[layer]` (and `feature_result[layer]`)."""
    for index, group in enumerate(chunk.groups):
        for layer, sums in zip(group, accs[index].finalize_layers()):
            result[layer] = sums
        if faccs is not None:
            for layer, fsums in zip(group, faccs[index].finalize_layers()):
                feature_result[layer] = fsums


@torch.inference_mode()
def collect_listed_sums(
    model: nn.Module,
    tokenizer,
    saes: dict[int, nn.Module],
    texts_by_lang: dict[str, list[str]],
    feature_ids: dict[str, dict[int, list[int]]],
    settings: EngineSettings = EngineSettings(),
) -> dict[str, dict[int, ListedSums]]:
    """The features' second pass: per-sentence sums of only the listed features, `result[lang][layer]` for every
    (lang, layer) in `feature_ids` ({lang: {layer: [features]}}).

    The same tokens and batches as `collect_stats` (so the sums equal its `feature_ids` path's to float rounding), but
    only the forward (up to the language's deepest listed layer) and the encoder columns of the listed features run
    (`encode_listed`): no decode, no `LayerStats`, no O(d_sae) per-feature totals, and only the layers a language has
    listed features in. Arguments as in `collect_stats` (`settings.decode` is not used).
    """
    saes = {int(layer): sae for layer, sae in saes.items()}
    wanted = {lang: {int(layer): fs for layer, fs in (feature_ids.get(lang) or {}).items() if len(fs)}
              for lang in texts_by_lang}
    wanted = {lang: by_layer for lang, by_layer in wanted.items() if by_layer}
    result: dict[str, dict[int, ListedSums]] = {lang: {} for lang in wanted}
    if not wanted:
        return result
    missing = sorted({layer for by_layer in wanted.values() for layer in by_layer} - set(saes))
    if missing:
        raise ValueError(f"feature_ids name layers {missing} without an SAE")
    s = settings
    _check_inputs(model, saes, s)
    run = _Pass.of(model, tokenizer, saes, settings)
    layers = sorted({layer for by_layer in wanted.values() for layer in by_layer})
    tokenized = {lang: tokenize_sorted(tokenizer, texts_by_lang[lang], s.max_length) for lang in wanted}
    with eval_mode(model):
        for chunk_layers in run.chunks(layers):
            with _saes_on(saes, chunk_layers, run.sae_device):
                for lang, items in tokenized.items():
                    accs = {layer: SentenceFeatureStats(len(items), wanted[lang][layer], run.sae_device)
                            for layer in chunk_layers if layer in wanted[lang]}
                    if accs:
                        _listed_language(run, items, accs, desc=f"{lang} listed features, layers {min(accs)}-{max(accs)}")
                        for layer, acc in accs.items():
                            result[lang][layer] = acc.finalize()
    return result


def _listed_language(run: _Pass, items: list, accs: dict[int, SentenceFeatureStats], desc: str) -> None:
    """One language's batches through the forward (up to its deepest listed layer) and the listed encoder columns."""
    for batch in run.batches(items, desc):
        inputs, flat, sentence_index, _ = run.batch_inputs(batch)
        with ResidualCapture(run.model, list(accs), detach=True, stop_after_last=True) as capture:
            activations = capture.forward(**inputs, use_cache=False)
        for layer, acc in accs.items():
            x = activations[layer].flatten(0, 1).index_select(0, flat).to(run.sae_device)
            acc.add(encode_listed(run.saes[layer], x, acc.feature_ids), sentence_index)


def encode_listed(sae, x: torch.Tensor, feature_ids: torch.Tensor) -> torch.Tensor:
    """[n, k] = sae.encode(x)[:, feature_ids] for x [n, d_in], computing only those k encoder columns where the encoder
    works feature by feature (`saes.encode.elementwise_encoder`; k/d_sae of the encode's cost), else through `sae.encode`. The
    same numbers up to float rounding of the smaller matmul (tests/analysis/test_engine.py)."""
    kind = elementwise_encoder(sae)
    if kind is None:
        return sae.encode(x).index_select(1, feature_ids)
    sae_in = x.to(sae.dtype)
    if sae.cfg.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec
    pre = torch.addmm(sae.b_enc.index_select(0, feature_ids), sae_in, sae.W_enc.index_select(1, feature_ids))
    acts = torch.relu(pre)
    if kind == "jumprelu":
        acts = acts * (pre > sae.threshold.index_select(0, feature_ids)).to(acts.dtype)
    return acts


@contextmanager
def _saes_on(saes: dict, layers: list[int], device):
    """The SAEs of `layers` on `device` for the block, back where they were afterwards."""
    homes = {layer: _param_device(saes[layer]) for layer in layers}
    for layer in layers:
        saes[layer].to(device)
    try:
        yield
    finally:
        for layer, home in homes.items():
            if home is not None:
                saes[layer].to(home)


def _param_device(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


REUSE_WORK_BUFFER = True
"""Write every stacked SAE step's codes into one buffer per layer chunk on the CPU (`_work_buffer`). A switch for A/B
timings and for tests/analysis/test_engine.py, which checks that the numbers are the same either way."""


def _work_buffer(groups: list[list[int]], stacks: list, max_tokens: int, device: torch.device) -> torch.Tensor | None:
    """One flat buffer for the largest stacked group's [L, tokens, d_sae] codes, on the CPU only: there a fresh tensor
    per batch and group pays page faults (no caching allocator), on an accelerator the allocator reuses memory
    anyway. At most `stack_groups`' CPU budget (~256 MB)."""
    sized = [(len(group), stack) for group, stack in zip(groups, stacks) if stack is not None]
    if not REUSE_WORK_BUFFER or device.type != "cpu" or not sized:
        return None
    n_layers, stack = max(sized, key=lambda item: item[0])
    return torch.empty(n_layers * max_tokens * stack.d_sae, dtype=stack.dtype, device=device)


def _batch_inputs(batch, pad_id, bos_id, padding_side, device, sae_device, min_position: int = 0,
                  max_position: int | None = None):
    """One batch's model inputs, its analysed positions as flat row-major indices, each kept token's sentence (its
    index in the language's text list) and the [batch, width] mask of analysed positions."""
    indices = torch.tensor([i for i, _ in batch], dtype=torch.long, device=device)
    inputs = pad_batch([ids for _, ids in batch], pad_id, padding_side, device)
    keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bos_id, min_position, max_position)
    # The kept positions as flat row-major indices, found once per batch: every layer then gathers with index_select,
    # where a boolean mask per layer would make the host wait for the device once per layer (on a GPU).
    flat = keep.flatten().nonzero().squeeze(1)
    # Token order is row by row, so each kept token's sentence is its row's text index.
    sentence_index = indices.repeat_interleave(keep.shape[1]).index_select(0, flat).to(sae_device)
    return inputs, flat, sentence_index, keep


def _run_batch(run: _Pass, chunk: _Chunk, accs: list[LayerStats], batch, feature_accs: list[FeatureStats] | None = None,
               recorder=None, batch_number: int = 0) -> None:
    """One batch: one forward capturing every layer of the chunk's groups, then one SAE step per group (stacked where
    the group's SAEs stack, else the layer's own `encode`/`decode`) and the group's streaming sums.

    recorder: one of `collect_stats`' token_recorders, handed this batch's tokens (in the pass's first chunk: their LM
    loss, from a full forward) and, for its layers, residuals, SAE codes and reconstructions, as batch `batch_number`.
    The chunk's work buffer (`_work_buffer`) takes every stacked group's codes: each group's consumers (the streaming
    sums, the recorder) are done with them before the next group's encode."""
    sae_device = run.sae_device
    inputs, flat, sentence_index, keep = run.batch_inputs(batch)
    width = keep.shape[1]
    positions = inputs["position_ids"].flatten().index_select(0, flat).to(sae_device)
    # Each kept token's row in the batch (a row is one whole sentence): per-sentence firing without host syncs.
    row_index = (flat // width).to(sae_device) if feature_accs is not None else None
    # The code's non-zero entries cost one host sync per group on an accelerator: only where the decode uses them.
    sparse = sparse_decode_wanted(run.settings.decode, torch.device(sae_device))
    activations = _forward(run, chunk, inputs, keep, batch, recorder, batch_number)
    for index, group in enumerate(chunk.groups):
        # Layer-major: layer position l's tokens are rows l*n ... (l+1)*n - 1.
        x = torch.cat([activations[layer].flatten(0, 1).index_select(0, flat) for layer in group]).to(sae_device)
        stack = chunk.stacks[index]
        if stack is not None:
            # With the sparse code, only the recorders and listed-feature sums read the dense one.
            dense = not sparse or recorder is not None or (
                feature_accs is not None and feature_accs[index].listed is not None)
            feature_acts, code = stack.encode(x, with_code=sparse, out=chunk.work, dense=dense)
            x_hat = stack.decode(feature_acts, code)
        else:  # a single SAE that does not stack (TopK, hooks, normalisation): its own encode and decode
            sae = run.saes[group[0]]
            feature_acts = sae.encode(x)
            code, x_hat = None, sae.decode(feature_acts)
        if recorder is not None:  # before the streaming sums, which may reuse x̂'s memory
            n = len(flat)
            for place, layer in enumerate(group):
                if layer in recorder.layers:
                    rows_of_layer = slice(place * n, (place + 1) * n)
                    recorder.add_layer(layer, batch_number, x[rows_of_layer], feature_acts[rows_of_layer],
                                       x_hat[rows_of_layer])
        accs[index].update(x, feature_acts, x_hat, sentence_index, positions, code=code)
        if feature_accs is not None:
            feature_accs[index].update(feature_acts, row_index, len(batch), sentence_index, code=code)


def _forward(run: _Pass, chunk: _Chunk, inputs, keep, batch, recorder, batch_number: int) -> dict:
    """The batch's residuals at the chunk's layers: a forward that stops after the last of them, or, where a recorder
    takes this batch's tokens (the pass's first chunk), the whole model, whose LM loss per row the recorder gets."""
    layers = [layer for group in chunk.groups for layer in group]
    if recorder is None or not chunk.first:
        with ResidualCapture(run.model, layers, detach=True, stop_after_last=True) as capture:
            return capture.forward(**inputs, use_cache=False)
    with ResidualCapture(run.model, layers, detach=True) as capture:  # the LM loss needs the LM head
        logits = run.model(**inputs, use_cache=False).logits
        activations = dict(capture.activations)
    rows = torch.tensor([i for i, _ in batch], dtype=torch.long, device=run.device)
    _, sentence, rank = token_order(keep, rows)
    number = recorder.add_tokens(rows, *lm_loss_per_row(logits, inputs), sentence, rank)
    if number != batch_number:
        raise ValueError(f"the recorder numbered batch {batch_number} as {number}")
    return activations
