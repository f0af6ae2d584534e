"""Atomic writes under a full disk, and users' JSON / safetensors files read with one-line errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from mlalign.errors import UserError
from mlalign.io import check_adapter_files, disk_full_error, read_json_file, safetensors_shapes, write_dir_atomic
from tests.helpers import REPO


def test_a_plot_that_does_not_fit_leaves_no_file_under_its_name(tmp_path):
    """A real out-of-space write: the file-size limit (RLIMIT_FSIZE) makes the PNG's write fail half-way (EFBIG), as a
    full disk fails it with ENOSPC. Before plots went through the atomic writer a truncated PNG stayed behind."""
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
        from mlalign.analysis.plots import plot_layer_curves
        summary = {{"metric": "mean_act", "aggregate": "token", "layers": [0, 1, 2], "langs": ["en", "hi"],
                    "reference_lang": "en",
                    "ci": 0.95, "bands": {{"early": [0, 0], "middle": [1, 1], "deep": [2, 2]}},
                    "values": {{lang: {{str(l): {{"mean_act": 1.0 + l}} for l in range(3)}} for lang in ("en", "hi")}}}}
        try:
            plot_layer_curves(summary, {str(tmp_path / "curves.png")!r})
        except OSError as err:
            from mlalign.io import disk_full_error
            print("disk full" if disk_full_error(err) else repr(err))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "disk full" in result.stdout, result.stdout + result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither a truncated curves.png nor its temp file


def test_a_folder_save_that_fails_half_way_leaves_the_previous_folder_whole(tmp_path):
    """Issue 30 audit: the trained adapter (peft save_pretrained) and the trained SAEs (sae-lens save_model) were
    written straight into their final folders, so a full disk left a cut adapter_model.safetensors there."""
    import errno

    target = tmp_path / "adapter"

    def save(files):
        def write(folder):
            for name, text in files.items():
                (folder / name).write_text(text)
        return write

    write_dir_atomic(target, save({"adapter_config.json": "{}", "adapter_model.safetensors": "old"}))

    def fails(folder):
        (folder / "adapter_model.safetensors").write_text("cut")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_dir_atomic(target, fails)
    assert (target / "adapter_model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left
    write_dir_atomic(target, save({"adapter_model.safetensors": "new"}))
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors"]  # replaced whole
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_disk_full_is_recognised_behind_a_library_error():
    inner = OSError(28, "No space left on device", "/x/y")
    try:
        try:
            raise inner
        except OSError as err:
            raise RuntimeError("file write failed") from err
    except RuntimeError as outer:
        assert disk_full_error(outer) is inner
    assert disk_full_error(RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                                        "No space left on device")) is not None
    assert disk_full_error(ValueError("bad value")) is None


def test_json_and_safetensors_damage_are_user_errors_naming_the_file(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 8), "b": torch.ones(3)}, str(good))
    assert safetensors_shapes(good, "weights", "fix it") == {"a": [4, 8], "b": [3]}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match=r"weights .*cut.safetensors is truncated or damaged.*; fix it"):
        safetensors_shapes(cut, "weights", "fix it")
    (tmp_path / "head.safetensors").write_bytes(good.read_bytes()[:20])
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        safetensors_shapes(tmp_path / "head.safetensors", "weights", "fix it")
    (tmp_path / "c.json").write_text('{"r": 8')
    with pytest.raises(UserError, match=r"c.json is not valid JSON \(.* line 1"):
        read_json_file(tmp_path / "c.json", "config", "fix it")
    assert read_json_file(_json(tmp_path), "config", "fix") == {"r": 8}


def _json(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"r": 8}))
    return path


def test_a_truncated_adapter_is_refused_before_any_model_loads(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    save_file({"w": torch.zeros(64, 64)}, str(adapter / "adapter_model.safetensors"))
    assert check_adapter_files(adapter)["r"] == 8
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    from mlalign.models import check_adapter

    with pytest.raises(UserError, match=r"adapter weights .*adapter_model.safetensors is truncated"):
        check_adapter(adapter)
