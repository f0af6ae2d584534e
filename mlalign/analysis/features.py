"""Which SAE features carry the language gap: per-feature statistics, the lists, overlap, their CIs, the adapter view.

Definitions and formulas: docs/method.md §8. The engine streams `FeatureStats` next to `stats.LayerStats` (O(d_sae)
per (language, layer)); a second, optional pass (`engine.collect_listed_sums`, `SentenceFeatureStats`) keeps
per-sentence sums of the listed features only (O(sentences x k)) for their paired bootstrap CIs. The adapter view
(`adapter_changes`) compares an adapted model's statistics with the base model's. The files, tables, plots and
Neuronpedia links written from these numbers: `analysis/features_outputs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from mlalign.saes.encode import SparseCode

from mlalign.errors import UserError

LIST_KINDS = ("under", "over", "specific")
ROUNDING = 1e-6
"""Relative differences in mean activation below this are float rounding (float32 batch sums), not a difference."""


@dataclass
class FeatureSums:
    """Per-feature totals of one (language, layer), numpy on the CPU. `F = d_sae`."""

    n_tokens: np.ndarray
    """[] analysed tokens (BOS, padding and positions outside the window excluded)."""
    n_sentences: np.ndarray
    """[] sentences with at least one analysed token."""
    act_sum: np.ndarray
    """[F] sum_t a_tf."""
    fire_count: np.ndarray
    """[F] #{t : a_tf != 0}."""
    sentences_fired: np.ndarray
    """[F] #{s : a_tf != 0 for some t in s}: the support that keeps one odd sentence from making a feature "Hindi's"."""
    feature_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """[k] features whose per-sentence sums are kept (second pass only; empty otherwise)."""
    sentence_sums: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """[n_sentences_total, k] per sentence sum_t a_tf of `feature_ids` (second pass only)."""

    @property
    def d_sae(self) -> int:
        return int(self.act_sum.shape[0])

    @property
    def mean_act(self) -> np.ndarray:
        """[F] mean activation over all analysed tokens."""
        n = float(self.n_tokens)
        return self.act_sum / n if n > 0 else np.full(self.d_sae, np.nan)

    @property
    def firing_rate(self) -> np.ndarray:
        """[F] share of analysed tokens on which the feature is non-zero."""
        n = float(self.n_tokens)
        return self.fire_count / n if n > 0 else np.full(self.d_sae, np.nan)

    @property
    def mean_act_firing(self) -> np.ndarray:
        """[F] mean activation over the tokens where it fires (NaN where it never fires)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fire_count > 0, self.act_sum / np.where(self.fire_count > 0, self.fire_count, 1), np.nan)

    def to_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, arrays) -> "FeatureSums":
        names = {f.name for f in fields(cls)}
        return cls(**{name: np.asarray(arrays[name]) for name in names})


FEATURE_SUMS_FIELDS = tuple(f.name for f in fields(FeatureSums))


class FeatureStats:
    """Streaming per-feature accumulator for one language and a group of `n_layers` layers (1 by default; inputs of a
    group are layer-major flattened, as in `stats.LayerStats`); nothing is synchronised with the host until
    finalizing. Memory O(d_sae) per layer, plus [n_sentences, k] when `feature_ids` (k features; one layer only)."""

    def __init__(self, n_sentences: int, d_sae: int, device: torch.device | str = "cpu", feature_ids=None,
                 n_layers: int = 1):
        device = torch.device(device)
        if feature_ids is not None and n_layers != 1:
            raise ValueError("feature_ids are per layer: use one FeatureStats per layer for them")
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.device = device
        self.n_layers, self.d_sae = int(n_layers), int(d_sae)
        self.n_tokens = 0  # from shapes: a Python int costs no host sync
        self.n_sentences = torch.zeros((), dtype=self.dtype, device=device)
        self.act_sum = torch.zeros(self.n_layers * self.d_sae, dtype=self.dtype, device=device)
        self.fire_count = torch.zeros(self.n_layers * self.d_sae, dtype=self.dtype, device=device)
        self.sentences_fired = torch.zeros(self.n_layers * self.d_sae, dtype=self.dtype, device=device)
        self.listed = None if feature_ids is None else SentenceFeatureStats(n_sentences, feature_ids, device)

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor, row_index: torch.Tensor, n_rows: int,
               sentence_index: torch.Tensor | None = None, code: SparseCode | None = None) -> None:
        """Add one batch. feature_acts: [L * n, d_sae] of the analysed tokens (layer-major); row_index: [n] long, each
        token's row in the batch (0..n_rows-1; a batch holds whole sentences, so a row is a sentence); sentence_index:
        [n] long, the sentence's position in the language's text list (needed only with `feature_ids`); code:
        feature_acts's non-zero entries if already found (the totals then cost O(nnz), and feature_acts may be None
        unless this accumulator keeps listed features); without it, dense passes with no host synchronisation (what an
        accelerator wants)."""
        n = row_index.shape[0]
        if n == 0:
            return
        L, d_sae = self.n_layers, self.d_sae
        self.n_tokens += n
        self.n_sentences += (torch.bincount(row_index, minlength=n_rows) > 0).sum().to(self.dtype)
        if code is not None:
            # Which (layer, row, feature) triples fired, as a [L * n_rows, d_sae] grid: its column sums count the
            # sentences a feature fires in (a batch's rows are whole sentences).
            # Each code row's (layer position, batch row) as one index into the grid, then the entries' cells.
            grid_row = (torch.arange(L, device=row_index.device).unsqueeze(1) * n_rows + row_index).view(-1)
            cell = grid_row.index_select(0, code.rows).mul_(d_sae).add_(code.features)
            fired_in_row = torch.zeros(L * n_rows * d_sae, dtype=torch.bool, device=code.values.device)
            fired_in_row.index_fill_(0, cell, True)
            self.act_sum.index_add_(0, code.layer_feature(n), code.values.to(self.dtype))
            self.fire_count += code.column_counts(n).to(self.dtype)
        else:
            acts = feature_acts.view(L, n, d_sae)
            # Per-row firing counts as one batched matmul with the [n_rows, n] token-to-row one-hot matrix: no float32
            # copy of the code; fp16 counts are exact up to 2048 tokens a row (float32 beyond, or on the CPU).
            count_dtype = torch.float16 if acts.device.type != "cpu" and n <= 2048 else torch.float32
            one_hot = torch.zeros(n_rows, n, dtype=count_dtype, device=acts.device)
            one_hot[row_index, torch.arange(n, device=acts.device)] = 1
            per_row = torch.matmul(one_hot, (acts != 0).to(count_dtype))  # [L, n_rows, d_sae]
            fired_in_row = per_row > 0
            self.act_sum += acts.sum(dim=1, dtype=torch.float32).view(-1).to(self.dtype)
            self.fire_count += per_row.sum(dim=1, dtype=torch.float32).view(-1).to(self.dtype)
        self.sentences_fired += fired_in_row.view(L, n_rows, d_sae).sum(dim=1).view(-1).to(self.dtype)
        if self.listed is not None:
            self.listed.update(feature_acts, sentence_index)

    def finalize_layers(self) -> list[FeatureSums]:
        """One `FeatureSums` per layer of the group, in its order."""
        n_tokens, n_sentences = np.asarray(float(self.n_tokens)), np.asarray(float(self.n_sentences.cpu()))
        per_layer = {name: getattr(self, name).double().cpu().numpy().reshape(self.n_layers, -1)
                     for name in ("act_sum", "fire_count", "sentences_fired")}
        out = [FeatureSums(n_tokens=n_tokens.copy(), n_sentences=n_sentences.copy(),
                           **{name: values[i].copy() for name, values in per_layer.items()})
               for i in range(self.n_layers)]
        if self.listed is not None:
            listed = self.listed.finalize()
            out[0].feature_ids, out[0].sentence_sums = listed.feature_ids, listed.sentence_sums
        return out

    def finalize(self) -> FeatureSums:
        """The `FeatureSums` of a one-layer accumulator."""
        if self.n_layers != 1:
            raise ValueError("finalize() is for one layer; use finalize_layers() for a group")
        return self.finalize_layers()[0]


@dataclass
class ListedSums:
    """Per-sentence sums of a few listed features of one (language, layer): what their paired bootstrap CIs need."""

    feature_ids: np.ndarray
    """[k] the features."""
    sentence_sums: np.ndarray
    """[n_sentences, k] per sentence sum_t a_tf, rows in the language's text order."""


