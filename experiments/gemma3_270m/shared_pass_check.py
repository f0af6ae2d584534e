"""Real-model check of task=pipeline's shared passes (mlalign/training/shared_pass.py, docs/training.md#what-is-measured-where):
on Gemma-3-270M with the SAEs of step (a) and the tuned adapter of step (c_tuned), the analysis engine's recorders give
the paired outcome pass's numbers of measure_base / measure_adapted (other batches, the stacked SAE step).

Needs outputs/gemma3_270m from run.sh (a) and (c_tuned). Run from the repository root:
    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python experiments/gemma3_270m/shared_pass_check.py
"""
import time
from dataclasses import asdict

import numpy as np
from peft import PeftModel

from mlalign.analysis.engine import EngineSettings, collect_stats
from mlalign.data.corpus import load_flores
from mlalign.training.outcomes import AdaptedSideRecorder, BaseSideRecorder, measure_adapted, measure_base
from real_model import ADAPTER, load_real_model

layers = [3, 9]
tok, base_model, saes = load_real_model(layers)
model = PeftModel.from_pretrained(base_model, str(ADAPTER))
model.eval()
corpus = load_flores(["en", "hi"], "test", max_sentences=16)
texts = {lang: corpus.sentences[lang] for lang in ("hi", "en")}
t = time.time()
with model.disable_adapter():
    base = measure_base(model, tok, saes, texts, batch_size=8, max_length=64, progress=False)
    recs = {lang: BaseSideRecorder(len(texts[lang]), layers, "cpu") for lang in texts}
    collect_stats(model, tok, saes, texts, EngineSettings(batch_size=5, max_length=64, progress=False),
                  token_recorders=recs)
    recorded = {lang: r.finalize(model.config.hidden_size) for lang, r in recs.items()}
worst = 0.0
for lang in texts:
    for name in ("n_tokens", "ce", "ce_tokens"):
        a, b = getattr(base[lang], name), getattr(recorded[lang], name)
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-9))))
    for layer in layers:
        for name, value in asdict(base[lang].layers[layer]).items():
            other = getattr(recorded[lang].layers[layer], name)
            if value.shape != other.shape:
                print("SHAPE", lang, layer, name, value.shape, other.shape); continue
            rel = np.max(np.abs(value.astype(float) - other.astype(float)) / np.maximum(np.abs(value.astype(float)), 1e-6)) if value.size else 0.0
            worst = max(worst, float(rel))
            if rel > 1e-4:
                print("base side", lang, layer, name, "max rel diff", rel)
print(f"base side: worst relative difference {worst:.2e}")
expected = measure_adapted(model, base, tok, saes, texts, "mean_act", batch_size=8, max_length=64, progress=False)
arecs = {lang: AdaptedSideRecorder(base[lang], saes, "mean_act", "cpu") for lang in texts}
collect_stats(model, tok, saes, texts, EngineSettings(batch_size=5, max_length=64, progress=False),
              token_recorders=arecs)
got = {lang: r.finalize() for lang, r in arecs.items()}
worst = 0.0
for lang in texts:
    for name, value in asdict(expected[lang]).items():
        value, other = np.asarray(value, dtype=float), np.asarray(asdict(got[lang])[name], dtype=float)
        rel = np.max(np.abs(value - other) / np.maximum(np.abs(value), 1e-6)) if value.size else 0.0
        worst = max(worst, float(rel))
        if rel > 1e-4:
            print("paired", lang, name, "max rel diff", rel)
print(f"paired sums: worst relative difference {worst:.2e}")
gain = {lang: float(got[lang].metric_after.sum() / got[lang].metric_before.sum() - 1) for lang in texts}
print("sanity: token-summed mean_act change after/before", gain, f"({time.time() - t:.0f} s)")
