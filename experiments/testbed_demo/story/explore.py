"""Which testbed recipe makes low-resource languages' mean_act fall below English's (the study's story)?"""
import sys, json, tempfile, dataclasses
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from mlalign.testbed.spec import TestbedSpec
from mlalign.testbed.saes import collect_residuals, train_layer_sae, capture_tokens
from mlalign.data.corpus import load_flores

torch.set_num_threads(1)
tb = "/tmp/demo_cache_base/testbed/5120dae5e78f"
model = AutoModelForCausalLM.from_pretrained(tb + "/model", attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(tb + "/model")
base = TestbedSpec()
train = load_flores(list(base.lang_mix), "train", normalize=None)
langs = ["en", "es", "zh", "ru", "hi", "mr", "ml"]
dev = load_flores(langs, "dev", max_sentences=32, normalize=None)
dev_acts = {lang: capture_tokens(model, tok, base, dev[lang]) for lang in langs}

variants = {
    "pretrain_mix": dict(base.lang_mix),
    "en_only": {"en": 1.0},
    "en90": {"en": 0.9, "zh": 0.02, "ru": 0.02, "es": 0.02, "it": 0.02, "id": 0.01, "ca": 0.01},
    "en70_lowres1": {"en": 0.7, "zh": 0.05, "ru": 0.05, "es": 0.05, "it": 0.05, "id": 0.03, "ca": 0.03, "mr": 0.01, "ml": 0.01, "hi": 0.01},
}
which = sys.argv[1:] or list(variants)
out = {}
for name in which:
    spec = dataclasses.replace(base, lang_mix=variants[name])
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    res = collect_residuals(model, tok, spec, train, rng)
    table = {lang: [] for lang in langs}
    fvu = {lang: [] for lang in langs}
    with tempfile.TemporaryDirectory() as ck:
        for layer in range(base.num_layers):
            sae = train_layer_sae(res[layer], layer, spec, ck)
            with torch.no_grad():
                for lang in langs:
                    x = dev_acts[lang][layer]
                    f = sae.encode(x)
                    table[lang].append(float(f.sum(-1).mean()))
                    xh = sae.decode(f)
                    fvu[lang].append(float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()))
    disp = {lang: [100 * (a / e - 1) for a, e in zip(table[lang], table["en"])] for lang in langs}
    out[name] = {"mean_act": table, "disparity": disp, "fvu": fvu}
    print(f"== {name}")
    for lang in langs[1:]:
        d = disp[lang]
        print(f"{lang:3s} below-en layers {sum(v < 0 for v in d):2d}/26  median {np.median(d):+5.0f}  " + " ".join(f"{v:+.0f}" for v in d))
    print("fvu max per lang", {lang: round(max(fvu[lang]), 2) for lang in langs})
    sys.stdout.flush()
json.dump(out, open(f"/tmp/story/out_{'_'.join(which)}.json", "w"))