class SentenceFeatureStats:
    """Streaming per-sentence sums of k listed features for one (language, layer): O(sentences x k), nothing else.
    The second pass (`engine.collect_listed_sums`) runs only this; `FeatureStats(feature_ids=...)` runs it beside its
    O(d_sae) totals, through the same code, so both give the same numbers."""

    def __init__(self, n_sentences: int, feature_ids, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.feature_ids = torch.as_tensor(np.asarray(feature_ids, dtype=np.int64), device=device)
        self.sentence_sums = torch.zeros(n_sentences, len(self.feature_ids), dtype=self.dtype, device=device)

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor, sentence_index: torch.Tensor) -> None:
        """feature_acts: [n, d_sae] of the analysed tokens; sentence_index: [n] long, each token's sentence."""
        self.add(feature_acts.index_select(1, self.feature_ids), sentence_index)

    @torch.no_grad()
    def add(self, listed_acts: torch.Tensor, sentence_index: torch.Tensor) -> None:
        """listed_acts: [n, k] activations of `feature_ids` only (in that order), e.g. from `engine.encode_listed`."""
        if listed_acts.shape[0] == 0:
            return
        self.sentence_sums.index_add_(0, sentence_index, listed_acts.to(torch.float32).to(self.dtype))

    def finalize(self) -> ListedSums:
        return ListedSums(self.feature_ids.cpu().numpy(), self.sentence_sums.double().cpu().numpy())


