"""The write-up's numbers for experiments/gemma3_270m_causal (are Gemma-3-270M's language-specific SAE features
causal?), from the committed copies in results/layer_<L>/ only.

After a layer's run: `python experiments/gemma3_270m_causal/tables.py copy 3` copies that layer's files from
outputs/gemma3_270m_causal/layer_3/analysis/ into results/layer_3/ (all of FILES, or none); `python
experiments/gemma3_270m_causal/tables.py > experiments/gemma3_270m_causal/results.md` writes every table for every
layer copied; the README's marked blocks call the functions below (mlalign/docs_numbers.py). Each function takes the
layer and, optionally, the results folder (tests pass their own).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUTS = Path("outputs/gemma3_270m_causal")
"""run.sh's $OUT (relative to the repository root)."""
FILES = ("ablation.json", "ablation.png", "steering.json", "steering.png", "features_neuronpedia.json",
         "feature_dashboard.html")
"""What task=analyze's causal steps write into analysis/ (docs/method.md §8c); the PNGs and the dashboard are shown,
not read."""


def _layer_dir(layer: str | int, results: Path) -> Path:
    return Path(results) / f"layer_{layer}"


def copy(layer: str | int, out: Path = OUTPUTS, results: Path = RESULTS) -> list[Path]:
    """Copy FILES of one layer's finished run into results/layer_<L>/; copies nothing if any is missing."""
    source = Path(out) / f"layer_{layer}" / "analysis"
    missing = [str(source / name) for name in FILES if not (source / name).exists()]
    if missing:
        raise FileNotFoundError("not there (has that layer's run finished?): " + ", ".join(missing))
    target = _layer_dir(layer, results)
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, target / name)
    return [target / name for name in FILES]


def _load(layer: str | int, name: str, results: Path) -> dict:
    path = _layer_dir(layer, results) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: after layer {layer}'s run, `python "
                                f"experiments/gemma3_270m_causal/tables.py copy {layer}`")
    return json.loads(path.read_text())


def layers(results: Path = RESULTS) -> list[str]:
    """The layers whose results are committed, in order."""
    found = [p.name.split("_", 1)[1] for p in Path(results).glob("layer_*") if (p / "ablation.json").exists()]
    return sorted(found, key=int)


def _ci(cell: dict, spec: str = "+.3f") -> str:
    value, ci = cell.get("dlm_loss", cell.get("diff")), cell.get("ci")
    if value is None:
        return "n/a"
    return format(value, spec) + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


# --------------------------------------------------------------------------------------------------- ablation


def ablation_table(layer: str | int, results: Path = RESULTS) -> str:
    """Per ablated language: the LM-loss change on its own text, the weakest of its comparisons with another language
    (diagonal minus that language's change, and which), the matched-random control on its own text and the diagonal
    minus it, and the verdict (every interval above 0)."""
    data = _load(layer, "ablation.json", results)
    level = f"{100 * data['ci']:g}%"
    lines = [f"| ablated (k = {data['k']}) | ΔLM loss on its own text [{level} CI] | the closest other language: "
             f"own − its ΔLM [{level} CI] | matched random, own text | own − random [{level} CI] | causal |",
             "| --- | --- | --- | --- | --- | --- |"]
    for lang, comparison in data["comparisons"].items():
        others = {e: c for e, c in comparison["vs_eval_lang"].items() if c["diff"] is not None}
        closest = min(others, key=lambda e: others[e]["diff"]) if others else None
        lines.append(f"| {lang} | {_ci(data['matrix'][lang][lang])} | "
                     + (f"{closest}: {_ci(others[closest])}" if closest else "n/a")
                     + f" | {_ci(data['random'][lang][lang])} | {_ci(comparison['vs_random'])} | "
                     f"{'yes' if comparison['causal'] else 'no'} |")
    sizes = sorted(set(data["n_sentences"].values()))
    lines += ["", f"ΔLM loss: nats/token on {'/'.join(map(str, sizes))} {data['split']}-split sentences per language "
              f"with the features removed from the residual "
              f"stream at layer {data['layer']} (the SAE's error term kept), minus the clean loss; features chosen on "
              f"the {data['features_chosen_on']} split; {data['bootstrap']} paired bootstrap resamples over sentences. "
              "Causal: the own-text change and every comparison's interval lie above 0."]
    return "\n".join(lines)


def causal_verdict(layer: str | int, results: Path = RESULTS) -> str:
    """One sentence: whose features are shown causal at the layer, whose are not, and which have none."""
    data = _load(layer, "ablation.json", results)
    causal = [lang for lang, verdict in data["causal"].items() if verdict]
    not_shown = [lang for lang, verdict in data["causal"].items() if not verdict]
    none = [lang for lang, features in data["features"].items() if not features]
    return _verdict(f"at layer {data['layer']}, removing a language's top {data['k']} specific features raises its own "
                    f"LM loss more than any other language's and more than {data['k']} matched random features do "
                    f"for", causal, len(data["causal"]), f" ({', '.join(causal)})",
                    [f"not shown for {', '.join(not_shown)}" if not_shown else "",
                     f"{', '.join(none)} had no specific feature there" if none else ""])


def _verdict(head: str, shown: list[str], total: int, listed: str, clauses: list[str]) -> str:
    """'<head> k of n languages<listed>; <clause>; ...' (`listed` only where some are shown, empty clauses dropped)."""
    return "; ".join([f"{head} {len(shown)} of {total} languages" + (listed if shown else ""),
                      *[clause for clause in clauses if clause]])


# --------------------------------------------------------------------------------------------------- steering


