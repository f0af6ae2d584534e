"""`make bench`: time mlalign's analysis and training step against the plain forward (the floor) and against peers.

One process, one model, the same length-sorted batches for every contender; repeats are interleaved (A B C D, A B C
D, ...) so that load from other jobs hits all of them alike, and the median is reported. Ratios are taken within the
run. Peak RSS growth (100 vs 1000 sentences) is measured in fresh subprocesses, where ru_maxrss means something.

    python -m mlalign.bench                      # CPU benchmark model (Gemma-2-shaped, hidden 256), a few minutes
    python -m mlalign.bench --quick              # tiny, for the test
    python -m mlalign.bench --device cuda --shape gemma2-2b   # Gemma-2-2B-sized random model + 16k SAEs, bf16

Writes outputs/bench/latest.json (see experiments/performance/README.md for what each number means).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

import torch

LANGS = ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class Shape:
    """A Gemma-2-shaped model and its SAEs. `vocab` is the model's vocabulary (embedding/LM-head rows)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    sae_width: int
    vocab: int
    dtype: str


SHAPES = {
    # Gemma-2-2B divided by 9 in every width. The vocabulary is divided by 9 too, so the LM head keeps its share of a
    # plain forward's FLOPs (~22% in Gemma-2-2B: 256000 x 2304 against 26 layers of ~78M weights).
    "cpu": Shape("cpu", hidden=256, layers=26, heads=8, kv_heads=4, head_dim=32, intermediate=1024, sae_width=2048,
                 vocab=28448, dtype="float32"),
    "gemma2-2b": Shape("gemma2-2b", hidden=2304, layers=26, heads=8, kv_heads=4, head_dim=256, intermediate=9216,
                       sae_width=16384, vocab=256000, dtype="bfloat16"),
    "quick": Shape("quick", hidden=64, layers=4, heads=2, kv_heads=1, head_dim=32, intermediate=256, sae_width=512,
                   vocab=2048, dtype="float32"),
}


@dataclass
class Settings:
    shape: Shape
    device: str
    sentences_per_lang: int
    langs: list[str]
    batch_size: int
    max_length: int
    repeats: int
    naive_repeats: int
    train_steps: int
    train_batch_size: int
    rss_sentences: tuple[int, int]
    threads: int
    naive_layers: int = 2
    """Layers the naive baseline is timed on (spread over the depth); its time is scaled to all layers. 0 = all."""
    rss_max_length: int = 32
    """Truncation in the RSS probes: growth then reflects the number of sentences, and 1000 sentences stay quick."""
    sae_density: float = 0.01
    """Fraction of (token, feature) pairs that fire: thresholds are set to this quantile of the pre-activations."""
    seed: int = 0


def settings_from_args(args) -> Settings:
    shape = SHAPES["quick" if args.quick else args.shape]
    if args.quick:
        return Settings(shape, args.device, sentences_per_lang=6, langs=["en", "hi", "zh"], batch_size=4,
                        max_length=48, repeats=2, naive_repeats=1, train_steps=2, train_batch_size=2,
                        rss_sentences=(6, 24), threads=args.threads, naive_layers=0)
    return Settings(shape, args.device, sentences_per_lang=args.sentences, langs=LANGS, batch_size=16,
                    max_length=128, repeats=args.repeats, naive_repeats=args.naive_repeats,
                    train_steps=args.train_steps, train_batch_size=8, rss_sentences=(100, 1000), threads=args.threads,
                    naive_layers=args.naive_layers)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark model: tokenizer, random Gemma-2, random JumpReLU SAEs with calibrated thresholds.