# ---------------------------------------------------------------------------------------------------- statistics


def selectivity(mean_acts: np.ndarray) -> np.ndarray:
    """[n_langs, F] share of each feature's mean activation that each language carries: mu_lf / sum_l' mu_l'f.
    1 = only this language activates it; 1/n_langs = every language equally. NaN where no language activates it."""
    mean_acts = np.clip(np.nan_to_num(np.asarray(mean_acts, dtype=np.float64)), 0.0, None)
    total = mean_acts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, mean_acts / np.where(total > 0, total, 1.0), np.nan)


def specificity(share: np.ndarray, n_langs: int) -> np.ndarray:
    """(share - 1/n) / (1 - 1/n): 1 = one language only, 0 = uniform, negative = below uniform. NaN for n = 1."""
    if n_langs < 2:
        return np.full_like(share, np.nan)
    return (share - 1.0 / n_langs) / (1.0 - 1.0 / n_langs)


def weighted_jaccard(mean_acts: np.ndarray) -> np.ndarray:
    """[n, n] activation-weighted Jaccard of the languages' activation profiles p_l = mu_l / sum_f mu_lf:
    sum_f min(p_af, p_bf) / sum_f max(p_af, p_bf). 1 = the same features in the same proportions, 0 = disjoint.
    Profiles are normalised so that a language using the same features uniformly more weakly still overlaps fully
    (that gap is what disparity_pct measures). A language without any activation overlaps only itself."""
    mu = np.clip(np.nan_to_num(np.asarray(mean_acts, dtype=np.float64)), 0.0, None)
    total = mu.sum(axis=1, keepdims=True)
    p = np.where(total > 0, mu / np.where(total > 0, total, 1.0), 0.0)
    n = p.shape[0]
    out = np.eye(n)
    for a in range(n):
        for b in range(a + 1, n):
            high = np.maximum(p[a], p[b]).sum()
            out[a, b] = out[b, a] = float(np.minimum(p[a], p[b]).sum() / high) if high > 0 else 0.0
    return np.clip(out, 0.0, 1.0)


