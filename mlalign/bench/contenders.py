"""The contenders: each does the whole job on the benchmark's texts (tokenisation included) so times compare.

Floors (`run_forward`, `run_trunk`, `run_floor`), mlalign's engine (`run_analyze`), and peers (`run_naive`, sae-lens's
`run_saelens`), plus the float64 reference the engine must equal (`run_reference`, `compare`).
"""

from __future__ import annotations

import math

import torch

from mlalign.bench.workload import Bench, hook_name

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


def _stacked_encoder(bench: Bench):
    """Every layer's W_enc, b_enc and threshold stacked once ([L, d, F], [L, 1, F], [L, 1, F]): the floor's encode is
    one batched matmul and one comparison per batch, the least any analysis of all layers can do."""
    cached = getattr(bench, "_floor_encoder", None)
    if cached is None:
        saes = [bench.saes[layer] for layer in sorted(bench.saes)]
        cached = (torch.stack([sae.W_enc.detach() for sae in saes]),
                  torch.stack([sae.b_enc.detach() for sae in saes]).unsqueeze(1),
                  torch.stack([sae.threshold.detach() for sae in saes]).unsqueeze(1))
        bench._floor_encoder = cached
    return cached


@torch.inference_mode()
def run_floor(bench: Bench) -> None:
    """What no SAE analysis can avoid: the decoder trunk (stopped after the last layer) plus the bare encode of every
    analysed layer's kept tokens (`x @ W_enc + b_enc` and the JumpReLU threshold, all layers in one batched matmul,
    into buffers allocated once), in the engine's batches."""
    from mlalign.analysis.capture import ResidualCapture
    from mlalign.analysis.engine import analysed_positions

    layers = sorted(bench.saes)
    w_enc, b_enc, threshold = _stacked_encoder(bench)
    work, mask = _floor_buffers(bench)
    n_layers, d_sae = w_enc.shape[0], w_enc.shape[2]
    with ResidualCapture(bench.model, layers, detach=True, stop_after_last=True) as capture:
        for lang in bench.texts:
            for inputs in sorted_batches(bench, lang):
                keep = analysed_positions(inputs["input_ids"], inputs["attention_mask"], bench.tokenizer.bos_token_id)
                flat = keep.flatten().nonzero().squeeze(1)
                activations = capture.forward(**inputs, use_cache=False)
                x = torch.stack([activations[layer].flatten(0, 1).index_select(0, flat) for layer in layers])
                size = n_layers * len(flat) * d_sae
                pre = torch.baddbmm(b_enc, x, w_enc, out=work[:size].view(n_layers, len(flat), d_sae))
                pre.masked_fill_(torch.le(pre, threshold, out=mask[:size].view(n_layers, len(flat), d_sae)), 0)


def _floor_buffers(bench: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor's code and mask buffers for the largest batch, allocated once per run (the size is found on the
    first, untimed call): as the engine allocates its work buffer once per pass on the CPU (`engine._work_buffer`),
    neither pays page faults per batch, and neither holds memory between runs (the memory measures stay the
    analysis's own)."""
    from mlalign.analysis.engine import analysed_positions

    w_enc = _stacked_encoder(bench)[0]
    kept = getattr(bench, "_floor_max_kept", None)
    if kept is None:
        kept = max(int(analysed_positions(inputs["input_ids"], inputs["attention_mask"],
                                          bench.tokenizer.bos_token_id).sum())
                   for lang in bench.texts for inputs in sorted_batches(bench, lang))
        bench._floor_max_kept = kept
    size = w_enc.shape[0] * kept * w_enc.shape[2]
    return (torch.empty(size, dtype=w_enc.dtype, device=w_enc.device),
            torch.empty(size, dtype=torch.bool, device=w_enc.device))


def run_analyze(bench: Bench, features: bool = True, decode: str = "auto", window: bool = True):
    """The engine as task=analyze runs it: per-feature statistics on (analysis.features.enabled, the default), the
    default decode (only the active features' decoder rows) and the position-matched window at the reference
    language's 90th-percentile position (found from tokenization, as `analysis.sources.LazyEngine` does);
    `decode="dense"` times sae-lens's dense decode instead."""
    from mlalign.analysis.engine import EngineSettings, collect_stats, position_cap

    s = bench.settings
    reference = "en" if "en" in bench.texts else next(iter(bench.texts))
    cap = position_cap(bench.tokenizer, bench.texts[reference], s.max_length) if window else None
    settings = EngineSettings(batch_size=s.batch_size, max_length=s.max_length, progress=False, decode=decode)
    return collect_stats(bench.model, bench.tokenizer, bench.saes, bench.texts, settings,
                         feature_stats={} if features else None, position_cap=cap)


def run_analyze_nofeatures(bench: Bench):
    """The engine with per-feature statistics off (analysis.features.enabled=false): what the features cost."""
    return run_analyze(bench, features=False)


def run_analyze_nowindow(bench: Bench):
    """The engine without the position-matched window: what keeping its sums in the same pass costs."""
    return run_analyze(bench, window=False)


def run_analyze_dense(bench: Bench):
    """The engine with sae-lens's dense decode: what decoding only the active features saves."""
    return run_analyze(bench, decode="dense")


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
