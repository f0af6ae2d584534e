"""Outcome measures of an adapter on held-out text: base vs adapted model on the same tokens, with their controls.

For every language the base and the adapted model read the same sentences; per sentence and analysed layer we keep
sums of the metric (before, after, and after with each token's residual rescaled to the base residual's norm), the
residual norm, L0, the SAE's squared reconstruction error, the SAE-code cosine, and the LM loss. Everything the train
report says (gain, norm-matched gain, FVU change, retention, their paired bootstrap CIs) is a function of these sums:
see docs/training.md, "Outcome measures".

The pass has two halves: `measure_base` (the base model: per-token residual norms and SAE codes, per-sentence sums),
which `mlalign.training.base_cache` keeps between runs, and `measure_adapted` (the adapted model on the same tokens,
compared token by token with the base side). `measure_paired` runs both.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.saes.encode import decode_active
from mlalign.analysis.engine import (analysed_positions, eval_mode, lm_loss_per_row, pad_batch, token_order,
                                    tokenize_sorted)
from mlalign.analysis.bootstrap import percentile_interval, resample_counts
from mlalign.analysis.norm_matched import norm_matched, sae_centres
from mlalign.training.losses import per_token_metric

FIDELITY_TOLERANCE = 1.25
"""Default `train.fidelity_tolerance`: a gain counts only where, at every aligned layer, the SAE's absolute
reconstruction error of the same tokens after <= this x before (`recon_error_ratio`). Calibrated on a no-change model
(docs/training.md, "Calibrating the tolerances")."""

SPLICED_TOLERANCE_NATS = 0.05
"""Default `train.spliced_tolerance_nats`: a gain counts only where, at every aligned layer, the spliced-in LM loss
(mean over sentences, nats/token) rose by at most this much. Calibrated like FIDELITY_TOLERANCE."""


@dataclass
class PairedSums:
    """One language's held-out sums, base vs adapted; arrays [sentences] or [sentences, layers] (layer order `layers`)."""

    layers: list[int]
    n_tokens: np.ndarray
    metric_before: np.ndarray
    metric_after: np.ndarray
    metric_norm_matched: np.ndarray
    """The metric of the SAE code of c + (x_after − c) · ‖x_before − c‖ / ‖x_after − c‖ (per token), c = the SAE's
    b_dec: the adapter's direction, not its scale, with the near-constant part of the residual (on Gemma 3 270M 93-98%
    of its norm) taken out before matching, so that rescaling reaches the content."""
    resid_norm_before: np.ndarray
    resid_norm_after: np.ndarray
    l0_before: np.ndarray
    l0_after: np.ndarray
    sq_err_before: np.ndarray
    sq_err_after: np.ndarray
    code_cosine: np.ndarray
    """Σ_t cos(f_before,t, f_after,t) of the SAE codes (1 where both codes are all zero)."""
    sumsq_before: np.ndarray
    """[layers] Σ_t ‖x_t‖² over all tokens (with `sum_x_*`, the FVU denominator Σ‖x − x̄‖²)."""
    sumsq_after: np.ndarray
    sum_x_before: np.ndarray
    """[layers, d_model] Σ_t x_t."""
    sum_x_after: np.ndarray
    ce_before: np.ndarray
    """[sentences] summed next-token cross-entropy (nats)."""
    ce_after: np.ndarray
    ce_tokens: np.ndarray
    spliced_layers: list[int] = field(default_factory=list)
    """The layers whose spliced-in LM loss was measured (`add_spliced`; the aligned layers)."""
    spliced_before: np.ndarray | None = None
    """[sentences, spliced layers] spliced-in minus clean mean next-token loss of the base model (nats/token)."""
    spliced_after: np.ndarray | None = None
    """The same for the adapted model (its own clean loss subtracted)."""

    @property
    def n_sentences(self) -> int:
        return int(self.n_tokens.shape[0])

    def fvu(self, which: str) -> np.ndarray:
        """[layers] pooled FVU of the base (`before`) or adapted (`after`) residuals, as the analysis defines it."""
        err = getattr(self, f"sq_err_{which}").sum(axis=0)
        n = float(self.n_tokens.sum())
        sum_x = getattr(self, f"sum_x_{which}")
        dev = getattr(self, f"sumsq_{which}") - (sum_x * sum_x).sum(axis=1) / max(n, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(dev > 0, err / dev, np.nan)


@dataclass
class BaseLayer:
    """The base model's side of one (language, layer): what the adapted side is compared against, token by token.

    Tokens are in sentence order (sentence 0's analysed positions first, each sentence's in position order), whatever
    the batches, so a base side cached by one run lines up with another run's adapted tokens."""

    token_norm: np.ndarray
    """[tokens] float32 ‖x_before,t‖."""
    token_centred_norm: np.ndarray
    """[tokens] float32 ‖x_before,t − b_dec‖: the norm the norm-matched gain rescales each adapted residual's centred
    part to (`PairedSums.metric_norm_matched`)."""
    code_ptr: np.ndarray
    """[tokens + 1] int64: token t's non-zero SAE code entries are `code_features/code_values[ptr[t]:ptr[t+1]]`."""
    code_features: np.ndarray
    """[nnz] int32: the feature of each non-zero entry of f_before (the code cosine, the metric and L0 before)."""
    code_values: np.ndarray
    """[nnz] float32: its activation (exact for float32 and bfloat16 SAEs)."""
    sq_err: np.ndarray
    """[sentences] float64 Σ_t ‖x_before,t − x̂_before,t‖²."""
    sumsq: np.ndarray
    """[] float64 Σ_t ‖x_before,t‖² over all tokens."""
    sum_x: np.ndarray
    """[d_model] float64 Σ_t x_before,t."""


@dataclass
class BaseSide:
    """The base model's side of the paired pass for one language: per-sentence token counts and LM loss, and per
    analysed layer a `BaseLayer`. Computed by `measure_base`, or read from the cache (`mlalign.training.base_cache`)."""

    n_tokens: np.ndarray
    """[sentences] float64 analysed tokens (all but BOS and padding)."""
    ce: np.ndarray
    """[sentences] float64 summed next-token cross-entropy of the base model (nats)."""
    ce_tokens: np.ndarray
    """[sentences] float64 predicted tokens."""
    layers: dict[int, BaseLayer]

    @property
    def offsets(self) -> np.ndarray:
        """[sentences] index of each sentence's first token in the per-token arrays."""
        counts = self.n_tokens.astype(np.int64)
        return np.cumsum(counts) - counts


def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    items = tokenize_sorted(tokenizer, texts, max_length)
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _inputs(tokenizer, batch, device):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = torch.tensor([i for i, _ in batch], dtype=torch.long, device=device)
    inputs = pad_batch([ids for _, ids in batch], pad_id, "right", device)
    keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
    return rows, inputs, keep



class BaseSideRecorder:
    """Builds one language's `BaseSide` from batches as they are run: what `measure_base` does per batch, and what the
    analysis engine does when task=pipeline's first step also records the paired pass's base side
    (`engine.collect_stats(base_sides=...)`, docs/training.md#what-is-measured-where).

    Per batch, `add_tokens` (once, whatever the number of layer chunks) takes the batch's analysed tokens and LM loss
    and returns the batch's number; `add_layer` takes one layer's residuals, SAE code and reconstruction of those
    tokens, in the same row order, for that batch number. Tokens end up in sentence order in `finalize`.
    """

    def __init__(self, n_sentences: int, layers: list[int], device, centres: dict[int, torch.Tensor]):
        """centres: per layer the centre of the norm-matched control, the SAE's b_dec (`sae_centres`)."""
        self.layers = sorted(int(layer) for layer in layers)
        missing = [layer for layer in self.layers if layer not in centres]
        if missing:
            raise ValueError(f"no centre (SAE b_dec) for layer(s) {missing}")
        self.centres = {layer: centres[layer].detach().float() for layer in self.layers}
        self._j = {layer: j for j, layer in enumerate(self.layers)}
        zeros = dict(dtype=torch.float64, device=device)
        self.n_tokens, self.ce, self.ce_tokens = (torch.zeros(n_sentences, **zeros) for _ in range(3))
        self.sq_err = torch.zeros(n_sentences, len(self.layers), **zeros)
        self.sumsq = torch.zeros(len(self.layers), **zeros)
        self.sum_x: list[torch.Tensor | None] = [None] * len(self.layers)
        # Per batch, on the CPU: each token's (sentence, rank), and per layer its norm and non-zero code entries
        # (12 bytes each until `finalize` packs them).
        self._sentences: list[torch.Tensor] = []
        self._ranks: list[torch.Tensor] = []
        self._first_token: list[int] = []
        self._norms: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._centred_norms: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._entries: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        self._seen = 0

    def add_tokens(self, rows: torch.Tensor, row_ce: torch.Tensor, row_tokens: torch.Tensor, sentence: torch.Tensor,
                   rank: torch.Tensor) -> int:
        """One batch: each row's sentence index `rows`, LM loss and predicted-token count, and each analysed token's
        sentence and rank within it (row-major order, as `token_order` gives). Returns the batch's number."""
        self.ce.index_add_(0, rows.to(self.ce.device), row_ce.to(self.ce.device))
        self.ce_tokens.index_add_(0, rows.to(self.ce.device), row_tokens.to(self.ce.device))
        sentence = sentence.to(self.n_tokens.device)
        self.n_tokens.index_add_(0, sentence, torch.ones_like(sentence, dtype=torch.float64))
        self._sentences.append(sentence.cpu())
        self._ranks.append(rank.cpu())
        self._first_token.append(self._seen)
        self._seen += len(sentence)
        return len(self._first_token) - 1

    def add_layer(self, layer: int, batch: int, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Batch `batch`'s tokens at `layer`: residuals x [tokens, d_model], SAE code f and reconstruction x̂."""
        j = self._j[int(layer)]
        sentence = self._sentences[batch].to(self.sq_err.device)
        x = x.float()
        self.sq_err[:, j].index_add_(0, sentence, (x - x_hat.float()).pow(2).sum(-1).double().to(self.sq_err.device))
        self._norms[j].append(x.norm(dim=-1).cpu())
        self._centred_norms[j].append((x - self.centres[int(layer)].to(x.device)).norm(dim=-1).cpu())
        token, feature = f.nonzero(as_tuple=True)
        self._entries[j].append(((token + self._first_token[batch]).to(torch.int32).cpu(), feature.to(torch.int32).cpu(),
                                 f[token, feature].float().cpu()))
        x = x.double().to(self.sumsq.device)
        self.sumsq[j] += x.pow(2).sum()
        self.sum_x[j] = x.sum(dim=0) if self.sum_x[j] is None else self.sum_x[j] + x.sum(dim=0)

    def finalize(self, d_model: int) -> BaseSide:
        seen = self._seen
        side = BaseSide(n_tokens=self.n_tokens.cpu().numpy(), ce=self.ce.cpu().numpy(),
                        ce_tokens=self.ce_tokens.cpu().numpy(), layers={})
        # Batch order -> sentence order.
        position = torch.from_numpy(side.offsets)[torch.cat(self._sentences)] + torch.cat(self._ranks) if seen else \
            torch.zeros(0, dtype=torch.long)
        for j, layer in enumerate(self.layers):
            if len(self._norms[j]) != len(self._first_token):
                raise ValueError(f"layer {layer} was recorded for {len(self._norms[j])} of "
                                 f"{len(self._first_token)} batches")
            token_norm = torch.zeros(seen, dtype=torch.float32)
            token_centred_norm = torch.zeros(seen, dtype=torch.float32)
            if seen:
                token_norm[position] = torch.cat(self._norms[j])
                token_centred_norm[position] = torch.cat(self._centred_norms[j])
            token = torch.cat([e[0] for e in self._entries[j]]) if seen else torch.zeros(0, dtype=torch.long)
            feature = torch.cat([e[1] for e in self._entries[j]]) if seen else torch.zeros(0, dtype=torch.int32)
            value = torch.cat([e[2] for e in self._entries[j]]) if seen else torch.zeros(0)
            owner = position[token.long()] if seen else token
            order = torch.sort(owner, stable=True).indices  # each token's entries stay in feature order
            ptr = torch.zeros(seen + 1, dtype=torch.long)
            ptr[1:] = torch.bincount(owner, minlength=seen).cumsum(0)
            total = self.sum_x[j] if self.sum_x[j] is not None else torch.zeros(d_model, dtype=torch.float64)
            side.layers[layer] = BaseLayer(
                token_norm=token_norm.numpy(), token_centred_norm=token_centred_norm.numpy(), code_ptr=ptr.numpy(),
                code_features=feature[order].numpy(),
                code_values=value[order].numpy(), sq_err=self.sq_err[:, j].cpu().numpy(),
                sumsq=self.sumsq[j].cpu().numpy(), sum_x=total.cpu().numpy())
        return side


@torch.no_grad()
def measure_base(model, tokenizer, saes: dict, texts_by_lang: dict[str, list[str]], batch_size: int,
                 max_length: int, progress: bool = True) -> dict[str, BaseSide]:
    """The base model's side of the paired pass (run `model` with any adapter off): per language a `BaseSide`."""
    from tqdm.auto import tqdm

    layers = sorted(int(layer) for layer in saes)
    device = next(model.parameters()).device
    out = {}
    with eval_mode(model):
        for lang, texts in texts_by_lang.items():
            recorder = BaseSideRecorder(len(texts), layers, device, sae_centres(saes))
            for batch in tqdm(_batches(tokenizer, texts, batch_size, max_length), desc=f"held-out {lang}: base model",
                              unit="batch", leave=False, disable=not progress):
                rows, inputs, keep = _inputs(tokenizer, batch, device)
                with ResidualCapture(model, layers) as capture:
                    logits = model(**inputs, use_cache=False).logits
                    acts = dict(capture.activations)
                flat, sentence, rank = token_order(keep, rows)
                number = recorder.add_tokens(rows, *lm_loss_per_row(logits, inputs), sentence, rank)
                for layer in layers:
                    x = acts[layer].flatten(0, 1).index_select(0, flat).float()
                    f = saes[layer].encode(x)
                    recorder.add_layer(layer, number, x, f, decode_active(saes[layer], f))
            out[lang] = recorder.finalize(int(model.config.hidden_size))
    return out


class _OnDevice:
    """One `BaseLayer`'s per-token arrays on the device, and the dense base code of any batch's tokens from them."""

    def __init__(self, base: BaseLayer, device):
        self.token_norm = torch.from_numpy(base.token_norm).to(device)
        self.token_centred_norm = torch.from_numpy(base.token_centred_norm).to(device)
        self.ptr = torch.from_numpy(base.code_ptr).to(device)
        self.features = torch.from_numpy(base.code_features).to(device).long()
        self.values = torch.from_numpy(base.code_values).to(device)

    def code(self, position: torch.Tensor, d_sae: int, dtype) -> torch.Tensor:
        """[tokens, d_sae] f_before of the tokens at `position` (sentence order), exactly as the SAE encoded it."""
        start = self.ptr.index_select(0, position)
        counts = self.ptr.index_select(0, position + 1) - start
        token = torch.repeat_interleave(torch.arange(len(position), device=position.device), counts)
        first = (counts.cumsum(0) - counts).index_select(0, token)
        entry = start.index_select(0, token) + torch.arange(len(token), device=position.device) - first
        code = torch.zeros(len(position), d_sae, dtype=dtype, device=position.device)
        code[token, self.features.index_select(0, entry)] = self.values.index_select(0, entry).to(dtype)
        return code


@torch.no_grad()
def measure_adapted(model, base: dict[str, BaseSide], tokenizer, saes: dict, texts_by_lang: dict[str, list[str]],
                    metric: str, batch_size: int, max_length: int, progress: bool = True) -> dict[str, PairedSums]:
    """PairedSums per language: the adapted model (`model` as it runs) on the tokens of its `BaseSide`, token by token."""
    from tqdm.auto import tqdm

    layers = sorted(int(layer) for layer in saes)
    device = next(model.parameters()).device
    out = {}
    with eval_mode(model):
        for lang, texts in texts_by_lang.items():
            side = base[lang]
            on_device = {layer: _OnDevice(side.layers[layer], device) for layer in layers}
            offsets = torch.from_numpy(side.offsets).to(device)
            acc = _Accumulator(len(texts), layers, device)
            for batch in tqdm(_batches(tokenizer, texts, batch_size, max_length), desc=f"held-out {lang}: adapter",
                              unit="batch", leave=False, disable=not progress):
                rows, inputs, keep = _inputs(tokenizer, batch, device)
                with ResidualCapture(model, layers) as capture:
                    logits = model(**inputs, use_cache=False).logits
                    acts = dict(capture.activations)
                row_ce, _ = lm_loss_per_row(logits, inputs)
                acc.s["ce_after"].index_add_(0, rows, row_ce)
                flat, sentence, rank = token_order(keep, rows)
                position = offsets.index_select(0, sentence) + rank
                for j, layer in enumerate(layers):
                    x_after = acts[layer].flatten(0, 1).index_select(0, flat).float()
                    acc.add_layer(j, saes[layer], metric, on_device[layer], position, x_after, sentence)
            out[lang] = acc.finalize(side)
    return out


class AdaptedSideRecorder:
    """Builds one language's `PairedSums` from batches of the adapted model as they are run, against its `BaseSide`:
    what `measure_adapted` does per batch, for the analysis engine's pass over the adapted model (task=pipeline's
    step 2 measures the held-out split this way, so step 3 finds the adapted model's statistics computed). The same
    interface as `BaseSideRecorder`; the tokens must be the base side's."""

    def __init__(self, base: BaseSide, saes: dict, metric: str, device):
        self.base, self.saes, self.metric = base, saes, metric
        self.layers = sorted(int(layer) for layer in saes)
        self._j = {layer: j for j, layer in enumerate(self.layers)}
        self._on_device = {layer: _OnDevice(base.layers[layer], device) for layer in self.layers}
        self._offsets = torch.from_numpy(base.offsets).to(device)
        self._acc = _Accumulator(len(base.n_tokens), self.layers, device)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layer_tokens = [0] * len(self.layers)
        self.device = torch.device(device)

    def add_tokens(self, rows: torch.Tensor, row_ce: torch.Tensor, row_tokens: torch.Tensor, sentence: torch.Tensor,
                   rank: torch.Tensor) -> int:
        self._acc.s["ce_after"].index_add_(0, rows.to(self.device), row_ce.to(self.device))
        sentence = sentence.to(self.device)
        self._batches.append((sentence, self._offsets.index_select(0, sentence) + rank.to(self.device)))
        return len(self._batches) - 1

    def add_layer(self, layer: int, batch: int, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        sentence, position = self._batches[batch]
        self._layer_tokens[self._j[int(layer)]] += len(sentence)
        self._acc.add_layer(self._j[int(layer)], self.saes[layer], self.metric, self._on_device[layer], position,
                            x.float().to(self.device), sentence, f_after=f.to(self.device),
                            x_hat_after=x_hat.to(self.device))

    def finalize(self, d_model: int | None = None) -> PairedSums:
        seen = sum(len(sentence) for sentence, _ in self._batches)
        if seen != int(self.base.n_tokens.sum()) or any(count != seen for count in self._layer_tokens):
            raise ValueError(f"the adapted pass saw {seen} tokens ({self._layer_tokens} per layer), the base side has "
                             f"{int(self.base.n_tokens.sum())}")
        return self._acc.finalize(self.base)


def measure_paired(model, adapter_off: Callable[[], contextlib.AbstractContextManager], tokenizer, saes: dict,
                   texts_by_lang: dict[str, list[str]], metric: str, batch_size: int, max_length: int,
                   progress: bool = True, base: dict[str, BaseSide] | None = None) -> dict[str, PairedSums]:
    """PairedSums per language: the base side (`adapter_off()`, e.g. peft's `model.disable_adapter`; or `base`, e.g.
    from the cache) and the adapted side on the same tokens."""
    if base is None:
        with adapter_off():
            base = measure_base(model, tokenizer, saes, texts_by_lang, batch_size, max_length, progress)
    return measure_adapted(model, base, tokenizer, saes, texts_by_lang, metric, batch_size, max_length, progress)


def add_spliced(paired: dict[str, PairedSums], model, adapter_off: Callable[[], contextlib.AbstractContextManager],
                tokenizer, saes: dict, texts_by_lang: dict[str, list[str]], batch_size: int, max_length: int,
                progress: bool = True) -> None:
    """Fill each language's `spliced_*` fields: the spliced-in LM loss (`mlalign.analysis.spliced`) at the layers of
    `saes`, per sentence, of the base model (`adapter_off()`) and of the adapted model, on the sentences of `paired`."""
    from tqdm.auto import tqdm

    from mlalign.analysis.spliced import spliced_dlm_loss, token_batches

    layers = sorted(int(layer) for layer in saes)
    device = next(model.parameters()).device
    for lang in tqdm(list(paired), desc="spliced-in LM loss", unit="lang", leave=False, disable=not progress):
        batches = token_batches(tokenizer, texts_by_lang[lang], batch_size, max_length)
        with eval_mode(model):
            with adapter_off():
                before = spliced_dlm_loss(model, saes, batches, layers, device=device)
            after = spliced_dlm_loss(model, saes, batches, layers, device=device)
        sums = paired[lang]
        if len(texts_by_lang[lang]) != sums.n_sentences:
            raise ValueError(f"{lang}: {len(texts_by_lang[lang])} sentences, the paired sums have {sums.n_sentences}")
        sums.spliced_layers = layers
        sums.spliced_before = np.stack([before[layer] for layer in layers], axis=1)
        sums.spliced_after = np.stack([after[layer] for layer in layers], axis=1)


class _Accumulator:
    def __init__(self, n_sentences: int, layers: list[int], device):
        self.layers = layers
        per_layer = ("metric_before", "metric_after", "metric_norm_matched", "resid_norm_before", "resid_norm_after",
                     "l0_before", "l0_after", "sq_err_after", "code_cosine")
        zeros = dict(dtype=torch.float64, device=device)
        self.sl = {name: torch.zeros(n_sentences, len(layers), **zeros) for name in per_layer}
        self.s = {"ce_after": torch.zeros(n_sentences, **zeros)}
        self.sumsq_after = torch.zeros(len(layers), **zeros)
        self.sum_x_after: torch.Tensor | None = None

    def add_layer(self, j: int, sae, metric: str, base: _OnDevice, position, x_after, sentence,
                  f_after: torch.Tensor | None = None, x_hat_after: torch.Tensor | None = None) -> None:
        """One layer of one batch; `f_after` and `x_hat_after` where the caller has encoded and decoded x_after."""
        norm_before = base.token_norm.index_select(0, position)
        norm_after = x_after.norm(dim=-1)
        x_matched = norm_matched(x_after, base.token_centred_norm.index_select(0, position),
                                 sae.b_dec.detach().float().to(x_after.device))
        f_after = sae.encode(x_after) if f_after is None else f_after
        f_matched = sae.encode(x_matched)
        x_hat_after = decode_active(sae, f_after) if x_hat_after is None else x_hat_after
        f_before = base.code(position, f_after.shape[-1], f_after.dtype)
        dot = (f_before * f_after).sum(-1)
        nb, na = f_before.norm(dim=-1), f_after.norm(dim=-1)
        both_zero = (nb == 0) & (na == 0)
        cosine = torch.where(both_zero, torch.ones_like(dot), dot / (nb * na).clamp_min(1e-12))
        per_token = {
            "metric_before": per_token_metric(f_before, metric, sae),
            "metric_after": per_token_metric(f_after, metric, sae),
            "metric_norm_matched": per_token_metric(f_matched, metric, sae),
            "resid_norm_before": norm_before,
            "resid_norm_after": norm_after,
            "l0_before": (f_before != 0).sum(-1),
            "l0_after": (f_after != 0).sum(-1),
            "sq_err_after": (x_after - x_hat_after.float()).pow(2).sum(-1),
            "code_cosine": cosine,
        }
        for name, values in per_token.items():
            self.sl[name][:, j].index_add_(0, sentence, values.double())
        x = x_after.double()
        self.sumsq_after[j] += x.pow(2).sum()
        total = x.sum(dim=0)
        if self.sum_x_after is None:
            self.sum_x_after = torch.zeros(len(self.layers), x.shape[1], dtype=torch.float64, device=x.device)
        self.sum_x_after[j] += total

    def finalize(self, base: BaseSide) -> PairedSums:
        def cpu(t):
            return t.cpu().numpy()

        before = [base.layers[layer] for layer in self.layers]
        d_model = before[0].sum_x.shape[0] if before else 1
        sum_x_after = cpu(self.sum_x_after) if self.sum_x_after is not None else np.zeros((len(self.layers), d_model))
        return PairedSums(layers=list(self.layers), **{k: cpu(v) for k, v in self.sl.items()},
                          sq_err_before=np.stack([b.sq_err for b in before], axis=1),
                          n_tokens=base.n_tokens, ce_before=base.ce, ce_after=cpu(self.s["ce_after"]),
                          ce_tokens=base.ce_tokens, sumsq_before=np.array([float(b.sumsq) for b in before]),
                          sumsq_after=cpu(self.sumsq_after),
                          sum_x_before=np.stack([b.sum_x for b in before]), sum_x_after=sum_x_after)


# --------------------------------------------------------------------------------------------------- the numbers


def _levels(values: np.ndarray, n_tokens: np.ndarray, weights: np.ndarray, aggregate: str) -> np.ndarray:
    """[..., layers] metric levels under sentence weights `weights` [..., sentences] (1 = the sample itself)."""
    if aggregate == "token":
        return (weights @ values) / (weights @ n_tokens)[..., None]
    valid = n_tokens > 0
    per_sentence = np.where(valid[:, None], values / np.where(valid, n_tokens, 1.0)[:, None], 0.0)
    return (weights @ per_sentence) / (weights @ valid.astype(float))[..., None]


def _pct(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * (after / before - 1.0)


def retention_pct(after_levels: np.ndarray, before_levels: np.ndarray) -> np.ndarray:
    """100 − 100 · mean_l |after_l / before_l − 1|: 100 = unchanged; a change of ±10% at every layer gives 90."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 - 100.0 * np.abs(after_levels / before_levels - 1.0).mean(axis=-1)


def recon_error_ratio(sums: PairedSums) -> np.ndarray:
    """[layers] Σ_t ‖x_A,t − x̂_A,t‖² / Σ_t ‖x_B,t − x̂_B,t‖² over the same tokens: the SAE's absolute reconstruction
    error after vs before (FVU divides by each side's own variance, which the adapter also moves)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.sq_err_after.sum(axis=0) / sums.sq_err_before.sum(axis=0)


def spliced_means(sums: PairedSums) -> tuple[np.ndarray, np.ndarray]:
    """([spliced layers] before, after): the spliced-in LM loss, mean over sentences with a predicted token."""
    if sums.spliced_before is None or not sums.spliced_layers:
        return np.zeros(0), np.zeros(0)
    with warnings.catch_warnings():  # a layer without any finite sentence is NaN, as it should be
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(sums.spliced_before, axis=0), np.nanmean(sums.spliced_after, axis=0)


def no_change_maxima(values: np.ndarray, weights: np.ndarray | None, statistic: str, n_splits: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """[n_splits] over random splits of the sentences into two disjoint halves A and B (n // 2 sentences each) of one
    unchanged model, the largest per-layer statistic between the halves: `ratio` (Σ_A values / Σ_A weights) /
    (Σ_B values / Σ_B weights), or `diff` mean_A − mean_B (NaN rows ignored). values [sentences, layers]; weights
    [sentences] (tokens) or None. Empty when there are fewer than 4 sentences or no layer."""
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    if n < 4 or values.ndim != 2 or values.shape[1] == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    halves = np.zeros((n_splits, n))
    rest = np.zeros((n_splits, n))
    for i in range(n_splits):
        order = rng.permutation(n)
        halves[i, order[: n // 2]] = 1.0
        rest[i, order[n // 2: 2 * (n // 2)]] = 1.0
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if statistic == "ratio":
            stat = ((halves @ filled) / (halves @ w)[:, None]) / ((rest @ filled) / (rest @ w)[:, None])
        elif statistic == "diff":
            stat = (halves @ filled) / (halves @ finite.astype(float)) - (rest @ filled) / (rest @ finite.astype(float))
        else:
            raise ValueError(f"statistic must be 'ratio' or 'diff', not {statistic!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(stat, axis=1)


def no_change_quantile(values: np.ndarray, weights: np.ndarray | None, statistic: str, q: float = 0.95,
                       n_splits: int = 1000, seed: int = 0) -> float:
    """The q-quantile of `no_change_maxima`: what a tolerance on `recon_error_ratio` (ratio) or on the spliced-loss
    change (diff) must be for an unchanged model, judged at every layer, to pass with probability q. NaN if undefined."""
    maxima = no_change_maxima(values, weights, statistic, n_splits, seed)
    maxima = maxima[np.isfinite(maxima)]
    return float(np.quantile(maxima, q)) if len(maxima) else float("nan")


def language_outcome(sums: PairedSums, aggregate: str, tolerance: float, counts: np.ndarray, ci: float,
                     is_reference: bool, spliced_tolerance: float = SPLICED_TOLERANCE_NATS,
                     judged_layers: list[int] | None = None) -> dict:
    """Every outcome number of one language (see docs/training.md), with paired bootstrap CIs over its sentences."""
    ones = np.ones(sums.n_sentences)
    weights = np.vstack([ones, counts])  # row 0: the point estimate; rows 1..: the resamples
    before = _levels(sums.metric_before, sums.n_tokens, weights, aggregate)
    after = _levels(sums.metric_after, sums.n_tokens, weights, aggregate)
    matched = _levels(sums.metric_norm_matched, sums.n_tokens, weights, aggregate)
    gain = _pct(after.sum(axis=-1), before.sum(axis=-1))  # the ratio of summed levels over layers
    norm_matched = _pct(matched.sum(axis=-1), before.sum(axis=-1))
    retention = retention_pct(after, before)
    ce_before, ce_after = weights @ sums.ce_before, weights @ sums.ce_after
    with np.errstate(invalid="ignore", divide="ignore"):
        lm_change = (ce_after - ce_before) / (weights @ sums.ce_tokens)
    point = {
        "level_before": _levels(sums.metric_before, sums.n_tokens, ones, aggregate),
        "level_after": _levels(sums.metric_after, sums.n_tokens, ones, aggregate),
        "resid_before": _levels(sums.resid_norm_before, sums.n_tokens, ones, "token"),
        "resid_after": _levels(sums.resid_norm_after, sums.n_tokens, ones, "token"),
        "l0_before": _levels(sums.l0_before, sums.n_tokens, ones, "token"),
        "l0_after": _levels(sums.l0_after, sums.n_tokens, ones, "token"),
        "cosine": _levels(sums.code_cosine, sums.n_tokens, ones, "token"),
    }
    fvu_before, fvu_after = sums.fvu("before"), sums.fvu("after")
    fvu_b, fvu_a = float(np.nanmean(fvu_before)), float(np.nanmean(fvu_after))
    recon_ratio = recon_error_ratio(sums)
    spliced_b, spliced_a = spliced_means(sums)
    valid, beyond, judged = _validity(sums, recon_ratio, spliced_b, spliced_a, tolerance, spliced_tolerance,
                                      judged_layers)
    out = {
        "gain_pct": float(gain[0]),
        "gain_ci": percentile_interval(gain[1:], ci),
        "norm_matched_gain_pct": float(norm_matched[0]),
        "norm_matched_gain_ci": percentile_interval(norm_matched[1:], ci),
        "level_before": float(point["level_before"].mean()),
        "level_after": float(point["level_after"].mean()),
        "fvu_before": fvu_b,
        "fvu_after": fvu_a,
        "fvu_ratio": fvu_a / fvu_b if fvu_b > 0 else float("nan"),
        "valid": valid,
        "layers_beyond_tolerance": sorted(int(layer) for layer in beyond),
        "judged_layers": sorted(int(layer) for layer in judged),
        "recon_error_ratio": [float(r) for r in recon_ratio],
        "recon_error_ratio_max": float(np.nanmax(recon_ratio)) if np.isfinite(recon_ratio).any() else float("nan"),
        "spliced_layers": [int(layer) for layer in sums.spliced_layers],
        "spliced_dlm_loss_before": [float(v) for v in spliced_b],
        "spliced_dlm_loss_after": [float(v) for v in spliced_a],
        "no_change_recon_error_ratio_q95": no_change_quantile(sums.sq_err_before, sums.n_tokens, "ratio"),
        "no_change_spliced_dlm_change_q95": (no_change_quantile(sums.spliced_before, None, "diff")
                                             if sums.spliced_before is not None else float("nan")),
        "resid_norm_before": float(point["resid_before"].mean()),
        "resid_norm_after": float(point["resid_after"].mean()),
        "resid_norm_change_pct": float(_pct(point["resid_after"].sum(), point["resid_before"].sum())),
        "l0_before": float(point["l0_before"].mean()),
        "l0_after": float(point["l0_after"].mean()),
        "lm_loss_before": float(ce_before[0] / max(sums.ce_tokens.sum(), 1.0)),
        "lm_loss_after": float(ce_after[0] / max(sums.ce_tokens.sum(), 1.0)),
        "lm_loss_change": float(lm_change[0]),
        "lm_loss_change_ci": percentile_interval(lm_change[1:], ci),
        "n_sentences": sums.n_sentences,
        "n_tokens": int(sums.n_tokens.sum()),
        "per_layer": _per_layer(sums, point, matched[0], before[0], fvu_before, fvu_after, recon_ratio),
    }
    if is_reference:
        out.update(retention_pct=float(retention[0]), retention_ci=percentile_interval(retention[1:], ci),
                   code_cosine=float(point["cosine"].mean()))
    return out


def _validity(sums: PairedSums, recon_ratio, spliced_b, spliced_a, tolerance: float, spliced_tolerance: float,
              judged_layers) -> tuple[bool, set, set]:
    """(valid, layers beyond tolerance, judged layers). Valid, per layer and strictly: at every judged (aligned) layer
    the SAE's absolute reconstruction error of the same tokens and the spliced-in LM loss stay within tolerance
    (docs/training.md, "valid")."""
    judged = set(sums.layers if judged_layers is None else (int(layer) for layer in judged_layers))
    beyond = {layer for layer, r in zip(sums.layers, recon_ratio) if layer in judged and not r <= tolerance}
    beyond |= {layer for layer, b, a in zip(sums.spliced_layers, spliced_b, spliced_a)
               if layer in judged and not a - b <= spliced_tolerance}
    return not beyond and any(layer in judged for layer in sums.layers), beyond, judged


def _per_layer(sums: PairedSums, point: dict, matched, before, fvu_before, fvu_after, recon_ratio) -> dict:
    """An outcome's per_layer block: each layer's point estimates (`matched`, `before`: the point rows of the
    norm-matched and before levels)."""
    return {
        str(layer): {"gain_pct": float(_pct(point["level_after"][j], point["level_before"][j])),
                     "norm_matched_gain_pct": float(_pct(matched[j], before[j])),
                     "level_before": float(point["level_before"][j]), "level_after": float(point["level_after"][j]),
                     "fvu_before": float(fvu_before[j]), "fvu_after": float(fvu_after[j]),
                     "recon_error_ratio": float(recon_ratio[j]),
                     "resid_norm_change_pct": float(_pct(point["resid_after"][j], point["resid_before"][j])),
                     "l0_before": float(point["l0_before"][j]), "l0_after": float(point["l0_after"][j]),
                     "code_cosine": float(point["cosine"][j])}
        for j, layer in enumerate(sums.layers)
    }


def outcome_report(paired: dict[str, PairedSums], reference_lang: str, targets: list[str], aggregate: str,
                   tolerance: float = FIDELITY_TOLERANCE, n_resamples: int = 1000, ci: float = 0.95,
                   seed: int = 0, spliced_tolerance: float = SPLICED_TOLERANCE_NATS,
                   judged_layers: list[int] | None = None) -> dict:
    """Per-language outcomes plus the headline numbers of one split (docs/training.md, "Outcome measures").
    judged_layers: the layers `valid` judges (the aligned layers; None = every analysed layer)."""
    per_lang = {}
    for k, lang in enumerate([*targets, reference_lang]):
        sums = paired[lang]
        counts = resample_counts(sums.n_sentences, n_resamples, seed * 1000 + k) if n_resamples > 0 else \
            np.zeros((0, sums.n_sentences))
        per_lang[lang] = language_outcome(sums, aggregate, tolerance, counts, ci, lang == reference_lang,
                                          spliced_tolerance, judged_layers)
    ref = per_lang[reference_lang]
    for lang in targets:
        per_lang[lang]["gap_closed_pct"] = gap_closed_pct(per_lang[lang], ref)
    gains = {lang: per_lang[lang]["gain_pct"] for lang in targets}
    valid_gains = {lang: (per_lang[lang]["gain_pct"] if per_lang[lang]["valid"] and ref["valid"] else None)
                   for lang in targets}
    return {
        "per_lang": per_lang,
        "activation_gain_pct": gains,
        "activation_gain_pct_mean": float(np.mean(list(gains.values()))),
        "valid_activation_gain_pct": valid_gains,
        "norm_matched_gain_pct": {lang: per_lang[lang]["norm_matched_gain_pct"] for lang in targets},
        "gap_closed_pct": {lang: per_lang[lang]["gap_closed_pct"] for lang in targets},
        "english_retention_pct": ref["retention_pct"],
        "english_retention_ci": ref["retention_ci"],
        "english_change_pct": ref["gain_pct"],
        "english_code_cosine": ref["code_cosine"],
        "english_lm_loss_change": ref["lm_loss_change"],
        "english_lm_loss_change_ci": ref["lm_loss_change_ci"],
        "english_spliced_dlm_change": [a - b for b, a in zip(ref["spliced_dlm_loss_before"],
                                                              ref["spliced_dlm_loss_after"])],
        "fvu_ratio_max": float(max(per_lang[lang]["fvu_ratio"] for lang in per_lang)),
        "recon_error_ratio_max": float(max(per_lang[lang]["recon_error_ratio_max"] for lang in per_lang)),
        "all_valid": all(per_lang[lang]["valid"] for lang in per_lang),
    }


def gap_closed_pct(target: dict, reference: dict) -> float:
    """How much of the distance to the reference language's base level the adapter closed, in % of that level:
    100 · (Σ_l |B_l − E_l| − Σ_l |A_l − E_l|) / Σ_l E_l with B, A the target's levels before and after and E English's
    before. Overshooting English is distance again, not gain; 100 would be reaching English at every layer from 0."""
    layers = list(target["per_layer"])
    before = np.array([target["per_layer"][k]["level_before"] for k in layers])
    after = np.array([target["per_layer"][k]["level_after"] for k in layers])
    english = np.array([reference["per_layer"][k]["level_before"] for k in layers])
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(100.0 * (np.abs(before - english).sum() - np.abs(after - english).sum()) / english.sum())


LM_LOSS_PENALTY = 100.0
"""alignment_score points lost per nat/token of LM-loss rise (mean over the targets and English)."""

UNDEFINED_SCORE = -1.0e6
"""alignment_score where a reconstruction ratio or retention is undefined (non-finite): worse than any measured run,
yet finite for Optuna."""


def alignment_score(split_report: dict, floor_pct: float, tolerance: float = FIDELITY_TOLERANCE) -> float:
    """What sweeps maximise (computed on the dev split only): the mean share of the gap to English the target
    languages closed (`gap_closed_pct`: overshooting English is not rewarded), minus 1 point per point of English
    retention lost (either direction) and 10 more below `floor_pct`, minus `LM_LOSS_PENALTY` points per nat/token of
    LM-loss rise (mean over the targets and English), minus 100 points per unit of the worst layer's reconstruction-
    error ratio above 1 (mean over the targets and English), and 100 more per unit above `tolerance`: a gain the SAE
    no longer explains scores below no gain at all."""
    per_lang = split_report["per_lang"]
    retention = split_report["english_retention_pct"]
    ratios = [per_lang[lang]["recon_error_ratio_max"] for lang in per_lang]
    gaps = [per_lang[lang]["gap_closed_pct"] for lang in per_lang if "gap_closed_pct" in per_lang[lang]]
    if not all(math.isfinite(r) for r in [*ratios, *gaps, retention]):
        return UNDEFINED_SCORE
    rise = float(np.mean([max(0.0, r - 1.0) for r in ratios]))
    beyond = float(np.mean([max(0.0, r - tolerance) for r in ratios]))
    lm_damage = float(np.mean([max(0.0, per_lang[lang]["lm_loss_change"]) for lang in per_lang
                               if math.isfinite(per_lang[lang]["lm_loss_change"])] or [0.0]))
    return float(np.mean(gaps) - (100.0 - retention) - 10.0 * max(0.0, floor_pct - retention)
                 - LM_LOSS_PENALTY * lm_damage - 100.0 * rise - 100.0 * beyond)
