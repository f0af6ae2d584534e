"""Markdown tables of the gemma3_270m experiment from its run directories (what README.md quotes), and copies of the
plots into this folder: `python experiments/gemma3_270m/tables.py outputs/gemma3_270m > results.md`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LANGS = ["zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def f(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)


def ci(pair, spec=".1f"):
    return "n/a" if not pair else f"[{format(pair[0], spec)}, {format(pair[1], spec)}]"


def times(out: Path) -> dict[str, str]:
    rows = {}
    if (out / "times.txt").exists():
        for line in (out / "times.txt").read_text().splitlines():
            name, _, seconds = line.removeprefix("== ").partition(": ")
            rows[name] = seconds
    return rows


def fidelity_table(saes: Path, title: str) -> list[str]:
    fid, data = load(saes / "fidelity.json"), load(saes / "train_data.json")
    if fid is None:
        return []
    langs = data["langs"]
    lines = [f"### {title}", "", f"{data['width']} features, {sum(data['tokens_per_lang'].values())} activation tokens "
             f"per layer ({data['lang_mix']}: " + ", ".join(f"{k} {v}" for k, v in data["tokens_per_lang"].items())
             + f"), {data['steps']} steps of {data['batch_size']}, lr {data['lr']:.3g}; held-out = dev split", "",
             "| layer | FVU (pooled) | L0 | L0 % | dead % | " + " | ".join(f"FVU {lang}" for lang in langs) + " |",
             "| --- " * (5 + len(langs)) + "|"]
    for layer, row in fid.items():
        lines.append(f"| {layer} | {row['fvu']:.3f} | {row['l0']:.1f} | {row['l0_pct']:.2f} | {row['dead_pct']:.0f} | "
                     + " | ".join(f"{row['per_lang'][lang]['fvu']:.3f}" for lang in langs) + " |")
    return lines + [""]


def disparity_table(summary: dict, title: str) -> list[str]:
    """The analysis's own table (stars after Holm across its cells, `mlalign.analysis.summary.disparity_table`) where
    the summary has `disparity_p_holm`; summaries written before it get the uncorrected star they were read with."""
    head = [f"### {title}", "", f"`disparity_pct` of `{summary['metric']}` vs en ({summary['aggregate']} aggregate)", ""]
    if summary.get("disparity_p_holm") is not None:
        from mlalign.analysis.summary import disparity_table as holm_table

        return head + holm_table(summary) + [""]
    layers = [str(layer) for layer in summary["layers"]]
    langs = [lang for lang in summary["langs"] if lang != summary["reference_lang"]]
    lines = [f"### {title}", "", f"`disparity_pct` of `{summary['metric']}` vs en ({summary['aggregate']} aggregate); "
             "`*` = the 95% paired-bootstrap CI excludes 0", "",
             "| lang | " + " | ".join(layers) + " |", "| --- " * (len(layers) + 1) + "|"]
    for lang in langs:
        cells = []
        for layer in layers:
            value, interval = summary["disparity_pct"][lang][layer], summary["disparity_ci"][lang][layer]
            star = "*" if interval and (interval[0] > 0 or interval[1] < 0) else ""
            cells.append(f"{f(value, '+.0f')}{star}")
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return lines + [""]


def ci_table(summary: dict, layers: list[str]) -> list[str]:
    langs = [lang for lang in summary["langs"] if lang != summary["reference_lang"]]
    lines = ["| lang | " + " | ".join(f"layer {layer}: disparity % [95% CI]" for layer in layers) + " |",
             "| --- " * (len(layers) + 1) + "|"]
    for lang in langs:
        lines.append(f"| {lang} | " + " | ".join(
            f"{f(summary['disparity_pct'][lang][layer], '+.1f')} {ci(summary['disparity_ci'][lang][layer])}"
            for layer in layers) + " |")
    return lines + [""]


def controls_table(summary: dict) -> list[str]:
    ref = summary["reference_lang"]
    layers = [str(layer) for layer in summary["layers"]]
    lines = ["| lang | tokens / sentence | truncated % | mean position | mean disparity % (all layers) | "
             "resid-norm disparity % (mean) | FVU (mean over layers) | fvu_raw vs en (mean ratio) |",
             "| --- " * 8 + "|"]
    for lang in summary["langs"]:
        stats = summary["corpus_stats"][lang]
        vals = summary["values"][lang]
        disp = [summary["disparity_pct"][lang][layer] for layer in layers]
        norm = [100 * (vals[layer]["resid_norm"] / summary["values"][ref][layer]["resid_norm"] - 1) for layer in layers]
        fvu = [vals[layer]["fvu"] for layer in layers]
        raw = [vals[layer]["fvu_raw"] / summary["values"][ref][layer]["fvu_raw"] for layer in layers]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(f"| {lang} | {stats['tokens_per_sentence']:.1f} | {stats['truncated_pct']:.1f} | "
                     f"{stats['mean_position']:.1f} | {mean(disp):+.1f} | {mean(norm):+.1f} | {mean(fvu):.3f} | "
                     f"{mean(raw):.2f} |")
    return lines + [""]


def train_table(runs: dict[str, dict]) -> list[str]:
    lines = ["| run | lang | gain % [95% CI] | norm-matched gain % [95% CI] | FVU before -> after | valid | "
             "resid norm % | LM loss change (nats) [95% CI] |", "| --- " * 8 + "|"]
    for name, m in runs.items():
        for lang in m["targets"]:
            o = m["per_lang"][lang]
            lines.append(f"| {name} | {lang} | {o['gain_pct']:+.1f} {ci(o['gain_ci'])} | "
                         f"{o['norm_matched_gain_pct']:+.1f} {ci(o['norm_matched_gain_ci'])} | "
                         f"{o['fvu_before']:.3f} -> {o['fvu_after']:.3f} | {o['valid']} | "
                         f"{o['resid_norm_change_pct']:+.1f} | {o['lm_loss_change']:+.3f} "
                         f"{ci(o['lm_loss_change_ci'], '+.3f')} |")
    lines += ["", "| run | English retention % [95% CI] | English change % | English code cosine | English FVU "
              "before -> after | English LM loss change | all valid | steps | train s |", "| --- " * 9 + "|"]
    for name, m in runs.items():
        en = m["per_lang"][m["reference_lang"]]
        lines.append(f"| {name} | {m['english_retention_pct']:.1f} {ci(m['english_retention_ci'])} | "
                     f"{m['english_change_pct']:+.1f} | {m['english_code_cosine']:.3f} | {en['fvu_before']:.3f} -> "
                     f"{en['fvu_after']:.3f} | {en['lm_loss_change']:+.3f} | {m['all_valid']} | {m['steps']} | "
                     f"{m['train_s']:.0f} |")
    return lines + [""]


def loss_settings(run_dir: Path) -> dict:
    """The loss weights and learning rate a train run used (its resolved Hydra config)."""
    import yaml

    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return {**{k: cfg["loss"][k] for k in ("ce", "act_align", "sae_fidelity", "en_retain", "act_align_kind", "margin",
                                          "retain_kind")}, "lr": cfg["train"]["optimizer"]["lr"]}


def sweep_table(out: Path, chosen: str | None) -> list[str]:
    """(c_tuned) dev-split numbers of every sweep run, and of part c's two runs for reference: what the choice saw."""
    dirs = {d.name: d for d in [out / "c_train_act_align", out / "c_train_plain", *sorted(out.glob("c_tuned_*"))]
            if d.name != "c_tuned_chosen" and (d / "train" / "metrics.json").exists()}
    lines = ["| run | act_align | sae_fidelity | lr | hi gain % | hi norm-matched % | ml gain % | ml norm-matched % | "
             "FVU ratio hi / ml / en | English retention % | all valid | alignment_score (dev) |", "| --- " * 12 + "|"]
    for name, d in dirs.items():
        m, s = load(d / "train" / "metrics.json"), loss_settings(d)
        dev = m["dev"]
        ratios = " / ".join(f"{dev['per_lang'][lang]['fvu_after'] / dev['per_lang'][lang]['fvu_before']:.2f}"
                            for lang in (*m["targets"], m["reference_lang"]))
        mark = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{mark} | {s['act_align']:g} | {s['sae_fidelity']:g} | {s['lr']:g} | "
                     f"{dev['activation_gain_pct']['hi']:+.1f} | {dev['norm_matched_gain_pct']['hi']:+.1f} | "
                     f"{dev['activation_gain_pct']['ml']:+.1f} | {dev['norm_matched_gain_pct']['ml']:+.1f} | "
                     f"{ratios} | "
                     f"{dev['english_retention_pct']:.1f} | {dev['all_valid']} | {m['alignment_score']:.2f} |")
    return lines + [""]