def paired_counts(ids_by_lang, langs, reference_lang, sizes, n_resamples, seed):
    from mlalign.analysis.bootstrap import resample_counts
    from mlalign.analysis.metrics import _paired_columns

    ids_by_lang = ids_by_lang or {}
    ref_counts = resample_counts(sizes[reference_lang], n_resamples, np.random.default_rng([seed, 14, 0]))
    out = {}
    for k, lang in enumerate(langs):
        if lang == reference_lang:
            out[lang] = ref_counts
            continue
        columns = _paired_columns(ids_by_lang.get(lang), ids_by_lang.get(reference_lang))
        out[lang] = (ref_counts[:, columns] if columns is not None
                     else resample_counts(sizes[lang], n_resamples, np.random.default_rng([seed, 14, k + 1])))
    return out


@dataclass
class FeatureReport:
    """Everything the outputs are written from. Per layer (int keys), per language (analysed order)."""

    reference_lang: str
    langs: list[str]
    layers: list[int]
    top_k: int
    min_sentences: int
    specific_threshold: float
    stats: dict
    """[layer] -> {mean_act, firing_rate, mean_act_firing, sentences_fired, selectivity, specificity}: [n_langs, F]."""
    lists: dict
    """[lang][layer][kind] -> [feature ids]; kinds under/over (vs the reference) and specific."""
    specific_counts: dict
    """[lang][layer] -> number of features specific to the language."""
    overlap: dict
    """[layer] -> [n_langs, n_langs] weighted Jaccard."""
    reference_share: dict
    """[lang][layer] -> {"features": share of the reference's supported features the language also supports,
    "mass": the reference activation mass on those features}."""
    intervals: dict = field(default_factory=dict)
    """[lang][layer][feature] -> [low, high] CI of mean_act(lang) - mean_act(reference)."""
    neuronpedia: dict = field(default_factory=dict)
    """[layer] -> Neuronpedia SAE id (e.g. gemma-2-2b/3-gemmascope-res-16k) or None."""

    def value(self, name: str, lang: str, layer: int, feature: int) -> float:
        return float(self.stats[layer][name][self.langs.index(lang), feature])

    def diff(self, lang: str, layer: int, feature: int) -> float:
        return self.value("mean_act", lang, layer, feature) - self.value("mean_act", self.reference_lang, layer, feature)

    def needed_features(self) -> dict[str, dict[int, list[int]]]:
        """[lang][layer] -> features whose per-sentence sums the CIs need: each language's listed features, and for
        the reference the union over languages (the CI is of a paired difference)."""
        out = {lang: {layer: set() for layer in self.layers} for lang in self.langs}
        for lang, by_layer in self.lists.items():
            if lang == self.reference_lang:
                continue
            for layer, kinds in by_layer.items():
                listed = {f for kind in LIST_KINDS for f in kinds.get(kind, [])}
                out[lang][layer] |= listed
                out[self.reference_lang][layer] |= listed
        return {lang: {layer: sorted(fs) for layer, fs in by_layer.items() if fs} for lang, by_layer in out.items()}


