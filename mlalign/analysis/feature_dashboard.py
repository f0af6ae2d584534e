"""Feature dashboards, offline: one self-contained HTML page of each language's top specific features at one layer
(top-activating contexts from every language's held-out text, activation histograms, logit effects), and the
Neuronpedia quick lists of every analysed layer's specific features where Neuronpedia hosts the SAE.

Why not sae-dashboard (PyPI): every release needs transformer-lens 2, transformers 4, numpy 1.26 and another torch than
the pinned stack (sae-lens 6, transformer-lens 3, transformers 5, numpy 2), so it cannot be installed beside mlalign;
this page renders the essentials of its feature view from the same numbers. Logit effects are SAEDashboard's: the
decoder row through the unembedding, W_dec[f] @ W_U, without the final norm. docs/method.md §8c.
"""

from __future__ import annotations

import html
import json
import urllib.parse

import numpy as np
import torch
from torch import nn

from mlalign.analysis.capture import ResidualCapture
from mlalign.analysis.spliced import TokenBatch, sae_device

NEURONPEDIA_DOMAIN = "https://neuronpedia.org"
NOT_HOSTED = ("Neuronpedia does not host this SAE (a local, testbed or task=train_saes SAE, or a release without a "
              "Neuronpedia id in sae-lens's registry): no quick list; the features are in analysis/features.csv and "
              "feature_dashboard.html")


def neuronpedia_quick_list_url(np_id: str, model_id: str, features: list[int], name: str) -> str:
    """The quick-list URL sae-lens's `get_neuronpedia_quick_list` builds (without opening a browser): np_id is the
    SAE's Neuronpedia id (`gemma-2-2b/3-gemmascope-res-16k`), model_id the Neuronpedia model (`gemma-2-2b`)."""
    listed = [{"modelId": model_id, "layer": np_id.split("/")[1], "index": str(int(f))} for f in features]
    return (f"{NEURONPEDIA_DOMAIN}/quick-list/?name={urllib.parse.quote(name)}"
            f"&features={urllib.parse.quote(json.dumps(listed))}")


def neuronpedia_export(lists: dict[str, dict[int, list[int]]], neuronpedia: dict[int, str | None], title: str) -> dict:
    """analysis/features_neuronpedia.json: per language and layer its specific features and, where Neuronpedia hosts
    that layer's SAE, the quick-list URL; elsewhere `quick_list_url` is null and `note` says why."""
    out: dict = {"hosted": {str(layer): np_id is not None for layer, np_id in neuronpedia.items()}, "lists": {}}
    if not any(neuronpedia.values()):
        out["note"] = NOT_HOSTED
    for lang, by_layer in lists.items():
        out["lists"][lang] = {}
        for layer, features in by_layer.items():
            np_id = neuronpedia.get(layer)
            url = (neuronpedia_quick_list_url(np_id, np_id.split("/")[0], features,
                                              f"{title}: {lang} specific features, layer {layer}")
                   if np_id and features else None)
            out["lists"][lang][str(layer)] = {"features": [int(f) for f in features], "neuronpedia_id": np_id,
                                              "quick_list_url": url}
    return out


@torch.no_grad()
def feature_activations(model: nn.Module, sae, layer: int, batches: list[TokenBatch], features: list[int], *, device
                        ) -> list[tuple[list[int], np.ndarray]]:
    """Per sentence (in `rows` order): its token ids and [tokens, k] activations of `features` (0 where not analysed:
    BOS, padding)."""
    out: dict[int, tuple[list[int], np.ndarray]] = {}
    index = torch.tensor(features, dtype=torch.long, device=sae_device(sae))
    with ResidualCapture(model, [layer], stop_after_last=True) as capture:
        for batch in batches:
            hidden = capture.forward(**batch.inputs(device), use_cache=False)[layer]
            acts = sae.encode(hidden.flatten(0, 1).to(sae_device(sae)).float()).index_select(1, index)
            acts = acts.view(*hidden.shape[:2], -1).cpu() * batch.keep.unsqueeze(-1)
            for b, row in enumerate(batch.rows.tolist()):
                n = int(batch.attention_mask[b].sum())
                out[row] = (batch.input_ids[b, :n].tolist(), acts[b, :n].numpy())
    return [out[i] for i in range(len(out))]


@torch.no_grad()
def logit_effects(model: nn.Module, sae, features: list[int], n: int) -> list[dict]:
    """Per feature: the `n` token ids its decoder row raises most and lowers most through the unembedding
    (W_dec[f] @ W_U), with the effect."""
    unembed = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    rows = sae.W_dec.detach().float().cpu()[torch.tensor(features, dtype=torch.long)]
    effects = rows @ unembed.T
    out = []
    for row in effects:
        top, bottom = torch.topk(row, n), torch.topk(-row, n)
        out.append({"up": list(zip(top.indices.tolist(), top.values.tolist())),
                    "down": list(zip(bottom.indices.tolist(), (-bottom.values).tolist()))})
    return out


