"""Post-hoc diagnostics of the finished comparison, asked by its review after the results were read (not part of the
design fixed in advance; the test split is not read again):

1. **Was the activation term active?** Every trained unit's per-step training history (checkpoints' `history`):
   on how many of its 100 steps the `act_align` hinge was above 0, and the target/English activation ratio it saw
   (`act_ratio`; at step 1 the adapter is still zero, so step 1's ratio is the base model's on that batch).
2. **Is the act_align - ce_kl difference the learning rate?** act_align was chosen at lr 5e-4, ce_kl and the placebo
   at 1e-3. Every arm's first seed was trained at both rates for the choice, so the adapters exist: this measures
   seed 0 of ce_kl, act_align and placebo at both rates, and the base model, on the **dev** split (99 sentences,
   48 tokens, as the run): retrieval@1 of the English translation at layers 3 and 17, and the spliced-in LM loss at
   layer 3 (the two outcomes where act_align differed from ce_kl on test). One seed: a diagnostic, not a result.

    python experiments/gemma3_270m_compare/posthoc.py [--run outputs/gemma3_270m_compare/compare/compare]
        [--cache $MLALIGN_CACHE or .cache] [--saes outputs/gemma3_270m_saes/saes/saes]

Writes results/posthoc.json beside this file (tables.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGETS, REFERENCE = ["hi", "ml"], "en"
LAYER, LAST = 3, 17
UNITS = [("ce_kl", "lr_0.0005"), ("ce_kl", "lr_0.001"), ("act_align", "lr_0.0005"), ("act_align", "lr_0.001"),
         ("placebo", "lr_0.0005"), ("placebo", "lr_0.001")]
MAX_LENGTH, BATCH = 48, 8


def histories(run: Path) -> dict:
    """{arm/setting/seed: hinge activity and act_ratio of its last checkpoint's per-step history}."""
    import torch

    out = {}
    for state in sorted(run.glob("units/*/lr_*/seed_*/checkpoints/step-*/training_state.pt")):
        unit = state.parents[2]
        key = "/".join(unit.relative_to(run / "units").parts)
        if key in out and out[key]["steps"] >= int(state.parent.name.split("-")[1]):
            continue
        history = torch.load(state, weights_only=False, map_location="cpu")["history"]
        ratios = sorted(float(row["act_ratio"]) for row in history)
        out[key] = {"steps": len(history),
                    "act_align_active_steps": sum(float(row.get("act_align", 0.0)) > 0 for row in history),
                    "sae_fidelity_active_steps": sum(float(row.get("sae_fidelity", 0.0)) > 0 for row in history),
                    "act_ratio_step1": float(history[0]["act_ratio"]), "act_ratio_median": ratios[len(ratios) // 2],
                    "act_ratio_min": ratios[0], "act_ratio_max": ratios[-1]}
    return out


def dev_measures(model, tokenizer, sae, texts: dict) -> dict:
    """retrieval@1 at LAYER and LAST per target, spliced-in minus clean loss at LAYER per language, on `texts`."""
    import numpy as np

    from mlalign.analysis.retrieval import retrieval_ranks, retrieval_scores
    from mlalign.analysis.spliced import clean_and_spliced_loss, token_batches
    from mlalign.compare.passes import pooled_residuals

    pooled = {lang: pooled_residuals(model, tokenizer, texts[lang], [LAYER, LAST], BATCH, MAX_LENGTH)
              for lang in texts}
    out = {}
    for lang in texts:
        clean, spliced = clean_and_spliced_loss(model, {LAYER: sae}, token_batches(tokenizer, texts[lang], BATCH,
                                                                                   MAX_LENGTH), [LAYER], device="cpu")
        row = {"spliced_dlm_loss": float(np.nanmean(spliced[LAYER] - clean))}
        if lang != REFERENCE:
            for layer in (LAYER, LAST):
                hits = retrieval_scores(retrieval_ranks(pooled[lang][layer], pooled[REFERENCE][layer]))["hit"]
                row[f"retrieval_at1_L{layer}"] = float(hits.mean())
        out[lang] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="outputs/gemma3_270m_compare/compare/compare")
    parser.add_argument("--cache", default=os.environ.get("MLALIGN_CACHE", ".cache"))
    parser.add_argument("--saes", default="outputs/gemma3_270m_saes/saes/saes")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from tqdm import tqdm

    from mlalign.data.corpus import load_flores
    from mlalign.saes.loading import load_sae_folder

    sys.path.insert(0, str(REPO / "experiments" / "gemma3_270m_saes"))
    from sweep import load_gemma3_270m  # the same offline model the run used

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run = Path(args.run)
    out = {"design": "post hoc, after the results were read; seed 0 only; dev split", "split": "dev",
           "max_length": MAX_LENGTH, "layer": LAYER, "last_layer": LAST, "histories": histories(run), "dev": {}}
    dev = load_flores([*TARGETS, REFERENCE], "dev")
    texts = {lang: list(dev[lang]) for lang in [*TARGETS, REFERENCE]}
    out["n_sentences"] = len(texts[REFERENCE])
    base, tokenizer = load_gemma3_270m(args.cache)
    sae = load_sae_folder(Path(args.saes) / f"layer_{LAYER}")
    with torch.no_grad():
        out["dev"]["base"] = dev_measures(base, tokenizer, sae, texts)
        for arm, setting in tqdm(UNITS, desc="post-hoc units"):
            model = PeftModel.from_pretrained(base, run / "units" / arm / setting / "seed_0" / "adapter").eval()
            out["dev"][f"{arm}/{setting}"] = dev_measures(model, tokenizer, sae, texts)
            base = model.unload()  # the base weights back, untouched (LoRA is not merged)
    (HERE / "results" / "posthoc.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["dev"], indent=1))


if __name__ == "__main__":
    main()
