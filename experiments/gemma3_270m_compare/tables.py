"""The cost numbers docs/compare.md and README.md quote, from the committed `testbed_cost.json` (`make docs` writes them
into the marked blocks; mlalign/docs_numbers.py)."""

from __future__ import annotations

import json
from pathlib import Path

COST = Path(__file__).resolve().parent / "testbed_cost.json"


def load() -> dict:
    return json.loads(COST.read_text())


def compare_over_train() -> str:
    """task=compare's wall-clock over task=train's, from the two wall-clocks (not from the file's own rounded ratio)."""
    cost = load()
    return f"{cost['compare_wall_s'] / cost['train_wall_s']:.1f}"


def held_out_unit_s() -> str:
    """Seconds per held-out unit: the held-out stage over its units."""
    cost = load()
    return f"{cost['compare_stages_s']['held_out_units'] / cost['compare_counts']['held_out_units']:.0f}"


def cost() -> str:
    """docs/compare.md's measured cost: both wall-clocks, their ratio, and what the comparison ran."""
    c, n = load(), load()["compare_counts"]
    return (f"task=train {c['train_wall_s']} s, task=compare {c['compare_wall_s']} s ({compare_over_train()}x: "
            f"{n['training_runs']} trainings, {n['dev_scorings']} dev scorings, {n['held_out_units']} held-out units "
            f"of ~{held_out_unit_s()} s each)")


# --------------------------------------------------------------------------------------------------- the real run
# Everything below reads the committed copy of the real run's results (results/results.json, from run.sh compare).

RESULTS = Path(__file__).resolve().parent / "results" / "results.json"
UNOPTIMISED = ("lm_loss", "spliced_dlm_loss", "retrieval_at1", "topic_transfer_acc")
"""The outcomes no arm's objective contains (the issue's list; benchmarks were cut in Revision 2)."""
LOWER_IS_BETTER = ("lm_loss", "spliced_dlm_loss")


def results(path: Path = RESULTS) -> dict:
    return json.loads(Path(path).read_text())


def direction(outcome: str, diff: dict) -> str:
    """'better', 'worse' (for the contrast's first arm) or 'none' (the 95% CI includes 0)."""
    low, high = diff["ci"]
    if low <= 0 <= high:
        return "none"
    higher = low > 0
    return "worse" if higher == (outcome in LOWER_IS_BETTER) else "better"


def tally(contrast: str, path: Path = RESULTS) -> str:
    """'better in B, worse in W, no detectable difference in N of T' over targets x unoptimised outcomes."""
    r = results(path)
    cells = [direction(o, r["differences"][contrast][lang][o]) for lang in r["targets"] for o in UNOPTIMISED
             if o in r["differences"][contrast][lang]]
    first = contrast.split("-")[0]
    return (f"{first} is better in {cells.count('better')}, worse in {cells.count('worse')} and not detectably "
            f"different in {cells.count('none')} of {len(cells)} (language, outcome) cells")


def verdicts(contrast: str, path: Path = RESULTS) -> str:
    """The run's own verdict line for every target language and unoptimised outcome of one contrast, as a list."""
    r = results(path)
    return "\n".join(f"- {r['differences'][contrast][lang][o]['verdict']}" for lang in r["targets"]
                     for o in UNOPTIMISED if o in r["differences"][contrast][lang])


