"""What the benchmark runs on: a Gemma-2-shaped random model, calibrated sae-lens JumpReLU SAEs, a BPE tokenizer
trained on the bundled corpus, and the bundled FLORES-200 sentences, built once per process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

LANGS = ["en", "zh", "ru", "es", "it", "id", "ca", "mr", "ml", "hi"]
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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
