"""Feature ablation: each language's specific SAE features removed from the residual stream at one layer, and the LM
loss change of every language's sentences (is a language's feature set causal for that language?).

Ablating a set S at decoder layer L replaces its output at the analysed positions (real tokens but BOS, as
`spliced.py`) by x' = x - sum_{f in S} a_f(x) W_dec[f], with a = the layer's SAE code of x: the SAE's error term
x - x̂ and every other feature's contribution stay, nothing else changes. The control is a set of as many random
features matched on firing rate (`matched_random_features`). Per batch, one forward holds the clean copy and one copy
per feature set (`spliced.copy_groups` splits them where the logits would not fit), so the clean loss and every ablated
loss come from one computation. docs/method.md §8c.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mlalign.analysis.bootstrap import percentile_interval
from mlalign.analysis.capture import decoder_layers
from mlalign.analysis.engine import progress_bar, lm_loss_per_row
from mlalign.analysis.spliced import TokenBatch, n_sentences, sae_device, copy_groups
from mlalign.errors import UserError


class _Ablate:
    """Forward hook on one decoder layer of a batch stacked once per feature set: copy j's analysed positions (`flat`
    offset by j * stride) lose sum_{f in sets[j]} a_f W_dec[f], a = the SAE's code of that copy's own residual."""

    def __init__(self, sae, flat: torch.Tensor, stride: int, sets: list[list[int]]):
        self.sae, self.flat, self.stride, self.sets = sae, flat, stride, sets

    def __call__(self, _module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        flat_hidden = hidden.flatten(0, 1)
        device = sae_device(self.sae)
        for j, features in enumerate(self.sets):
            if not features:  # nothing ablated: this copy stays the clean pass, bit for bit
                continue
            where = self.flat + j * self.stride
            index = torch.tensor(features, dtype=torch.long, device=device)
            acts = self.sae.encode(flat_hidden.index_select(0, where).to(device).float()).index_select(1, index)
            removed = acts @ self.sae.W_dec.index_select(0, index).float()
            flat_hidden = flat_hidden.index_add(0, where, removed.to(device=hidden.device, dtype=hidden.dtype),
                                                alpha=-1)
        ablated = flat_hidden.view_as(hidden)
        return (ablated, *output[1:]) if isinstance(output, tuple) else ablated


@torch.no_grad()
def ablated_dlm_loss(model: nn.Module, sae, layer: int, batches: list[TokenBatch], feature_sets: dict[str, list[int]],
                     *, device, progress: bool = False) -> dict[str, np.ndarray]:
    """{name: [sentences]} mean next-token loss per sentence (nats/token) with `feature_sets[name]` ablated at `layer`
    minus the clean loss, sentences in `rows` order (NaN for a sentence with no predicted token)."""
    names = list(feature_sets)
    n = n_sentences(batches)
    sums = {name: torch.zeros(n, dtype=torch.float64) for name in [None, *names]}
    count = torch.zeros(n, dtype=torch.float64)
    block = decoder_layers(model)[layer]
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(batches, progress, desc=f"ablation at layer {layer}", unit="batch"):
            inputs = batch.inputs(device)
            flat = batch.keep.to(device).flatten().nonzero().squeeze(1)
            rows, positions = inputs["input_ids"].shape
            vocab = model.get_output_embeddings().weight.shape[0]
            # Copy 0 of the first group is the clean pass: it shares the forward (and its kernels) with the ablations.
            for group in copy_groups([None, *names], rows, positions, vocab):
                stacked = {key: value.repeat(len(group), 1) for key, value in inputs.items()}
                sets = [[] if name is None else [int(f) for f in feature_sets[name]] for name in group]
                handle = block.register_forward_hook(_Ablate(sae, flat, rows * positions, sets))
                try:
                    logits = model(**stacked, use_cache=False).logits
                finally:
                    handle.remove()
                total, predicted = lm_loss_per_row(logits, stacked)
                total = total.view(len(group), rows).cpu()
                for j, name in enumerate(group):
                    sums[name].index_add_(0, batch.rows, total[j])
                if group[0] is None:
                    count.index_add_(0, batch.rows, predicted.view(len(group), rows)[0].cpu())
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        clean = sums[None].numpy() / count.numpy()
        return {name: sums[name].numpy() / count.numpy() - clean for name in names}


def matched_random_features(firing_rate: np.ndarray, chosen: list[int], seed, pool: int = 10) -> list[int]:
    """As many random features as `chosen`, each drawn uniformly from the `pool` features (outside `chosen` and not yet
    drawn, firing at all) whose firing rate is nearest on a log scale to its chosen feature's: a control that fires as
    often as the ablated set but was not selected for a language. firing_rate: [F], e.g. the mean over languages."""
    rng = np.random.default_rng(seed)
    rate = np.nan_to_num(np.asarray(firing_rate, dtype=np.float64))
    available = rate > 0
    available[list(chosen)] = False
    out = []
    for f in chosen:
        candidates = np.flatnonzero(available)
        if candidates.size == 0:
            break
        target = np.log(max(rate[f], 1e-12))
        nearest = candidates[np.argsort(np.abs(np.log(rate[candidates]) - target), kind="stable")[:pool]]
        pick = int(rng.choice(nearest))
        out.append(pick)
        available[pick] = False
    return out


def _mean_samples(delta: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B] the resampled means of per-sentence values (NaN sentences weigh 0)."""
    valid = np.isfinite(delta)
    weights = counts * valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights @ np.where(valid, delta, 0.0) / weights.sum(axis=1)