def differences_table(path: Path = RESULTS) -> str:
    """Every contrast x language x outcome (unoptimised ones, then gain_pct): estimate, 95% CI, which way, seeds."""
    r = results(path)
    lines = ["| contrast | lang | outcome | estimate | 95% CI (seeds, then sentences) | MDE | reads | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for contrast, by_lang in r["differences"].items():
        for lang in [*r["targets"], r["reference_lang"]]:
            for outcome in (*UNOPTIMISED, "gain_pct"):
                d = by_lang.get(lang, {}).get(outcome)
                if d is None:
                    continue
                reads = {"better": f"{contrast.split('-')[0]} better", "worse": f"{contrast.split('-')[0]} worse",
                         "none": "no detectable difference"}[direction(outcome, d)]
                lines.append(f"| {contrast} | {lang} | {outcome} | {d['estimate']:+.4f} | [{d['ci'][0]:+.4f}, "
                             f"{d['ci'][1]:+.4f}] | {'n/a' if d.get('mde') is None else format(d['mde'], '.4f')} | {reads} | {d['n_seeds'][0]} vs {d['n_seeds'][1]} |")
    return "\n".join(lines)


def arms_table(path: Path = RESULTS) -> str:
    """Each arm's chosen setting and its held-out outcomes per target language: mean over seeds ± seed SD."""
    import statistics

    r = results(path)
    keys = ("gain_pct", *UNOPTIMISED)
    lines = ["| lang | arm | setting | seeds | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    for lang in [*r["targets"], r["reference_lang"]]:
        for name, arm in r["arms"].items():
            cells = []
            for key in keys:
                values = [s["per_lang"][lang][key] for s in arm["seeds"].values()
                          if isinstance(s["per_lang"].get(lang, {}).get(key), (int, float))]
                cells.append("" if not values else f"{statistics.mean(values):.4f}"
                             + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""))
            lines.append(f"| {lang} | {name} | {arm['setting']} | {len(arm['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def s_per_step(arm: str, path: Path = RESULTS) -> str:
    """Wall-clock seconds per training step of one arm: the mean over its seeds' units (TRAINED's s_per_step)."""
    runs = [s["training"]["s_per_step"] for s in results(path)["arms"][arm]["seeds"].values() if s.get("training")]
    return f"{sum(runs) / len(runs):.1f}"


def s_per_step_range(arm: str, path: Path = RESULTS) -> str:
    """'low-high' seconds per training step over one arm's seeds (the slow end: units trained on a shared box)."""
    runs = [s["training"]["s_per_step"] for s in results(path)["arms"][arm]["seeds"].values() if s.get("training")]
    return f"{min(runs):.1f}-{max(runs):.1f}"


def chosen(arm: str, path: Path = RESULTS) -> str:
    """The arm's setting chosen on dev (e.g. lr_0.001)."""
    return results(path)["arms"][arm]["setting"]


def mean(arm: str, lang: str, key: str, fmt: str = ".3f", path: Path = RESULTS) -> str:
    """One arm's held-out outcome for one language: the mean over its seeds."""
    values = [s["per_lang"][lang][key] for s in results(path)["arms"][arm]["seeds"].values()]
    return format(sum(values) / len(values), fmt)


def estimate(contrast: str, lang: str, outcome: str, fmt: str = "+.3f", path: Path = RESULTS) -> str:
    """'estimate [low, high]' of one contrast's difference (95% CI, seeds then sentences)."""
    d = results(path)["differences"][contrast][lang][outcome]
    return f"{format(d['estimate'], fmt)} [{format(d['ci'][0], fmt)}, {format(d['ci'][1], fmt)}]"


CHOICES = RESULTS.parent / "choices.json"


def steer_dev_gains() -> str:
    """The steer arm's dev activation gain and FVU ratio at every alpha it tried (choices.json), e.g.
    'alpha 0.5: -5.5% (FVU x1.10), ...'."""
    scores = json.loads(CHOICES.read_text())["steer"]["scores"]
    return ", ".join(f"alpha {alpha}: {s['activation_gain_pct_mean']:+.1f}% (FVU x{s['fvu_ratio_max']:.2f})"
                     for alpha, s in scores.items())


STAGES = RESULTS.parent / "stages_final_resume.txt"
"""The console's 'done in' lines of the last resume (2026-12-06, the box to itself but for two helpers' tests)."""


def held_out_minutes() -> str:
    """'a-b min' over the held-out units the last resume measured (the earlier sessions' logs were overwritten and
    shared the box with other work)."""
    import re

    minutes = [int(m) + int(s) / 60 for m, s in re.findall(r"held-out outcomes .*: done in (\d+)m(\d+)s",
                                                           STAGES.read_text())]
    return f"{min(minutes):.1f}-{max(minutes):.1f} min over {len(minutes)} units"


# ------------------------------------------------------------------------------------------- post-hoc diagnostics
# results/posthoc.json, written by posthoc.py after the results were read (the review's questions; not the design).

POSTHOC = RESULTS.parent / "posthoc.json"


def _histories(arm: str | None = None, setting: str | None = None) -> list[dict]:
    rows = json.loads(POSTHOC.read_text())["histories"]
    return [h for key, h in rows.items() if (arm is None or key.split("/")[0] == arm)
            and (setting is None or key.split("/")[1] == setting)]


def hinge_active(arm: str = "act_align") -> str:
    """'a-b of 100' steps on which the arm's act_align hinge was above 0, over its units at the chosen setting."""
    rows = _histories(arm, chosen(arm))
    counts = [h["act_align_active_steps"] for h in rows]
    return f"{min(counts)}-{max(counts)} of {rows[0]['steps']}"


def fidelity_active(arm: str = "act_align") -> str:
    """'a-b of 100' steps on which the arm's SAE-fidelity term was above 0, over its units at the chosen setting."""
    rows = _histories(arm, chosen(arm))
    counts = [h["sae_fidelity_active_steps"] for h in rows]
    return f"{min(counts)}-{max(counts)} of {rows[0]['steps']}"


def base_ratio_step1() -> str:
    """'low-high' of the target/English activation ratio at step 1 (adapter still zero: the base model) over every
    trained unit's first batch."""
    ratios = [h["act_ratio_step1"] for h in _histories()]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def untrained_ratio_median() -> str:
    """'low-high' of the median target/English ratio over training of the arms that do not train on it (ce, ce_kl:
    their logged ratio is the exact metric's), over their units."""
    medians = [h["act_ratio_median"] for arm in ("ce", "ce_kl") for h in _histories(arm)]
    return f"{min(medians):.2f}-{max(medians):.2f}"


def posthoc_value(unit: str, lang: str, key: str, fmt: str = ".3f") -> str:
    """One dev measure of one unit ('base' or 'arm/setting', seed 0) from posthoc.json."""
    return format(json.loads(POSTHOC.read_text())["dev"][unit][lang][key], fmt)


def posthoc_table() -> str:
    """The post-hoc dev measures of seed 0 of every trained arm at both learning rates, and the base model."""
    data = json.loads(POSTHOC.read_text())
    keys = [("hi", "retrieval_at1_L17"), ("ml", "retrieval_at1_L17"), ("hi", "retrieval_at1_L3"),
            ("ml", "retrieval_at1_L3"), ("hi", "spliced_dlm_loss"), ("ml", "spliced_dlm_loss"),
            ("en", "spliced_dlm_loss")]
    lines = ["| unit (seed 0) | " + " | ".join(f"{lang} {key}" for lang, key in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for unit, row in data["dev"].items():
        lines.append(f"| {unit} | " + " | ".join(f"{row[lang][key]:.3f}" for lang, key in keys) + " |")
    return "\n".join(lines)
