"""task=eval_compare: two lm-eval sample folders (any producer) through task=eval's paired tests; known answers."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from mlalign.errors import UserError
from mlalign.tasks.eval_compare import compare_folders
from tests.helpers import run_cli

DATE = "2026-01-02T03-04-05.678901"


def _write_samples(folder, task, acc, acc_norm=None, date=DATE):
    """lm-eval's layout: <output_path>/<model name>/samples_<task>_<date>.jsonl, one JSON object per item."""
    model_dir = folder / "org__model"
    model_dir.mkdir(parents=True, exist_ok=True)
    with (model_dir / f"samples_{task}_{date}.jsonl").open("w") as handle:
        for doc_id, score in enumerate(acc):
            sample = {"doc_id": doc_id, "doc": {"q": doc_id}, "target": 0, "filter": "none",
                      "metrics": ["acc", "acc_norm"], "acc": float(score),
                      "acc_norm": float(score if acc_norm is None else acc_norm[doc_id])}
            handle.write(json.dumps(sample) + "\n")
    return folder


def _scores(n, right, seed):
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=int)
    out[rng.choice(n, right, replace=False)] = 1
    return out


def test_a_folder_compared_with_itself_gives_p_1_zero_difference_and_the_mde_floor(tmp_path):
    folder = _write_samples(tmp_path / "run", "arc_easy", _scores(120, 70, 0))
    _write_samples(folder, "mmlu_anatomy", _scores(80, 30, 1))
    comparison = compare_folders(folder, folder, alpha=0.05, resamples=2000)
    z = norm.ppf(0.975) + norm.ppf(0.8)
    for task, n in (("arc_easy", 120), ("mmlu_anatomy", 80)):
        cell = comparison["results"][task]["all"]
        assert cell["p_value"] == 1.0 and cell["p_holm"] == 1.0 and cell["significant"] is False
        assert cell["diff"]["acc"] == 0.0 and cell["diff_ci"] == [0.0, 0.0]
        assert cell["significance"]["discordant"] == [0, 0] and cell["n_samples"] == n
        assert cell["mde"] == pytest.approx(z * z / n)  # no disagreement: the floor, not zero


def test_flipped_items_give_the_exact_mcnemar_p_and_difference(tmp_path):
    a = _scores(200, 100, 2)
    b = a.copy()
    right, wrong = np.flatnonzero(a == 1), np.flatnonzero(a == 0)
    b[right[:5]] = 0   # 5 items only a gets right
    b[wrong[:17]] = 1  # 17 items only b gets right
    _write_samples(tmp_path / "a", "arc_easy", a)
    _write_samples(tmp_path / "b", "arc_easy", b)
    _write_samples(tmp_path / "b", "hellaswag", a)  # only in b: skipped, not tested
    comparison = compare_folders(tmp_path / "a", tmp_path / "b", resamples=2000)
    cell = comparison["results"]["arc_easy"]["all"]
    assert cell["diff"]["acc"] == pytest.approx(12 / 200)
    assert cell["significance"]["discordant"] == [5, 17]
    assert cell["p_value"] == pytest.approx(binomtest(5, 22, 0.5).pvalue)
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert cell["mde"] == pytest.approx(z * np.sqrt(22 / 200 / 200))
    assert comparison["skipped"] == [{"benchmark": "hellaswag", "lang": "all", "reason": "only in b"}]


def test_the_newest_samples_file_of_a_task_is_read_and_different_items_are_refused(tmp_path):
    _write_samples(tmp_path / "a", "arc_easy", [0] * 10, date="2025-01-01T00-00-00.000000")
    _write_samples(tmp_path / "a", "arc_easy", [1] * 10)
    _write_samples(tmp_path / "b", "arc_easy", [1] * 10)
    comparison = compare_folders(tmp_path / "a", tmp_path / "b", resamples=100)
    assert comparison["results"]["arc_easy"]["all"]["base"]["acc"] == 1.0  # the 2026 file, not the 2025 one
    _write_samples(tmp_path / "c", "arc_easy", [1] * 8)
    with pytest.raises(UserError, match="not the same items"):
        compare_folders(tmp_path / "a", tmp_path / "c")


def test_cli_writes_the_table_and_a_missing_folder_is_one_error_line(tmp_path):
    folder = _write_samples(tmp_path / "run", "arc_easy", _scores(40, 20, 3))
    done = run_cli(["task=eval_compare", f"a={folder}", f"b={folder}", "eval.bootstrap=200",
                    f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "eval_compare" / "results.json").read_text())
    assert results["results"]["arc_easy"]["all"]["p_value"] == 1.0
    table = (tmp_path / "out" / "eval_compare" / "results.md").read_text()
    assert "| a acc | b acc |" in table and "| MDE |" in table and "0 of 1 differences are significant" in table
    missing = run_cli(["task=eval_compare", f"a={folder}", f"paths.root_dir={tmp_path}"])
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: b= is not set; task=eval_compare a=DIR b=DIR (two lm-eval output folders with samples_*.jsonl, "
        "e.g. from --log_samples)")