def _cell(delta: np.ndarray, samples: np.ndarray, ci: float) -> dict:
    finite = delta[np.isfinite(delta)]
    return {"dlm_loss": float(finite.mean()) if finite.size else None, "ci": percentile_interval(samples, ci),
            "n_sentences": int(finite.size)}


def ablation_matrix(deltas: dict[str, dict[str, np.ndarray]], random: dict[str, dict[str, np.ndarray]],
                    counts: dict[str, np.ndarray], ci: float) -> dict:
    """The matrices of ablation.json and each ablated language's comparisons.

    deltas / random: [ablated_lang][eval_lang] -> [sentences] LM-loss change with the language's specific / matched
    random features ablated; counts: [eval_lang] -> [B, sentences] bootstrap weights (paired by sentence id across
    languages, `features.paired_counts`). Returns {matrix, random, comparisons}: comparisons[lang] = the diagonal minus
    each off-diagonal cell of its row (`vs_eval_lang`) and minus the matched-random diagonal (`vs_random`), each
    {diff, ci}, and `causal`: whether every one of those intervals and the diagonal's own lie above 0."""
    samples = {kind: {a: {e: _mean_samples(d, counts[e]) for e, d in row.items()} for a, row in source.items()}
               for kind, source in (("matrix", deltas), ("random", random))}
    out = {kind: {a: {e: _cell(source[a][e], samples[kind][a][e], ci) for e in source[a]} for a in source}
           for kind, source in (("matrix", deltas), ("random", random))}
    comparisons = {}
    for lang, row in deltas.items():
        if lang not in row:
            continue
        diag = samples["matrix"][lang][lang]

        def difference(other: np.ndarray, point: float | None) -> dict:
            own = out["matrix"][lang][lang]["dlm_loss"]
            diff = None if own is None or point is None else own - point
            return {"diff": diff, "ci": percentile_interval(diag - other, ci)}

        vs_eval = {e: difference(samples["matrix"][lang][e], out["matrix"][lang][e]["dlm_loss"])
                   for e in row if e != lang}
        vs_random = difference(samples["random"][lang][lang], out["random"][lang][lang]["dlm_loss"])
        intervals = [out["matrix"][lang][lang]["ci"], vs_random["ci"], *(c["ci"] for c in vs_eval.values())]
        comparisons[lang] = {"vs_eval_lang": vs_eval, "vs_random": vs_random,
                             "causal": all(c is not None and c[0] > 0 for c in intervals)}
    return {**out, "comparisons": comparisons}


