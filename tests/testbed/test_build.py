"""The offline testbed: a loadable 26-layer Gemma-2 and tokenizer, one fitting SAE per layer, caching, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mlalign.analysis.capture import ResidualCapture
from mlalign.data.corpus import flores_langs, load_flores
from mlalign.errors import UserError
from mlalign.testbed import TestbedSpec, build, ensure_testbed, testbed_dir as spec_dir

REPO = Path(__file__).resolve().parents[2]
# A 4-layer spec that builds in seconds: enough to see that a seed fixes every weight.
MINI = TestbedSpec(num_layers=4, pretrain_steps=4, batch_size=4, sae_train_tokens=600, sae_train_steps=10)


def _load_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory / "model", attn_implementation="eager").eval()


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory / "model")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a built testbed: the model's and each SAE's, keyed by file and name."""
    tensors = {}
    for file in sorted(directory.rglob("*.safetensors")):
        for name, tensor in load_file(file).items():
            tensors[f"{file.relative_to(directory)}:{name}"] = tensor
    return tensors


def test_yaml_block_is_the_default_spec():
    # The hash of a spec from conf/model/testbed.yaml must equal the dataclass default's, or the CLI and the tests
    # would build different testbeds for "the default".
    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "testbed.yaml")
    assert TestbedSpec.from_config(model_cfg.testbed) == TestbedSpec()
    assert TestbedSpec.from_config(model_cfg) == TestbedSpec()
    assert TestbedSpec.from_config(dict(model_cfg.testbed)).fingerprint() == TestbedSpec().fingerprint()


def test_hydra_overrides_name_the_session_testbed(small_testbed_spec, small_testbed_overrides):
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["model=testbed", *small_testbed_overrides])
    assert TestbedSpec.from_config(cfg.model.testbed) == small_testbed_spec


@pytest.mark.parametrize("mapping, message", [
    ({"hidden": 32}, "unknown testbed setting"),
    ({"lang_mix": {"en": 0.5, "xx": 0.5}}, "unknown language 'xx'"),
    ({"lang_mix": {"en": 0.5, "bn": 0.5}}, "bn.*which the bundled FLORES-200 copy lacks"),  # in the table, no corpus
    ({"lang_mix": {"en": 1.0, "hi": 0.0}}, "must be > 0"),
    ({"lang_mix": {"en": 0.5, "hi": 0.5}}, "planted_gap_langs has mr, ml, which lang_mix lacks"),
    ({"planted_gap_langs": ["en", "hi"]}, "measured against English"),
    ({"planted_gap_pct": 100.0}, r"planted_gap_pct=100.0 must be in \[0, 100\)"),
])
def test_bad_spec_is_a_user_error(mapping, message):
    with pytest.raises(UserError, match=message):
        TestbedSpec.from_config(mapping)


def test_testbed_dir_is_named_by_the_spec(tmp_path):
    spec = TestbedSpec()
    assert spec_dir(spec, tmp_path) == tmp_path / "testbed" / spec.fingerprint()
    assert spec_dir(replace(spec, seed=1), tmp_path) != spec_dir(spec, tmp_path)
    # The mix's key order is not part of what gets built.
    shuffled = TestbedSpec(lang_mix=dict(reversed(list(spec.lang_mix.items()))))
    assert spec_dir(shuffled, tmp_path) == spec_dir(spec, tmp_path)


def test_model_has_26_layers_and_loads_with_auto_classes(testbed_dir, small_testbed_spec):
    model = _load_model(testbed_dir)
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.config.num_hidden_layers == 26 == len(model.model.layers)
    assert model.config.hidden_size == small_testbed_spec.hidden_size
    assert model.config._attn_implementation == "eager"
    batch = _load_tokenizer(testbed_dir)(["The testbed speaks a little English."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], small_testbed_spec.vocab_size)
    assert torch.isfinite(logits).all()


