"""task=train on the testbed: LoRA-only gradients, activation-aware beats plain LoRA, reload, resume, user errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from mlalign.errors import UserError
from mlalign.training.checkpoint import KEEP
from mlalign.tracking import Tracker
from tests.helpers import compose_cfg, run_cli

# Five layers spread over the 26 (each one where the testbed's hi sits below English) keep every run short.
LAYERS = "[1,4,15,19,24]"
FAST = ["task=train", "model=testbed", "langs=[hi]", f"layers={LAYERS}", "data.max_sentences=96",
        "data.max_length=48", "train.max_length=48", "train.batch_size=8", "train.warmup_steps=2",
        "train.optimizer.lr=3e-3", "analysis.batch_size=48", "train.eval_every=0"]


def bed_overrides(testbed_dir) -> list[str]:
    d = Path(testbed_dir)
    return [f"model.hf_id={d / 'model'}", f"sae.path_template='{d}/saes/layer_{{layer}}'"]


def train_cfg(testbed_dir, tmp_path, *overrides):
    return compose_cfg([*FAST, *bed_overrides(testbed_dir), *overrides], tmp_path)


def run_train(cfg, tracker=None):
    from mlalign.tasks import train
    from mlalign.tasks.common import RunContext

    with RunContext(cfg) as ctx:
        if tracker is not None:
            ctx.tracker = tracker
        metrics = train.run(cfg, ctx)
        ctx.finish(metrics)
    return metrics, ctx.run_dir


def peft_testbed(cfg):
    from hydra.utils import instantiate
    from peft import get_peft_model

    from mlalign.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(cfg.model), instantiate(cfg.lora, _convert_="all"))
    with torch.no_grad():  # B starts at 0, which would leave A without gradient; any non-zero B reaches both
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    return model


# --------------------------------------------------------------------------------------------------- objective


def test_objective_is_the_weighted_sum_of_its_terms_and_skips_unweighted_ones(testbed_dir, tmp_path, monkeypatch):
    """An arm is its weights: total = sum_term w * term (each term one method), and a term weighted 0 never runs
    (except ce and act_align, which are logged without a graph)."""
    from accelerate import Accelerator

    from mlalign.models import load_tokenizer
    from mlalign.saes import load_saes
    from mlalign.training.data import load_parallel_stream
    from mlalign.training.loop import ObjectiveFn

    model = peft_testbed(train_cfg(testbed_dir, tmp_path))
    tokenizer = load_tokenizer(train_cfg(testbed_dir, tmp_path).model)
    layers = [1, 4]
    saes = load_saes(train_cfg(testbed_dir, tmp_path).sae, layers, model.config.hidden_size)
    stream = load_parallel_stream(train_cfg(testbed_dir, tmp_path).data, ["hi"], "en", "train", tokenizer, 48, seed=0)
    batch = stream.batch(0, 4, torch.device("cpu"))
    model.eval()  # no LoRA dropout: every arm sees the same forwards
    full = train_cfg(testbed_dir, tmp_path, "loss.ce=1.0", "loss.act_align=2.0", "loss.sae_fidelity=3.0",
                     "loss.en_retain=0.5")
    terms = ObjectiveFn(full.loss, saes, layers, tokenizer.bos_token_id, Accelerator(cpu=True))(model, batch)
    v = terms.values
    expected = v["ce"] + 2.0 * v["act_align"] + 3.0 * v["sae_fidelity"] + 0.5 * v["en_retain"]
    assert terms.total.item() == pytest.approx(expected, rel=1e-5) and v["total"] == pytest.approx(expected, rel=1e-5)

    def never(*args):
        raise AssertionError("a term weighted 0 was computed")

    monkeypatch.setattr(ObjectiveFn, "sae_fidelity", never)
    monkeypatch.setattr(ObjectiveFn, "en_retain", never)
    ce_only = train_cfg(testbed_dir, tmp_path, "loss.ce=1.0", "loss.act_align=0.0", "loss.sae_fidelity=0.0",
                        "loss.en_retain=0.0")
    plain = ObjectiveFn(ce_only.loss, saes, layers, tokenizer.bos_token_id, Accelerator(cpu=True))(model, batch)
    assert plain.total.item() == pytest.approx(v["ce"], rel=1e-6)
    assert plain.values["act_align"] == pytest.approx(v["act_align"], rel=1e-6)  # logged, not trained
    assert "sae_fidelity" not in plain.values and "en_retain" not in plain.values


# --------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("weights", ["ce=1.0,act_align=1.0,sae_fidelity=1.0,en_retain=1.0",
                                     "ce=0.0,act_align=1.0,sae_fidelity=0.0,en_retain=0.0",
                                     "ce=0.0,act_align=0.0,sae_fidelity=1.0,en_retain=0.0"])
def test_gradients_reach_only_lora_parameters(testbed_dir, tmp_path, weights):
    from accelerate import Accelerator

    from mlalign.analysis.capture import decoder_layers
    from mlalign.models import load_tokenizer
    from mlalign.saes import load_saes
    from mlalign.training.data import load_parallel_stream
    from mlalign.training.loop import ObjectiveFn

    ce, act, fid, retain = (float(kv.split("=")[1]) for kv in weights.split(","))
    cfg = train_cfg(testbed_dir, tmp_path, f"loss.ce={ce}", f"loss.act_align={act}", f"loss.sae_fidelity={fid}",
                    f"loss.en_retain={retain}")
    model = peft_testbed(cfg)
    tokenizer = load_tokenizer(cfg.model)
    layers = [1, 4, 15, 19, 24]
    saes = load_saes(cfg.sae, layers, model.config.hidden_size)
    stream = load_parallel_stream(cfg.data, ["hi"], "en", "train", tokenizer, 48, seed=0)
    objective = ObjectiveFn(cfg.loss, saes, layers, tokenizer.bos_token_id, Accelerator(cpu=True))
    model.train()
    terms = objective(model, stream.batch(0, 4, torch.device("cpu")))
    assert terms.values["act_align"] > 0  # hi starts below English on the testbed, so the hinge is active
    if fid:
        # The random LoRA B makes the adapted FVU differ from the base model's, so the term has a gradient.
        assert terms.values["fvu_ratio"] != pytest.approx(1.0, abs=1e-6)
    if terms.total.grad_fn is None:
        pytest.fail(f"no gradient path for {weights}")
    terms.total.backward()
    # Through L_act or L_fid alone only layers up to the deepest aligned one can move the aligned activations.
    reach = max(layers) if ce == 0 and retain == 0 else len(decoder_layers(model)) - 1
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    reached = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items()}
    assert lora and all(reached[n] == (int(n.split(".layers.")[1].split(".")[0]) <= reach) for n in lora)
    others = [n for n, p in model.named_parameters() if "lora_" not in n and (p.requires_grad or p.grad is not None)]
    assert others == []
    sae_grads = [p.grad for sae in saes.values() for p in sae.parameters() if p.grad is not None]
    assert sae_grads == []


# --------------------------------------------------------------------------------------- training end to end

STEPS = 24


@pytest.fixture(scope="module")
def aligned_run(testbed_dir, tmp_path_factory):
    """The activation-aware run, through run.py as a user would start it."""
    run_dir = tmp_path_factory.mktemp("aligned") / "run"
    result = run_cli([*FAST, *bed_overrides(testbed_dir), f"train.max_steps={STEPS}", "train.save_every=10",
                      f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}"],
                     threads=1)  # tiny matrices: a second thread only spins on a shared box
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def plain_run(testbed_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    metrics, run_dir = run_train(train_cfg(testbed_dir, tmp, "loss=plain", f"train.max_steps={STEPS}",
                                           "train.save_every=0"))
    return run_dir


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "train" / "metrics.json").read_text())


@pytest.mark.slow
def test_run_writes_adapter_metrics_plot_and_the_outcome_contract(aligned_run):
    r = report(aligned_run)
    assert (aligned_run / "adapter" / "adapter_config.json").is_file()
    assert (aligned_run / "train" / "activation_before_after.png").stat().st_size > 0
    assert r["splits"]["headline"] == "test" and r["splits"]["dev"] == "dev" and r["splits"]["train"] == "train"
    # One run: the report says its CIs cover sentences, not runs, and where the seed spread comes from.
    assert r["seeds"]["n"] == 1 and "compare.seeds" in r["seeds"]["note"]
    from mlalign.training.report import outcome_lines
    assert any(line.startswith("- Seeds: one training run") for line in outcome_lines(r))
    # How often the activation term pushed, over every step of the run (mlalign/training/report.py).
    activity = r["act_align_activity"]
    assert activity["steps"] == r["steps"] and 0 <= activity["active_steps"] <= activity["steps"]
    assert any(line.startswith("- **Activation term nearly idle**") for line in outcome_lines(r)) == activity["idle"]
    for lang in ("hi", "en"):
        o = r["per_lang"][lang]
        for key in ("gain_pct", "norm_matched_gain_pct", "fvu_before", "fvu_after", "resid_norm_change_pct"):
            assert isinstance(o[key], float), (lang, key)
        low, high = o["gain_ci"]
        assert low <= o["gain_pct"] <= high
        assert isinstance(o["valid"], bool)
        # valid: every aligned layer within tolerance, on the reconstruction error and on the spliced-in LM loss.
        assert o["spliced_layers"] == r["aligned_layers"] == [1, 4, 15, 19, 24]
        assert len(o["recon_error_ratio"]) == len(r["layers"])
        assert len(o["spliced_dlm_loss_before"]) == len(o["spliced_dlm_loss_after"]) == len(o["spliced_layers"])
        recon_ok = all(ratio <= r["fidelity_tolerance"] for ratio in o["recon_error_ratio"])
        spliced_ok = all(a - b <= r["spliced_tolerance_nats"]
                         for b, a in zip(o["spliced_dlm_loss_before"], o["spliced_dlm_loss_after"]))
        assert o["valid"] == (recon_ok and spliced_ok)
        assert set(o["per_layer"]) == {"1", "4", "15", "19", "24"}
    assert r["activation_gain_pct"]["hi"] == r["per_lang"]["hi"]["gain_pct"]
    assert 0 < r["english_retention_pct"] <= 100
    low, high = r["english_retention_ci"]
    assert low <= r["english_retention_pct"] <= high
    assert set(r["lm_loss_change"]) == {"en", "hi"}
    # Sweeps see dev numbers only; the test split's numbers are in train/metrics.json.
    summary = json.loads((aligned_run / "metrics.json").read_text())
    assert summary["dev_activation_gain_pct_hi"] == pytest.approx(r["dev"]["activation_gain_pct"]["hi"])
    assert summary["alignment_score"] == pytest.approx(r["alignment_score"])
    assert not any(key.startswith("activation_gain_pct") for key in summary)
    # The last KEEP checkpoints are kept (the newest, and one to fall back on if it is damaged), the older ones removed.
    # Saved at steps 10, 20 and 24 (the last), KEEP = 2.
    assert KEEP == 2
    assert sorted(p.name for p in (aligned_run / "checkpoints").iterdir()) == ["step-00000020", f"step-{STEPS:08d}"]


def test_steps_on_the_alignment_term_raise_the_exact_metric_ratio(testbed_dir, tmp_path):
    """The term's value is the reported metric's ratio, and descending it raises that ratio (not a surrogate's)."""
    from accelerate import Accelerator

    from mlalign.models import load_tokenizer
    from mlalign.saes import load_saes
    from mlalign.training.data import load_parallel_stream
    from mlalign.training.loop import ObjectiveFn

    # margin 0.5: the hinge is active whatever the batch's starting ratio.
    cfg = train_cfg(testbed_dir, tmp_path, "loss.ce=0", "loss.act_align=1", "loss.sae_fidelity=0", "loss.en_retain=0",
                    "loss.margin=0.5", "lora.lora_dropout=0")
    model = peft_testbed(cfg)
    tokenizer = load_tokenizer(cfg.model)
    layers = [1, 4, 15, 19, 24]
    saes = load_saes(cfg.sae, layers, model.config.hidden_size)
    batch = load_parallel_stream(cfg.data, ["hi"], "en", "train", tokenizer, 48, seed=0).batch(0, 8, torch.device("cpu"))
    objective = ObjectiveFn(cfg.loss, saes, layers, tokenizer.bos_token_id, Accelerator(cpu=True))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = objective(model, batch).values
    assert first["act_align"] == pytest.approx(max(0.0, 1.5 - first["act_ratio"]), abs=0.05)  # per-layer mean
    for _ in range(8):
        terms = objective(model, batch)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    last = objective(model, batch).values
    assert last["act_align"] < first["act_align"]
    assert last["act_ratio"] > first["act_ratio"] + 0.02


@pytest.mark.slow
def test_the_fidelity_term_keeps_the_sae_valid_where_plain_lora_breaks_it(aligned_run, plain_run):
    # Measured on the session testbed at this learning rate: plain LoRA pushes the SAE's FVU on the adapted residual
    # up ~1e3-1e4x (hi and English), the default objective keeps it within ~1.2x, and only the latter moves the
    # residual's direction towards more activation (norm-matched gain ~+19% vs ~-5%).
    aligned, plain = report(aligned_run), report(plain_run)
    tolerance = aligned["fidelity_tolerance"]
    assert plain["per_lang"]["hi"]["fvu_ratio"] > 10 * tolerance and not plain["all_valid"]
    assert plain["valid_activation_gain_pct"]["hi"] is None
    for lang in ("hi", "en"):
        assert aligned["per_lang"][lang]["fvu_ratio"] < 2.0
    assert aligned["norm_matched_gain_pct"]["hi"] > plain["norm_matched_gain_pct"]["hi"] + 5.0
    assert aligned["alignment_score"] > plain["alignment_score"]


@pytest.mark.slow
def test_a_second_run_takes_the_base_side_from_the_cache_with_identical_numbers(testbed_dir, tmp_path):
    """A sweep job after the first (same base model, SAEs, corpus, layers): the held-out "before" is a cache hit, only
    the adapted side is measured, and every number is the first run's."""
    cache = tmp_path / "cache"
    args = [*FAST, *bed_overrides(testbed_dir), "layers=[1,4]", "data.max_sentences=32", "train.max_steps=2",
            "train.save_every=0", "analysis.bootstrap=20", f"paths.cache_dir={cache}"]
    runs = []
    for name in ("first", "second"):
        result = run_cli([*args, f"hydra.run.dir={tmp_path / name}"], threads=1)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result.stdout)
    for split in ("dev", "test"):
        assert f"measuring base vs adapter on the {split} split" in runs[0]
    assert "base model: measuring 2 language(s) x 2 layer(s), cached for later runs: done in" in runs[0]
    assert "cache hit" not in runs[0]
    hits = [line for line in runs[1].splitlines() if "base model: cache hit (2 language(s) x 2 layer(s)" in line]
    assert len(hits) == 2 and "base model: measuring" not in runs[1]  # dev and test
    assert "base model: cache hit" in (tmp_path / "second" / "run.log").read_text()
    first, second = (report(tmp_path / name) for name in ("first", "second"))
    for timing in ("train_s", "total_s"):
        first.pop(timing), second.pop(timing)
    assert first == second


