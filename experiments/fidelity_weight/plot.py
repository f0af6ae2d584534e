"""Gain vs SAE fidelity vs English retention over the fidelity-weight sweep, on the dev split: table and plot.

The test split is not shown: the default is chosen on dev, and its test numbers are reported once (make demo).

Usage: python experiments/fidelity_weight/plot.py OUT.png RUN_DIR [RUN_DIR ...]   (each a task=train run directory)
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def load(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    return {"act_align": cfg.loss.act_align, "sae_fidelity": cfg.loss.sae_fidelity, **metrics}


def main(out: str, *run_dirs: str) -> None:
    runs = sorted((load(Path(d)) for d in run_dirs), key=lambda r: (r["act_align"], r["sae_fidelity"]))
    print("| act_align | sae_fidelity | split | hi gain (%) | hi norm-matched (%) | ml gain (%) | ml norm-matched (%) "
          "| FVU ratio hi / ml / en | English retention (%) | valid | alignment_score (dev) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        for split, block in (("dev", r["dev"]),):
            p = block["per_lang"]
            fvu = " / ".join(f"{p[lang]['fvu_ratio']:.2f}" for lang in ("hi", "ml", "en"))
            score = f"{r['alignment_score']:.1f}" if split == "dev" else ""
            print(f"| {r['act_align']:g} | {r['sae_fidelity']:g} | {split} | {p['hi']['gain_pct']:+.1f} | "
                  f"{p['hi']['norm_matched_gain_pct']:+.1f} | {p['ml']['gain_pct']:+.1f} | "
                  f"{p['ml']['norm_matched_gain_pct']:+.1f} | {fvu} | {block['english_retention_pct']:.1f} | "
                  f"{'yes' if block['all_valid'] else 'no'} | {score} |")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"a{r['act_align']:g}/f{r['sae_fidelity']:g}" for r in runs]
    xs = range(len(runs))
    for lang, colour in (("hi", "C0"), ("ml", "C1")):
        axes[0].plot(xs, [r["dev"]["per_lang"][lang]["gain_pct"] for r in runs], "-o", color=colour, label=f"{lang} raw")
        axes[0].plot(xs, [r["dev"]["per_lang"][lang]["norm_matched_gain_pct"] for r in runs], ":s", color=colour,
                     label=f"{lang} norm-matched")
    for lang, colour in (("hi", "C0"), ("ml", "C1"), ("en", "C2")):
        axes[1].plot(xs, [r["dev"]["per_lang"][lang]["fvu_ratio"] for r in runs], "-o", color=colour, label=lang)
    axes[1].axhline(runs[0]["fidelity_tolerance"], color="red", lw=0.8, ls="--", label="tolerance")
    axes[1].set_yscale("log")
    axes[2].plot(xs, [r["dev"]["english_retention_pct"] for r in runs], "-o", color="C2")
    for ax, title in zip(axes, ("dev gain (%)", "dev FVU after / before (log)", "dev English retention (%)")):
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("loss.act_align / loss.sae_fidelity")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
