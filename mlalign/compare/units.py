"""One arm x seed of task=compare: train (resumable) or set up the intervention, then measure it on a split.

Every unit lives in `<run dir>/compare/units/<arm>/<setting>/seed_<s>/`: `adapter/` and `TRAINED` once trained,
`checkpoints/` while training, `dev.json` (the choice score) and `test.json` + `test.npz` (the held-out outcomes and
the per-sentence sums the differences resample). A unit whose file is there is not run again: a killed comparison
continues where it stopped."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlalign.analysis.retrieval import retrieval_ranks, retrieval_scores
from mlalign.analysis.spliced import spliced_dlm_loss, token_batches
from mlalign.analysis.probes import probe_correct
from mlalign.compare.passes import pooled_residuals, steering
from mlalign.io import write_dir_atomic, write_json_atomic
from mlalign.training.outcomes import alignment_score, measure_adapted, outcome_report

log = logging.getLogger(__name__)

TRAINED = "TRAINED"


def read_json(path: Path):
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def unit_dir(root: Path, arm: str, setting: str, seed: int | None) -> Path:
    return Path(root) / "units" / arm / setting / ("seed_na" if seed is None else f"seed_{seed}")


def lr_setting(lr: float) -> str:
    return f"lr_{lr:g}"


def alpha_setting(alpha: float) -> str:
    return f"alpha_{alpha:g}"


@dataclass
class Bench:
    """What every unit shares: the one model (peft-wrapped), tokenizer, SAEs, texts and base sides."""

    cfg: object
    accelerator: object
    model: object
    """peft model with one LoRA slot ("default"), re-initialised per trained unit."""
    tokenizer: object
    saes: dict
    """Real SAEs of the analysed and aligned layers."""
    placebo: dict
    analysed: list[int]
    aligned: list[int]
    pool_layers: list[int]
    targets: list[str]
    reference: str
    texts: dict
    """split name (train/dev/test) -> lang -> sentences."""
    ids: dict
    """split name -> sentence ids (the same in every language)."""
    base_sides: dict
    """split name (dev/test) -> lang -> BaseSide."""
    steer_vectors: dict
    """target lang -> {layer: vector}."""
    topics: dict | None
    """sentence id -> topic; None when the corpus has no topic labels."""
    metric: str = "mean_act"
    aggregate: str = "token"
    tolerance: float = 1.25
    streams: dict = field(default_factory=dict)

    @property
    def measured(self) -> list[str]:
        return [*self.targets, self.reference]

    def passes(self) -> dict:
        return dict(batch_size=int(self.cfg.analysis.batch_size), max_length=int(self.cfg.data.max_length))


# --------------------------------------------------------------------------------------------------- training


def reset_adapter(model, seed: int) -> None:
    """Re-initialise the LoRA slot with peft's own initialiser from `seed` (the base weights are never touched)."""
    from peft.tuners.lora import LoraLayer

    from transformers import set_seed  # the call tasks.common.RunContext seeds every task with

    set_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            module.reset_lora_parameters("default", True)


def load_adapter(model, directory: Path) -> None:
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(directory)))