def build_tokenizer(sentences: list[str], vocab_size: int):
    """Byte-level BPE trained on the corpus, prepending <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(sentences, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", clean_up_tokenization_spaces=False)


def build_model(shape: Shape, tokenizer, max_length: int, device: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=max(shape.vocab, len(tokenizer)), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, query_pre_attn_scalar=shape.head_dim, max_position_embeddings=max(max_length, 256),
        sliding_window=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, attn_implementation="eager",
    )
    with torch.device(device):
        model = Gemma2ForCausalLM(config)
    return model.to(getattr(torch, shape.dtype)).eval()


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@torch.no_grad()  # not inference_mode: the training benchmark backpropagates through these weights
def build_saes(shape: Shape, residuals: dict[int, torch.Tensor], density: float, seed: int) -> dict:
    """One sae-lens JumpReLUSAE per layer: random unit-norm decoder, encoder = its transpose, b_dec = the residual
    mean, and per-feature thresholds at the (1 - density) quantile of a calibration batch's pre-activations, so that
    about `density` of the features fire on each token (Gemma Scope's L0 is of that order)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    saes = {}
    for layer, x in residuals.items():
        x = x.float()
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=shape.hidden, d_sae=shape.sae_width, dtype="float32",
                                            device=str(x.device),
                                            metadata=SAEMetadata(hook_name=hook_name(layer), hook_layer=layer)))
        w_dec = torch.randn(shape.sae_width, shape.hidden, generator=generator).to(x.device)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        scale = (x - x.mean(0)).norm(dim=1).mean().clamp_min(1e-6)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T / scale)
        sae.b_dec.copy_(x.mean(0))
        sae.b_enc.zero_()
        pre = (x - x.mean(0)) @ sae.W_enc
        k = max(1, round(density * pre.shape[0]))
        sae.threshold.copy_(pre.topk(k, dim=0).values[-1].clamp_min(1e-3))
        saes[layer] = sae.to(dtype).eval().requires_grad_(False)
    return saes


@dataclass
class Bench:
    settings: Settings
    tokenizer: object
    model: object
    saes: dict
    texts: dict[str, list[str]]
    n_tokens: int


def corpus_texts(langs: list[str], per_lang: int) -> dict[str, list[str]]:
    """The first `per_lang` sentences of each language from the bundled FLORES-200 (test, then dev and train)."""
    from mlalign.data.corpus import load_flores

    corpus = load_flores(langs, "test+dev+train")
    return {lang: corpus[lang][:per_lang] for lang in langs}


def build_bench(settings: Settings, per_lang: int | None = None) -> Bench:
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions, pad_batch
    from mlalign.data.corpus import load_flores

    torch.manual_seed(settings.seed)
    shape = settings.shape
    train = load_flores(settings.langs, "train")
    tokenizer = build_tokenizer([s for lang in settings.langs for s in train[lang]], min(shape.vocab, 8192))
    model = build_model(shape, tokenizer, settings.max_length, settings.device)
    texts = corpus_texts(settings.langs, per_lang or settings.sentences_per_lang)
    # Calibrate the SAEs on training sentences (not the benchmark's), one forward pass for every layer.
    calib = [train[lang][-4] for lang in settings.langs] * max(1, 32 // len(settings.langs))
    ids = tokenizer(calib, truncation=True, max_length=settings.max_length)["input_ids"]
    inputs = pad_batch(ids, tokenizer.pad_token_id, "right", torch.device(settings.device))
    keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], tokenizer.bos_token_id)
    with torch.inference_mode(), ResidualCapture(model, list(range(shape.layers)), stop_after_last=True) as capture:
        residuals = {layer: h[keep].clone() for layer, h in capture.forward(**inputs, use_cache=False).items()}
    saes = build_saes(shape, residuals, settings.sae_density, settings.seed)
    n_tokens = sum(len(ids) - 1 for lang in texts for ids in
                   tokenizer(texts[lang], truncation=True, max_length=settings.max_length)["input_ids"])
    return Bench(settings, tokenizer, model, saes, texts, n_tokens)


# --------------------------------------------------------------------------------------------------------------------
# The contenders. Each takes the Bench and does the whole job on its texts, tokenisation included.