def _svg_histogram(values_by_group: dict[str, np.ndarray], colors: dict[str, str], bins: int = 20) -> str:
    """A small inline SVG histogram of the non-zero activations of each group (bars side by side per bin)."""
    finite = [v for v in values_by_group.values() if v.size]
    if not finite:
        return "<em>never fires on these sentences</em>"
    top = float(max(v.max() for v in finite)) or 1.0
    edges = np.linspace(0.0, top, bins + 1)
    counts = {g: np.histogram(v, bins=edges)[0] for g, v in values_by_group.items()}
    tallest = max(1, max(int(c.max()) for c in counts.values()))
    width, height, groups = 300, 70, list(values_by_group)
    bar = width / bins / max(1, len(groups))
    parts = [f'<svg width="{width}" height="{height + 14}" role="img">']
    for i in range(bins):
        for j, group in enumerate(groups):
            h = height * counts[group][i] / tallest
            parts.append(f'<rect x="{i * width / bins + j * bar:.1f}" y="{height - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{colors[group]}"><title>{html.escape(group)}: '
                         f'{counts[group][i]} tokens in [{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>')
    parts.append(f'<text x="0" y="{height + 12}" font-size="10">0</text>'
                 f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">{top:.3g}</text></svg>')
    return "".join(parts)


def _context_html(tokenizer, ids: list[int], acts: np.ndarray, at: int, peak: float, before: int = 10,
                  after: int = 4) -> str:
    spans = []
    for t in range(max(0, at - before), min(len(ids), at + after + 1)):
        shade = 0.0 if peak <= 0 else min(1.0, float(acts[t]) / peak)
        text = html.escape(tokenizer.decode([ids[t]])).replace(" ", "&nbsp;") or "&#9251;"
        style = f"background: rgba(255, 120, 0, {shade:.2f});" + ("border-bottom: 2px solid #000;" if t == at else "")
        spans.append(f'<span style="{style}" title="{float(acts[t]):.4g}">{text}</span>')
    return "".join(spans)


def dashboard_html(tokenizer, layer: int, title: str, lang_features: dict[str, list[int]],
                   activations: dict[str, list[tuple[list[int], np.ndarray]]], feature_index: dict[int, int],
                   effects: dict[int, dict], stats: dict[str, dict[int, dict]], contexts: int) -> str:
    """The page. lang_features: each language's shown features; activations[lang]: `feature_activations` over the
    union of shown features (column feature_index[f]); effects[f]: `logit_effects`; stats[lang][f]: the analysis's
    per-feature numbers of the language whose feature it is (selectivity, specificity, mean_act, firing_rate)."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    langs = list(activations)
    colors = {lang: palette[i % len(palette)] for i, lang in enumerate(langs)}
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: features, layer {layer}"
            "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto} .f{border:1px solid #ccc;"
            "padding:8px;margin:8px 0} .ctx{font-family:monospace;font-size:12px;white-space:nowrap;overflow:hidden}"
            " td,th{padding:2px 6px;font-size:12px}</style></head><body>"
            f"<h1>{html.escape(title)}: language-specific SAE features at layer {layer}</h1>"
            "<p>Per language its top specific features (analysis/features_top.md). Contexts: the highest activations "
            "over every language's held-out sentences (the token underlined, shading = activation / the feature's "
            "peak). Histogram: non-zero activations per language. Logit effects: the decoder row through the "
            "unembedding (W_dec[f] @ W_U, no final norm).</p>")
    body = []
    for lang, features in lang_features.items():
        body.append(f"<h2 id='{html.escape(lang)}'>{html.escape(lang)}</h2>")
        if not features:
            body.append("<p>No feature is specific to this language at this layer.</p>")
        for f in features:
            col = feature_index[f]
            hits = [(float(acts[t, col]), lang_, s, t) for lang_, sentences in activations.items()
                    for s, (ids, acts) in enumerate(sentences) for t in range(len(ids)) if acts[t, col] > 0]
            hits.sort(key=lambda h: -h[0])
            peak = hits[0][0] if hits else 0.0
            s = stats[lang][f]
            rows = "".join(
                f"<tr><td>{html.escape(h[1])}</td><td>{h[0]:.4g}</td><td class='ctx'>"
                f"{_context_html(tokenizer, activations[h[1]][h[2]][0], activations[h[1]][h[2]][1][:, col], h[3], peak)}"
                "</td></tr>" for h in hits[:contexts])
            values = {lang_: np.array([a for _, acts in sentences for a in acts[:, col] if a > 0])
                      for lang_, sentences in activations.items()}
            fires = " ".join(f"<span style='color:{colors[l_]}'>{html.escape(l_)}: {v.size}</span>"
                             for l_, v in values.items())

            def tokens(pairs):
                return ", ".join(f"{html.escape(repr(tokenizer.decode([t])))} ({v:+.3g})" for t, v in pairs)

            body.append(
                f"<div class='f'><h3>feature {f}</h3><p>selectivity {s['selectivity']:.3f}, specificity "
                f"{s['specificity']:.3f}, mean activation {s['mean_act']:.4g}, firing rate {s['firing_rate']:.4g} "
                f"(analysis split)</p><p>tokens where it fires (held-out): {fires}</p>"
                f"{_svg_histogram(values, colors)}<p><b>raises</b>: {tokens(effects[f]['up'])}<br><b>lowers</b>: "
                f"{tokens(effects[f]['down'])}</p><table><tr><th>lang</th><th>act</th><th>context</th></tr>{rows}"
                "</table></div>")
    return head + "".join(body) + "</body></html>"
