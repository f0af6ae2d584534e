"""Load a causal LM and its tokenizer (Hugging Face id, local path, or the built testbed), optionally with a LoRA adapter."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mlalign.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or null) picks CUDA, then MPS, then CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def model_source(model_cfg, testbed_dir: str | Path | None = None) -> str:
    """The Hugging Face id or local directory the model loads from (the testbed and GGUF sources: their cached copy)."""
    if model_cfg.get("converted_dir"):
        return str(model_cfg.converted_dir)
    from mlalign.gguf import is_gguf

    if is_gguf(model_cfg):
        raise RuntimeError(f"model {model_cfg.name!r} is a GGUF source: call mlalign.models.prepare_model first")
    if model_cfg.hf_id:
        return str(model_cfg.hf_id)
    if testbed_dir:
        return str(Path(testbed_dir) / "model")
    raise UserError(f"model {model_cfg.name!r} has no hf_id; set model.hf_id=ORG/NAME or a local path, or use model=testbed")


def prepare_model(model_cfg, cache_dir: str | Path) -> None:
    """GGUF sources (model.gguf_file, model.source=pypi): convert once into cache_dir, set model.converted_dir to it."""
    from omegaconf import open_dict

    from mlalign.gguf import ensure_converted, is_gguf

    if is_gguf(model_cfg) and not model_cfg.get("converted_dir"):
        directory = ensure_converted(model_cfg, cache_dir)
        with open_dict(model_cfg):
            model_cfg.converted_dir = str(directory)


def resolve_model_shape(model_cfg, testbed_dir: str | Path | None = None) -> None:
    """model.num_layers / model.hidden_size left null (model=hf): read them from the model's config.json, which is all
    that is fetched here (kilobytes), so a layer typo still fails before any weights download."""
    from omegaconf import open_dict

    if model_cfg.get("num_layers") is not None and model_cfg.get("hidden_size") is not None:
        return
    from transformers import AutoConfig

    source = model_source(model_cfg, testbed_dir)
    try:
        config = AutoConfig.from_pretrained(source, revision=model_cfg.get("revision"),
                                            trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    text = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM's shape in text_config
    with open_dict(model_cfg):
        if model_cfg.get("num_layers") is None:
            model_cfg.num_layers = int(text.num_hidden_layers)
        if model_cfg.get("hidden_size") is None:
            model_cfg.hidden_size = int(text.hidden_size)
    log.info("model %s: %d layers, hidden size %d (from its config)", source, model_cfg.num_layers,
             model_cfg.hidden_size)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_error(source: str, err: Exception) -> UserError:
    text = str(err)
    if Path(source).exists() or source.startswith(("/", ".")):
        return UserError(f"cannot load a model from {source}: {text.splitlines()[0] if text else type(err).__name__}; "
                         "point model.hf_id at a directory saved with save_pretrained")
    if "gated" in text.lower() or "401" in text or "403" in text or "access" in text.lower():
        return UserError(f"no access to {source} (gated model): accept its license on huggingface.co, run "
                         "`.venv/bin/hf auth login` (or set HF_TOKEN), or use model=testbed to run offline")
    if _offline() or "offline" in text.lower() or "cannot find" in text.lower() or "couldn't connect" in text.lower():
        return UserError(f"{source} is not in the local Hugging Face cache and the hub is unreachable "
                         "(HF_HUB_OFFLINE or no network): run `.venv/bin/hf auth login` and download it once online, "
                         "or use model=testbed to run offline")
    return UserError(f"cannot load {source}: {text.splitlines()[0] if text else type(err).__name__}; "
                     "check model.hf_id, or use model=testbed to run offline")


def load_tokenizer(model_cfg, testbed_dir=None):
    from transformers import AutoTokenizer

    source = model_source(model_cfg, testbed_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=model_cfg.get("revision"),
                                                  trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg, testbed_dir=None, adapter: str | None = None, device: str | None = None,
               dtype: str | None = None):
    """Load the causal LM on `device` in `dtype` (defaults from the config), eval mode, optionally with a peft adapter.

    Weights come from safetensors only (`use_safetensors=True`); remote code runs only with model.trust_remote_code=true.
    """
    from transformers import AutoModelForCausalLM

    source = model_source(model_cfg, testbed_dir)
    target = resolve_device(device or model_cfg.device)
    kwargs = dict(
        dtype=torch_dtype(dtype or model_cfg.dtype),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=bool(model_cfg.trust_remote_code),
        revision=model_cfg.get("revision"),
        use_safetensors=True,
    )
    if target.type != "cpu":
        # Straight onto the accelerator: no full CPU copy first (peak host memory, and the time of a second copy).
        # CPU targets load as before: safetensors rejects indexed CPU devices ("cpu:0" in multi-process CPU runs).
        kwargs["device_map"] = {"": str(target)}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_error(source, err) from None
    model.to(target)  # a no-op when already there
    if adapter:
        model = attach_adapter(model, adapter, source)
    model.eval()
    return model


def check_adapter(adapter: str | Path) -> dict:
    """The adapter's peft config; a folder without one is a user error (checked before any model loads)."""
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter} is not a peft adapter (no adapter_config.json); pass adapter=DIR written by task=train "
                        "(its run directory's adapter/ folder)")
    from mlalign.io import check_adapter_files

    return check_adapter_files(Path(adapter))


def _check_trained_on(adapter: Path, adapter_cfg: dict, model, base_source: str | None) -> None:
    trained_on = adapter_cfg.get("base_model_name_or_path")
    expected = base_source or getattr(model.config, "_name_or_path", None)
    if trained_on and expected and not _same_base(trained_on, expected):
        raise UserError(f"adapter {adapter} was trained on {trained_on}, not on {expected}; "
                        f"pick the matching model= or an adapter trained on this model")


def attach_adapter(model, adapter: str | Path, base_source: str | None = None, adapter_name: str = "default"):
    """Wrap `model` with the peft LoRA adapter saved at `adapter`, checking that it was trained on this base model."""
    from peft import PeftModel

    adapter = Path(adapter)
    _check_trained_on(adapter, check_adapter(adapter), model, base_source)
    try:
        return PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"adapter {adapter} does not fit this model ({str(err).splitlines()[0]}); "
                        "use an adapter trained on this model") from None


def swap_adapter(model, adapter: str | Path, adapter_name: str, base_source: str | None = None):
    """`model` with the adapter at `adapter` active (as `adapter_name`) and no other: the first call wraps the base
    model with peft, later ones load the next adapter beside the active one, switch to it and delete the old one, so
    one base model in memory serves any number of adapters (lm-eval's several-adapters-one-base request)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        model = attach_adapter(model, adapter, base_source, adapter_name=adapter_name)
        model.eval()
        return model
    adapter = Path(adapter)
    _check_trained_on(adapter, check_adapter(adapter), model.get_base_model(), base_source)
    previous = model.active_adapter
    try:
        model.load_adapter(str(adapter), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"adapter {adapter} does not fit this model ({str(err).splitlines()[0]}); "
                        "use an adapter trained on this model") from None
    model.set_adapter(adapter_name)
    if previous != adapter_name:
        model.delete_adapter(previous)
    model.eval()
    return model


def _same_base(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        p = Path(s)
        # The testbed lives in a content-hashed folder, so comparing the resolved path is exact for it.
        return str(p.resolve()) if p.exists() else s.rstrip("/")

    return norm(a) == norm(b)


def num_layers(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)  # GPT-2's n_layer and NeoX's names map onto this in transformers' configs


def hidden_size(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)
