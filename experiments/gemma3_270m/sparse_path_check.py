"""Real-model check of the analysis engine's CPU sparse path (mlalign/saes/encode.py: the layer-by-layer sparse
code, the shared per-column counts, L1 from the plain sum; stats.py, features.py): on Gemma-3-270M with the SAEs of
step (a) (18 layers, 1024-wide JumpReLU), `collect_stats` with `decode=sparse` (SparseCode everywhere) against
`decode=dense` (dense code, dense decode, the accumulators' dense branches, no SparseCode): every per-sentence sum and
per-feature total must agree to float rounding.

Needs outputs/gemma3_270m from run.sh (a). Run from the repository root:
    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python experiments/gemma3_270m/sparse_path_check.py
"""
import time
from dataclasses import fields

import numpy as np

from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.data.corpus import load_flores
from real_model import load_real_model

tok, model, saes = load_real_model()
layers = sorted(saes)
corpus = load_flores(["en", "hi", "ml"], "test", max_sentences=24)
texts = {lang: corpus.sentences[lang] for lang in ("en", "hi", "ml")}
out = {}
for decode in ("sparse", "dense"):
    start, features = time.time(), {}
    stats = collect_stats(model, tok, saes, texts, EngineSettings(batch_size=8, max_length=128, progress=False,
                                                                  decode=decode), feature_stats=features)
    out[decode] = (stats, features)
    print(f"decode={decode}: {time.time() - start:.1f} s")
worst, where, active = 0.0, "", 0
for lang in texts:
    for layer in layers:
        pairs = [(f.name, getattr(out["sparse"][0][lang][layer], f.name), getattr(out["dense"][0][lang][layer], f.name))
                 for f in fields(out["sparse"][0][lang][layer])]
        pairs += [(f"features.{f.name}", getattr(out["sparse"][1][lang][layer], f.name),
                   getattr(out["dense"][1][lang][layer], f.name)) for f in fields(out["sparse"][1][lang][layer])]
        for name, a, b in pairs:
            a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
            if a.size == 0:
                continue
            rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
            if rel > worst:
                worst, where = rel, f"{lang} layer {layer} {name}"
        active += int(out["sparse"][0][lang][layer].l0.sum())
print(f"{len(texts)} languages x {len(layers)} layers, {active:,} active (token, feature) entries: worst relative "
      f"difference sparse vs dense {worst:.2e} ({where})")
assert worst < 1e-4, worst