@pytest.mark.slow
def test_reloaded_adapter_reproduces_the_reported_numbers(aligned_run, testbed_dir, tmp_path):
    from mlalign.data.corpus import load_corpus
    from mlalign.models import load_model, load_tokenizer
    from mlalign.saes import load_saes
    from mlalign.training.report import activation_levels

    cfg = train_cfg(testbed_dir, tmp_path, f"adapter={aligned_run / 'adapter'}")
    base = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    inputs = tokenizer(["यह एक परीक्षण है।"], return_tensors="pt")
    base_logits = base(**inputs).logits
    adapted = load_model(cfg.model, adapter=cfg.adapter)  # the path analyze and eval take
    assert not torch.allclose(adapted(**inputs).logits, base_logits, atol=1e-4)

    r = report(aligned_run)
    layers = r["layers"]
    heldout = load_corpus(cfg.data, ["en", "hi"], "test")
    # The analysis engine (what task=analyze adapter=... reports) gives the train report's "after" levels.
    levels = activation_levels(adapted, tokenizer, load_saes(cfg.sae, layers, base.config.hidden_size),
                               {lang: heldout[lang] for lang in ("en", "hi")}, "mean_act", "token",
                               batch_size=48, max_length=48)
    for lang in ("en", "hi"):
        for layer in layers:
            assert levels[lang][layer] == pytest.approx(r["per_lang"][lang]["per_layer"][str(layer)]["level_after"],
                                                        rel=1e-4)


