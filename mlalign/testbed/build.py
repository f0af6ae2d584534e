"""Build the offline testbed: a tiny 26-layer Gemma-2, its BPE tokenizer and one JumpReLU SAE per layer, cached by spec.

Everything comes from the bundled corpus's train split, so the testbed builds offline and, on one kind of CPU, bit for
bit the same (another CPU's vector kernels may round differently: tests assert what holds on any build). The model is
pretrained on an English-heavy language mix (which languages are "low-resource" is known by construction) and each SAE
is trained with sae-lens on the testbed's own residual stream at `blocks.L.hook_resid_post`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from mlalign.io import COMPLETE_MARKER
from mlalign.testbed.spec import BUILD_VERSION, EVAL_SENTENCES_PER_LANG, TestbedSpec, testbed_dir

def ensure_testbed(spec: TestbedSpec, cache_dir: str | Path, progress: bool = True) -> Path:
    """Return the built testbed's directory, building it first unless the cache already holds it.

    The build goes to a temporary sibling directory that is renamed into place only once `COMPLETE` is written, so an
    interrupted build never looks finished; a concurrent builder of the same spec just loses the rename race.
    """
    final = testbed_dir(spec, cache_dir)
    if (final / COMPLETE_MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        build_testbed(spec, staging, progress=progress)
        (staging / COMPLETE_MARKER).write_text(f"build_version {BUILD_VERSION}\n")
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # debris of an older, unfinished layout: never a finished build
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def build_testbed(spec: TestbedSpec, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Build the testbed into `out_dir` (no caching, no COMPLETE marker) and return its build info."""
    from mlalign.data.corpus import flores_langs, load_flores
    # Imported here: they import this module's constants, and a cache hit needs neither.
    from mlalign.testbed.lm import build_tokenizer, final_loss_per_lang, new_model, pretrain
    from mlalign.testbed.saes import collect_residuals, evaluate_saes, train_layer_sae

    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        start = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - start, 2)

    langs = list(spec.lang_mix)
    load_average = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # phase times depend on it
    with _single_threaded(), _seeded(spec.seed):
        rng = np.random.default_rng(spec.seed)
        # The text exactly as bundled (normalize=None): the build's hash covers its config, not the corpus loader's
        # defaults, so a cached testbed and a fresh build must read the same bytes.
        bundled = flores_langs()  # the study's ten: every language of the bundled copy trains the tokenizer
        train = load_flores(bundled, "train", normalize=None)
        with phase("tokenizer"):
            tokenizer = build_tokenizer(spec, [s for lang in bundled for s in train[lang]])
        with phase("pretrain"):
            model = new_model(spec)
            pretrain(model, tokenizer, spec, train, rng, progress)
            model.eval()
            pretrain_loss = final_loss_per_lang(model, tokenizer, spec, train, EVAL_SENTENCES_PER_LANG)
            model.save_pretrained(out_dir / "model")
            tokenizer.save_pretrained(out_dir / "model")
        with phase("sae_data"):
            residuals = collect_residuals(model, tokenizer, spec, train, rng)
        with phase("saes"):
            saes = {}
            with tempfile.TemporaryDirectory(prefix="mlalign-sae-ckpt-") as checkpoints:
                for layer in tqdm(range(spec.num_layers), desc="testbed SAEs", unit="layer", disable=not progress):
                    saes[layer] = train_layer_sae(residuals[layer], layer, spec, checkpoints)
                    saes[layer].save_model(out_dir / "saes" / f"layer_{layer}")
            del residuals
        with phase("sae_eval"):
            dev = load_flores(langs, "dev", max_sentences=EVAL_SENTENCES_PER_LANG, normalize=None)
            sae_stats = evaluate_saes(model, tokenizer, spec, dev, saes)

    info = {
        "build_version": BUILD_VERSION,
        "fingerprint": spec.fingerprint(),
        "spec": asdict(spec),
        "seconds": seconds,
        "torch_threads": 1,
        "load_average_at_start": load_average,
        "pretrain_loss": pretrain_loss,
        "sae": sae_stats,
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """One intra-op thread: float reductions then run in one order, so a seed gives the same weights on every run on
    one kind of CPU (not across CPUs: the kernels chosen for AVX2, AVX-512 or AMX may round differently)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch, and put the caller's global RNG states back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
