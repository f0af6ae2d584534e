"""task=train_saes: one JumpReLU SAE per layer for any model, trained on the corpus's train split with a language mix,
written where sae=local reads it, with a held-out fidelity table (FVU, L0, dead features per layer and language)."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlalign.analysis.capture import ResidualCapture
from mlalign.analysis.engine import analysed_positions, pad_batch
from mlalign.config import SAETrainConfig, typed
from mlalign.data.corpus import ParallelCorpus, load_corpus
from mlalign.errors import UserError
from mlalign.io import write_atomic, write_dir_atomic, write_json_atomic, write_text_atomic
from mlalign.saes.loading import SEED_FOLDER, load_sae_folder, seed_folder
from mlalign.saes.training import TRAINER_MODULE, SAETrainSettings, default_lr, fidelity, train_sae

log = logging.getLogger(__name__)

OBJECTIVE = "mean_fvu"
LANG_MIXES = ("balanced", "english_heavy")
TASK_MAX_LR = 3e-2
"""Cap of the default learning rate; above it the reconstruction diverges on the testbed."""
BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED_STRIDE = 1000
"""SAE seed s of layer L draws from torch seed `seed + L + SEED_STRIDE * s` (s = 0 is the single-seed run's SAE)."""
OVERRIDABLE = ("epochs", "steps", "lr", "threshold_travel", "l0_coefficient", "target_l0", "pre_act_loss_coefficient",
               "dead_window")
"""The recipe keys `sae_train.layer_overrides` may set per depth; the width, the data, the mix and the seeds stay one
per run (the fidelity table and the analysis compare layers on the same footing)."""


def split_parts(source: str, split: str) -> set[str]:
    """The disjoint pieces of text a split names (`mlalign.data.corpus.split_parts`; the same for every source)."""
    from mlalign.data.corpus import split_parts as parts

    return parts(split)


def check_settings(cfg) -> None:
    """Everything a user can get wrong, before any model loads."""
    st, splits, source = cfg.sae_train, cfg.data.splits, cfg.data.source
    train_parts = split_parts(source, splits.train)
    for role in ("analysis", "valid"):
        shared = train_parts & split_parts(source, splits[role])
        if shared:
            what = "analysed" if role == "analysis" else "held out for the fidelity table"
            raise UserError(f"data.splits.train={splits.train} overlaps data.splits.{role}={splits[role]}, the split "
                            f"{what}: SAEs must never train on it. Use e.g. data.splits.train=train "
                            f"data.splits.{role}={'test' if role == 'analysis' else 'dev'}")
    if st.width is not None and int(st.width) <= 0:
        raise UserError(f"sae_train.width={st.width} must be a positive number of features, e.g. sae_train.width=512 "
                        f"(or null for sae_train.width_multiple={st.width_multiple} x the hidden size)")
    if int(st.width_multiple) <= 0:
        raise UserError(f"sae_train.width_multiple={st.width_multiple} must be a positive number of features per "
                        f"residual dimension, e.g. 2")
    if int(st.batch_size) <= 0 or int(st.capture_batch_size) <= 0:
        raise UserError("sae_train.batch_size and sae_train.capture_batch_size must be positive, e.g. 256 and 16")
    if int(st.tokens) < int(st.batch_size):
        raise UserError(f"sae_train.tokens={st.tokens} is fewer than one SAE minibatch (sae_train.batch_size="
                        f"{st.batch_size}); give at least that many, e.g. sae_train.tokens=100000")
    if st.lang_mix not in LANG_MIXES:
        raise UserError(f"unknown sae_train.lang_mix={st.lang_mix!r}; use sae_train.lang_mix=balanced or english_heavy")
    _check_recipe(st)
    _check_overrides(st)
    if str(st.buffer_dtype) not in BUFFER_DTYPES:
        raise UserError(f"unknown sae_train.buffer_dtype={st.buffer_dtype!r}; use sae_train.buffer_dtype=float32 or "
                        f"bfloat16")
    if int(st.seeds) < 1:
        raise UserError(f"sae_train.seeds={st.seeds} must be >= 1 SAE per layer, e.g. sae_train.seeds=3")
    if int(st.spliced_sentences) < 0:
        raise UserError(f"sae_train.spliced_sentences={st.spliced_sentences} must be >= 0 (0 skips the spliced-in "
                        f"LM loss), e.g. sae_train.spliced_sentences=16")


def _check_recipe(st) -> None:
    """The recipe values a user can get wrong: run on `sae_train` and on it with each `layer_overrides` entry applied."""
    if st.steps is None and not float(st.epochs) > 0:
        raise UserError(f"sae_train.epochs={st.epochs} must be > 0 (or set sae_train.steps=N)")
    if st.steps is not None and int(st.steps) <= 0:
        raise UserError(f"sae_train.steps={st.steps} must be positive (or null to derive it from sae_train.epochs)")
    if st.lr is None and not float(st.threshold_travel) > 0:
        raise UserError(f"sae_train.threshold_travel={st.threshold_travel} must be > 0, e.g. 2.4 (or set sae_train.lr)")
    if st.target_l0 is not None and not float(st.target_l0) > 0:
        raise UserError(f"sae_train.target_l0={st.target_l0} must be > 0 features per token, or null")
    if not float(st.pre_act_loss_coefficient) >= 0:
        raise UserError(f"sae_train.pre_act_loss_coefficient={st.pre_act_loss_coefficient} must be >= 0, e.g. 0.1")
    if st.dead_window is not None and int(st.dead_window) < 1:
        raise UserError(f"sae_train.dead_window={st.dead_window} must be >= 1 step (or null for half the run)")


def _check_overrides(st) -> None:
    """`sae_train.layer_overrides`: well-formed layer keys, each layer named once, recipe keys only, sound values."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = getattr(st, "layer_overrides", None)
    for spec, values in layer_override_entries(raw):
        try:
            _check_recipe(OmegaConf.merge(st, values) if OmegaConf.is_config(st) else dataclasses.replace(st, **values))
        except (UserError, OmegaConfBaseException, ValueError, TypeError) as err:
            message = str(err).splitlines()[0]
            raise UserError(f"sae_train.layer_overrides[{spec!r}]: {message}") from None
    layer_overrides(raw)


def layer_override_entries(raw) -> list[tuple[str, dict]]:
    """`sae_train.layer_overrides` as written: [(layer spec, {recipe key: value})], every key checked to be one of
    `OVERRIDABLE`."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else (raw or {})
    if not isinstance(raw, dict):
        raise UserError(f"sae_train.layer_overrides={raw!r} must map layers to recipe values, e.g. "
                        f"sae_train.layer_overrides={{15-17:{{target_l0:128}}}}")
    entries = []
    for spec, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise UserError(f"sae_train.layer_overrides[{str(spec)!r}]={values!r} must be recipe values, e.g. "
                            f"{{target_l0: 128}}")
        unknown = sorted(set(map(str, values)) - set(OVERRIDABLE))
        if unknown:
            raise UserError(f"sae_train.layer_overrides[{str(spec)!r}] sets {', '.join(unknown)}, which is one per "
                            f"run; a layer may override only {', '.join(OVERRIDABLE)}")
        entries.append((str(spec), dict(values)))
    return entries


def _layer_spec(spec: str) -> list[int]:
    """"7" -> [7]; "15-17" -> [15, 16, 17]."""
    first, _, last = spec.strip().partition("-")
    try:
        first_layer, last_layer = int(first), int(last or first)
    except ValueError:
        first_layer = last_layer = -1
    if first_layer < 0 or last_layer < first_layer:
        raise UserError(f"sae_train.layer_overrides key {spec!r} is neither a layer nor a range of layers; write e.g. "
                        f"\"1\" or \"15-17\"")
    return list(range(first_layer, last_layer + 1))


def layer_overrides(raw) -> dict[int, dict]:
    """{layer: {recipe key: value}} from `sae_train.layer_overrides` (ranges expanded); a layer named twice is an
    error."""
    out: dict[int, dict] = {}
    for spec, values in layer_override_entries(raw):
        for layer in _layer_spec(spec):
            if layer in out:
                raise UserError(f"layer {layer} is named twice in sae_train.layer_overrides (again in {spec!r}); give "
                                f"each layer one entry")
            out[layer] = values
    return out


def layer_settings(st: SAETrainConfig, layer: int) -> SAETrainConfig:
    """The settings layer `layer`'s SAEs train with: `st` with that layer's `layer_overrides` entry applied."""
    import dataclasses

    values = layer_overrides(getattr(st, "layer_overrides", None)).get(int(layer))
    return dataclasses.replace(st, **values) if values else st

def mix_weights(lang_mix: str, langs: list[str], english_heavy_weights) -> dict[str, float]:
    """Each language's share of the activation tokens, summing to 1."""
    if lang_mix == "balanced":
        return {lang: 1 / len(langs) for lang in langs}
    weights = dict(english_heavy_weights or {})
    missing = [lang for lang in langs if lang not in weights]
    if missing:
        raise UserError(f"sae_train.english_heavy_weights has no weight for {', '.join(missing)}; add one, e.g. "
                        f"'sae_train.english_heavy_weights.{missing[0]}=0.04'")
    bad = [lang for lang in langs if not float(weights[lang]) > 0]
    if bad:
        raise UserError(f"sae_train.english_heavy_weights.{bad[0]}={weights[bad[0]]} must be > 0 (or drop the "
                        f"language from langs)")
    total = sum(float(weights[lang]) for lang in langs)
    return {lang: float(weights[lang]) / total for lang in langs}


def token_quotas(weights: dict[str, float], tokens: int) -> dict[str, int]:
    """Split `tokens` by `weights` into integers that sum to `tokens` (largest remainders first)."""
    exact = {lang: weights[lang] * tokens for lang in weights}
    quotas = {lang: int(math.floor(value)) for lang, value in exact.items()}
    for lang in sorted(exact, key=lambda lang: quotas[lang] - exact[lang])[: tokens - sum(quotas.values())]:
        quotas[lang] += 1
    empty = [lang for lang, quota in quotas.items() if quota == 0]
    if empty:
        raise UserError(f"sae_train.tokens={tokens} leaves no tokens for {', '.join(empty)} under this mix; "
                        f"raise sae_train.tokens")
    return quotas


def _kept_count(ids: list[int], bos_id: int | None) -> int:
    return len(ids) - (1 if ids and bos_id is not None and ids[0] == bos_id else 0)


@torch.inference_mode()
def capture_language(model, tokenizer, sentences: list[str], layers: list[int], max_length: int, batch_size: int,
                     quota: int | None = None, rng: np.random.Generator | None = None,
                     desc: str = "", progress: bool = True, dtype: torch.dtype = torch.float32
                     ) -> dict[int, torch.Tensor]:
    """Residuals `{layer: [tokens, hidden]}` (`dtype`, CPU) at every position but BOS and padding, one forward pass
    per batch for all `layers`, stopped after the last of them (the LM head never runs). With `quota`, sentences are
    taken in `rng`'s random order until that many tokens are in (the last sentence's surplus is cut), else all of them
    in order.
    Why 11 parameters: the options travel in pairs (quota with rng, desc with progress) and experiments/
    gemma3_270m_saes's scripts call it by these names; a settings object would buy one line."""
    from tqdm.auto import tqdm

    encoded = tokenizer(list(sentences), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    bos_id = tokenizer.bos_token_id
    order = list(range(len(encoded))) if rng is None else list(rng.permutation(len(encoded)))
    if quota is not None:
        counts = np.cumsum([_kept_count(encoded[i], bos_id) for i in order])
        order = order[: int(np.searchsorted(counts, quota)) + 1]
    chosen = sorted(order, key=lambda i: (len(encoded[i]), i))  # similar lengths per batch: little padding
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        with ResidualCapture(model, layers, detach=True, stop_after_last=True) as capture:
            starts = range(0, len(chosen), batch_size)
            for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
                inputs = pad_batch([list(encoded[i]) for i in chosen[start:start + batch_size]], pad_id, "right", device)
                flat = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bos_id).flatten()
                flat = flat.nonzero().squeeze(1)
                for layer, hidden in capture.forward(**inputs, use_cache=False).items():
                    chunks[layer].append(hidden.flatten(0, 1).index_select(0, flat).to(dtype).cpu())
    finally:
        model.train(was_training)
    acts = {layer: torch.cat(parts) if parts else torch.empty(0, 0) for layer, parts in chunks.items()}
    return {layer: x[:quota] for layer, x in acts.items()} if quota is not None else acts


def collect_training_activations(model, tokenizer, corpus: ParallelCorpus, quotas: dict[str, int], layers: list[int],
                                 max_length: int, batch_size: int, rng: np.random.Generator, progress: bool = True,
                                 dtype: torch.dtype = torch.float32):
    """Every language's quota of residual positions, languages stacked: `(acts {layer: [rows, hidden]}, index or
    None, info)`. A language whose text runs out is repeated through `index` (rows of acts, one per training token)
    rather than by copying its rows, so the mix holds without a second forward pass."""
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    index_parts, unique, offset, repeated = [], {}, 0, False
    for lang, quota in quotas.items():
        acts = capture_language(model, tokenizer, corpus[lang], layers, max_length, batch_size, quota=quota, rng=rng,
                                desc=f"activations {lang}", progress=progress, dtype=dtype)
        n = len(acts[layers[0]])
        if n == 0:
            raise UserError(f"the train split has no tokens for {lang}; check data.path or drop {lang} from langs")
        unique[lang] = n
        for layer in layers:
            per_layer[layer].append(acts[layer])
        rows = torch.arange(offset, offset + n)
        if n < quota:
            repeated = True
            log.warning("%s's train text holds %d tokens, fewer than its share %d: they are repeated to keep the mix",
                        lang, n, quota)
            extra = rows[torch.from_numpy(rng.permutation(n)[: quota % n])]
            rows = torch.cat([rows.repeat(quota // n), extra])
        index_parts.append(rows)
        offset += n
    acts = {layer: torch.cat(parts) for layer, parts in per_layer.items()}
    info = {"tokens_per_lang": dict(quotas), "unique_tokens_per_lang": unique,
            "repeated_langs": [lang for lang in quotas if unique[lang] < quotas[lang]]}
    return acts, (torch.cat(index_parts) if repeated else None), info


def _round(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def fidelity_markdown(table: dict, langs: list[str], header: str) -> str:
    def num(value, fmt):
        return "n/a" if value is None else fmt.format(value)

    lines = [header, "", "Spliced ΔLM loss: the model's next-token loss (nats/token) with the layer's residual replaced "
             "by the SAE's reconstruction, minus the clean loss.", "",
             "| layer | FVU | L0 | L0 % of width | dead % | spliced ΔLM loss |", "| --- | --- | --- | --- | --- | --- |"]
    for layer, row in table.items():
        lines.append(f"| {layer} | {row['fvu']:.4f} | {row['l0']:.1f} | {row['l0_pct']:.2f} | {row['dead_pct']:.1f} "
                     f"| {num(row.get('spliced_dlm_loss'), '{:+.4f}')} |")
    for key, name, fmt in (("fvu", "FVU", "{:.4f}"), ("l0", "L0", "{:.1f}"),
                           ("spliced_dlm_loss", "Spliced ΔLM loss", "{:+.4f}")):
        if key == "spliced_dlm_loss" and all(row.get(key) is None for row in table.values()):
            continue
        lines += ["", f"{name} per language (held-out text):", "",
                  "| layer | " + " | ".join(langs) + " |", "| --- |" + " --- |" * len(langs)]
        for layer, row in table.items():
            lines.append(f"| {layer} | " + " | ".join(num(row["per_lang"][lang].get(key), fmt) for lang in langs)
                         + " |")
    return "\n".join(lines) + "\n"


def plot_fidelity(table: dict, langs: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(layer) for layer in table]
    panels = [("fvu", "FVU (fraction of variance unexplained)"), ("l0", "L0 (features firing per token)")]
    if all(row.get("spliced_dlm_loss") is not None for row in table.values()):
        panels.append(("spliced_dlm_loss", "spliced-in ΔLM loss (nats/token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    colors = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes, panels):
        for k, lang in enumerate(langs):
            ax.plot(layers, [table[str(layer)]["per_lang"][lang][key] for layer in layers], marker="o", markersize=2.5,
                    linewidth=1.2, color=colors(k % 10), label=lang, alpha=0.85)
        ax.plot(layers, [table[str(layer)][key] for layer in layers], color="black", linewidth=2.4, label="all")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=150))
    plt.close(fig)
    return path


def fidelity_scalars(table: dict) -> dict[str, float]:
    """W&B summary values with stable names: `layer_<L>/<fvu|l0|l0_pct|dead_pct|spliced_dlm_loss>` and
    `layer_<L>/<lang>/<fvu|l0|spliced_dlm_loss>`."""
    out = {}
    for layer, row in table.items():
        out.update({f"layer_{layer}/{key}": float(row[key])
                    for key in ("fvu", "l0", "l0_pct", "dead_pct", "spliced_dlm_loss") if row.get(key) is not None})
        for lang, values in row.get("per_lang", {}).items():
            out.update({f"layer_{layer}/{lang}/{key}": float(values[key]) for key in ("fvu", "l0", "spliced_dlm_loss")
                        if values.get(key) is not None})
    return out


def seed_dir(out_dir: Path, seed_index: int, seeds: int) -> Path:
    """Where SAE seed `seed_index`'s layer folders go: `saes/` for a single-seed run, else `saes/seed_<s>/`."""
    return out_dir if seeds == 1 else seed_folder(out_dir, seed_index)


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def spliced_fidelity(model, tokenizer, valid: ParallelCorpus, langs: list[str], saes: dict[int, object],
                     sentences: int, max_length: int, batch_size: int, device) -> dict[int, dict]:
    """{layer: {"spliced_dlm_loss": pooled, "clean_lm_loss": pooled, "per_lang": {lang: {...}}}}: the mean over
    held-out sentences of (loss with the layer's residual replaced by the SAE's reconstruction - clean loss), in
    nats/token, each language on its first `sentences` sentences of the valid split; pooled = over all of them."""
    from tqdm.auto import tqdm

    from mlalign.analysis.spliced import clean_and_spliced_loss, token_batches

    layers = sorted(saes)
    per_lang, pooled_clean, pooled_delta = {}, [], {layer: [] for layer in layers}
    for lang in tqdm(langs, desc="spliced-in loss", unit="language", leave=False):
        batches = token_batches(tokenizer, list(valid[lang][:sentences]), batch_size, max_length)
        clean, spliced = clean_and_spliced_loss(model, saes, batches, layers, device=device)
        per_lang[lang] = {layer: (spliced[layer] - clean) for layer in layers}
        pooled_clean.append(clean)
        for layer in layers:
            pooled_delta[layer].append(spliced[layer] - clean)
    clean_all = np.concatenate(pooled_clean)
    out = {}
    for layer in layers:
        delta = np.concatenate(pooled_delta[layer])
        out[layer] = {
            "spliced_dlm_loss": _round(float(np.nanmean(delta))),
            "clean_lm_loss": _round(float(np.nanmean(clean_all))),
            "spliced_sentences": int(np.isfinite(delta).sum()),
            "per_lang": {lang: {"spliced_dlm_loss": _round(float(np.nanmean(per_lang[lang][layer])))}
                         for lang in langs},
        }
    return out


def _seed_record(overall: dict, per_lang: dict, torch_seed: int, seconds: float) -> dict:
    return {
        "fvu": _round(overall["fvu"]), "l0": _round(overall["l0"]), "l0_pct": _round(overall["l0_pct"]),
        "dead_pct": _round(overall["dead_pct"]), "heldout_tokens": overall["tokens"], "torch_seed": torch_seed,
        "train_seconds": round(seconds, 2),
        "per_lang": {lang: {"fvu": _round(s["fvu"]), "l0": _round(s["l0"]), "tokens": s["tokens"]}
                     for lang, s in per_lang.items()},
    }


def layer_record(seed_records: list[dict], width: int, langs: list[str]) -> dict:
    """One layer's fidelity.json record: a single seed's record as it is, or with several SAE seeds the mean of each
    headline value (FVU, L0, dead %, spliced-in loss; per language too), `seed_range` [min, max] of each, and
    `seeds` holding every seed's own record."""
    if len(seed_records) == 1:
        return {**seed_records[0], "width": width}
    keys = ("fvu", "l0", "l0_pct", "dead_pct", "spliced_dlm_loss")

    def mean_of(key, records):
        value = _mean_or_none([r.get(key) for r in records])
        return None if value is None else _round(value)

    record = {key: mean_of(key, seed_records) for key in keys}
    record["seed_range"] = {key: [min(r[key] for r in seed_records), max(r[key] for r in seed_records)]
                            for key in keys if all(r.get(key) is not None for r in seed_records)}
    record.update({"width": width, "heldout_tokens": seed_records[0]["heldout_tokens"],
                   "clean_lm_loss": seed_records[0].get("clean_lm_loss")})
    record["per_lang"] = {lang: {**{key: mean_of(key, [r["per_lang"][lang] for r in seed_records])
                                    for key in ("fvu", "l0", "spliced_dlm_loss")},
                                 "tokens": seed_records[0]["per_lang"][lang]["tokens"]} for lang in langs}
    record["seeds"] = {str(s): r for s, r in enumerate(seed_records)}
    return record


@dataclass
class _Job:
    """One task=train_saes run: its typed settings, what the SAEs train and are scored on, the recipe every SAE
    shares, and where they go."""

    st: SAETrainConfig
    layers: list[int]
    langs: list[str]
    weights: dict[str, float]
    quotas: dict[str, int]
    train: ParallelCorpus
    valid: ParallelCorpus
    out_dir: Path
    recipe: SAETrainSettings | None = None
    """The run's recipe (`sae_train` as given); `recipes[layer]` applies that layer's `layer_overrides`."""
    recipes: dict[int, SAETrainSettings] | None = None


def run(cfg, ctx) -> dict[str, float]:
    """recipe -> training and held-out activations -> one SAE per layer and seed, each scored on held-out text ->
    spliced-in LM loss -> fidelity.json/.md/.png and train_data.json -> the console's and the tracker's report."""
    from mlalign.models import num_layers

    check_settings(cfg)
    st = typed(cfg.sae_train, SAETrainConfig)
    layers, langs = ctx.layers(), ctx.langs
    weights = mix_weights(str(st.lang_mix), langs, st.english_heavy_weights)
    quotas = token_quotas(weights, int(st.tokens))
    job = _Job(st, layers, langs, weights, quotas, load_corpus(cfg.data, langs, cfg.data.splits.train),
               load_corpus(cfg.data, langs, cfg.data.splits.valid), ctx.run_dir / "saes")
    started = time.perf_counter()
    model, tokenizer = ctx.load_model(), ctx.load_tokenizer()
    ctx.layers(num_layers(model))  # the config's layer count must match the weights
    job.recipe = sae_recipe(cfg, job, model)
    job.recipes = {layer: sae_recipe(cfg, job, model, layer) for layer in layers}
    acts, index, data_info, heldout = _capture(cfg, job, model, tokenizer)
    seconds = {"activations": round(time.perf_counter() - started, 2)}
    records, trained, seconds["training"], kept = _train_saes(cfg, job, acts, index, heldout)
    seconds.update(_add_spliced(cfg, job, model, tokenizer, trained, records))
    table = {str(layer): layer_record(records[layer], job.recipe.width, langs) for layer in job.layers}
    for layer, values in _trained_overrides(job).items():
        table[str(layer)]["layer_overrides"] = values
    n_saes = len(job.layers) * int(st.seeds)
    seconds["total"] = round(time.perf_counter() - started, 2)
    seconds["training_per_sae"] = round(seconds["training"] / max(1, n_saes - kept), 2)  # over the SAEs it trained
    data_info = {**data_info, "saes_kept_from_an_earlier_try": kept}  # their training time is in their own records
    if "spliced" in seconds:
        seconds["spliced_per_sae"] = round(seconds["spliced"] / n_saes, 2)
    markdown = _write_outputs(cfg, job, table, records, data_info, seconds)
    _report(cfg, ctx, job, table, markdown)
    return _results(table, seconds)


def sae_recipe(cfg, job: _Job, model, layer: int | None = None) -> SAETrainSettings:
    """The run's recipe (width, steps, learning rate, penalties, device), or with `layer` that layer's (its
    `layer_overrides` entry applied: the same settings when it has none); each said on the console."""
    from mlalign.console import emit
    from mlalign.models import hidden_size

    st = job.st if layer is None else layer_settings(job.st, layer)
    if layer is not None and st is job.st:
        return job.recipe
    width = int(st.width) if st.width is not None else int(st.width_multiple) * hidden_size(model)
    if st.target_l0 is not None and float(st.target_l0) > width:
        raise UserError(f"sae_train.target_l0={st.target_l0} exceeds the width {width}; choose a smaller target")
    steps = int(st.steps) if st.steps is not None else max(1, math.ceil(float(st.epochs) * int(st.tokens) / int(st.batch_size)))
    lr = float(st.lr) if st.lr is not None else default_lr(steps, float(st.threshold_travel), max_lr=TASK_MAX_LR)
    if layer is None:
        emit(f"training {len(job.layers)} x {int(st.seeds)} SAE(s) of {width} features on {int(st.tokens)} "
             f"{cfg.data.splits.train}-split tokens per layer ({st.lang_mix} mix over {len(job.langs)} languages), "
             f"{steps} steps of {int(st.batch_size)}, lr {lr:.2g}")
    else:
        changed = ", ".join(f"{key} {value}" for key, value in layer_overrides(st.layer_overrides)[layer].items())
        emit(f"  layer {layer}: {changed} (sae_train.layer_overrides): {steps} steps, lr {lr:.2g}")
    return SAETrainSettings(
        width=width, steps=steps, batch_size=int(st.batch_size), lr=lr, l0_coefficient=float(st.l0_coefficient),
        target_l0=None if st.target_l0 is None else float(st.target_l0),
        pre_act_loss=float(st.pre_act_loss_coefficient),
        dead_window=None if st.dead_window is None else int(st.dead_window), b_dec_init="mean",
        model_name=str(cfg.model.name), context_size=int(cfg.data.max_length),
        device=str(st.device or next(model.parameters()).device))


def _capture(cfg, job: _Job, model, tokenizer):
    """(training activations {layer: [rows, hidden]}, their index or None, data info, held-out activations
    {lang: {layer: [tokens, hidden]}})."""
    from mlalign.console import stage

    st, layers, langs = job.st, job.layers, job.langs
    max_length, capture_batch = job.recipe.context_size, int(st.capture_batch_size)
    rng = np.random.default_rng(int(cfg.seed))
    with stage(f"capturing training activations ({int(st.tokens)} tokens x {len(layers)} layer(s), "
               f"{cfg.data.splits.train} split, {st.buffer_dtype})"):
        acts, index, data_info = collect_training_activations(model, tokenizer, job.train, job.quotas, layers, max_length,
                                                              capture_batch, rng, dtype=BUFFER_DTYPES[str(st.buffer_dtype)])
    how_many = "all" if st.eval_sentences is None else f"up to {st.eval_sentences}"
    with stage(f"capturing held-out activations ({cfg.data.splits.valid} split, {how_many} sentences x "
               f"{len(langs)} languages)"):
        heldout = {lang: capture_language(model, tokenizer, job.valid[lang][: st.eval_sentences], layers, max_length,
                                          capture_batch, desc=f"held-out {lang}") for lang in langs}
    return acts, index, data_info, heldout


RECORD_FILE = "mlalign_record.json"
"""Beside each trained SAE's sae-lens files: its fidelity record and the fingerprint of what made it (`sae_fingerprint`),
so a rerun of a stopped run keeps every SAE already finished instead of training it again."""


def sae_fingerprint(cfg, job: _Job, layer: int, torch_seed: int) -> str:
    """What one SAE depends on: the model, the data settings, the run seed (it draws the training tokens), the mix, the
    token quotas, the recipe (its device aside) and the SAE's own layer and torch seed. Equal fingerprints, equal SAE."""
    import dataclasses
    import hashlib
    import json

    from omegaconf import OmegaConf

    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "device"}
    recipe = {k: v for k, v in dataclasses.asdict(job.recipes[layer]).items() if k != "device"}
    what = {"model": model, "data": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed),
            "langs": job.langs, "quotas": job.quotas, "recipe": recipe, "eval_sentences": job.st.eval_sentences,
            "buffer_dtype": str(job.st.buffer_dtype), "layer": int(layer), "torch_seed": int(torch_seed)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _finished_sae(folder: Path, fingerprint: str, device: str):
    """(SAE, record) of an SAE an earlier try of this run finished with the same fingerprint, else None (nothing
    there, another recipe, or damaged files: it is trained again)."""
    import json

    try:
        kept = json.loads((folder / RECORD_FILE).read_text())
        if kept.get("fingerprint") != fingerprint:
            return None
        sae = load_sae_folder(folder, device)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    return sae, kept["record"]


def _train_saes(cfg, job: _Job, acts: dict, index, heldout: dict) -> tuple[dict, list, float, int]:
    """Every layer's SAEs, seed after seed on the same activations, each saved with its held-out fidelity record
    (`RECORD_FILE`) as soon as it is trained: (fidelity records {layer: [one per seed]}, the SAEs [seed][layer],
    seconds, how many SAEs were kept from an earlier try of this run). Rerun after a kill, an SAE whose folder holds
    the same fingerprint is loaded, not trained again."""
    from mlalign.console import note, stage, transient_bars

    seeds, layers, langs = int(job.st.seeds), job.layers, job.langs
    records: dict[int, list[dict]] = {layer: [] for layer in layers}
    trained: list[dict[int, object]] = [{} for _ in range(seeds)]
    kept = 0
    train_started = time.perf_counter()
    transient_bars(TRAINER_MODULE)  # its per-SAE bar vanishes when done; each layer's line stays
    with tempfile.TemporaryDirectory(prefix="mlalign-sae-ckpt-") as checkpoints, \
            stage(f"training {len(layers) * seeds} SAE(s) ({_steps_said(job)} steps each)"):
        for layer in layers:
            layer_acts = acts.pop(layer)
            for s in range(seeds):
                torch_seed = int(cfg.seed) + layer + SEED_STRIDE * s
                label = f"SAE of layer {layer}" + (f", seed {s}" if seeds > 1 else "")
                folder = seed_dir(job.out_dir, s, seeds) / f"layer_{layer}"
                fingerprint = sae_fingerprint(cfg, job, layer, torch_seed)
                finished = _finished_sae(folder, fingerprint, job.recipe.device)
                if finished is not None:
                    sae, record = finished
                    kept += 1
                    note(f"{label}: kept from an earlier try of this run (same recipe, data and seed)")
                else:
                    with stage(label, start_line=False):  # sae-lens's "Training SAE" bar shows it running
                        layer_started = time.perf_counter()
                        torch.manual_seed(torch_seed)
                        sae = train_sae(layer_acts, layer, job.recipes[layer], seed=torch_seed, index=index,
                                        checkpoint_dir=checkpoints, progress=True)
                        train_seconds = time.perf_counter() - layer_started
                        overall = fidelity(sae, torch.cat([heldout[lang][layer] for lang in langs]))
                        per_lang = {lang: fidelity(sae, heldout[lang][layer]) for lang in langs}
                        record = _seed_record(overall, per_lang, torch_seed, train_seconds)

                        def save(tmp: Path, sae=sae, record=record, fingerprint=fingerprint) -> None:
                            sae.save_model(tmp)
                            write_json_atomic(tmp / RECORD_FILE, {"fingerprint": fingerprint, "record": record})

                        write_dir_atomic(folder, save)
                records[layer].append(record)
                trained[s][layer] = sae
                note(f"  held-out FVU {record['fvu']:.3f}, L0 {record['l0']:.1f}, dead {record['dead_pct']:.1f}%")
            del layer_acts
    return records, trained, round(time.perf_counter() - train_started, 2), kept


def _trained_overrides(job: _Job) -> dict[int, dict]:
    """The `layer_overrides` entries of the layers this run trains."""
    overrides = layer_overrides(job.st.layer_overrides)
    return {layer: overrides[layer] for layer in job.layers if layer in overrides}


def _steps_said(job: _Job) -> str:
    steps = sorted({recipe.steps for recipe in job.recipes.values()})
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _add_spliced(cfg, job: _Job, model, tokenizer, trained: list, records: dict) -> dict[str, float]:
    """Each record's spliced-in LM loss (None with sae_train.spliced_sentences=0); returns {"spliced": seconds} if
    measured."""
    from mlalign.console import stage

    seeds, layers, langs, sentences = int(job.st.seeds), job.layers, job.langs, int(job.st.spliced_sentences)
    if sentences <= 0:
        for layer in layers:
            for record in records[layer]:
                record["spliced_dlm_loss"] = None
                for lang in langs:
                    record["per_lang"][lang]["spliced_dlm_loss"] = None
        return {}
    spliced_started = time.perf_counter()
    with stage(f"spliced-in LM loss ({sentences} {cfg.data.splits.valid} sentences x {len(langs)} "
               f"languages, {len(layers) * seeds} SAE(s))"):
        for s in range(seeds):
            by_layer = spliced_fidelity(model, tokenizer, job.valid, langs, trained[s], sentences,
                                        job.recipe.context_size, int(job.st.capture_batch_size), job.recipe.device)
            for layer in layers:
                record, spliced = records[layer][s], by_layer[layer]
                record.update({key: spliced[key] for key in ("spliced_dlm_loss", "clean_lm_loss",
                                                             "spliced_sentences")})
                for lang in langs:
                    record["per_lang"][lang]["spliced_dlm_loss"] = spliced["per_lang"][lang]["spliced_dlm_loss"]
    return {"spliced": round(time.perf_counter() - spliced_started, 2)}


def _write_outputs(cfg, job: _Job, table: dict, records: dict, data_info: dict, seconds: dict) -> str:
    """fidelity.json, fidelity.md, fidelity.png and train_data.json in the SAEs' folder; returns the markdown."""
    st, recipe, out_dir, seeds, langs = job.st, job.recipe, job.out_dir, int(job.st.seeds), job.langs
    header = (f"SAE fidelity on held-out text ({cfg.data.splits.valid} split), model {cfg.model.name}, "
              f"{recipe.width} features, {int(st.tokens)} training tokens per layer ({st.lang_mix} mix)"
              + (f", mean of {seeds} SAE seeds" if seeds > 1 else ""))
    markdown = fidelity_markdown(table, langs, header)
    write_json_atomic(out_dir / "fidelity.json", table)
    write_text_atomic(out_dir / "fidelity.md", markdown)
    plot_fidelity(table, langs, out_dir / "fidelity.png", header)
    write_json_atomic(out_dir / "train_data.json", {
        "model": str(cfg.model.name), "layers": job.layers, "langs": langs, "lang_mix": str(st.lang_mix),
        "weights": job.weights, **data_info, "train_split": str(cfg.data.splits.train),
        "valid_split": str(cfg.data.splits.valid), "width": recipe.width, "steps": recipe.steps,
        "batch_size": int(st.batch_size), "lr": recipe.lr, "l0_coefficient": float(st.l0_coefficient),
        "target_l0": st.target_l0, "seeds": seeds, "pre_act_loss_coefficient": float(st.pre_act_loss_coefficient),
        "dead_window": st.dead_window,
        "layer_overrides": {str(layer): {**values, "steps": job.recipes[layer].steps, "lr": job.recipes[layer].lr}
                            for layer, values in _trained_overrides(job).items()},
        "torch_seeds": {str(layer): [r["torch_seed"] for r in records[layer]] for layer in job.layers},
        "buffer_dtype": str(st.buffer_dtype), "spliced_sentences": int(st.spliced_sentences), "seconds": seconds,
    })
    return markdown


def _report(cfg, ctx, job: _Job, table: dict, markdown: str) -> None:
    """The fidelity table to the tracker and the console, and where the SAEs are."""
    from mlalign.console import headline, output

    out_dir = job.out_dir
    ctx.tracker.log_table("train_saes/fidelity", [{"layer": int(layer), **{k: v for k, v in row.items()
                                                                            if k not in ("per_lang", "seeds",
                                                                                         "seed_range")}}
                                                   for layer, row in table.items()])
    ctx.tracker.log_images({"train_saes/fidelity": out_dir / "fidelity.png"})
    print("\n" + markdown)
    ctx.tracker.summary(fidelity_scalars(table))
    per_layer = ", ".join(f"{layer} {row['fvu']:.3f}" for layer, row in table.items())
    headline(f"held-out FVU per layer ({cfg.data.splits.valid} split): {per_layer}")
    seeds = int(job.st.seeds)
    where = out_dir if seeds == 1 else out_dir / SEED_FOLDER.format(seed="<s>")
    every_seed = "" if seeds == 1 else f" sae.seeds=[{','.join(map(str, range(seeds)))}]"
    output("SAEs", f"{where} (analyse with: sae=local sae.path_template={out_dir}{every_seed} "
                   f"layers=[{','.join(map(str, job.layers))}])")
    output("fidelity", out_dir / "fidelity.md")


def _results(table: dict, seconds: dict) -> dict[str, float]:
    """The task's numbers for the tracker and sweepers: fidelity over layers, and where the time went."""
    fvus = [row["fvu"] for row in table.values()]
    l0s = [row["l0"] for row in table.values()]
    spliced_values = [row["spliced_dlm_loss"] for row in table.values() if row.get("spliced_dlm_loss") is not None]
    return {
        "mean_fvu": float(np.mean(fvus)), "max_fvu": float(np.max(fvus)), "mean_l0": float(np.mean(l0s)),
        "mean_l0_pct": float(np.mean([row["l0_pct"] for row in table.values()])),
        "mean_dead_pct": float(np.mean([row["dead_pct"] for row in table.values()])),
        "max_dead_pct": float(np.max([row["dead_pct"] for row in table.values()])),
        **({"mean_spliced_dlm_loss": float(np.mean(spliced_values)),
            "max_spliced_dlm_loss": float(np.max(spliced_values))} if spliced_values else {}),
        "activation_s": seconds["activations"], "training_s": seconds["training"],
        **({"spliced_s": seconds["spliced"]} if "spliced" in seconds else {}),
    }