class SigtermAt(Tracker):
    """Sends this process SIGTERM (or `signum`) when the loop logs step `at`, as a cluster scheduler would."""

    def __init__(self, at: int, signum: int = signal.SIGTERM):
        self.at, self.signum, self.steps = at, signum, []

    def log(self, metrics, step=None):
        if step is not None:
            self.steps.append(step)
        if step == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_sigterm_checkpoint_then_resume_matches_an_uninterrupted_run(testbed_dir, tmp_path, capsys):
    from mlalign.training.loop import TrainingStopped

    steps = ["train.max_steps=8", "train.save_every=3", "data.max_sentences=48"]
    whole, whole_dir = run_train(train_cfg(testbed_dir, tmp_path / "whole", *steps))

    cfg = train_cfg(testbed_dir, tmp_path / "cut", *steps)
    with pytest.raises(TrainingStopped, match="SIGTERM after step 5"):
        run_train(cfg, tracker=SigtermAt(5))
    run_dir = Path(cfg.paths.output_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000005"]
    assert not (run_dir / "adapter").exists()

    with open_dict(cfg):
        cfg.train.resume = True
    resumed, _ = run_train(cfg)
    assert "resumed from step 5" in capsys.readouterr().out

    h_whole = json.loads((whole_dir / "train" / "history.json").read_text())
    h_resumed = json.loads((run_dir / "train" / "history.json").read_text())
    assert [h["step"] for h in h_resumed] == list(range(1, 9))
    for a, b in zip(h_whole, h_resumed):
        assert b["total"] == pytest.approx(a["total"], rel=1e-4, abs=1e-6)
    for key in ("dev_activation_gain_pct_hi", "dev_english_retention_pct", "alignment_score"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-3)


def test_sigusr2_stops_like_sigterm_when_no_submitit_handler_is_there():
    from mlalign.training.loop import _SigtermFlag

    before = signal.getsignal(signal.SIGUSR2)
    with _SigtermFlag() as flag:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.raised and flag.name == "SIGUSR2"
        flag.hand_over()  # the default handler is not Python's to call: the loop raises TrainingStopped instead
    assert signal.getsignal(signal.SIGUSR2) == before


def test_resume_auto_starts_fresh_then_continues_a_sigusr2_requeued_job(testbed_dir, tmp_path, capsys):
    """submitit's SIGUSR2 handler requeues the job; it must run only after the checkpoint, and the requeued job (same
    command, same run directory, train.resume=auto) continues from it."""
    cfg = train_cfg(testbed_dir, tmp_path, "train.max_steps=6", "train.save_every=0", "train.resume=auto",
                    "data.max_sentences=48")
    run_dir = Path(cfg.paths.output_dir)
    requeued = []

    def submitit_requeue(signum, frame):
        requeued.append(sorted(p.name for p in (run_dir / "checkpoints").iterdir()))
        raise SystemExit(-1)  # as submitit does after `scontrol requeue`

    first = SigtermAt(4, signal.SIGUSR2)
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        with pytest.raises(SystemExit):
            run_train(cfg, tracker=first)
        assert signal.getsignal(signal.SIGUSR2) is submitit_requeue  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert first.steps == [1, 2, 3, 4] and "resumed from" not in capsys.readouterr().out  # fresh: from step 0
    assert requeued == [["step-00000004"]]

    metrics, _ = run_train(cfg)
    assert "resumed from step 4" in capsys.readouterr().out
    history = json.loads((run_dir / "train" / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7)) and metrics["steps"] == 6


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(testbed_dir, tmp_path):
    from mlalign.training.loop import TrainingStopped

    # An absurd learning rate blows the LoRA weights up after the first update.
    cfg = train_cfg(testbed_dir, tmp_path, "train.max_steps=6", "train.save_every=1", "train.warmup_steps=0",
                    "train.optimizer.lr=1e30", "train.max_grad_norm=0", "data.max_sentences=24")
    with pytest.raises(TrainingStopped, match=r"non-finite loss at step \d.*last good checkpoint") as info:
        run_train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    kept = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert 1 <= len(kept) <= 2 and max(kept) in str(info.value)  # the newest two are kept
    assert not (run_dir / "adapter").exists()


# --------------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("overrides, message", [
    (["loss.ce=0", "loss.act_align=0", "loss.sae_fidelity=0", "loss.en_retain=0"], "every loss weight is 0"),
    (["data.splits.valid=test"], "dev split of their own"),
    (["train.fidelity_tolerance=0.9"], "fidelity_tolerance"),
    (["analysis.metric=fvu"], "no per-token"),
    (["lora.r=0"], "lora.r=0"),
    (["lora.r=-4"], "lora.r=-4"),
    (["data.splits.heldout=train"], "held-out"),
    (["train.resume=maybe"], "true, false or auto"),
])
def test_untrainable_configs_are_user_errors(tmp_path, overrides, message):
    from mlalign.tasks.train import run

    cfg = compose_cfg([*FAST, *overrides], tmp_path)
    with pytest.raises(UserError, match=message):
        run(cfg, ctx=None)  # refused before anything loads


def test_resume_without_a_checkpoint_is_a_user_error(testbed_dir, tmp_path):
    cfg = train_cfg(testbed_dir, tmp_path, "train.resume=true")
    with pytest.raises(UserError, match="holds no checkpoint"):
        run_train(cfg)


def test_cli_prints_one_line_for_zero_weights(tmp_path):
    result = run_cli(["task=train", "model=testbed", "model.hf_id=/nonexistent", "langs=[hi]", "loss.ce=0",
                      "loss.act_align=0", "loss.sae_fidelity=0", "loss.en_retain=0", f"hydra.run.dir={tmp_path / 'run'}",
                      f"paths.cache_dir={tmp_path / 'cache'}"])
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "every loss weight is 0" in result.stderr