def train_unit(bench: Bench, arm, lr: float, seed: int, directory: Path, tracker) -> dict:
    """Train the LoRA slot for `arm` at `lr` from `seed` (continuing from the unit's last checkpoint after a kill), save
    the adapter; {steps, train_s, resumed_from_step}. A trained unit only loads its adapter."""
    import time

    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict
    from transformers import get_scheduler

    from mlalign.training.checkpoint import last_checkpoint
    from mlalign.training.data import load_parallel_stream
    from mlalign.training.loop import ObjectiveFn, Trainee, TrainingStopped, train_loop
    from mlalign.training.report import act_align_activity, idle_act_align_line

    cfg, model = bench.cfg, bench.model
    if (directory / TRAINED).is_file():
        load_adapter(model, directory / "adapter")
        return read_json(directory / TRAINED)
    reset_adapter(model, seed)
    if seed not in bench.streams:  # data order: a function of the seed alone, the same for every arm
        bench.streams[seed] = load_parallel_stream(cfg.data, bench.targets, bench.reference, str(cfg.data.splits.train),
                                                   bench.tokenizer, int(cfg.train.max_length), seed)
    saes = bench.placebo if arm.sae == "placebo" else bench.saes
    objective = ObjectiveFn(OmegaConf.create(arm.loss), {layer: saes[layer] for layer in bench.aligned}, bench.aligned,
                            bench.tokenizer.bos_token_id, bench.accelerator, bench.metric, bench.aggregate)
    train_cfg = OmegaConf.create(OmegaConf.to_container(cfg.train, resolve=True))
    with open_dict(train_cfg):
        train_cfg.optimizer.lr = float(lr)
        train_cfg.eval_every = 0
    optimizer = instantiate(train_cfg.optimizer)([p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(str(train_cfg.scheduler), optimizer, num_warmup_steps=int(train_cfg.warmup_steps),
                              num_training_steps=int(train_cfg.max_steps))
    optimizer = bench.accelerator.prepare(optimizer)
    started = time.perf_counter()
    try:
        state = train_loop(Trainee(bench.accelerator, model, optimizer, scheduler), objective=objective,
                           stream=bench.streams[seed], train_cfg=train_cfg, checkpoints=directory / "checkpoints",
                           resume_from=last_checkpoint(directory / "checkpoints"), tracker=tracker)
    except TrainingStopped as stop:  # a unit is continued by rerunning the comparison, not by task=train
        if stop.saved is None:
            raise
        raise TrainingStopped(stop.what, "to continue, run the same task=compare command again: finished units are "
                              "kept and this one resumes from that checkpoint", saved=stop.saved) from None
    seconds = time.perf_counter() - started
    model.eval()
    write_dir_atomic(directory / "adapter", lambda tmp: model.save_pretrained(str(tmp)))
    done = {"steps": state.step, "resumed_from_step": state.resumed_from, "train_s": seconds,
            "s_per_step": seconds / max(1, state.step - (state.resumed_from or 0)),
            "final": state.history[-1] if state.history else {},
            "act_align_activity": act_align_activity(state.history, float(arm.loss.get("act_align", 0.0)))}
    write_json_atomic(directory / TRAINED, done)
    if idle_act_align_line(done["act_align_activity"]):
        log.warning("arm %s, seed %s: %s", arm.name, seed, idle_act_align_line(done["act_align_activity"]))
    return done


# --------------------------------------------------------------------------------------------------- measuring


def intervention(bench: Bench, arm, alpha: float):
    """lang -> context in which `bench.model` is this arm's model for that language's sentences."""
    model = bench.model

    def for_lang(lang: str):
        if arm.kind == "lora":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(model.disable_adapter())
        if arm.kind == "steer" and lang in bench.steer_vectors:
            stack.enter_context(steering(model, bench.steer_vectors[lang], alpha))
        return stack

    return for_lang


def paired_sums(bench: Bench, split: str, for_lang) -> dict:
    analysed = {layer: bench.saes[layer] for layer in bench.analysed}
    out = {}
    for lang in bench.measured:
        with for_lang(lang):
            out[lang] = measure_adapted(bench.model, {lang: bench.base_sides[split][lang]}, bench.tokenizer, analysed,
                                        {lang: bench.texts[split][lang]}, bench.metric, progress=False,
                                        **bench.passes())[lang]
    return out


def dev_score(bench: Bench, for_lang, seed: int) -> dict:
    """The choice rule's number on dev: alignment_score of the outcome report (docs/compare.md#choices)."""
    cfg = bench.cfg
    report = outcome_report(paired_sums(bench, "dev", for_lang), bench.reference, bench.targets, bench.aggregate,
                            bench.tolerance, n_resamples=0, seed=seed)
    score = alignment_score(report, float(cfg.train.get("retention_floor_pct", 90.0)), bench.tolerance)
    return {"alignment_score": score, "activation_gain_pct_mean": report["activation_gain_pct_mean"],
            "english_retention_pct": report["english_retention_pct"], "fvu_ratio_max": report["fvu_ratio_max"]}


def _ratio_sums(values: np.ndarray, n_tokens: np.ndarray, aggregate: str) -> np.ndarray:
    """[sentences] Σ_l over layers of a per-sentence metric sum, per-sentence means for aggregate=sentence."""
    total = values.sum(axis=1)
    if aggregate == "sentence":
        return np.where(n_tokens > 0, total / np.where(n_tokens > 0, n_tokens, 1.0), 0.0)
    return total


def measure_test(bench: Bench, for_lang, seed: int) -> tuple[dict, dict]:
    """(per_lang outcomes, per-sentence sums) of one unit on the held-out split: the outcome report, LM loss,
    spliced-in LM loss at each aligned layer, retrieval, topic transfer (and benchmarks when asked)."""
    cfg = bench.cfg
    paired = paired_sums(bench, "test", for_lang)
    report = outcome_report(paired, bench.reference, bench.targets, bench.aggregate, bench.tolerance,
                            n_resamples=int(cfg.analysis.bootstrap), ci=float(cfg.analysis.ci), seed=seed)
    per_lang: dict[str, dict] = {}
    sums: dict[str, dict] = {}
    pooled, pooled_train, spliced = {}, {}, {}
    last = bench.pool_layers[-1]
    device = next(bench.model.parameters()).device
    for lang in bench.measured:
        with for_lang(lang):
            batches = token_batches(bench.tokenizer, bench.texts["test"][lang], **bench.passes())
            spliced[lang] = spliced_dlm_loss(bench.model, bench.saes, batches, bench.aligned, device=device)
            pooled[lang] = pooled_residuals(bench.model, bench.tokenizer, bench.texts["test"][lang], bench.pool_layers,
                                            **bench.passes())
            if bench.topics is not None:
                pooled_train[lang] = pooled_residuals(bench.model, bench.tokenizer, bench.texts["train"][lang], [last],
                                                      **bench.passes())[last]
    for lang in bench.measured:
        p, o = paired[lang], report["per_lang"][lang]
        keep = ("gain_pct", "gain_ci", "norm_matched_gain_pct", "fvu_before", "fvu_after", "fvu_ratio", "valid",
                "resid_norm_change_pct", "l0_before", "l0_after", "lm_loss_before", "lm_loss_after", "lm_loss_change",
                "lm_loss_change_ci", "retention_pct", "retention_ci", "n_sentences")
        per_lang[lang] = {key: o[key] for key in keep if key in o}
        per_lang[lang]["lm_loss"] = o["lm_loss_after"]
        s = {"gain_pct": (_ratio_sums(p.metric_after, p.n_tokens, bench.aggregate),
                          _ratio_sums(p.metric_before, p.n_tokens, bench.aggregate), 100.0, -100.0),
             "norm_matched_gain_pct": (_ratio_sums(p.metric_norm_matched, p.n_tokens, bench.aggregate),
                                       _ratio_sums(p.metric_before, p.n_tokens, bench.aggregate), 100.0, -100.0),
             "lm_loss": (p.ce_after, p.ce_tokens, 1.0, 0.0)}
        ones = np.ones(p.n_sentences)
        # Spliced-in LM loss (nats/token, per sentence; the mean over sentences), per aligned layer and averaged.
        by_layer = {layer: np.asarray(values, dtype=float) for layer, values in spliced[lang].items()}
        for layer, values in by_layer.items():
            s[f"spliced_dlm_loss_L{layer}"] = (np.nan_to_num(values), np.isfinite(values).astype(float), 1.0, 0.0)
        mean_layers = np.mean(np.stack(list(by_layer.values())), axis=0)
        s["spliced_dlm_loss"] = (np.nan_to_num(mean_layers), np.isfinite(mean_layers).astype(float), 1.0, 0.0)
        per_lang[lang]["spliced_dlm_loss"] = float(np.nanmean(mean_layers))
        per_lang[lang]["spliced_dlm_loss_per_layer"] = {str(layer): float(np.nanmean(v)) for layer, v in by_layer.items()}
        if lang != bench.reference:
            retrieval = {}
            for layer in bench.pool_layers:
                scores = retrieval_scores(retrieval_ranks(pooled[lang][layer], pooled[bench.reference][layer]))
                retrieval[str(layer)] = {"at1": float(scores["hit"].mean()), "mrr": float(scores["reciprocal_rank"].mean())}
                s[f"retrieval_at1_L{layer}"] = (scores["hit"], ones, 1.0, 0.0)
                s[f"retrieval_mrr_L{layer}"] = (scores["reciprocal_rank"], ones, 1.0, 0.0)
            per_lang[lang].update(retrieval=retrieval, retrieval_layer=last, retrieval_at1=retrieval[str(last)]["at1"],
                                  retrieval_mrr=retrieval[str(last)]["mrr"])
            s["retrieval_at1"], s["retrieval_mrr"] = s[f"retrieval_at1_L{last}"], s[f"retrieval_mrr_L{last}"]
        if bench.topics is not None:
            train_y = [bench.topics[i] for i in bench.ids["train"]]
            test_y = [bench.topics[i] for i in bench.ids["test"]]
            shuffled = list(np.random.default_rng(seed).permutation(train_y))
            probes = {"topic_transfer_acc": (pooled_train[bench.reference], train_y),
                      "topic_inlang_acc": (pooled_train[lang], train_y),
                      "topic_shuffled_acc": (pooled_train[bench.reference], shuffled)}
            for name, (x, y) in probes.items():
                correct = probe_correct(x, y, pooled[lang][last], test_y, seed=seed)
                per_lang[lang][name] = float(correct.mean())
                s[name] = (correct, ones, 1.0, 0.0)
        sums[lang] = s
    if bench.cfg.compare.benchmarks:
        _benchmarks(bench, for_lang, per_lang, sums)
    return per_lang, sums


def benchmark_plan(cfg, langs: list[str], work_dir: Path):
    """`eval`'s benchmark plan in `langs` (task=eval's settings), every task name checked against lm-eval (UserError)."""
    from mlalign.config import EvalConfig, typed
    from mlalign.evaluation.harness import plan_benchmarks

    return plan_benchmarks(langs, typed(cfg.eval, EvalConfig), seed=int(cfg.seed), work_dir=work_dir)


def _benchmarks(bench: Bench, for_lang, per_lang: dict, sums: dict) -> None:
    """The `eval` benchmarks in every measured language under this unit's model, item by item (ids sorted)."""
    import tempfile

    from mlalign.evaluation.harness import run_plan

    for lang in bench.measured:
        with tempfile.TemporaryDirectory(prefix="mlalign-compare-eval-") as work, for_lang(lang):
            plan = benchmark_plan(bench.cfg, [lang], Path(work))
            result = run_plan(bench.model, bench.tokenizer, plan, output_dir=None, log_samples=False)
        for benchmark, by_lang in result["results"].items():
            row = by_lang.get(lang) or {}
            items = row.get("items") or {}
            if not items.get("ids") or items.get("acc") is None:
                continue
            order = np.argsort(np.asarray([str(i) for i in items["ids"]]))
            acc = np.asarray(items["acc"], dtype=float)[order]
            per_lang[lang][f"bench_{benchmark}_acc"] = float(acc.mean())
            per_lang[lang][f"bench_{benchmark}_n_items"] = int(acc.size)
            sums[lang][f"bench_{benchmark}_acc"] = (acc, np.ones_like(acc), 1.0, 0.0)


def save_sums(path: Path, sums: dict) -> None:
    arrays, transforms = {}, {}
    for lang, outcomes in sums.items():
        for name, (num, den, scale, shift) in outcomes.items():
            arrays[f"{lang}/{name}/num"] = np.asarray(num, dtype=float)
            arrays[f"{lang}/{name}/den"] = np.asarray(den, dtype=float)
            transforms[f"{lang}/{name}"] = [scale, shift]
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    write_json_atomic(path.with_suffix(".transforms.json"), transforms)


def load_sums(path: Path) -> dict:
    transforms = read_json(path.with_suffix(".transforms.json"))
    data = np.load(path)
    out: dict[str, dict] = {}
    for key, (scale, shift) in transforms.items():
        lang, name = key.split("/", 1)
        out.setdefault(lang, {})[name] = (data[f"{key}/num"], data[f"{key}/den"], scale, shift)
    return out
