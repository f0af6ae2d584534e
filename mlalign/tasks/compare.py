"""task=compare: base, plain LoRA, LoRA + English KL, activation-aware LoRA, its placebo and steering, trained and
measured on the same data, budget, seeds and held-out sentences; differences with hierarchical-bootstrap CIs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from mlalign.errors import UserError
from mlalign.io import json_safe, write_json_atomic

log = logging.getLogger(__name__)

OBJECTIVE = None
"""Nothing to sweep: a comparison reports differences, it is not a setting to optimise."""


def check_config(cfg: DictConfig) -> None:
    """Fail on settings that cannot compare before any model loads."""
    from mlalign.compare.arms import compare_settings
    from mlalign.training.checks import check_train_config

    check_train_config(cfg)
    settings = compare_settings(cfg)
    if settings.benchmarks:  # benchmark and task names fail here, not after hours of training
        import tempfile

        from mlalign.compare.units import benchmark_plan
        from mlalign.languages import resolve_langs

        with tempfile.TemporaryDirectory(prefix="mlalign-compare-check-") as work:
            benchmark_plan(cfg, resolve_langs(cfg.langs, cfg.reference_lang), Path(work))


def run(cfg: DictConfig, ctx) -> dict[str, float]:
    """choices on dev (every arm) -> the remaining seeds -> every arm x seed on the held-out split -> differences."""
    from mlalign.compare.arms import compare_settings
    from mlalign.console import headline, output

    settings = compare_settings(cfg)
    started = time.perf_counter()
    root = ctx.run_dir / "compare"
    bench = _setup(cfg, ctx, settings)
    setup_s = time.perf_counter() - started
    choices = _choose(bench, settings, root, ctx)
    units = _train_seeds(bench, settings, choices, root, ctx)
    # The held-out split is read here, once, after every choice was made on dev.
    results = _measure_all(bench, settings, choices, units, root, ctx)
    results["timing"] = {"setup_s": setup_s, "total_s": time.perf_counter() - started,
                         "train_s": {arm: sum(u.get("train_s", 0.0) for u in per.values())
                                     for arm, per in units.items()}}
    _write_outputs(root, results, settings)
    headline(*results["verdicts"][:12])
    output("comparison", root / "results.md")
    return _summary(results)


# --------------------------------------------------------------------------------------------------- set-up


def _setup(cfg, ctx, settings):
    """Load the model once (peft-wrapped, one LoRA slot), the SAEs, every split's texts, the base sides (cached), the
    steering vectors and the placebo SAEs."""
    import torch
    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model

    from mlalign.analysis.metrics import check_aggregate, check_metric
    from mlalign.compare.passes import residual_tokens, steering_vectors
    from mlalign.compare.units import Bench
    from mlalign.console import stage
    from mlalign.data.corpus import load_corpus
    from mlalign.models import hidden_size, num_layers
    from mlalign.saes import placebo_sae
    from mlalign.tasks.common import resolve_layers
    from mlalign.languages import target_langs
    from mlalign.training import base_cache
    from mlalign.training.loop import resolve_mixed_precision

    reference = str(cfg.reference_lang)
    targets = target_langs(cfg, ctx.langs)
    if not targets:
        raise UserError(f"task=compare needs at least one target language besides {reference}; type e.g. langs=[hi]")
    cpu = str(cfg.model.device) == "cpu"
    precision = resolve_mixed_precision(cfg.train.mixed_precision, cpu)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=int(cfg.train.grad_accum), cpu=cpu)
    tokenizer = ctx.load_tokenizer()
    base = ctx.load_model(device=str(accelerator.device))
    n_layers, d_model = num_layers(base), hidden_size(base)
    analysed = ctx.layers(n_layers)
    aligned = resolve_layers(cfg.loss.layers, n_layers) if cfg.loss.layers is not None else analysed
    saes = ctx.load_saes(sorted(set(analysed) | set(aligned)), d_model, accelerator.device)
    model = get_peft_model(base, instantiate(cfg.lora, _convert_="all"))
    model = accelerator.prepare(model)
    model = accelerator.unwrap_model(model)
    measured = [*targets, reference]
    splits = {"train": str(cfg.data.splits.train), "dev": str(cfg.data.splits.valid),
              "test": str(cfg.data.splits.heldout)}
    corpora = {name: load_corpus(cfg.data, measured, split) for name, split in splits.items()}
    texts = {name: {lang: corpus[lang] for lang in measured} for name, corpus in corpora.items()}
    ids = {name: list(corpus.ids[reference]) for name, corpus in corpora.items()}
    passes = dict(batch_size=int(cfg.analysis.batch_size), max_length=int(cfg.data.max_length))
    base_sides = {}
    analysed_saes = {layer: saes[layer] for layer in analysed}
    with model.disable_adapter():
        for name in ("dev", "test"):
            cache = base_cache.open_cache(cfg, ctx.testbed_dir, splits[name], analysed, precision)
            base_sides[name] = base_cache.base_sides(cache, model, tokenizer, analysed_saes, texts[name],
                                                     write=accelerator.is_main_process, progress=False, **passes)
        with stage(f"base model on the train split: steering vectors and placebo calibration ({len(aligned)} "
                   f"aligned layer(s))"):
            tokens = {lang: residual_tokens(model, tokenizer, texts["train"][lang], aligned, **passes)
                      for lang in measured}
    vectors = {lang: steering_vectors(tokens[reference], tokens[lang]) for lang in targets}
    placebo = {}
    if any(arm.sae == "placebo" for arm in settings.arms):
        rng = np.random.default_rng(settings.placebo_seed)
        for layer in aligned:
            pool = torch.cat([tokens[lang][layer] for lang in measured])
            take = rng.permutation(len(pool))[:settings.calibration_tokens]
            placebo[layer] = placebo_sae(saes[layer], pool[np.sort(take)], seed=settings.placebo_seed + layer)
    del tokens
    topics = None
    if str(cfg.data.source) == "flores":
        from mlalign.data.topics import flores_topics

        topics = flores_topics(cfg.data.path)
    else:
        log.info("topic transfer not measured: data.source=%s carries no SIB-200 labels", cfg.data.source)
    pool_layers = sorted(set(aligned) | {n_layers - 1})

    return Bench(cfg=cfg, accelerator=accelerator, model=model, tokenizer=tokenizer, saes=saes, placebo=placebo,
                 analysed=analysed, aligned=aligned, pool_layers=pool_layers, targets=targets, reference=reference,
                 texts=texts, ids=ids, base_sides=base_sides, steer_vectors=vectors, topics=topics,
                 metric=check_metric(str(cfg.analysis.metric)), aggregate=check_aggregate(str(cfg.analysis.aggregate)),
                 tolerance=float(cfg.train.fidelity_tolerance))


def _tracker(ctx, cfg, directory: Path, arm: str, setting: str, seed):
    """One W&B run per arm x setting x seed, all in the comparison's group (the no-op tracker with logger=none)."""
    from mlalign.tasks.common import job_name_and_group
    from mlalign.tracking import make_tracker

    _, group = job_name_and_group(cfg, "compare")
    name = f"{arm}/{setting}" + ("" if seed is None else f"/seed{seed}")
    directory.mkdir(parents=True, exist_ok=True)
    return make_tracker(cfg, directory, "compare", name, f"{group}-{ctx.run_dir.name}",
                        config={"arm": arm, "setting": setting, "seed": seed}, reinit="create_new")