def sorted_batches(bench: Bench, lang: str):
    """The analysis engine's own batching: length-sorted, padded, in the order `collect_stats` runs them."""
    from mlalign.analysis.engine import _batches, pad_batch, tokenize_sorted

    s = bench.settings
    items = tokenize_sorted(bench.tokenizer, bench.texts[lang], s.max_length)
    for batch in _batches(items, s.batch_size):
        yield pad_batch([ids for _, ids in batch], bench.tokenizer.pad_token_id, "right", torch.device(s.device))


@torch.inference_mode()
def run_forward(bench: Bench) -> None:
    """The floor: the model's plain forward (LM head included, as a user's would be), no hooks, same batches."""
    for lang in bench.texts:
        for inputs in sorted_batches(bench, lang):
            bench.model(**inputs, use_cache=False)


@torch.inference_mode()
def run_trunk(bench: Bench) -> None:
    """The decoder stack alone: the same forward stopped after the last layer (no final norm, no LM head). Not a
    target, a second floor that shows what the SAE work itself costs."""
    from mlalign.analysis.capture import ResidualCapture

    last = bench.settings.shape.layers - 1
    with ResidualCapture(bench.model, [last], stop_after_last=True) as capture:
        for lang in bench.texts:
            for inputs in sorted_batches(bench, lang):
                capture.forward(**inputs, use_cache=False)


def run_analyze(bench: Bench, features: bool = True):
    """The engine as task=analyze runs it: per-feature statistics on (analysis.features.enabled, the default)."""
    from mlalign.analysis.engine import collect_stats

    s = bench.settings
    return collect_stats(bench.model, bench.tokenizer, bench.saes, bench.texts, batch_size=s.batch_size,
                         max_length=s.max_length, progress=False, feature_stats={} if features else None)


class Totals:
    """Per-(language, layer) corpus totals, accumulated in float64 with plain torch and sae-lens's own encode/decode:
    the unoptimised reference the analysis must equal, and the work every peer is asked to do."""

    def __init__(self):
        self.values: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def add(self, lang: str, layer: int, x: torch.Tensor, acts: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, acts, x_hat = x.double(), acts.double(), x_hat.double()
        new = {"n_tokens": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
               "mean_act": acts.mean(-1).sum(), "l1": acts.abs().sum(), "l0": (acts != 0).sum().double(),
               "resid_norm": x.norm(dim=-1).sum(), "sq_err": (x - x_hat).pow(2).sum(),
               "sum_x": x.sum(0), "sum_sq": x.pow(2).sum(), "fired": (acts != 0).any(0)}
        old = self.values.get((lang, layer))
        self.values[(lang, layer)] = new if old is None else {
            k: (old[k] | v) if k == "fired" else old[k] + v for k, v in new.items()}

    def metrics(self) -> dict[tuple[str, int], dict[str, float]]:
        out = {}
        for key, v in self.values.items():
            n = float(v["n_tokens"])
            mean = v["sum_x"] / n
            total_dev = float(v["sum_sq"] - n * mean @ mean)
            out[key] = {"mean_act": float(v["mean_act"]) / n, "l1": float(v["l1"]) / n, "l0": float(v["l0"]) / n,
                        "resid_norm": float(v["resid_norm"]) / n, "fvu": float(v["sq_err"]) / total_dev,
                        "feature_coverage": float(v["fired"].float().mean())}
        return out


@torch.inference_mode()
def run_naive(bench: Bench, layers: list[int]) -> Totals:
    """The notebook baseline: for each layer, a full forward with that layer hooked, then that layer's SAE."""
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions

    totals = Totals()
    for layer in layers:
        sae = bench.saes[layer]
        for lang in bench.texts:
            for inputs in sorted_batches(bench, lang):
                keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bench.tokenizer.bos_token_id)
                with ResidualCapture(bench.model, [layer]) as capture:
                    bench.model(**inputs, use_cache=False)
                x = capture.activations[layer][keep]
                acts = sae.encode(x)
                totals.add(lang, layer, x, acts, sae.decode(acts))
    return totals


