"""Figures from `analysis/summary.json`: a language x layer heatmap of disparity_pct and per-language layer curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mlalign.analysis.registry import get_metric  # noqa: E402
from mlalign.analysis.summary import order_by_tier, tier_of  # noqa: E402
from mlalign.languages import LANGUAGES  # noqa: E402
from mlalign.io import save_figure  # noqa: E402

TIER_COLORS = {"reference": "black", "high": "tab:blue", "medium_low": "tab:orange", "unknown": "tab:gray"}
TIER_LABELS = {"reference": "reference", "high": "high-resource", "medium_low": "medium-to-low resource"}


TIER_COLORMAPS = {"high": "Blues", "medium_low": "Oranges", "unknown": "Greys"}


def _shade(tier: str, k: int, n: int):
    """The k-th of n distinguishable shades of the tier's colour (reference: black)."""
    if tier not in TIER_COLORMAPS:
        return TIER_COLORS["reference"]
    return plt.get_cmap(TIER_COLORMAPS[tier])(0.45 + 0.5 * (k / max(n - 1, 1)))


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def _title(summary: dict, what: str) -> str:
    model = summary.get("model") or "model"
    sae = summary.get("sae") or "SAE"
    return f"{what} — {model}, {sae} ({summary['aggregate']} mean)"


def plot_disparity_heatmap(summary: dict, path: str | Path, marked: dict[str, set[int]] | None = None,
                           what: str | None = None) -> Path:
    """Languages (rows, by tier) x layers (columns) of disparity_pct, diverging colours centred at 0, band edges marked.
    marked: {lang: layers} whose cells are hatched (the SAE seeds' sign-unstable cells); what: added to the title."""
    path = Path(path)
    marked = marked or {}
    langs = [lang for lang in order_by_tier(summary["langs"]) if lang != summary["reference_lang"]]
    layers = summary["layers"]
    grid = np.array([[_nan(summary["disparity_pct"][lang][str(layer)]) for layer in layers] for lang in langs])
    finite = grid[np.isfinite(grid)]
    span = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-6)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(layers) + 2.5), 0.45 * len(langs) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span))
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(langs)), [f"{lang} ({LANGUAGES[lang].name})" if lang in LANGUAGES else lang for lang in langs])
    for tick, lang in zip(ax.get_yticklabels(), langs):
        tick.set_color(TIER_COLORS[tier_of(lang)])
    # Tier boundaries and band boundaries as thin lines so the early/middle/deep split is readable.
    tiers = [tier_of(lang) for lang in langs]
    for row in range(1, len(langs)):
        if tiers[row] != tiers[row - 1]:
            ax.axhline(row - 0.5, color="black", linewidth=1.0)
    for band_layers in list(summary["bands"].values())[1:]:
        if band_layers[0] in layers:
            ax.axvline(layers.index(band_layers[0]) - 0.5, color="black", linewidth=0.8, linestyle="--")
    if len(langs) * len(layers) <= 200:
        for r in range(len(langs)):
            for c in range(len(layers)):
                if np.isfinite(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(grid[r, c]) > 0.6 * span else "black")
    for r, lang in enumerate(langs):
        for layer in marked.get(lang, ()):
            if layer in layers:
                ax.add_patch(Rectangle((layers.index(layer) - 0.5, r - 0.5), 1, 1, fill=False, hatch="///",
                                       edgecolor="black", linewidth=0.0))
    ax.set_xlabel("layer")
    ref = summary["reference_lang"]
    fig.colorbar(image, ax=ax, label=f"disparity vs {ref} (%)")
    ax.set_title(_title(summary, f"{get_metric(summary['metric']).words}: % difference from {ref}")
                 + (f"\n{what}" if what else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=150)
    plt.close(fig)
    return path


def plot_layer_curves(summary: dict, path: str | Path) -> Path:
    """One line per language (reference included) of the primary metric across layers, with its bootstrap CI band."""
    path = Path(path)
    metric, layers = summary["metric"], summary["layers"]
    values_ci = summary.get("values_ci") or {}
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    styles = ["-", "--", ":", "-."]
    langs = order_by_tier(summary["langs"])
    seen: dict[str, int] = {}
    for lang in langs:
        tier = tier_of(lang)
        k = seen[tier] = seen.get(tier, -1) + 1
        y = np.array([_nan(summary["values"][lang][str(layer)][metric]) for layer in layers])
        color = _shade(tier, k, sum(tier_of(other) == tier for other in langs))
        label = f"{lang} ({TIER_LABELS.get(tier, tier)})"
        line_width = 2.2 if tier == "reference" else 1.3
        ax.plot(layers, y, styles[k % len(styles)], color=color, linewidth=line_width, marker="o", markersize=2.5,
                label=label, alpha=1.0 if tier == "reference" else 0.85)
        cis = [((values_ci.get(lang) or {}).get(str(layer)) or {}).get(metric) for layer in layers]
        if any(ci is not None for ci in cis):
            low = np.array([_nan(ci[0]) if ci else np.nan for ci in cis])
            high = np.array([_nan(ci[1]) if ci else np.nan for ci in cis])
            ax.fill_between(layers, low, high, color=color, alpha=0.12, linewidth=0)
    for band_layers in list(summary["bands"].values())[1:]:
        ax.axvline(band_layers[0] - 0.5, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.set_title(_title(summary, f"{get_metric(metric).words} per layer (shaded: {int(100 * summary['ci'])}% CI)"), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=150)
    plt.close(fig)
    return path


def make_plots(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write disparity_heatmap.png (when a language besides the reference was analysed) and layer_curves.png into
    `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if any(lang != summary["reference_lang"] for lang in summary["langs"]):
        paths.append(plot_disparity_heatmap(summary, out_dir / "disparity_heatmap.png"))
    paths.append(plot_layer_curves(summary, out_dir / "layer_curves.png"))
    return paths