# --------------------------------------------------------------------------------------------------- choices


def _choose(bench, settings, root: Path, ctx) -> dict:
    """Every arm's setting, chosen on dev by one rule: the highest dev alignment_score (ties: the earlier grid entry,
    i.e. the smaller lr / alpha as listed). Trained arms train the first seed at every lr of the grid."""
    from mlalign.compare.units import (alpha_setting, dev_score, intervention, lr_setting, read_json, train_unit,
                                       unit_dir)
    from mlalign.console import stage

    seed = settings.seeds[0]
    choices = {}
    for arm in settings.arms:
        if arm.kind == "base":
            choices[arm.name] = {"setting": "none", "scores": {}}
            continue
        grid = settings.lrs if arm.kind == "lora" else settings.steer_alphas
        scores = {}
        for value in grid:
            setting = lr_setting(value) if arm.kind == "lora" else alpha_setting(value)
            directory = unit_dir(root, arm.name, setting, seed if arm.kind == "lora" else None)
            done = directory / "dev.json"
            if done.is_file():
                scores[value] = read_json(done)
                continue
            with stage(f"choice: arm {arm.name}, {setting.replace('_', ' ')}" +
                       (f", seed {seed}: train on {bench.cfg.data.splits.train}, score on dev" if arm.kind == "lora"
                        else ": score on dev")):
                tracker = _tracker(ctx, bench.cfg, directory, arm.name, setting, seed if arm.kind == "lora" else None)
                try:
                    trained = train_unit(bench, arm, value, seed, directory, tracker) if arm.kind == "lora" else {}
                    score = dev_score(bench, intervention(bench, arm, value), seed)
                    tracker.summary({f"dev/{k}": v for k, v in score.items()})
                finally:
                    tracker.finish()
            scores[value] = {**score, **({"s_per_step": trained.get("s_per_step")} if trained else {})}
            write_json_atomic(done, scores[value])
        finite = [v for v in grid if np.isfinite(scores[v]["alignment_score"])]
        best = max(finite, key=lambda v: (scores[v]["alignment_score"], -grid.index(v))) if finite else grid[0]
        choices[arm.name] = {"value": best, "setting": lr_setting(best) if arm.kind == "lora" else alpha_setting(best),
                             "scores": {f"{v:g}": scores[v] for v in grid}}
    write_json_atomic(root / "choices.json", choices)
    return choices


