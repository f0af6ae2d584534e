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


# What README.md (and docs/) quote is read back from the committed results.md: the run directories under outputs/ are
# not committed, results.md is. `make docs` (mlalign/docs_numbers.py) calls the functions below.
RESULTS = HERE / "results.md"


def results_tables(path: Path = RESULTS) -> list[tuple[str, list[list[str]]]]:
    """Every table of results.md as (the heading above it, rows of cells; the header row first)."""
    out, heading, rows = [], "", []
    for line in [*path.read_text().splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        if rows:
            out.append((heading, rows))
            rows = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return out


def _table(heading: str, index: int = 0) -> list[list[str]]:
    """The index-th table under the heading that starts with `heading`."""
    found = [rows for title, rows in results_tables() if title.startswith(heading)]
    if len(found) <= index:
        raise KeyError(f"results.md has {len(found)} table(s) under a heading starting {heading!r}")
    return found[index]


def _rows(table: list[list[str]], rows) -> list[list[str]]:
    """The rows whose first cells are `rows` (a key, or a list of leading cells); None: all."""
    if rows is None:
        return table[1:]
    keys = [rows] if isinstance(rows, (str, tuple)) else rows
    keys = [[k] if isinstance(k, str) else list(k) for k in keys]
    out = []
    for key in keys:
        match = [row for row in table[1:] if row[:len(key)] == key]
        if len(match) != 1:
            raise KeyError(f"{len(match)} rows start with {key}")
        out.append(match[0])
    return out


def _column(table: list[list[str]], column: str) -> int:
    if column not in table[0]:
        raise KeyError(f"no column {column!r} in {table[0]}")
    return table[0].index(column)


def table(heading: str, index: int = 0, columns: list[str] | None = None, rows=None) -> str:
    """A table of results.md as it stands there, or some of its columns and rows."""
    t = _table(heading, index)
    keep = [_column(t, c) for c in columns] if columns else list(range(len(t[0])))
    body = [t[0], *_rows(t, rows)]
    lines = ["| " + " | ".join(row[i] for i in keep) + " |" for row in body]
    return "\n".join([lines[0], "| --- " * len(keep) + "|", *lines[1:]])


def cell(heading: str, row, column: str, index: int = 0) -> str:
    """One cell of a results.md table, as written there."""
    t = _table(heading, index)
    return _rows(t, [row])[0][_column(t, column)]


def number(text: str) -> float:
    """The first number of a cell: "+31.9 [29.2, 35.0]" -> 31.9, "0.327 -> 0.802" -> 0.327."""
    return float(text.split()[0].rstrip("*%"))


def value(heading: str, row, column: str, spec: str = "", index: int = 0) -> str:
    """The first number of a cell, formatted with `spec` (e.g. "+.0f")."""
    return format(number(cell(heading, row, column, index)), spec)


def interval(heading: str, row, column: str, index: int = 0) -> str:
    """The bracketed CI of a cell: "+31.9 [29.2, 35.0]" -> "[29.2, 35.0]"."""
    text = cell(heading, row, column, index)
    return text[text.index("["):text.index("]") + 1]


def span(heading: str, rows, column: str, spec: str = ".2f", index: int = 0) -> str:
    """min-max of a column over some rows ("0-2": the rows keyed 0, 1, 2), one number when they round alike."""
    if isinstance(rows, str) and "-" in rows:
        first, last = map(int, rows.split("-"))
        rows = [str(k) for k in range(first, last + 1)]
    t = _table(heading, index)
    values = [number(row[_column(t, column)]) for row in _rows(t, rows)]
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def top(heading: str, rows, column: str, spec: str = ".2f", index: int = 0) -> str:
    """The largest number of a column over some rows (as span's rows)."""
    return span(heading, rows, column, spec, index).split("-")[-1]


def top_language_fvu(heading: str = "(a) SAEs") -> str:
    """The largest per-language FVU of an SAE table, over every layer and language."""
    t = _table(heading)
    columns = [i for i, name in enumerate(t[0]) if name.startswith("FVU ") and name != "FVU (pooled)"]
    return f"{max(number(r[i]) for r in t[1:] for i in columns):.2f}"


def row(heading: str, key, index: int = 0) -> str:
    """A row's cells after its key, comma-separated: the per-layer values of one language."""
    t = _table(heading, index)
    return ", ".join(_rows(t, [key])[0][1:])


def paragraph(start: str) -> str:
    """The line of results.md that starts with `start`."""
    found = [line for line in RESULTS.read_text().splitlines() if line.startswith(start)]
    if len(found) != 1:
        raise KeyError(f"{len(found)} lines of results.md start with {start!r}")
    return found[0]


def statements() -> str:
    """(a)'s headline statements, as task=analyze wrote them."""
    lines = RESULTS.read_text().splitlines()
    start = lines.index("Statements:") + 2
    return "\n".join(lines[start:lines.index("", start)])


def fvu_ratio(heading: str, row, column: str = "FVU before -> after", index: int = 0) -> str:
    """"0.327 -> 0.802" -> "2.45": the after/before ratio of an FVU cell."""
    before, _, after = cell(heading, row, column, index).partition(" -> ")
    return f"{float(after) / float(before):.2f}"


def fvu_gap(layer: str, mix: str, langs=("mr", "ml", "hi")) -> str:
    """(b): the range over `langs` of their held-out FVU minus English's at one layer and SAE mix."""
    gaps = [number(cell("(b) held-out FVU", (layer, mix), lang)) - number(cell("(b) held-out FVU", (layer, mix), "en"))
            for lang in langs]
    return f"+{min(gaps):.3f}-{max(gaps):.3f}"


TUNED = "act_align tuned (c_tuned_aa5_fid20_lr1e-3)"


def gain_over_english(lang: str) -> str:
    """The tuned run's test gain relative to English's own change: (1 + gain) / (1 + English change) - 1, in %."""
    gain = number(cell("(c) LoRA", (TUNED, lang), "gain % [95% CI]"))
    english = number(cell("(c) LoRA", TUNED, "English change %", index=1))
    return f"{100 * ((1 + gain / 100) / (1 + english / 100) - 1):.0f}"


def default_artefact() -> str:
    """(c), the testbed-chosen defaults on this model: hi's FVU rise and English retention (test split)."""
    retention = value("(c) LoRA", "act_align", "English retention % [95% CI]", ".0f", 1)
    return f"hi's FVU x{fvu_ratio('(c) LoRA', ('act_align', 'hi'))}, English retention {retention}%"


def tuned_outcome() -> str:
    """(c_tuned), the chosen run's test outcome: gains, FVU ratios, English retention."""
    hi, ml = (TUNED, "hi"), (TUNED, "ml")
    return (f"hi {value('(c) LoRA', hi, 'gain % [95% CI]', '+.1f')}% {interval('(c) LoRA', hi, 'gain % [95% CI]')}, "
            f"ml {value('(c) LoRA', ml, 'gain % [95% CI]', '+.1f')}%, FVU x{fvu_ratio('(c) LoRA', hi)}/"
            f"x{fvu_ratio('(c) LoRA', ml)}, English retention "
            f"{value('(c) LoRA', TUNED, 'English retention % [95% CI]', '.1f', 1)}%")


def accuracy_span(benchmark: str, column: str = "base acc") -> str:
    """(d): the range of an accuracy column over the languages of one benchmark, in %."""
    t = _table("(d) bundled")
    values = [100 * number(r[_column(t, column)]) for r in t[1:] if r[0] == benchmark]
    low, high = f"{min(values):.0f}", f"{max(values):.0f}"
    return f"{low}%" if low == high else f"{low}-{high}%"


def significant(adapter: str, alpha: float = 0.05) -> str:
    """(d): "k of n": the adapter's differences whose Holm-adjusted p is below alpha."""
    t = _table("(d) bundled")
    holm = [float(r[_column(t, f"{adapter} p (Holm)")].split("(")[1].rstrip(")")) for r in t[1:]]
    return f"{sum(p < alpha for p in holm)} of {len(holm)}"


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