def test_tokenizer_prepends_bos_pads_with_pad_and_round_trips_every_language(testbed_dir):
    tokenizer = _load_tokenizer(testbed_dir)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == \
        ("<pad>", "<bos>", "<eos>", "<unk>")
    heldout = load_flores(flores_langs(), "test", max_sentences=3)
    for lang in flores_langs():
        for text in heldout[lang]:
            ids = tokenizer(text)["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:], lang
            assert tokenizer.decode(ids, skip_special_tokens=True) == text, lang
    batch = tokenizer(["a", "a much longer sentence than the first"], padding=True)
    short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
    assert short_ids[:2] == [tokenizer.bos_token_id, tokenizer("a")["input_ids"][1]]
    assert set(short_ids[2:]) == {tokenizer.pad_token_id} and sum(short_mask) == 2


@pytest.mark.slow
def test_every_layer_has_a_fitting_sae_on_held_out_text(testbed_dir, small_testbed_spec):
    from sae_lens import SAE, JumpReLUSAE

    tokenizer, model = _load_tokenizer(testbed_dir), _load_model(testbed_dir)
    heldout = load_flores(flores_langs(), "test", max_sentences=4)
    batch = tokenizer([s for lang in flores_langs() for s in heldout[lang]], padding=True, truncation=True,
                      max_length=small_testbed_spec.max_length, return_tensors="pt")
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != tokenizer.bos_token_id)
    with torch.no_grad(), ResidualCapture(model, list(range(26))) as capture:
        residuals = capture.forward(**batch)
    d_sae = small_testbed_spec.sae_width_multiple * small_testbed_spec.hidden_size
    for layer in range(26):
        sae = SAE.load_from_disk(testbed_dir / "saes" / f"layer_{layer}")
        assert isinstance(sae, JumpReLUSAE)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.d_in == small_testbed_spec.hidden_size and sae.cfg.d_sae == d_sae
        acts = residuals[layer][keep]
        with torch.no_grad():
            features = sae.encode(acts)
            recon = sae.decode(features)
        fired = features > 0
        firing_features = fired.any(0).sum().item()
        assert 0 < firing_features < d_sae, f"layer {layer}: {firing_features} of {d_sae} features fire"
        assert 0 < fired.sum(-1).float().mean().item() < d_sae / 2, f"layer {layer} is not sparse"
        explained = 1 - (acts - recon).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
        assert explained > 0.8, f"layer {layer}: SAE explains {explained:.2f} of held-out variance"


def test_build_info_records_phases_losses_and_sae_quality(testbed_dir, small_testbed_spec):
    info = json.loads((testbed_dir / "build_info.json").read_text())
    assert TestbedSpec(**info["spec"]) == small_testbed_spec
    assert set(info["seconds"]) == {"tokenizer", "pretrain", "sae_data", "saes", "sae_eval"}
    assert set(info["pretrain_loss"]) == set(small_testbed_spec.lang_mix)
    assert sorted(info["sae"]["per_layer"], key=int) == [str(layer) for layer in range(26)]
    for stats in info["sae"]["per_layer"].values():
        assert 0 < stats["l0_pct"] < 100 and stats["explained_variance"] > 0.5


def test_english_heavy_mix_leaves_low_resource_languages_worse_modelled(testbed_dir):
    # Compared within the Latin script: per-token loss is not comparable across scripts, since byte-level tokens of
    # Devanagari or Malayalam are short and easy to predict whatever the model knows.
    loss = json.loads((testbed_dir / "build_info.json").read_text())["pretrain_loss"]
    for low_resource in ("id", "ca"):
        assert loss["en"] < loss[low_resource], loss


