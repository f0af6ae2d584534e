"""What a mean-activation gap is made of, feature by feature: how much of a language's activation comes from dense
features (firing on most tokens), how much mass moved between features (gross) against the net change the disparity
reports, and the disparity without the dense features.

All from the per-feature totals (`features.FeatureSums`) of the analysis pass, for `mean_act` (for a ReLU/JumpReLU
code l1 = d_sae x mean_act, so the same shares hold). Definitions: docs/method.md §8b.
"""

from __future__ import annotations

import numpy as np

DENSE_THRESHOLD = 0.5
"""Default `analysis.dense_threshold`: a feature firing on more than this share of the analysed tokens (all languages
pooled, per layer) is dense."""


def dense_features(feature_stats: dict, layer: int, threshold: float) -> np.ndarray:
    """[d_sae] bool: firing on more than `threshold` of the tokens of every analysed language pooled, at `layer`
    (one set per layer, the same for every language, so excluding it compares like with like)."""
    fired = sum(np.asarray(by_layer[layer].fire_count, dtype=np.float64) for by_layer in feature_stats.values())
    tokens = sum(float(by_layer[layer].n_tokens) for by_layer in feature_stats.values())
    return fired / tokens > threshold if tokens > 0 else np.zeros_like(fired, dtype=bool)


def _pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator > 0 else float("nan")


def decompose(feature_stats: dict, reference_lang: str, threshold: float = DENSE_THRESHOLD) -> dict:
    """{dense_threshold, n_dense[layer], dense_share[lang][layer], net_change_pct[lang][layer],
    gross_change_pct[lang][layer], disparity_pct_nondense[lang][layer]}.

    With mu_f = a feature's mean activation per token (every token counted) and D the dense features:
    dense_share = sum_{f in D} mu_f / sum_f mu_f (of the language's own mean_act);
    net_change_pct = 100 sum_f (mu_f - mu_f,ref) / sum_f mu_f,ref (= the token-aggregate disparity of mean_act);
    gross_change_pct = 100 sum_f |mu_f - mu_f,ref| / sum_f mu_f,ref: the mass that moved, whichever way, so
    gross >> |net| means the languages use different features more than they use them less;
    disparity_pct_nondense = the net change over the features not in D.
    """
    layers = sorted(next(iter(feature_stats.values())))
    dense = {layer: dense_features(feature_stats, layer, threshold) for layer in layers}
    out = {"dense_threshold": float(threshold), "n_dense": {layer: int(dense[layer].sum()) for layer in layers},
           "dense_share": {}, "net_change_pct": {}, "gross_change_pct": {}, "disparity_pct_nondense": {}}
    for lang, by_layer in feature_stats.items():
        for key in ("dense_share", "net_change_pct", "gross_change_pct", "disparity_pct_nondense"):
            out[key][lang] = {}
        for layer in layers:
            mu, ref = by_layer[layer].mean_act, feature_stats[reference_lang][layer].mean_act
            d = dense[layer]
            total = float(mu.sum())
            out["dense_share"][lang][layer] = float(mu[d].sum()) / total if total > 0 else float("nan")
            out["net_change_pct"][lang][layer] = _pct(float((mu - ref).sum()), float(ref.sum()))
            out["gross_change_pct"][lang][layer] = _pct(float(np.abs(mu - ref).sum()), float(ref.sum()))
            out["disparity_pct_nondense"][lang][layer] = _pct(float((mu[~d] - ref[~d]).sum()), float(ref[~d].sum()))
    return out
