"""Load the SAE of each layer from a sae-lens release (+ id template) or a local directory template, and check it fits."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mlalign.errors import UserError

log = logging.getLogger(__name__)


def resid_post_hook(layer: int) -> str:
    """TransformerLens / sae-lens name of decoder layer `layer`'s output."""
    return f"blocks.{layer}.hook_resid_post"


def pretrained_release(release: str):
    """sae-lens's registry entry of `release` (repo_id, saes_map, neuronpedia_id, ...), shipped with sae-lens (offline),
    or None when the registry has no such release."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory().get(release)


def registry_ids(release: str) -> dict[str, str]:
    """sae_id -> path of a sae-lens release, from the registry shipped with sae-lens (offline)."""
    entry = pretrained_release(release)
    if entry is None:
        raise UserError(f"sae-lens has no SAE release {release!r}; pick an sae= option (e.g. sae=gemma2_2b) "
                        "or a release listed by sae_lens.loading.pretrained_saes_directory")
    return dict(entry.saes_map)


NO_SAE_OFFLINE = ("go online once (`.venv/bin/hf auth login` if gated), or train SAEs for this model with "
                  "`python run.py task=train_saes model=<this model>` and use sae=local sae.path_template=<run dir>/saes")


def local_sae_path(path_template: str, layer: int) -> Path:
    """`/dir/layer_{layer}`, or just `/dir` holding `layer_0/`, `layer_1/`, ... (no braces to quote on the command line)."""
    template = str(path_template)
    if "{layer}" not in template:
        template = str(Path(template) / "layer_{layer}")
    return Path(template.format(layer=layer))


SEED_FOLDER = "seed_{seed}"
"""Where SAE seed s's layer folders sit inside a `task=train_saes sae_train.seeds=N` run's `saes/` directory."""


def seed_folder(directory: str | Path, seed: int) -> Path:
    return Path(directory) / SEED_FOLDER.format(seed=seed)


def seed_folders_in(directory: Path) -> list[int]:
    """The seeds s whose `seed_<s>/` folder `directory` holds, in order."""
    prefix = SEED_FOLDER.format(seed="")
    names = [path.name[len(prefix):] for path in directory.glob(f"{prefix}*") if path.is_dir()] if directory.is_dir() else []
    return sorted(int(name) for name in names if name.isdigit())


def check_sae_seeds(sae_cfg, layers: list[int]) -> dict[int, Path]:
    """`sae.seeds`' folders, {seed: <sae.path_template>/seed_<s>}, each checked as a single-seed directory for `layers`
    before any weights load (a wrong seed, a non-local SAE set or a missing layer is one UserError); {} without
    sae.seeds."""
    seeds = sae_cfg.get("seeds")
    if seeds is None:
        return {}
    seeds = [int(seed) for seed in seeds]
    listed = f"sae.seeds=[{','.join(map(str, seeds))}]"
    template = sae_cfg.get("path_template")
    if sae_cfg.get("release") or not template or "{layer}" in str(template):
        what = (f"sae.release={sae_cfg.release} is" if sae_cfg.get("release") else
                f"sae.path_template={template} is" if template else f"sae={sae_cfg.name} has no SAE folder, nor")
        raise UserError(f"{listed} analyses the seed_<s>/ folders that task=train_saes sae_train.seeds=N writes, with "
                        f"sae=local sae.path_template=<that run dir>/saes; {what} one SAE per layer: drop sae.seeds")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"{listed}: a spread needs two or more different seeds, e.g. sae.seeds=[0,1,2]; one seed's "
                        "SAEs are sae.path_template=<dir>/seed_<s> without sae.seeds")
    directory = Path(template)
    present = seed_folders_in(directory)
    missing = [seed for seed in seeds if seed not in present]
    if missing:
        if present:
            holds = "it holds " + ", ".join(seed_folder("", seed).name for seed in present)
        elif any(directory.glob("layer_*")):
            holds = "it is a single-seed directory (layer_<L>/ folders): drop sae.seeds"
        else:
            holds = "it holds no seed_<s>/ folder: train them with task=train_saes sae_train.seeds=N"
        raise UserError(f"{listed}: no folder {', '.join(seed_folder('', seed).name for seed in missing)} in "
                        f"{directory}; {holds}")
    folders = {seed: seed_folder(directory, seed) for seed in seeds}
    for folder in folders.values():
        for layer in layers:
            check_local_sae(local_sae_path(folder, layer))
    return folders


def sae_id_for(sae_cfg, layer: int) -> str:
    return str(sae_cfg.id_template).format(layer=layer)


def check_sae_config(sae_cfg, layers: list[int]) -> None:
    """Fail before any weights load if the release lacks an id for a requested layer."""
    if sae_cfg.release:
        known = registry_ids(sae_cfg.release)
        missing = [layer for layer in layers if sae_id_for(sae_cfg, layer) not in known]
        if missing:
            raise UserError(f"SAE release {sae_cfg.release} has no id {sae_id_for(sae_cfg, missing[0])!r} "
                            f"(layers {missing} have none); choose layers=[...] it covers or another sae=")
    elif not sae_cfg.path_template:
        raise UserError(f"sae={sae_cfg.name}: no SAEs for this model (neither sae.release nor sae.path_template); "
                        "train them with `python run.py task=train_saes` and the same model= settings, then add "
                        "sae=local sae.path_template=<that run dir>/saes")
    else:
        template = str(sae_cfg.path_template)
        seeds = seed_folders_in(Path(template)) if "{layer}" not in template else []
        if seeds and layers and not local_sae_path(template, layers[0]).is_dir():
            raise UserError(f"{template} holds SAE seeds ({', '.join(seed_folder('', s).name for s in seeds)}), not "
                            f"layer_<L>/ folders: add sae.seeds=[{','.join(map(str, seeds))}] (task=analyze: the map "
                            f"under every seed and its spread), or point sae.path_template at one, e.g. "
                            f"{seed_folder(template, seeds[0])}")
        for layer in layers:
            check_local_sae(local_sae_path(sae_cfg.path_template, layer))


LOCAL_SAE_FIX = "re-save it with sae-lens's save_model (or task=train_saes), or point sae.path_template= at one that is"


def check_local_sae(path: Path) -> dict:
    """A local SAE folder's cfg.json, checked against its weights file's header (present, complete, W_enc/W_dec
    shapes matching d_in and d_sae) before any weights load: each problem is a UserError naming the file."""
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    from mlalign.io import read_json_file, safetensors_shapes

    if not (path / SAE_CFG_FILENAME).is_file():
        raise UserError(f"no SAE at {path} (missing {SAE_CFG_FILENAME}); set sae.path_template=/dir holding layer_0/, "
                        "layer_1/, ... written by sae-lens's save_model")
    cfg_file = path / SAE_CFG_FILENAME
    cfg = read_json_file(cfg_file, "SAE config", LOCAL_SAE_FIX)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"SAE config {cfg_file} has no integer d_in and d_sae; {LOCAL_SAE_FIX}") from None
    from sae_lens.registry import SAE_CLASS_REGISTRY

    architecture = cfg.get("architecture")
    if architecture not in SAE_CLASS_REGISTRY:  # issue 30 audit: sae-lens raised KeyError from inside its loader
        raise UserError(f"SAE config {cfg_file} has architecture={architecture!r}, which sae-lens does not know (it "
                        f"knows {', '.join(sorted(SAE_CLASS_REGISTRY))}); {LOCAL_SAE_FIX}")
    weights = path / SAE_WEIGHTS_FILENAME
    shapes = safetensors_shapes(weights, "SAE weights", LOCAL_SAE_FIX)
    expected = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in]}
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise UserError(f"SAE {path}: {SAE_CFG_FILENAME} says d_in={d_in}, d_sae={d_sae}, but {weights.name} holds "
                            f"{name} of shape {shapes[name]} (expected {shape}); {LOCAL_SAE_FIX}")
    return cfg


def load_sae_folder(folder: str | Path, device: str = "cpu"):
    """The SAE sae-lens saved in `folder` (as `SAE.save_model` writes it), in eval mode; raises what sae-lens raises
    on a missing or damaged folder (OSError, ValueError, KeyError, RuntimeError)."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(folder), device=str(device)).eval()