def ablation_statements(result: dict, names: dict[str, str], n_features: dict[str, int], layer: int,
                        ci: float) -> list[str]:
    """One plain sentence per ablated language: whether its specific features are causal for it, by how much, and
    which test failed where they are not shown to be."""
    out, level = [], f"{100 * ci:g}%"

    def fmt(cell) -> str:
        value, interval = cell["dlm_loss"], cell["ci"]
        if value is None:
            return "undefined"
        return f"{value:+.4f}" + (f" ({level} CI {interval[0]:+.4f} to {interval[1]:+.4f})" if interval else "")

    for lang, comparison in result["comparisons"].items():
        name, k = names.get(lang, lang), n_features.get(lang, 0)
        diag = result["matrix"][lang][lang]
        head = (f"{name} ({lang}): ablating its {k} specific feature(s) at layer {layer} changes {lang}'s LM loss by "
                f"{fmt(diag)} nats/token; {k} firing-rate-matched random features: {fmt(result['random'][lang][lang])}.")
        if comparison["causal"]:
            out.append(f"{head} The rise is larger than in every other language and than the random control "
                       f"(each difference's {level} CI above 0): these are {name}'s features.")
            continue
        reasons = []
        if diag["ci"] is None or diag["ci"][0] <= 0:
            reasons.append(f"{lang}'s own loss does not rise (CI not above 0)")
        if comparison["vs_random"]["ci"] is None or comparison["vs_random"]["ci"][0] <= 0:
            reasons.append("the rise is not larger than the random control's")
        beaten = [e for e, c in comparison["vs_eval_lang"].items() if c["ci"] is None or c["ci"][0] <= 0]
        if beaten:
            reasons.append(f"the rise is not larger than in {', '.join(beaten)}")
        out.append(f"{head} Not shown to be {name}'s features: {'; '.join(reasons)}.")
    return out


def check_k(k: int, what: str) -> None:
    """A number of features must be >= 1: one clear line otherwise."""
    if int(k) < 1:
        raise UserError(f"{what} must be >= 1 (features per language), got {k}")


def plot_ablation(result: dict, langs: list[str], layer: int, k: int, path, title: str = ""):
    """analysis/ablation.png: the two matrices (rows = whose features were ablated, columns = evaluated language),
    LM-loss change in nats/token, one colour scale centred at 0, the diagonal outlined; a bold row is causal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlalign.io import save_figure

    rows = [lang for lang in langs if lang in result["matrix"]]
    grids = {kind: np.array([[np.nan if result[kind][a][e]["dlm_loss"] is None else result[kind][a][e]["dlm_loss"]
                              for e in langs] for a in rows]) for kind in ("matrix", "random")}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(3.0 + 1.3 * len(langs), 2.2 + 0.5 * max(1, len(rows))), squeeze=False,
                             layout="constrained")
    for ax, (kind, label) in zip(axes[0], (("matrix", f"its top-{k} specific features"),
                                           ("random", f"{k} rate-matched random features"))):
        image = ax.imshow(grids[kind], cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(rows)), rows)
        for label_ in ax.get_yticklabels():
            if kind == "matrix" and result["comparisons"].get(label_.get_text(), {}).get("causal"):
                label_.set_fontweight("bold")
        for i, a in enumerate(rows):
            for j, e in enumerate(langs):
                if np.isfinite(grids[kind][i, j]):
                    ax.text(j, i, f"{grids[kind][i, j]:.3f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(grids[kind][i, j]) > 0.6 * bound else "black")
                if a == e:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5))
        ax.set_xlabel("evaluated language")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("whose features are ablated")
    fig.colorbar(image, ax=list(axes[0]), label="Δ LM loss (nats/token)")
    fig.suptitle(f"{title + ', ' if title else ''}ablation at layer {layer} (bold: causal)", fontsize=10)
    saved = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return saved
