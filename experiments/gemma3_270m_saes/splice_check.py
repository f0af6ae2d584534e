"""Is the large spliced-in loss of the real_small SAEs a bug, a few huge dimensions, or the SAEs? And how large is it
against doing nothing useful (the layer's residual replaced by its mean over the text: mean ablation)?

    python experiments/gemma3_270m_saes/splice_check.py [--cache DIR] [--saes DIR] [--layers 1,3,9,15]

For each layer, on the first 8 dev sentences of en, hi and ml: the largest difference between the reconstruction
the splice uses and `sae.decode(sae.encode(x))`; FVU with and without the five dimensions of largest mean |x|; the
clean, SAE-spliced and mean-spliced losses; and the loss recovered, (mean - SAE) / (mean - clean), the quantity
sae-lens's evals call CE loss recovered (with mean instead of zero ablation). Writes splice_check.json beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
LANGS = ["en", "hi", "ml"]


def mean_sae(mean):
    """A JumpReLU SAE that never fires and decodes to `mean`: splicing it in is mean ablation."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=int(mean.shape[0]), d_sae=1))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_enc.fill_(-1.0)
        sae.threshold.fill_(1.0)
        sae.b_dec.copy_(mean)
    return sae.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--saes", default="outputs/gemma3_270m_saes/saes/saes")
    parser.add_argument("--layers", default="1,3,9,15")
    parser.add_argument("--sentences", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    import torch
    from sae_lens import SAE

    from mlalign.analysis.spliced import clean_and_spliced_loss, reconstruct, token_batches
    from mlalign.data.corpus import load_flores
    from mlalign.tasks.train_saes import capture_language
    from sweep import load_gemma3_270m  # beside this file

    torch.set_num_threads(2)
    layers = [int(layer) for layer in args.layers.split(",")]
    model, tokenizer = load_gemma3_270m(args.cache)
    dev = load_flores(LANGS, "dev")
    texts = {lang: list(dev[lang])[: args.sentences] for lang in LANGS}
    saes = {layer: SAE.load_from_disk(Path(args.saes) / f"layer_{layer}").eval() for layer in layers}
    acts = {lang: capture_language(model, tokenizer, texts[lang], layers, 128, 8, progress=False) for lang in LANGS}
    out = {"langs": LANGS, "sentences": args.sentences, "layers": {}}
    for layer in layers:
        x = torch.cat([acts[lang][layer] for lang in LANGS])
        with torch.no_grad():
            decoded = saes[layer].decode(saes[layer].encode(x))
            spliced_in = reconstruct(saes[layer], x)
        mean = x.mean(0)
        variance = (x - mean).pow(2).sum(0)
        error = (x - decoded).pow(2).sum(0)
        top = torch.argsort(mean.abs(), descending=True)[:5]
        rest = torch.ones(len(mean), dtype=torch.bool)
        rest[top] = False
        row = {"max_abs_diff_splice_vs_decode": float((decoded - spliced_in).abs().max()),
               "fvu": float(error.sum() / variance.sum()),
               "fvu_without_top5_mean_dims": float(error[rest].sum() / variance[rest].sum()),
               "top5_mean_dims_variance_share": float(variance[top].sum() / variance.sum()),
               "per_lang": {}}
        for lang in LANGS:
            batches = token_batches(tokenizer, texts[lang], 8, 128)
            clean, with_sae = clean_and_spliced_loss(model, {layer: saes[layer]}, batches, [layer], device="cpu")
            _, with_mean = clean_and_spliced_loss(model, {layer: mean_sae(mean)}, batches, [layer], device="cpu")
            c, s, m = float(np.nanmean(clean)), float(np.nanmean(with_sae[layer])), float(np.nanmean(with_mean[layer]))
            row["per_lang"][lang] = {"clean": c, "sae": s, "mean_ablation": m,
                                     "loss_recovered": (m - s) / (m - c) if m != c else float("nan")}
        out["layers"][str(layer)] = row
        print(layer, json.dumps(row), flush=True)
    (HERE / "splice_check.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
