"""The benchmark numbers README.md and this folder's README print, from the committed runs (`cpu/latest.json`,
`gpu_h100/*.json`); `make docs` writes them into the marked blocks (mlalign/docs_numbers.py).

After a new `make bench`: copy `outputs/bench/latest.json` to `cpu/latest.json`, then `make docs`."""

from __future__ import annotations

import json
from pathlib import Path

from mlalign.bench.report import BOUNDS, TARGETS

HERE = Path(__file__).resolve().parent
CPU = HERE / "cpu" / "latest.json"
GPU_PER_LAYER = HERE / "gpu_h100" / "gemma2_2b_per_layer.json"
GPU_STACKED = HERE / "gpu_h100" / "gemma2_2b_stacked.json"


def load(path: Path = CPU) -> dict:
    return json.loads(path.read_text())


def sci(value: float, digits: int = 1) -> str:
    """4.0e-9, not 4.0e-09."""
    mantissa, _, exponent = f"{value:.{digits}e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def met(run: dict, key: str) -> bool:
    op, target = TARGETS[key]
    return run[key] <= target if op == "<=" else run[key] >= target


def target(key: str) -> str:
    op, value = TARGETS[key]
    return f"{op} {value}"


def verdict(run: dict, key: str) -> str:
    """`met`, or `missed` with the bound the floor sets where there is one."""
    if met(run, key):
        return "met"
    bound = BOUNDS.get(key)
    if bound == "floor_over_forward":
        return f"missed: the floor itself is {run[bound]:.3f} x the forward in this run"
    if bound == "saelens_over_floor":
        return f"missed: sae-lens / floor is {run[bound]:.2f}, so no analysis could reach {TARGETS[key][1]} in this run"
    return "missed"


def readme_ratios() -> str:
    """README.md's Performance table: the CPU run's ratios against the benchmark's targets."""
    r = load()
    rows = [("analysis / floor", f"{r['analyze_over_floor']:.2f}", "analyze_over_floor"),
            ("analysis / plain forward", f"{r['analyze_over_forward']:.2f}", "analyze_over_forward"),
            ("per-layer loop / analysis", f"{r['naive_over_analyze']:.1f}", "naive_over_analyze"),
            ("sae-lens / analysis", f"{r['saelens_over_analyze']:.2f} (sae-lens also takes "
             f"+{r['saelens_peak_mb'] / 1000:.1f} GB of memory during its run)", "saelens_over_analyze"),
            ("per-feature statistics' cost", f"+{r['features_cost_pct']:.2f}%", "features_cost_pct"),
            ("activation-aware / plain LoRA step", f"{r['act_over_plain_step']:.2f} (the default objective with "
             f"SAE-fidelity and KL retention terms: {r['full_over_plain_step']:.2f})", "act_over_plain_step"),
            ("analysis peak RSS, 1000 vs 100 sentences", f"+{r['rss_growth_pct']:.1f}%", "rss_growth_pct")]
    lines = ["| ratio | measured | target |", "| --- | --- | --- |"]
    for name, value, key in rows:
        unit = "%" if key.endswith("_pct") else ""
        lines.append(f"| {name} | {value} | {target(key)}{unit} ({verdict(r, key)}) |")
    return "\n".join(lines)


def cpu_header() -> str:
    r = load()
    s = r["settings"]
    return (f"{r['date'][:10]}, `{r['device']}`, torch {r['torch']}, {r['torch_threads']} thread, 1-minute load "
            f"average {r['load_avg_1m']:.1f}, the default `make bench`: {s['sentences_per_lang']} sentences per "
            f"language x {len(s['langs'])} languages = **{r['analysed_tokens']:,} analysed tokens** x "
            f"{s['shape']['layers']} layers, {s['shape']['sae_width']}-wide SAEs; medians of {s['repeats']} "
            f"interleaved repeats; {r['total_s'] / 60:.0f} minutes in all")