def steering_table(layer: str | int, results: Path = RESULTS) -> str:
    """Per steered language and alpha: the share of generations identified as that language, along its features'
    direction / along the matched random direction (alpha 0 is the unsteered English baseline)."""
    data = _load(layer, "steering.json", results)
    alphas = sorted({row["alpha"] for rows in data["results"].values() for row in rows})
    lines = ["| lang | " + " | ".join(f"α = {a:g}" for a in alphas) + " |", "| --- |" + " --- |" * len(alphas)]
    repetition = all("share_repetitive" in row for rows in data["results"].values() for row in rows)

    def cell(row):
        text = f"{row['share_in_lang']:.2f} / {row['share_in_lang_random']:.2f}"
        return text + (f" ({row['share_in_lang_not_repetitive']:.2f}; {row['share_repetitive']:.2f} / "
                       f"{row['share_repetitive_random']:.2f})" if repetition else "")

    for lang, rows in data["results"].items():
        by_alpha = {row["alpha"]: row for row in rows}
        lines.append(f"| {lang} | " + " | ".join(cell(by_alpha[a]) if a in by_alpha else "–" for a in alphas) + " |")
    lines += ["", f"Share of {data['prompts']} greedy generations ({data['max_new_tokens']} new tokens) from "
              f"{data['reference_lang']} prompts ({data['prompt_split']} split) that {data['identifier']} labels as the "
              f"language: along its top-{data['k']} features' mean decoder direction / along {data['k']} matched random "
              f"features'; α in units of {data['alpha_unit']} ({data['alpha_scale']:.3g})."
              + (" In brackets: the share in the language and not repetitive along its own direction; the share of "
                 "repetitive generations (zlib compression ratio above 2.4), own / random." if repetition else "")
              + (f" No specific features to steer with: {', '.join(data['no_specific_features'])}."
                 if data.get("no_specific_features") else "")]
    return "\n".join(lines)


def share_ci(share: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson interval of a share of n generations (scipy's binomtest): n = 24 prompts makes it wide, and it says
    so."""
    from scipy.stats import binomtest

    ci = binomtest(round(share * n), n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _share(share: float, n: int) -> str:
    low, high = share_ci(share, n)
    return f"{share:.2f} [{low:.2f}, {high:.2f}]"


def steering_best(layer: str | int, results: Path = RESULTS) -> str:
    """One sentence: per language, the largest share its own direction reaches (and at which alpha), with its 95%
    Wilson interval over the prompts, beside the random direction's share at the same alpha."""
    data = _load(layer, "steering.json", results)
    n, parts = int(data["prompts"]), []
    for lang, rows in data["results"].items():
        best = max(rows, key=lambda row: (row["share_in_lang"], -row["alpha"]))
        parts.append(f"{lang} {_share(best['share_in_lang'], n)} (α {best['alpha']:g}) vs random "
                     f"{_share(best['share_in_lang_random'], n)}")
    return (f"at layer {data['layer']}, the largest share of the {n} generations in the language (95% Wilson "
            f"interval over prompts), own direction vs the matched random one at the same α: " + "; ".join(parts))


RANDOM_STEERS = 0.5
"""A random direction that makes at least this share of generations a language is named: there, steering shows
that a push of that size moves generation into the language whatever its direction."""


def steering_verdict(layer: str | int, results: Path = RESULTS) -> str:
    """One sentence: the languages whose own direction makes more generations that language than the matched random
    direction at some alpha with non-overlapping 95% Wilson intervals (over the prompts; several alphas tried, no
    correction), those where it does not, and where the random direction alone reaches RANDOM_STEERS."""
    data = _load(layer, "steering.json", results)
    n, steers, not_shown, random_alone = int(data["prompts"]), [], [], []
    # Where the run measured repetition, only the own direction's generations that are not repetitive count for it.
    own = ("share_in_lang_not_repetitive" if all("share_in_lang_not_repetitive" in row
                                                  for rows in data["results"].values() for row in rows)
           else "share_in_lang")
    for lang, rows in data["results"].items():
        separated = [row["alpha"] for row in rows
                     if share_ci(row[own], n)[0] > share_ci(row["share_in_lang_random"], n)[1]]
        (steers if separated else not_shown).append(lang + (f" (α {', '.join(f'{a:g}' for a in separated)})"
                                                            if separated else ""))
        random_alone += [f"{lang} at α {row['alpha']:g} ({row['share_in_lang_random']:.2f})" for row in rows
                         if row["share_in_lang_random"] >= RANDOM_STEERS]
    counted = "generations that language, not repetitive," if own != "share_in_lang" else "generations that language"
    return _verdict(f"at layer {data['layer']}, steering along a language's top {data['k']} features makes more of the "
                    f"{n} {counted} than the matched random direction (95% Wilson intervals apart) for", steers,
                    len(data["results"]), f": {', '.join(steers)}",
                    [f"not for {', '.join(not_shown)}" if not_shown else "",
                     f"the random direction alone makes at least {RANDOM_STEERS:.0%} of generations the language for "
                     + ", ".join(random_alone) if random_alone else ""])


# ------------------------------------------------------------------------------------------------------- main


def main(results: Path = RESULTS) -> None:
    print("# Are Gemma-3-270M's language-specific SAE features causal? Results (generated by tables.py from "
          "results/)\n")
    for layer in layers(results):
        print(f"## Layer {layer}\n")
        print(f"**Ablation.** {causal_verdict(layer, results)}.\n")
        print(ablation_table(layer, results) + "\n")
        print(f"**Steering.** {steering_verdict(layer, results)}.\n")
        print(f"Largest shares: {steering_best(layer, results)}.\n")
        print(steering_table(layer, results) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["copy"]:
        for layer in sys.argv[2:]:
            for path in copy(layer):
                print(f"copied {path}")
    else:
        main()
