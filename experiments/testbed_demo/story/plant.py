"""Planted gap prototype: pretrain with lam * mean(||h_l||^2/d) over the tokens of hi/mr/ml sentences, every layer."""
import sys, math, tempfile, dataclasses
import numpy as np, torch
from tqdm import tqdm
from mlalign.testbed.spec import TestbedSpec
from mlalign.testbed import lm
from mlalign.testbed.lm import build_tokenizer, new_model, encode, _lm_labels, final_loss_per_lang
from mlalign.testbed.saes import collect_residuals, train_layer_sae, capture_tokens
from mlalign.data.corpus import load_flores, flores_langs

torch.set_num_threads(1)
lam = float(sys.argv[1]); target = float(sys.argv[2]); steps = 300
weak = {"hi", "mr", "ml"}
spec = dataclasses.replace(TestbedSpec(), pretrain_steps=steps)
bundled = flores_langs()
train = load_flores(bundled, "train", normalize=None)
rng = np.random.default_rng(0); torch.manual_seed(0)
tok = build_tokenizer(spec, [s for lang in bundled for s in train[lang]])
model = new_model(spec)
acts = []
hooks = [layer.register_forward_hook(lambda m, i, o: acts.append(o[0] if isinstance(o, tuple) else o)) for layer in model.model.layers]
optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
warmup = max(1, spec.pretrain_steps // 10)
lr_factor = lambda step: (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.pretrain_steps - warmup)))
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
langs = list(spec.lang_mix); w = np.array([spec.lang_mix[l] for l in langs])
model.train()
for step in range(spec.pretrain_steps):
    picks = rng.choice(len(langs), size=spec.batch_size, p=w / w.sum())
    picked = [langs[i] for i in picks]
    sents = [train[l][rng.integers(len(train[l]))] for l in picked]
    batch = encode(tok, sents, spec)
    acts.clear()
    loss = model(**batch, labels=_lm_labels(batch)).loss
    is_weak = torch.tensor([l in weak for l in picked])
    mask = batch["attention_mask"].bool() & is_weak[:, None]
    mask[:, 0] = False
    pen = torch.zeros(())
    en = batch["attention_mask"].bool() & torch.tensor([l == "en" for l in picked])[:, None]
    en[:, 0] = False
    if mask.any() and en.any():
        ratios = torch.stack([h[mask].norm(dim=-1).mean() / h[en].norm(dim=-1).mean().detach() for h in acts])
        pen = ((ratios - target) ** 2).sum()
    total = loss + lam * pen
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)
    if step % 50 == 0:
        print(step, round(loss.item(), 3), round(pen.item(), 3), flush=True)
for h in hooks: h.remove()
model.eval()
print("pretrain loss", {k: round(v, 2) for k, v in final_loss_per_lang(model, tok, spec, train, 16).items()})
ev = ["en", "es", "zh", "ru", "hi", "mr", "ml"]
dev = load_flores(ev, "dev", max_sentences=32, normalize=None)
dev_acts = {l: capture_tokens(model, tok, spec, dev[l]) for l in ev}
res = collect_residuals(model, tok, spec, train, rng)
table = {l: [] for l in ev}; fvu = {l: [] for l in ev}; norm = {l: [] for l in ev}
with tempfile.TemporaryDirectory() as ck:
    for layer in range(spec.num_layers):
        sae = train_layer_sae(res[layer], layer, spec, ck)
        with torch.no_grad():
            for l in ev:
                x = dev_acts[l][layer]; f = sae.encode(x)
                table[l].append(float(f.sum(-1).mean())); norm[l].append(float(x.norm(dim=-1).mean()))
                xh = sae.decode(f); fvu[l].append(float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()))
print(f"== lam {lam} target {target}")
for l in ev[1:]:
    d = [100 * (a / e - 1) for a, e in zip(table[l], table["en"])]
    n = [100 * (a / e - 1) for a, e in zip(norm[l], norm["en"])]
    print(f"{l:3s} below-en {sum(v < 0 for v in d):2d}/26 median {np.median(d):+5.0f} | " + " ".join(f"{v:+.0f}" for v in d) + f" | norm median {np.median(n):+.0f}")
print("fvu max per lang", {l: round(max(fvu[l]), 2) for l in ev})