def _train_seeds(bench, settings, choices: dict, root: Path, ctx) -> dict:
    """The remaining seeds of every trained arm at its chosen lr (the first seed was trained while choosing)."""
    from mlalign.compare.units import train_unit, unit_dir
    from mlalign.console import stage

    units: dict[str, dict] = {}
    for arm in settings.trained:
        choice = choices[arm.name]
        units[arm.name] = {}
        for seed in settings.seeds:
            directory = unit_dir(root, arm.name, choice["setting"], seed)
            with stage(f"arm {arm.name}, seed {seed}: train at lr {choice['value']:g}"):
                tracker = _tracker(ctx, bench.cfg, directory, arm.name, choice["setting"], seed)
                try:
                    units[arm.name][seed] = train_unit(bench, arm, choice["value"], seed, directory, tracker)
                finally:
                    tracker.finish()
    return units


# --------------------------------------------------------------------------------------------------- held-out


def _measure_all(bench, settings, choices: dict, units: dict, root: Path, ctx) -> dict:
    from mlalign.compare.units import (intervention, load_adapter, load_sums, measure_test, read_json, save_sums,
                                       unit_dir)
    from mlalign.console import stage

    arms_out: dict[str, dict] = {}
    sums: dict[str, dict] = {}
    for arm in settings.arms:
        choice = choices[arm.name]
        seeds = settings.seeds if arm.kind == "lora" else [None]
        arms_out[arm.name] = {"kind": arm.kind, "sae": arm.sae, "setting": choice["setting"],
                              "lr": choice["value"] if arm.kind == "lora" else None,
                              "alpha": choice["value"] if arm.kind == "steer" else None,
                              "dev_scores": choice["scores"], "loss": arm.loss if arm.kind == "lora" else None,
                              "seeds": {}}
        sums[arm.name] = {}
        for seed in seeds:
            directory = unit_dir(root, arm.name, choice["setting"], seed)
            key = "na" if seed is None else str(seed)
            done = directory / "test.json"
            if not done.is_file():
                with stage(f"arm {arm.name}, seed {key}: held-out outcomes ({bench.cfg.data.splits.heldout} split, "
                           f"{len(bench.texts['test'][bench.reference])} sentences x {len(bench.measured)} languages)"):
                    if arm.kind == "lora":
                        load_adapter(bench.model, directory / "adapter")
                    tracker = _tracker(ctx, bench.cfg, directory, arm.name, choice["setting"], seed)
                    try:
                        per_lang, per_sentence = measure_test(bench, intervention(bench, arm, choice["value"]
                                                                                   if arm.kind == "steer" else 0.0),
                                                              settings.seeds[0] if seed is None else seed)
                        tracker.summary({f"test/{lang}/{k}": v for lang, o in per_lang.items() for k, v in o.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
                    finally:
                        tracker.finish()
                    save_sums(directory / "test.npz", per_sentence)
                    write_json_atomic(done, {"per_lang": json_safe(per_lang),
                                             "training": units.get(arm.name, {}).get(seed)})
            stored = read_json(done)
            arms_out[arm.name]["seeds"][key] = stored
            sums[arm.name][key] = load_sums(directory / "test.npz")
    differences, verdicts = _differences(settings, sums, bench)
    return {"arms": arms_out, "differences": differences, "verdicts": verdicts, "contrasts": settings.contrasts,
            "targets": bench.targets, "reference_lang": bench.reference, "aligned_layers": bench.aligned,
            "analysed_layers": bench.analysed, "retrieval_layers": bench.pool_layers,
            "seeds": settings.seeds, "lrs": settings.lrs, "steer_alphas": settings.steer_alphas,
            "choice_rule": "highest dev alignment_score; ties: the earlier grid entry",
            "n_test_sentences": len(bench.texts["test"][bench.reference])}


UNITS = {"gain_pct": "%", "norm_matched_gain_pct": "%", "lm_loss": " nats", "spliced_dlm_loss": " nats"}


def _differences(settings, sums: dict, bench) -> tuple[dict, list[str]]:
    from mlalign.compare.stats import Outcome, hierarchical_difference, verdict

    differences: dict = {}
    lines: list[str] = []
    kinds = {arm.name: arm.kind for arm in settings.arms}
    for c, contrast in enumerate(settings.contrasts):
        first, second = contrast.split("-")
        one_seed = len(settings.seeds) == 1 and "lora" in (kinds[first], kinds[second])
        differences[contrast] = {}
        for lang in bench.measured:
            differences[contrast][lang] = {}
            a_runs, b_runs = sums[first], sums[second]
            names = sorted(set.intersection(*[set(run[lang]) for run in (*a_runs.values(), *b_runs.values())]))
            for k, name in enumerate(names):
                def outcome(runs):
                    parts = [runs[key][lang][name] for key in sorted(runs)]
                    return Outcome(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                   float(parts[0][2]), float(parts[0][3]))

                diff = hierarchical_difference(outcome(a_runs), outcome(b_runs), settings.bootstrap,
                                               seed=1000 * c + 100 * bench.measured.index(lang) + k)
                diff["verdict"] = verdict(contrast, lang, name, diff, UNITS.get(name.split("_L")[0], ""),
                                          lower_is_better=name.startswith(("lm_loss", "spliced_dlm_loss")),
                                          one_seed=one_seed)
                differences[contrast][lang][name] = diff
                if "_L" not in name and not name.startswith("topic_shuffled"):
                    lines.append(diff["verdict"])
    return differences, lines


# --------------------------------------------------------------------------------------------------- outputs


HEADLINE_OUTCOMES = ("gain_pct", "lm_loss", "retrieval_at1", "retrieval_mrr", "topic_transfer_acc", "topic_inlang_acc",
                     "topic_shuffled_acc", "spliced_dlm_loss")


def _mean_over_seeds(arm: dict, lang: str, key: str):
    values = [s["per_lang"][lang].get(key) for s in arm["seeds"].values() if lang in s["per_lang"]]
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _markdown(results: dict) -> str:
    langs = [*results["targets"], results["reference_lang"]]
    lines = ["# task=compare", "",
             f"Held-out split: {results['n_test_sentences']} sentences per language, read once after every choice. "
             f"Aligned layers {results['aligned_layers']}; retrieval at {results['retrieval_layers']} "
             f"(`retrieval_at1` is the last layer). Choice rule: {results['choice_rule']}.", "",
             "## Arms (mean over seeds; ± = seed standard deviation)", ""]
    bench_keys = sorted({k for arm in results["arms"].values() for s in arm["seeds"].values()
                         for o in s["per_lang"].values() for k in o if k.startswith("bench_") and k.endswith("_acc")})
    keys = [*HEADLINE_OUTCOMES, *bench_keys]
    for lang in langs:
        lines += [f"### {lang}", "", "| arm | setting | seeds | " + " | ".join(keys) + " |",
                  "|---|---|---|" + "---|" * len(keys)]
        for name, arm in results["arms"].items():
            cells = []
            for key in keys:
                mean, sd = _mean_over_seeds(arm, lang, key)
                cells.append("" if mean is None else f"{mean:.4g}" + (f" ± {sd:.2g}" if sd is not None else ""))
            lines.append(f"| {name} | {arm['setting']} | {len(arm['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Differences (95% CI: hierarchical bootstrap over seeds, then sentences paired by id)", ""]
    lines += [f"- {v}" for v in results["verdicts"]]
    lines += ["", "## How much of each interval is run-to-run spread", "",
              "The hierarchical CI beside the CI a sentences-only bootstrap of the same runs gives (every seed kept).", "",
              "| contrast | lang | outcome | estimate | CI (seeds, sentences) | CI (sentences only) | seeds |",
              "|---|---|---|---|---|---|---|"]
    for contrast, by_lang in results["differences"].items():
        for lang, by_outcome in by_lang.items():
            for outcome in ("gain_pct", "lm_loss", "spliced_dlm_loss", "retrieval_at1", "topic_transfer_acc"):
                d = by_outcome.get(outcome)
                if d is not None:
                    both, only = d["ci"], d["ci_sentences_only"]
                    lines.append(f"| {contrast} | {lang} | {outcome} | {d['estimate']:+.4g} | [{both[0]:+.4g}, "
                                 f"{both[1]:+.4g}] | [{only[0]:+.4g}, {only[1]:+.4g}] | "
                                 f"{d['n_seeds'][0]} vs {d['n_seeds'][1]} |")
    lines += ["", "## Choices on dev", ""]
    for name, arm in results["arms"].items():
        if arm["dev_scores"]:
            shown = ", ".join(f"{v}: {s['alignment_score']:.3g}" for v, s in arm["dev_scores"].items())
            lines.append(f"- {name}: {arm['setting']} (alignment_score by grid value: {shown})")
    lines += _activity_lines(results)
    return "\n".join(lines) + "\n"


def _activity_lines(results: dict) -> list[str]:
    """Per arm with an activation term: on how many steps of each seed's training it was above zero, and a warning
    where it was nearly idle (mlalign.training.report.IDLE_ACT_ALIGN_PCT): such an arm trained mostly on its other
    terms, so its contrasts do not test the activation objective."""
    from mlalign.training.report import idle_act_align_line

    lines = []
    for name, arm in results["arms"].items():
        runs = [(seed, (s.get("training") or {}).get("act_align_activity")) for seed, s in arm["seeds"].items()]
        runs = [(seed, a) for seed, a in runs if a]
        if not runs:
            continue
        steps = ", ".join(f"seed {seed}: {a['active_steps']} of {a['steps']}" for seed, a in runs)
        idle = [idle_act_align_line(a) for _, a in runs if a["idle"]]
        lines.append(f"- {name}: activation term above zero on {steps} steps"
                     + (f". **Nearly idle**: {idle[0]}" if idle else ""))
    return ["", "## The activation term during training", "", *lines] if lines else []


def _forest_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = [o for o in ("gain_pct", "lm_loss", "spliced_dlm_loss", "retrieval_at1", "topic_transfer_acc")
                if any(o in by_lang for by_c in results["differences"].values() for by_lang in by_c.values())]
    rows = [(c, lang) for c, by_lang in results["differences"].items() for lang in by_lang]
    fig, axes = plt.subplots(1, max(1, len(outcomes)), figsize=(3.6 * max(1, len(outcomes)), 0.35 * len(rows) + 1.5),
                             sharey=True, squeeze=False)
    for ax, outcome in zip(axes[0], outcomes):
        for y, (contrast, lang) in enumerate(rows):
            d = results["differences"][contrast][lang].get(outcome)
            if d is None:
                continue
            low, high = d["ci"]
            significant = low > 0 or high < 0
            ax.plot([low, high], [y, y], color="black" if significant else "grey", lw=1.5)
            ax.plot([d["estimate"]], [y], "o", color="C3" if significant else "grey")
        ax.axvline(0.0, color="C0", lw=0.8, ls="--")
        ax.set_title(outcome, fontsize=9)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels([f"{c} ({lang})" for c, lang in rows], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("A − B with 95% CI (seeds, then sentences); red: the CI excludes 0", fontsize=9)
    fig.tight_layout()
    from mlalign.io import save_figure

    save_figure(fig, path, dpi=120)  # atomic: a full disk leaves no cut image under the final name
    plt.close(fig)


def _write_outputs(root: Path, results: dict, settings) -> None:
    from mlalign.io import write_text_atomic

    write_json_atomic(root / "results.json", json_safe(results))
    write_text_atomic(root / "results.md", _markdown(results))
    _forest_plot(results, root / "differences.png")


def _summary(results: dict) -> dict[str, float]:
    out = {}
    for contrast, by_lang in results["differences"].items():
        for lang, by_outcome in by_lang.items():
            for outcome in ("gain_pct", "lm_loss", "spliced_dlm_loss", "retrieval_at1", "topic_transfer_acc"):
                if outcome in by_outcome:
                    out[f"{contrast}/{lang}/{outcome}"] = float(by_outcome[outcome]["estimate"])
    out["total_s"] = float(results["timing"]["total_s"])
    return out
