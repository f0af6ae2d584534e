"""compare_results arithmetic and the three output files (results.json, results.md, accuracy.png)."""

import json

import pytest

from mlalign.evaluation.report import compare_results, flat_metrics, write_eval_outputs


def _run(acc_arc_hi, acc_mmlu_hi, n=10):
    def row(task, acc, acc_norm=None):
        return {"task": task, "acc": acc, "acc_stderr": 0.1, "acc_norm": acc_norm,
                "acc_norm_stderr": None if acc_norm is None else 0.1, "n_samples": n}

    return {
        "results": {
            "arc_challenge": {"en": row("mlalign_arc_en", 0.5, 0.6), "hi": row("mlalign_arc_hi", acc_arc_hi, 0.3)},
            "mmlu": {"hi": row("mlalign_mmlu_hi", acc_mmlu_hi)},
            "hellaswag": {},
        },
        "skipped": [{"benchmark": "hellaswag", "lang": "hi", "reason": "HellaSwag is not bundled"}],
        "settings": {"suite": "bundled", "limit": n},
    }


def test_diff_is_adapter_minus_base():
    comparison = compare_results(_run(0.25, 0.40), _run(0.35, 0.30))
    cell = comparison["results"]["arc_challenge"]["hi"]
    assert cell["base"]["acc"] == 0.25 and cell["adapter"]["acc"] == 0.35
    assert cell["diff"]["acc"] == pytest.approx(0.10) and cell["diff"]["acc_norm"] == pytest.approx(0.0)
    assert comparison["results"]["mmlu"]["hi"]["diff"] == {"acc": pytest.approx(-0.10), "acc_norm": None}
    assert comparison["has_adapter"] and comparison["skipped"][0]["benchmark"] == "hellaswag"
    flat = flat_metrics(comparison)
    assert flat["mmlu/hi/diff_acc"] == pytest.approx(-0.10) and "mmlu/hi/diff_acc_norm" not in flat


def test_base_only_has_no_adapter_or_diff():
    comparison = compare_results(_run(0.25, 0.40))
    cell = comparison["results"]["arc_challenge"]["hi"]
    assert cell["adapter"] is None and cell["diff"] is None and not comparison["has_adapter"]
    assert not any(key.split("/")[-1].startswith(("adapter", "diff")) for key in flat_metrics(comparison))


def test_runs_on_different_items_are_refused():
    with pytest.raises(ValueError, match="same limit"):
        compare_results(_run(0.2, 0.4, n=10), _run(0.2, 0.4, n=20))


@pytest.mark.parametrize("with_adapter", [True, False])
def test_outputs_are_written(tmp_path, with_adapter):
    comparison = compare_results(_run(0.25, 0.40), _run(0.35, 0.30) if with_adapter else None)
    paths = write_eval_outputs(tmp_path / "eval", comparison)
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == comparison
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "| arc_challenge | hi | mlalign_arc_hi | 10 | – | 0.2500 ± 0.1000 |" in markdown
    assert ("+0.1000" in markdown) == with_adapter and ("Base model only" in markdown) != with_adapter
    assert "HellaSwag is not bundled" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["accuracy.png", "results.json", "results.md"]
