"""Pretraining-mix variants: does under-training the low-resource languages make their mean_act fall below English's?"""
import sys, json, tempfile, dataclasses
import numpy as np, torch
from mlalign.testbed.spec import TestbedSpec
from mlalign.testbed.lm import build_tokenizer, new_model, pretrain, final_loss_per_lang
from mlalign.testbed.saes import collect_residuals, train_layer_sae, capture_tokens
from mlalign.data.corpus import load_flores, flores_langs

torch.set_num_threads(1)
variants = {
    "low1": {"en": 0.50, "zh": 0.09, "ru": 0.09, "es": 0.09, "it": 0.09, "id": 0.05, "ca": 0.05, "mr": 0.01, "ml": 0.01, "hi": 0.01},
    "default": dict(TestbedSpec().lang_mix),
    "low05": {"en": 0.55, "zh": 0.09, "ru": 0.09, "es": 0.09, "it": 0.09, "id": 0.04, "ca": 0.04, "mr": 0.003, "ml": 0.003, "hi": 0.003},
}
name = sys.argv[1]
base = TestbedSpec()
steps = int(name.split("steps")[1]) if "steps" in name else 300
spec = dataclasses.replace(base, lang_mix=variants[name.split("_steps")[0]], pretrain_steps=steps)
bundled = flores_langs()
train = load_flores(bundled, "train", normalize=None)
rng = np.random.default_rng(0); torch.manual_seed(0)
tok = build_tokenizer(spec, [s for lang in bundled for s in train[lang]])
model = new_model(spec)
pretrain(model, tok, spec, train, rng, False)
model.eval()
print("pretrain loss", {k: round(v, 2) for k, v in final_loss_per_lang(model, tok, spec, train, 16).items()})
langs = ["en", "es", "zh", "ru", "hi", "mr", "ml"]
dev = load_flores(langs, "dev", max_sentences=32, normalize=None)
dev_acts = {lang: capture_tokens(model, tok, spec, dev[lang]) for lang in langs}
res = collect_residuals(model, tok, spec, train, rng)
table = {lang: [] for lang in langs}; fvu = {lang: [] for lang in langs}; norm = {lang: [] for lang in langs}
with tempfile.TemporaryDirectory() as ck:
    for layer in range(spec.num_layers):
        sae = train_layer_sae(res[layer], layer, spec, ck)
        with torch.no_grad():
            for lang in langs:
                x = dev_acts[lang][layer]; f = sae.encode(x)
                table[lang].append(float(f.sum(-1).mean())); norm[lang].append(float(x.norm(dim=-1).mean()))
                xh = sae.decode(f)
                fvu[lang].append(float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()))
print(f"== {name}")
for lang in langs[1:]:
    d = [100 * (a / e - 1) for a, e in zip(table[lang], table["en"])]
    n = [100 * (a / e - 1) for a, e in zip(norm[lang], norm["en"])]
    print(f"{lang:3s} below-en {sum(v < 0 for v in d):2d}/26 median {np.median(d):+5.0f} | " + " ".join(f"{v:+.0f}" for v in d) + f" | norm median {np.median(n):+.0f}")
print("fvu max per lang", {lang: round(max(fvu[lang]), 2) for lang in langs})