def test_the_planted_gap_puts_the_planted_languages_residuals_below_englishs(testbed_dir, small_testbed_spec):
    """The known answer the demo rests on: pretraining pushed hi/mr/ml's residual norm to about 80% of English's at
    every layer (planted_gap_pct=20), on held-out sentences it never trained on."""
    model = _load_model(testbed_dir)
    tokenizer = _load_tokenizer(testbed_dir)
    dev = load_flores(["en", *small_testbed_spec.planted_gap_langs], "dev", max_sentences=16, normalize=None)
    norms = {}
    with ResidualCapture(model, list(range(26)), stop_after_last=True) as capture, torch.no_grad():
        for lang in dev.langs:
            batch = tokenizer(dev[lang], padding=True, truncation=True, max_length=64, return_tensors="pt")
            mask = batch["attention_mask"].bool()
            mask[:, 0] = False
            norms[lang] = {layer: h[mask].norm(dim=-1).mean().item() for layer, h in capture.forward(**batch).items()}
    for lang in small_testbed_spec.planted_gap_langs:
        ratios = [norms[lang][layer] / norms["en"][layer] for layer in range(26)]
        assert sum(r < 1.0 for r in ratios) >= 24, (lang, ratios)
        assert 0.7 < sum(ratios) / len(ratios) < 0.9, (lang, ratios)


def test_the_planted_gap_penalty_is_zero_on_target_and_moves_only_the_planted_side():
    from mlalign.testbed.lm import planted_gap_penalty

    spec = TestbedSpec(planted_gap_pct=20.0, planted_gap_weight=10.0)
    batch = {"attention_mask": torch.ones(2, 3, dtype=torch.long)}
    english = torch.ones(1, 3, 4) * 2.0
    on_target = torch.cat([english, english * 0.8]).requires_grad_()  # hi tokens at 80% of English's norm
    assert planted_gap_penalty([on_target], batch, ["en", "hi"], spec).item() == pytest.approx(0.0, abs=1e-10)
    equal = torch.cat([english, english]).requires_grad_()  # no gap: (1 - 0.8)^2 x 10 per layer
    penalty = planted_gap_penalty([equal, equal], batch, ["en", "hi"], spec)
    assert penalty.item() == pytest.approx(2 * 10 * 0.2 ** 2)
    penalty.backward()
    assert equal.grad[0].abs().sum() == 0 and equal.grad[1].abs().sum() > 0  # English held fixed
    assert planted_gap_penalty([equal], batch, ["en", "es"], spec).item() == 0.0  # no planted language in the batch


def test_second_call_is_a_cache_hit(testbed_dir, small_testbed_spec, testbed_cache_dir, monkeypatch):
    marker = testbed_dir / "COMPLETE"
    before = {path: path.stat().st_mtime_ns for path in [marker, *testbed_dir.rglob("*.safetensors")]}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_testbed rebuilt a complete testbed")

    monkeypatch.setattr(build, "build_testbed", no_rebuild)
    assert ensure_testbed(small_testbed_spec, testbed_cache_dir, progress=False) == testbed_dir
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    def interrupted(spec, out_dir, progress=True):
        (Path(out_dir) / "model").mkdir()
        (Path(out_dir) / "model" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_testbed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_testbed(MINI, tmp_path, progress=False)
    assert not spec_dir(MINI, tmp_path).exists()
    assert list((tmp_path / "testbed").iterdir()) == []  # no half-built staging directory left behind


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    # One build here and one in a fresh interpreter with another hash seed and thread count: nothing the process
    # happens to hold may leak into the weights.
    here = ensure_testbed(MINI, tmp_path / "a", progress=False)
    script = ("import sys; from mlalign.testbed import TestbedSpec, ensure_testbed; "
              f"ensure_testbed(TestbedSpec(**{MINI.__dict__!r}), sys.argv[1], progress=False)")
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True, env=env, cwd=REPO)
    there = spec_dir(MINI, tmp_path / "b")
    assert (there / "COMPLETE").is_file()

    weights_here, weights_there = _weights(here), _weights(there)
    assert len(weights_here) > 4 * 4 and weights_here.keys() == weights_there.keys()
    for name, tensor in weights_here.items():
        assert torch.equal(tensor, weights_there[name]), name
    assert (here / "model" / "tokenizer.json").read_bytes() == (there / "model" / "tokenizer.json").read_bytes()

    other = _weights(ensure_testbed(replace(MINI, seed=1), tmp_path / "a", progress=False))
    model_tensors = [name for name in weights_here if name.startswith("model/")]
    assert not any(torch.equal(weights_here[name], other[name]) for name in model_tensors if "norm" not in name)