def analyze_features(feature_stats: dict[str, dict[int, FeatureSums]], reference_lang: str, langs: list[str] | None = None,
                     top_k: int = 10, min_sentences: int = 5, specific_threshold: float = 0.5) -> FeatureReport:
    """Per-feature statistics, top-k lists, language-specific features and overlap (docs/method.md §8).

    Over-active in `lang`: mean_act(lang) - mean_act(ref) > 0, firing in >= min_sentences of lang's sentences;
    under-active: the difference < 0, firing in >= min_sentences of the reference's; the k largest |difference| each.
    Specific to `lang`: specificity >= specific_threshold and firing in >= min_sentences of lang's sentences, listed
    by mean activation (the top k; `specific_counts` counts all of them). Needs the reference among the languages.
    """
    langs = list(langs or feature_stats)
    if reference_lang not in langs:
        raise UserError(f"reference language {reference_lang!r} was not analysed; add it to langs or set reference_lang")
    if top_k < 1 or min_sentences < 1:
        raise UserError(f"analysis.features.top_k and min_sentences must be >= 1, got {top_k} and {min_sentences}")
    if not 0 < specific_threshold <= 1:
        raise UserError(f"analysis.features.specific_threshold must lie in (0, 1], got {specific_threshold}")
    layers = sorted(feature_stats[reference_lang])
    ref = langs.index(reference_lang)
    n = len(langs)
    stats, lists, counts, overlap, share = {}, {lang: {} for lang in langs}, {lang: {} for lang in langs}, {}, {lang: {} for lang in langs}
    for layer in layers:
        sums = [feature_stats[lang][layer] for lang in langs]
        mean_act = np.stack([s.mean_act for s in sums])
        fired = np.stack([s.sentences_fired for s in sums])
        sel = selectivity(mean_act)
        spec = specificity(sel, n)
        stats[layer] = {"mean_act": mean_act, "firing_rate": np.stack([s.firing_rate for s in sums]),
                        "mean_act_firing": np.stack([s.mean_act_firing for s in sums]), "sentences_fired": fired,
                        "selectivity": sel, "specificity": spec}
        overlap[layer] = weighted_jaccard(mean_act)
        supported = fired >= min_sentences
        ref_support = supported[ref]
        ref_mass = np.nan_to_num(mean_act[ref]) * ref_support
        for i, lang in enumerate(langs):
            kinds = {}
            if n > 1:
                specific = _specific_mask(spec[i], supported[i], specific_threshold)
                counts[lang][layer] = int(specific.sum())
                kinds["specific"] = _top(np.where(specific, mean_act[i], -np.inf), top_k)
            else:
                counts[lang][layer] = 0
            both = ref_support & supported[i]
            share[lang][layer] = {
                "features": float(both.sum() / ref_support.sum()) if ref_support.any() else None,
                "mass": float(ref_mass[both].sum() / ref_mass.sum()) if ref_mass.sum() > 0 else None,
            }
            if i != ref:
                diff = np.nan_to_num(mean_act[i] - mean_act[ref])
                # Differences within float rounding of the sums (batch composition) are no difference.
                scale = np.nan_to_num(np.maximum(np.abs(mean_act[i]), np.abs(mean_act[ref])))
                diff = np.where(np.abs(diff) > ROUNDING * scale, diff, 0.0)
                kinds["over"] = _top(np.where(supported[i] & (diff > 0), diff, -np.inf), top_k)
                kinds["under"] = _top(np.where(ref_support & (diff < 0), -diff, -np.inf), top_k)
            lists[lang][layer] = kinds
    return FeatureReport(reference_lang, langs, layers, top_k, min_sentences, specific_threshold, stats, lists,
                         counts, overlap, share)


def _specific_mask(specificity_row: np.ndarray, supported_row: np.ndarray, threshold: float) -> np.ndarray:
    """[F] bool: specific to the language (specificity >= threshold) and counting for it (enough support)."""
    return supported_row & (np.nan_to_num(specificity_row, nan=-1.0) >= threshold - 1e-12)


def specific_features(report: FeatureReport, lang: str, layer: int, k: int) -> list[int]:
    """The top k features specific to `lang` at `layer` by mean activation: the "specific" list for any k (fewer
    where the language has fewer specific features)."""
    if lang not in report.langs:
        raise UserError(f"language {lang!r} was not analysed (analysed: {', '.join(report.langs)}); add it to langs")
    if layer not in report.stats:
        raise UserError(f"layer {layer} was not analysed (analysed: {', '.join(map(str, report.layers))}); add it to "
                        "layers=[...] or pick one of those")
    if k < 1:
        raise UserError(f"the number of features k must be >= 1, got {k}")
    i, stats = report.langs.index(lang), report.stats[layer]
    specific = _specific_mask(stats["specificity"][i], stats["sentences_fired"][i] >= report.min_sentences,
                              report.specific_threshold)
    return _top(np.where(specific, stats["mean_act"][i], -np.inf), k)