def load_sae(sae_cfg, layer: int, hidden_size: int, device: str = "cpu"):
    """The SAE of decoder layer `layer`, validated against the model's hidden size and the layer's residual hook."""
    import torch
    from sae_lens import SAE

    # safetensors rejects indexed CPU devices ("cpu:0", what accelerate reports in multi-process CPU runs).
    device = "cpu" if torch.device(device).type == "cpu" else str(device)
    dtype = sae_cfg.dtype
    if sae_cfg.release:
        sae_id = sae_id_for(sae_cfg, layer)
        try:
            sae = SAE.from_pretrained(sae_cfg.release, sae_id, device=str(device), dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load SAE {sae_cfg.release}/{sae_id}: {str(err).splitlines()[0]}; it is not in the "
                            f"local Hugging Face cache: {NO_SAE_OFFLINE}") from None
        where = f"{sae_cfg.release}/{sae_id}"
    else:
        path = local_sae_path(sae_cfg.path_template, layer)
        check_local_sae(path)
        try:
            sae = SAE.load_from_disk(path, device=str(device), dtype=dtype)
        except (KeyError, ValueError, TypeError) as err:  # issue 30 audit: a cfg.json without a known "architecture"
            detail = (f"missing {err}" if isinstance(err, KeyError)  # was a traceback (KeyError: 'architecture')
                      else (str(err).splitlines() or [type(err).__name__])[0])
            raise UserError(f"sae-lens cannot load the SAE at {path} ({detail}); {LOCAL_SAE_FIX}") from None
        where = str(path)
    d_in = int(sae.cfg.d_in)
    if d_in != hidden_size:
        raise UserError(f"SAE {where} expects d_in={d_in} but the model's hidden size is {hidden_size}; "
                        "pick the sae= that matches model= (each model selects its own by default)")
    hook = sae.cfg.metadata.hook_name
    if hook is not None and hook != resid_post_hook(layer):
        raise UserError(f"SAE {where} reads {hook}, not layer {layer}'s residual output {resid_post_hook(layer)}; "
                        "use a residual-stream (resid_post) SAE set whose id template puts {layer} in the right place")
    sae.eval()
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae


def load_saes(sae_cfg, layers: list[int], hidden_size: int, device: str = "cpu", progress: bool = True) -> dict:
    """Every layer's SAE, with a progress bar that names the layer loading (a hub release downloads and loads each
    one: minutes for 26 layers, and for a single wide one)."""
    from tqdm.auto import tqdm

    check_sae_config(sae_cfg, layers)
    bar = tqdm(layers, desc=f"SAEs ({sae_cfg.name})", unit="layer", leave=False,
               disable=not progress or int(os.environ.get("RANK", "0")) != 0)
    saes = {}
    for layer in bar:
        bar.set_postfix_str(f"layer {layer}")
        saes[layer] = load_sae(sae_cfg, layer, hidden_size, device)
    return saes