def cpu_table() -> str:
    """This folder's CPU table: every timing beside the ratio it feeds, with the targets."""
    r = load()
    rows = [("forward_s", "analyze_over_floor"), ("trunk_s", "analyze_over_forward"), ("floor_s", "naive_over_analyze"),
            ("analyze_s", "saelens_over_analyze"), ("analyze_dense_s", "dense_decode_over_analyze"),
            ("analyze_nofeatures_s", "features_cost_pct"), ("naive_s", "act_over_plain_step"),
            ("saelens_s", "full_over_plain_step"), ("steps", "rss_growth_pct"), (None, "equality")]
    notes = {"dense_decode_over_analyze": "what the sparse decode saves",
             "full_over_plain_step": "default objective (+ SAE fidelity + KL retention)",
             "act_over_plain_step": "the activation term's cost"}
    lines = ["| measure | seconds | | ratio | target | |", "|---|---:|---|---:|---|---|"]
    for measure, ratio in rows:
        if measure == "steps":
            left = (f"`plain_step_s` / `act_step_s` / `full_step_s` | {r['plain_step_s']:.2f} / {r['act_step_s']:.2f} "
                    f"/ {r['full_step_s']:.2f}")
        elif measure is None:
            left = " | "
        else:
            left = f"`{measure}` | {r[measure]:.1f}" if r[measure] >= 100 else f"`{measure}` | {r[measure]:.2f}"
        if ratio == "equality":
            eq = r["equality"]
            right = (f"equality | max rel diff {sci(eq['max_rel_diff'])} | <= {sci(eq['tolerance'], 0)} | "
                     f"{'passed' if eq['passed'] else 'FAILED'}")
        elif ratio == "rss_growth_pct":
            rss = r["rss"]
            right = (f"`rss_growth_pct` | **{r[ratio]:.1f}** ({rss['small']['peak_rss_mb']:.0f} -> "
                     f"{rss['large']['peak_rss_mb']:.0f} MB, {rss['small']['sentences']} -> "
                     f"{rss['large']['sentences']} sentences) | {target(ratio)} | {verdict(r, ratio)}")
        elif ratio in TARGETS:
            value = f"{r[ratio]:.2f}%" if ratio == "features_cost_pct" else (
                f"{r[ratio]:.1f}" if r[ratio] >= 10 else f"{r[ratio]:.2f}")
            unit = "%" if ratio.endswith("_pct") else ""
            right = f"`{ratio}` | **{value}** | {target(ratio)}{unit} | {verdict(r, ratio)}"
        else:
            right = f"`{ratio}` | {r[ratio]:.2f} | — | {notes[ratio]}"
        lines.append(f"| {left} | {right} |")
    return "\n".join(lines)


def cpu_repeats() -> str:
    """Per repeat analyze/floor and the forward, and each phase's in-process memory."""
    r = load()
    raw = r["raw"]
    ratios = ", ".join(f"{a / f:.2f}" for a, f in zip(raw["analyze_s"], raw["floor_s"]))
    forward = ", ".join(f"{x:.2f}" for x in raw["forward_s"])
    return (f"analyze/floor {ratios}; forward {forward} s. In-process memory above each phase's start "
            f"(median): analysis +{r['analyze_peak_mb']:.0f} MB (its buffers are reused from the warm-up), sae-lens "
            f"+{r['saelens_peak_mb'] / 1000:.1f} GB.")


def page_faults() -> str:
    """What the `minor_page_faults` of each repeat say."""
    faults = load()["raw"]["minor_page_faults"]
    later = max(x for key, repeats in faults.items() if key != "saelens_s" for x in repeats[1:])
    sae = faults["saelens_s"]
    return (f"in the first repeat the analysis took {faults['analyze_s'][0] / 1000:.0f}k minor faults (fresh pages "
            f"from the kernel), the floor {faults['floor_s'][0] / 1000:.0f}k, the forward {faults['forward_s'][0]}; "
            f"from the second repeat on every contender but sae-lens took at most {later}, while sae-lens took "
            f"{min(sae) / 1e6:.1f}-{max(sae) / 1e6:.1f} million in each repeat")


def whole_run() -> str:
    r = load()
    return f"{r['total_s'] / 60:.0f} minutes on this box ({r['naive_s'] / 60:.1f} of them the naive baseline)"


def bounds() -> str:
    """What the floor's bounds say about the two CPU targets in this run."""
    r = load()
    floor, sae = r["floor_over_forward"], r["saelens_over_floor"]
    reach, limit = TARGETS["saelens_over_analyze"][1], TARGETS["analyze_over_forward"][1]
    sae_text = f"sae-lens is {sae:.2f} x the floor, so `saelens_over_analyze` >= {reach} was " + (
        "out of reach for any analysis" if sae < reach else "within reach")
    need = 100 * (limit / floor - 1)
    floor_text = (f"`analyze_over_forward` <= {limit} would need an analysis within {need:.1f}% of the floor"
                  if need >= 0 else f"`analyze_over_forward` <= {limit} was out of reach for any analysis")
    return f"In the committed run the floor is {floor:.3f} x the forward and {sae_text}, and {floor_text}"


def minutes() -> str:
    return f"{load()['total_s'] / 60:.0f} minutes"


def equality(which: str = "cpu") -> str:
    """The largest relative difference from the float64 reference path."""
    run = load({"cpu": CPU, "stacked": GPU_STACKED, "per_layer": GPU_PER_LAYER}[which])
    return sci(run["equality"]["max_rel_diff"])