def _top(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest finite scores, largest first (ties by index)."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.lexsort((finite, -scores[finite]))]
    return [int(f) for f in order[:k]]


def add_intervals(report: FeatureReport, sentence_sums: dict[str, dict[int, FeatureSums]],
                  n_tokens: dict[str, dict[int, np.ndarray]], ids_by_lang: dict | None = None,
                  n_resamples: int = 1000, ci: float = 0.95, seed: int = 0) -> None:
    """Paired percentile-bootstrap CIs of mean_act(lang) - mean_act(ref) for every listed feature, into
    `report.intervals`. sentence_sums[lang][layer] holds per-sentence sums of (at least) the needed features;
    n_tokens[lang][layer] the per-sentence token counts. A language holding the reference's sentence ids reuses its
    draw by id (the same sentences on both sides), like the disparity CIs."""
    from mlalign.analysis.bootstrap import percentile_interval

    if n_resamples <= 0:
        return
    ref = report.reference_lang
    langs = [lang for lang in report.langs if lang in sentence_sums]
    if ref not in langs:
        return
    sizes = {lang: len(next(iter(n_tokens[lang].values()))) for lang in langs}
    counts = paired_counts(ids_by_lang, langs, ref, sizes, n_resamples, seed)
    needed = report.needed_features()
    for lang in langs:
        if lang == ref:
            continue
        for layer, features in needed.get(lang, {}).items():
            mine, theirs = sentence_sums[lang].get(layer), sentence_sums[ref].get(layer)
            if mine is None or theirs is None:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                a = _resampled_means(mine, n_tokens[lang][layer], counts[lang], features)
                b = _resampled_means(theirs, n_tokens[ref][layer], counts[ref], features)
            cell = report.intervals.setdefault(lang, {}).setdefault(layer, {})
            for j, feature in enumerate(features):
                cell[feature] = percentile_interval(a[:, j] - b[:, j], ci)


def _resampled_means(sums: FeatureSums, n_tokens: np.ndarray, counts: np.ndarray, features: list[int]) -> np.ndarray:
    """[n_resamples, len(features)] token-pooled mean activation of `features` under each resample's weights."""
    where = {int(f): j for j, f in enumerate(sums.feature_ids)}
    columns = sums.sentence_sums[:, [where[int(f)] for f in features]]
    return (counts @ columns) / (counts @ np.asarray(n_tokens, dtype=np.float64))[:, None]


def band_overlap(report: FeatureReport, lang: str, layers: list[int]) -> float | None:
    """`lang`'s weighted Jaccard with the reference, mean over `layers` (None where none was analysed)."""
    i, r = report.langs.index(lang), report.langs.index(report.reference_lang)
    values = [report.overlap[layer][i, r] for layer in layers if layer in report.overlap]
    return float(np.mean(values)) if values else None


def finite_or_none(x) -> float | None:
    """A float, or None where it is NaN or infinite (strict JSON has neither)."""
    x = float(x)
    return None if not np.isfinite(x) else x


# ---------------------------------------------------------------------------------------------------- adapter view


def adapter_changes(base: dict[str, dict[int, FeatureSums]], adapted: dict[str, dict[int, FeatureSums]], langs: list[str],
                    reference_lang: str, top_k: int = 10, min_sentences: int = 5, specific_threshold: float = 0.5) -> dict:
    """Which features an adapter turned up or down, per language in `langs` and layer (docs/method.md §8, adapter view).

    change[f] = mu_f(adapted) - mu_f(base) on the same sentences. `up`/`down`: the top_k largest rises (the feature
    counts in the adapted model) and falls (it counts in the base model), each with the feature's base selectivity and
    whether it is specific to the language in the base model. `total_rise` R = sum of positive changes, `total_fall`
    the sum of |negative| ones. `gain_top_k_share`: the share of R the top_k rises carry (near 1 = a handful of
    features); `gain_specific_share`: the share of R on features specific to this language in the base model
    (analyze_features over every base language), against `base_specific_share`, the share of the base model's
    activation mass on them (what an adapter that scaled every feature alike would give);
    `turned_on`/`turned_off`: features that reach / lose the support of min_sentences sentences.
    """
    base_report = analyze_features(base, reference_lang, list(base), top_k=top_k, min_sentences=min_sentences,
                                   specific_threshold=specific_threshold)
    out: dict = {}
    for lang in langs:
        out[lang] = {}
        i = base_report.langs.index(lang)
        for layer in base_report.layers:
            b, a = base[lang][layer], adapted[lang][layer]
            change = np.nan_to_num(a.mean_act - b.mean_act)
            scale = np.nan_to_num(np.maximum(np.abs(a.mean_act), np.abs(b.mean_act)))
            change = np.where(np.abs(change) > ROUNDING * scale, change, 0.0)
            supported_a, supported_b = a.sentences_fired >= min_sentences, b.sentences_fired >= min_sentences
            up = _top(np.where(supported_a & (change > 0), change, -np.inf), top_k)
            down = _top(np.where(supported_b & (change < 0), -change, -np.inf), top_k)
            rises = np.clip(change, 0.0, None)
            total = float(rises.sum())
            sel = base_report.stats[layer]["selectivity"][i]
            spec = base_report.stats[layer]["specificity"][i]
            specific = supported_b & (np.nan_to_num(spec, nan=-1.0) >= specific_threshold - 1e-12)
            base_mass = np.clip(np.nan_to_num(b.mean_act), 0.0, None)

            def item(f):
                return {"feature": f, "base": float(b.mean_act[f]), "adapted": float(a.mean_act[f]),
                        "change": float(change[f]), "base_selectivity": finite_or_none(sel[f]),
                        "specific": bool(specific[f])}

            out[lang][layer] = {
                "up": [item(f) for f in up],
                "down": [item(f) for f in down],
                "total_rise": total,
                "total_fall": float(np.clip(-change, 0.0, None).sum()),
                "gain_top_k_share": float(rises[up].sum() / total) if total > 0 else None,
                "gain_specific_share": float(rises[specific].sum() / total) if total > 0 else None,
                "base_specific_share": float(base_mass[specific].sum() / base_mass.sum()) if base_mass.sum() > 0 else None,
                "turned_on": int((supported_a & ~supported_b).sum()),
                "turned_off": int((supported_b & ~supported_a).sum()),
            }
    return out


CHANGE_SHARES = ("gain_top_k_share", "gain_specific_share", "base_specific_share")


def adapter_changes_by_band(changes: dict, bands: dict[str, list[int]]) -> dict:
    """[lang][band] -> the shares averaged over the band's layers (layers without any rise left out), the rises and
    falls and the feature counts turned on / off summed over them: the key numbers report.md shows."""
    out: dict = {}
    for lang, by_layer in changes.items():
        out[lang] = {}
        for band, layers in bands.items():
            cells = [by_layer[layer] for layer in layers if layer in by_layer]
            if not cells:
                continue
            row = {}
            for name in CHANGE_SHARES:
                values = [c[name] for c in cells if c[name] is not None and c["total_rise"] > 0]
                row[name] = float(np.mean(values)) if values else None
            row.update({name: float(sum(c[name] for c in cells)) for name in ("total_rise", "total_fall")})
            row.update({name: int(sum(c[name] for c in cells)) for name in ("turned_on", "turned_off")})
            out[lang][band] = row
    return out