@torch.inference_mode()
def run_reference(bench: Bench) -> Totals:
    """The unoptimised reference for the equality check: one full forward per batch with every layer hooked, then
    sae-lens's own `encode`/`decode` per layer and float64 totals in plain torch (no mlalign statistics code)."""
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions

    totals = Totals()
    for lang in bench.texts:
        for inputs in sorted_batches(bench, lang):
            keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bench.tokenizer.bos_token_id)
            with ResidualCapture(bench.model, list(bench.saes)) as capture:
                bench.model(**inputs, use_cache=False)
            for layer, sae in bench.saes.items():
                x = capture.activations[layer][keep]
                acts = sae.encode(x)
                totals.add(lang, layer, x, acts, sae.decode(acts))
    return totals


def naive_layers(n_layers: int, measured: int) -> list[int]:
    """`measured` layers spread over the depth (first and last included); all when measured <= 0."""
    if measured <= 0 or measured >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (measured - 1)) for i in range(measured)})


def build_saelens_model(bench: Bench):
    """sae-lens's HookedSAETransformer with a TransformerLens config of the same shape (random weights)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    shape, s = bench.settings.shape, bench.settings
    cfg = HookedTransformerConfig(
        d_model=shape.hidden, d_head=shape.head_dim, n_heads=shape.heads, d_mlp=shape.intermediate,
        n_layers=shape.layers, n_ctx=max(s.max_length, 256), d_vocab=bench.model.config.vocab_size,
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary", rotary_base=10000.0,
        use_attn_scale=True, n_key_value_heads=shape.kv_heads, window_size=4096, use_local_attn=True,
        attn_types=["local", "global"] * (shape.layers // 2) + ["local"] * (shape.layers % 2),
        attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, eps=1e-6, default_prepend_bos=False, dtype=getattr(torch, shape.dtype),
        device=s.device, seed=s.seed, original_architecture="Gemma2ForCausalLM",
    )
    return HookedSAETransformer(cfg).eval()


@torch.inference_mode()
def run_saelens(bench: Bench, tl_model) -> Totals:
    """What most users reach for: every layer's SAE spliced in, `run_with_cache_with_saes(use_error_term=True)`
    (so the model's output is unchanged), then the statistics read from the cache."""
    from mlalign.analysis.engine import analysed_positions

    saes = list(bench.saes.values())
    totals = Totals()
    for lang in bench.texts:
        for inputs in sorted_batches(bench, lang):
            keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bench.tokenizer.bos_token_id)
            _, cache = tl_model.run_with_cache_with_saes(inputs["input_ids"], saes=saes, use_error_term=True,
                                                         attention_mask=inputs["attention_mask"])
            for layer in bench.saes:
                prefix = f"{hook_name(layer)}."
                totals.add(lang, layer, cache[prefix + "hook_sae_input"][keep], cache[prefix + "hook_sae_acts_post"][keep],
                           cache[prefix + "hook_sae_recons"][keep])
            del cache
    return totals


def analysis_metrics(stats) -> dict[tuple[str, int], dict[str, float]]:
    from mlalign.analysis.metrics import compute_metrics

    values = compute_metrics(stats, "token")
    return {(lang, int(layer)): {k: float(v[k]) for k in ("mean_act", "l1", "l0", "resid_norm", "fvu", "feature_coverage")}
            for lang, by_layer in values.items() for layer, v in by_layer.items()}


def compare(analysis: dict, reference: dict) -> dict:
    worst, where = 0.0, None
    for key, ref in reference.items():
        for name, r in ref.items():
            a = analysis[key][name]
            rel = abs(a - r) / max(abs(r), 1e-12)
            if not math.isfinite(a) or rel > worst:
                worst, where = (math.inf if not math.isfinite(a) else rel), f"{key[0]} layer {key[1]} {name}"
    return {"max_rel_diff": worst, "where": where, "tolerance": 1e-5, "passed": worst <= 1e-5,
            "compared": "analysis (collect_stats + compute_metrics) vs run_reference (full hooked forward, sae-lens "
                        "encode/decode, float64 totals in plain torch), every (lang, layer, metric)"}