def eval_table(runs: dict[str, dict]) -> list[str]:
    """(d) base vs each adapter on the same items: accuracy, paired difference with CI, McNemar p (Holm per run)."""
    first = next(iter(runs.values()))
    lines = ["| benchmark | lang | n | base acc | " + " | ".join(
        f"{name} acc | {name} Δ acc [95% CI] | {name} p (Holm)" for name in runs) + " |",
        "| --- " * (4 + 3 * len(runs)) + "|"]
    for benchmark, by_lang in first["results"].items():
        for lang, cell in by_lang.items():
            row = f"| {benchmark} | {lang} | {cell['n_samples']} | {cell['base']['acc']:.3f} |"
            for comparison in runs.values():
                c = comparison["results"][benchmark][lang]
                row += (f" {c['adapter']['acc']:.3f} | {c['diff']['acc']:+.3f} {ci(c['diff_ci'], '+.3f')} | "
                        f"{c['p_value']:.3g} ({c['p_holm']:.3g}) |")
            lines.append(row)
    return lines + [""]


def main(out: Path) -> None:
    print(f"# gemma3_270m results (generated by tables.py from {out})\n")
    t = times(out)
    if t:
        print("| step | wall-clock |\n| --- | --- |")
        for name, seconds in t.items():
            print(f"| {name} | {seconds} |")
        print()
    a = load(out / "a_analyze" / "analysis" / "summary.json")
    if (out / "a_saes_balanced" / "saes" / "fidelity.png").exists():
        shutil.copyfile(out / "a_saes_balanced" / "saes" / "fidelity.png", HERE / "a_fidelity.png")
    print("\n".join(fidelity_table(out / "a_saes_balanced" / "saes", "(a) SAEs, balanced mix")))
    if a:
        print("\n".join(disparity_table(a, "(a) disparity, all languages x all layers")))
        print("CIs at three layers:\n")
        print("\n".join(ci_table(a, ["3", "9", "15"])))
        print("Controls (analysis corpus):\n")
        print("\n".join(controls_table(a)))
        print("Statements:\n")
        print("\n".join(f"- {s}" for s in a["statements"]))
        print("\nWarnings:\n")
        print("\n".join(f"- {w}" for w in a["warnings"]) or "- none")
        print()
        for png in ("disparity_heatmap.png", "layer_curves.png"):
            if (out / "a_analyze" / "analysis" / png).exists():
                shutil.copyfile(out / "a_analyze" / "analysis" / png, HERE / f"a_{png}")
    b = load(out / "b_analyze_english_heavy" / "analysis" / "summary.json")
    print("\n".join(fidelity_table(out / "b_saes_english_heavy" / "saes", "(b) SAEs, English-heavy mix")))
    fa = load(out / "a_saes_balanced" / "saes" / "fidelity.json")
    fb = load(out / "b_saes_english_heavy" / "saes" / "fidelity.json")
    if fa and fb:
        print("### (b) held-out FVU per language (same 12 dev sentences per language), balanced vs English-heavy SAEs\n")
        langs = ["en", *LANGS]
        print("| layer | mix | " + " | ".join(langs) + " |\n" + "| --- " * (len(langs) + 2) + "|")
        for layer in fb:
            for name, table in (("balanced", fa), ("English-heavy", fb)):
                print(f"| {layer} | {name} | " + " | ".join(f"{table[layer]['per_lang'][lang]['fvu']:.3f}"
                                                            for lang in langs) + " |")
        print()
    if b:
        print("\n".join(disparity_table(b, f"(b) disparity with English-heavy SAEs ({b['n_sentences']['en']} "
                                            "sentences per language)")))
        print("\n".join(ci_table(b, [str(layer) for layer in b["layers"]])))
        print("Controls (English-heavy SAEs):\n")
        print("\n".join(controls_table(b)))
    if a and b:
        layers = [str(layer) for layer in b["layers"]]
        print(f"### (b) balanced ({a['n_sentences']['en']} sentences) vs English-heavy ({b['n_sentences']['en']} "
              "sentences) SAEs: disparity % [95% CI] and the language's FVU\n")
        print("| lang | layer | balanced | English-heavy | FVU balanced | FVU English-heavy |\n| --- | --- | --- | --- | --- | --- |")
        for lang in [lang for lang in b["langs"] if lang != b["reference_lang"]]:
            for layer in layers:
                print(f"| {lang} | {layer} | {f(a['disparity_pct'][lang][layer], '+.1f')} "
                      f"{ci(a['disparity_ci'][lang][layer])} | {f(b['disparity_pct'][lang][layer], '+.1f')} "
                      f"{ci(b['disparity_ci'][lang][layer])} | {a['values'][lang][layer]['fvu']:.3f} | "
                      f"{b['values'][lang][layer]['fvu']:.3f} |")
        print("\nEnglish FVU: " + ", ".join(f"layer {layer} {a['values']['en'][layer]['fvu']:.3f} (balanced) / "
                                             f"{b['values']['en'][layer]['fvu']:.3f} (English-heavy)" for layer in layers))
        print()
    chosen_link = out / "c_tuned_chosen"
    chosen = chosen_link.resolve().name if chosen_link.exists() else None
    train_dirs = {"act_align": out / "c_train_act_align", "plain": out / "c_train_plain"}
    if chosen:
        train_dirs[f"act_align tuned ({chosen})"] = out / chosen
    runs = {name: load(d / "train" / "metrics.json") for name, d in train_dirs.items()}
    runs = {name: m for name, m in runs.items() if m}
    if runs:
        print("### (c) LoRA for hi+ml, held-out (FLORES test) numbers\n")
        print("\n".join(train_table(runs)))
        for name in runs:
            if (train_dirs[name] / ".hydra" / "config.yaml").exists():
                print(f"`{name}` loss: " + ", ".join(f"{k}={v}" for k, v in loss_settings(train_dirs[name]).items())
                      + "\n")
        png = out / "c_train_act_align" / "train" / "activation_before_after.png"
        if png.exists():
            shutil.copyfile(png, HERE / "c_activation_before_after.png")
        if chosen and (out / chosen / "train" / "activation_before_after.png").exists():
            shutil.copyfile(out / chosen / "train" / "activation_before_after.png",
                            HERE / "c_tuned_activation_before_after.png")
    if any(out.glob("c_tuned_*/train/metrics.json")):
        print(f"### (c_tuned) loss weights and lr chosen on the dev split (16 FLORES dev sentences per language); "
              f"chosen: {chosen}\n")
        print("\n".join(sweep_table(out, chosen)))
    evals = {name: load(out / f"d_eval_{name}" / "eval" / "results.json") for name in ("tuned", "plain")}
    evals = {name: e for name, e in evals.items() if e}
    if evals:
        print("### (d) bundled ARC-Challenge / MMLU (0-shot), base vs the tuned activation-aware and the plain "
              "adapter\n")
        print("Same items for base and adapter; Δ acc CI: paired bootstrap; p: McNemar exact, Holm-adjusted over the "
              "cells of one adapter's run.\n")
        print("\n".join(eval_table(evals)))
        for name in evals:
            png = out / f"d_eval_{name}" / "eval" / "accuracy.png"
            if png.exists():
                shutil.copyfile(png, HERE / f"d_accuracy_{name}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/gemma3_270m"))