def cpu(key: str, spec: str = ".2f") -> str:
    return format(load()[key], spec)


def gpu(which: str, key: str, spec: str = ".2f") -> str:
    return format(load(GPU_STACKED if which == "stacked" else GPU_PER_LAYER)[key], spec)


def gpu_readme() -> str:
    """README.md's GPU sentence: the stacked run's throughput, its ratio to the forward and the corpus estimate."""
    g = load(GPU_STACKED)
    return (f"the analysis ran at {g['tokens_per_s']['analyze']:,.0f} tokens/s, {g['analyze_over_forward']:.2f} x the "
            f"plain forward (target 1.25: {'met' if g['analyze_over_forward'] <= 1.25 else 'missed'}); the whole "
            f"bundled corpus (10 languages x 1,004 sentences) is an estimated "
            f"{g['whole_corpus_10_langs_estimate_s']:.0f} s")


def corpus_tokens(run: dict) -> float:
    """The token count behind the whole-corpus estimate (the estimate is these tokens at the run's analysis speed)."""
    return run["whole_corpus_10_langs_estimate_s"] * run["tokens_per_s"]["analyze"]


def gpu_table() -> str:
    """This folder's GPU table: the per-layer run (all contenders) beside the stacked one (analysis only)."""
    p, s = load(GPU_PER_LAYER), load(GPU_STACKED)

    def sec(run, key, bold=False):
        if run.get(key) is None:
            return "—"
        text = f"{run[key]:.3f}"
        return f"**{text}**" if bold else text

    def steps(run):
        keys = ("plain_step_s", "act_step_s", "full_step_s")
        return "—" if run["plain_step_s"] is None else " / ".join(f"{run[k]:.2f}" for k in keys) + " s"

    def corpus(run, bold=False):
        text = f"est. {run['whole_corpus_10_langs_estimate_s']:.0f} s"
        return f"**{text}**" if bold else text

    met_corpus = "met" if s["whole_corpus_10_langs_estimate_s"] < 60 else "missed"
    met_forward = "met" if s["analyze_over_forward"] <= 1.25 else "missed"
    rows = [
        ("`forward_s`", sec(p, "forward_s"), sec(s, "forward_s")),
        ("`trunk_s`", sec(p, "trunk_s"), sec(s, "trunk_s")),
        ("`floor_s`", f"{sec(p, 'floor_s')} (per-layer encode)", f"{sec(s, 'floor_s')} (one batched encode)"),
        ("`analyze_s`", f"{sec(p, 'analyze_s')} (sparse decode)",
         f"{sec(s, 'analyze_s', True)} (`decode=auto`: dense on GPU)"),
        ("`analyze_dense_s`", sec(p, "analyze_dense_s"), sec(s, "analyze_dense_s")),
        ("`analyze_nofeatures_s`", sec(p, "analyze_nofeatures_s"), sec(s, "analyze_nofeatures_s")),
        ("`naive_s` / `saelens_s`", f"{p['naive_s']:.2f} / {p['saelens_s']:.2f}",
         "not run (device time)" if s["naive_s"] is None else f"{s['naive_s']:.2f} / {s['saelens_s']:.2f}"),
        ("`analyze_over_forward`", f"{p['analyze_over_forward']:.2f} (dense: "
         f"{p['analyze_dense_s'] / p['forward_s']:.2f})",
         f"**{s['analyze_over_forward']:.2f}** (target <= 1.25: {met_forward})"),
        ("`analyze_over_floor`", f"{p['analyze_over_floor']:.2f}", f"{s['analyze_over_floor']:.2f}"),
        ("analysis tokens/s", f"{p['tokens_per_s']['analyze']:,.0f}", f"**{s['tokens_per_s']['analyze']:,.0f}**"),
        (f"whole bundled corpus (10 x 1,004 sentences, ~{corpus_tokens(s) / 1000:.0f}k tokens)", corpus(p),
         f"{corpus(s, True)} (target < 60 s: {met_corpus}, as an estimate from tokens/s)"),
        ("`features_cost_pct`", "—" if p.get("features_cost_pct") is None else f"{p['features_cost_pct']:.1f}",
         f"{s['features_cost_pct']:.1f}"),
        ("LoRA steps plain / act / full", steps(p), steps(s)),
        ("equality vs the float64 reference", sci(p["equality"]["max_rel_diff"]), sci(s["equality"]["max_rel_diff"])),
    ]
    lines = ["| measure (s) | per-layer path (all contenders) | stacked layer groups (analysis only) |",
             "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