# --------------------------------------------------------------------------------------------------------------------
# Training steps: mlalign's real objective (ObjectiveFn) on a peft LoRA model, loss=plain vs loss=act_align.


def _project_cfg(overrides: list[str] | None = None):
    """The project's composed config (the same loss and LoRA settings a `task=train` run gets)."""
    from hydra import compose, initialize_config_dir

    import mlalign.config  # noqa: F401  (registers the typed config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def _loss_cfg(**overrides):
    return _project_cfg([f"loss.{key}={value}" for key, value in overrides.items()]).loss


def build_training(bench: Bench):
    import copy

    from accelerate import Accelerator
    from hydra.utils import instantiate
    from peft import get_peft_model

    from mlalign.training.data import ParallelStream, tokenize
    from mlalign.training.loop import ObjectiveFn

    s = bench.settings
    accelerator = Accelerator(cpu=s.device == "cpu", mixed_precision="bf16" if s.shape.dtype == "bfloat16" else "no")
    base = copy.deepcopy(bench.model).float() if s.device == "cpu" else copy.deepcopy(bench.model)
    model = get_peft_model(base, instantiate(_project_cfg().lora, _convert_="all"))
    saes = {layer: sae.float() if s.device == "cpu" else sae for layer, sae in bench.saes.items()}
    targets = [lang for lang in bench.texts if lang != "en"]
    target_ids = {lang: tokenize(bench.tokenizer, bench.texts[lang], s.max_length) for lang in targets}
    reference_ids = {lang: tokenize(bench.tokenizer, bench.texts["en"], s.max_length) for lang in targets}
    stream = ParallelStream(targets, target_ids, reference_ids, int(bench.tokenizer.pad_token_id), s.seed)
    layers = sorted(saes)
    objectives = {
        "plain": ObjectiveFn(_loss_cfg(act_align=0.0, sae_fidelity=0.0, en_retain=0.0), saes, layers,
                             bench.tokenizer.bos_token_id, accelerator),
        # The activation term's own cost (issue: "step-time cost of the activation term against plain LoRA") ...
        "act": ObjectiveFn(_loss_cfg(sae_fidelity=0.0, en_retain=0.0), saes, layers, bench.tokenizer.bos_token_id,
                           accelerator),
        # ... and the full default objective: the SAE-fidelity term adds a frozen forward on the target batch and an
        # adapted English forward, KL retention a graph-keeping English forward + backward.
        "full": ObjectiveFn(_loss_cfg(), saes, layers, bench.tokenizer.bos_token_id, accelerator),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return accelerator, model, optimizer, params, stream, objectives, s.train_batch_size


def train_step(training, name: str, index: int) -> None:
    """One optimizer step as `train_loop` takes it: objective, backward, clip, step, zero_grad."""
    accelerator, model, optimizer, params, stream, objectives, batch_size = training
    batch = stream.batch(index, batch_size, accelerator.device)
    objective = objectives[name]
    total = objective(model, batch).total if not callable(getattr(objective, "bare", None)) else objective.bare(model, batch)
    accelerator.backward(total)
    accelerator.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class BarePlainObjective:
    """Plain LoRA's objective built from mlalign's loss function alone (target-language cross-entropy): the fallback
    when `ObjectiveFn(loss=plain)` cannot run."""

    def bare(self, model, batch):
        from mlalign.training.losses import lm_cross_entropy

        logits = model(**batch.target, use_cache=False).logits
        return lm_cross_entropy(logits, batch.target["input_ids"], batch.target["attention_mask"])


def usable_objectives(training) -> dict[str, str]:
    """Try one step of each objective; replace one that fails by the bare plain step (plain) or drop it, and say why."""
    notes = {}
    objectives = training[5]
    embed = training[1].get_input_embeddings()
    for name in list(objectives):
        try:
            passes = []
            handle = embed.register_forward_hook(lambda *_: passes.append(1))
            try:
                train_step(training, name, 0)
            finally:
                handle.remove()
            notes[name] = (f"mlalign.training.loop.ObjectiveFn({_OBJECTIVE_LOSS[name]}): "
                           f"{len(passes)} model forward passes per micro-batch")
        except Exception as err:  # noqa: BLE001 - the training code is young; the benchmark reports, not crashes
            why = f"ObjectiveFn({_OBJECTIVE_LOSS[name]}) failed: {type(err).__name__} {err}".strip()
            print(why, flush=True)
            training[2].zero_grad(set_to_none=True)
            if name == "plain":
                objectives[name] = BarePlainObjective()
                train_step(training, name, 0)
                notes[name] = f"fallback: forward + mlalign.training.losses.lm_cross_entropy ({why})"
            else:
                del objectives[name]
                notes[name] = f"not measured ({why})"
    return notes


_OBJECTIVE_LOSS = {"plain": "loss=plain", "act": "loss=act_align loss.sae_fidelity=0 loss.en_retain=0",
                   "full": "loss=act_align"}


# --------------------------------------------------------------------------------------------------------------------
# Measurement helpers.


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the start of the block: CUDA allocator peak on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            self.peak_abs_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_mb = (self.peak - self.start) / 2**20
        self.peak_abs_mb = self.peak / 2**20


def timed(device: str, fn, *args):
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, out


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that it covers only what follows; False where that is unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_probe(settings: Settings, n_sentences: int) -> dict:
    """Run in a fresh process: build the benchmark, analyse `n_sentences` (spread over the languages), report the
    peak RSS of the analysis alone (the build's own peak, e.g. BPE training, is cleared first)."""
    per_lang = max(1, n_sentences // len(settings.langs))
    settings = replace(settings, max_length=settings.rss_max_length)
    bench = build_bench(settings, per_lang=per_lang)
    gc.collect()
    before = _rss_bytes()
    with PeakMemory("cpu") as sampled:  # a second opinion where VmHWM cannot be reset
        reset = _reset_peak_rss()
        run_analyze(bench)
    peak = _peak_rss_bytes() if reset else sampled.peak
    return {"sentences": per_lang * len(settings.langs), "tokens": bench.n_tokens, "rss_before_mb": before / 2**20,
            "peak_rss_mb": peak / 2**20, "peak_source": "VmHWM after clear_refs" if reset else "sampled every 2 ms"}


def run_rss_probes(args, settings: Settings) -> dict:
    results = []
    for n in settings.rss_sentences:
        cmd = [sys.executable, "-m", "mlalign.bench", "--rss-probe", str(n), "--device", args.device,
               "--shape", args.shape, "--threads", str(settings.threads)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"RSS probe for {n} sentences failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = results
    return {"small": small, "large": large,
            "rss_growth_pct": 100.0 * (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"],
            "growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"]}


# --------------------------------------------------------------------------------------------------------------------


def set_threads(requested: int, device: str) -> int:
    """Intra-op threads: 1 on a CPU by default. The benchmark's matrices are small (256 wide); on a shared 2-core box
    two threads spin-wait on each other and on other jobs, which makes medians noisy and often slower."""
    threads = requested if requested > 0 else (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def run_benchmark(args) -> dict:
    settings = settings_from_args(args)
    settings.threads = set_threads(args.threads, args.device)
    s = settings
    print(f"benchmark: shape={s.shape.name} device={s.device} torch {torch.__version__} threads={s.threads} "
          f"langs={len(s.langs)} sentences/lang={s.sentences_per_lang} repeats={s.repeats}", flush=True)
    started = time.perf_counter()
    bench = build_bench(settings)
    print(f"built: {bench.n_tokens} analysed tokens, {s.shape.layers} layers, SAE width {s.shape.sae_width} "
          f"({time.perf_counter() - started:.1f}s)", flush=True)

    tl_model, saelens_error = None, None
    try:
        tl_model = build_saelens_model(bench)
    except Exception as err:  # a peer that cannot be built is a finding, not a crash
        saelens_error = f"{type(err).__name__}: {err}"
        print(f"sae-lens HookedSAETransformer could not be built: {saelens_error}", flush=True)

    # Warm-up (allocator, lazy inits) and the equality check.
    run_forward(bench)
    run_trunk(bench)
    stats = run_analyze(bench)
    equality = compare(analysis_metrics(stats), run_reference(bench).metrics())
    print(f"equality: max relative difference {equality['max_rel_diff']:.2e} ({equality['where']}) -> "
          f"{'ok' if equality['passed'] else 'FAILED'}", flush=True)
    if tl_model is not None:
        try:
            run_saelens(bench, tl_model)
        except Exception as err:
            saelens_error = f"{type(err).__name__}: {err}"
            print(f"sae-lens run_with_cache_with_saes failed: {saelens_error}", flush=True)
            tl_model = None

    # Every naive pass is the same work (a full forward plus one layer's SAE), so its time is linear in the number of
    # layers: timing a spread of them and scaling is exact up to noise, and keeps the benchmark to minutes.
    measured_layers = naive_layers(s.shape.layers, s.naive_layers)
    scale = s.shape.layers / len(measured_layers)
    times: dict[str, list[float]] = {"forward_s": [], "trunk_s": [], "analyze_s": [], "naive_s": [], "saelens_s": []}
    peaks: dict[str, list[float]] = {"analyze_peak_mb": [], "saelens_peak_mb": [], "analyze_peak_abs_mb": [],
                                     "saelens_peak_abs_mb": []}
    for repeat in range(s.repeats):
        times["forward_s"].append(timed(s.device, run_forward, bench)[0])
        times["trunk_s"].append(timed(s.device, run_trunk, bench)[0])
        with PeakMemory(s.device) as mem:
            times["analyze_s"].append(timed(s.device, run_analyze, bench)[0])
        peaks["analyze_peak_mb"].append(mem.peak_mb)
        peaks["analyze_peak_abs_mb"].append(mem.peak_abs_mb)
        if tl_model is not None:
            with PeakMemory(s.device) as mem:
                times["saelens_s"].append(timed(s.device, run_saelens, bench, tl_model)[0])
            peaks["saelens_peak_mb"].append(mem.peak_mb)
            peaks["saelens_peak_abs_mb"].append(mem.peak_abs_mb)
        if repeat < s.naive_repeats:
            times["naive_s"].append(scale * timed(s.device, run_naive, bench, measured_layers)[0])
        print(f"repeat {repeat + 1}/{s.repeats}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in times.items() if v),
              flush=True)
    del tl_model
    gc.collect()

    training = build_training(bench)
    step_impl = usable_objectives(training)  # also the warm-up step of each
    names = {"plain_step_s": "plain", "act_step_s": "act", "full_step_s": "full"}
    steps = {key: [] for key in names}
    for step in range(s.train_steps):
        for key, name in names.items():
            if name in training[5]:
                steps[key].append(timed(s.device, train_step, training, name, step + 1)[0])
    del training
    gc.collect()

    rss = run_rss_probes(args, settings) if not args.no_rss else None

    med = {k: statistics.median(v) if v else None for k, v in {**times, **steps}.items()}
    peak = {k: statistics.median(v) if v else None for k, v in peaks.items()}

    def ratio(a, b):
        return None if med.get(a) is None or med.get(b) is None else med[a] / med[b]

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(s.device),
        "torch": torch.__version__,
        "torch_threads": s.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "settings": {**{k: v for k, v in asdict(s).items() if k != "shape"}, "shape": asdict(s.shape)},
        "analysed_tokens": bench.n_tokens,
        "sentences": sum(len(t) for t in bench.texts.values()),
        **med,
        "tokens_per_s": {"forward": bench.n_tokens / med["forward_s"], "analyze": bench.n_tokens / med["analyze_s"]},
        "analyze_over_forward": ratio("analyze_s", "forward_s"),
        "analyze_over_trunk": ratio("analyze_s", "trunk_s"),
        "naive_layers_timed": measured_layers,
        "naive_over_analyze": ratio("naive_s", "analyze_s"),
        "saelens_over_analyze": ratio("saelens_s", "analyze_s"),
        "act_over_plain_step": ratio("act_step_s", "plain_step_s"),
        "full_over_plain_step": ratio("full_step_s", "plain_step_s"),
        **peak,
        "rss_growth_pct": None if rss is None else rss["rss_growth_pct"],
        "rss": rss,
        "saelens_error": saelens_error,
        "train_step_impl": step_impl,
        "equality": equality,
        "raw": {**times, **steps, **peaks},
        "total_s": time.perf_counter() - started,
    }
    if s.shape.name == "gemma2-2b":
        result["whole_corpus_10_langs_estimate_s"] = 10 * 1004 * (bench.n_tokens / sum(
            len(t) for t in bench.texts.values())) / result["tokens_per_s"]["analyze"]
    return result


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"cpu: {platform.processor()}"


TARGETS = {"analyze_over_forward": ("<=", 1.2), "naive_over_analyze": (">=", 15), "saelens_over_analyze": (">=", 2.5),
           "act_over_plain_step": ("<=", 1.3), "rss_growth_pct": ("<=", 10)}


def print_table(result: dict) -> None:
    print(f"\n{result['device']} | torch {result['torch']} | threads {result['torch_threads']} | "
          f"{result['analysed_tokens']} tokens, {result['sentences']} sentences | load {result['load_avg_1m']:.1f}")
    rows = [("forward_s", "plain forward, no hooks (floor)"),
            ("trunk_s", "decoder layers only (no LM head)"), ("analyze_s", "mlalign collect_stats, all layers"),
            ("naive_s", "naive: one hooked full pass per layer"), ("saelens_s", "sae-lens run_with_cache_with_saes"),
            ("plain_step_s", "LoRA step, loss=plain (CE)"), ("act_step_s", "LoRA step, CE + act_align"),
            ("full_step_s", "LoRA step, default objective (+ SAE fidelity + KL retention)")]
    for key, label in rows:
        value = result.get(key)
        print(f"  {key:<22} {_fmt(value):>9}  {label}")
    print(f"  {'full_over_plain_step':<22} {_fmt(result.get('full_over_plain_step')):>9}  (default objective, KL retention)")
    print(f"  {'analyze_peak_mb':<22} {_fmt(result.get('analyze_peak_mb')):>9}  peak memory above start")
    print(f"  {'saelens_peak_mb':<22} {_fmt(result.get('saelens_peak_mb')):>9}")
    if result.get("rss"):
        rss = result["rss"]
        print(f"  peak RSS of the analysis: {rss['small']['peak_rss_mb']:.0f} MB ({rss['small']['sentences']} sentences) "
              f"vs {rss['large']['peak_rss_mb']:.0f} MB ({rss['large']['sentences']})")
    for key, (op, target) in TARGETS.items():
        value = result.get(key)
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        print(f"  {key:<22} {_fmt(value):>9}  target {op} {target}: {'n/a' if met is None else 'met' if met else 'MISSED'}")
    eq = result["equality"]
    print(f"  equality vs reference: max rel diff {eq['max_rel_diff']:.2e} -> {'ok' if eq['passed'] else 'FAILED'}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:9.3f}"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m mlalign.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and corpus (seconds), for the test suite")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shape", default="cpu", choices=[k for k in SHAPES if k != "quick"])
    parser.add_argument("--sentences", type=int, default=26, help="sentences per language (10 languages; 26 = ~15k tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1, help="the naive path is ~26x slower: fewer repeats")
    parser.add_argument("--naive-layers", type=int, default=2, help="layers the naive path is timed on (0: all)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: 1 on cpu)")
    parser.add_argument("--no-rss", action="store_true", help="skip the 100 vs 1000 sentence RSS subprocesses")
    parser.add_argument("--out", default="outputs/bench/latest.json")
    parser.add_argument("--rss-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rss_probe:
        settings = settings_from_args(args)
        settings.threads = set_threads(args.threads, args.device)
        print(json.dumps(rss_probe(settings, args.rss_probe)))
        return None
    result = run_benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print_table(result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
