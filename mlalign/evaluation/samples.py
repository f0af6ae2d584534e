"""Read any lm-eval output folder's per-item scores (`samples_<task>_<date>.jsonl`), mlalign's or not, into the shape
`run_plan` returns, so two folders are compared with the same paired tests as base vs adapter."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from mlalign.errors import UserError

PAIRED_METRICS = ("acc", "exact_match")
"""Per-item 0/1 scores, first found wins: what McNemar's test pairs (acc_norm is carried beside acc)."""

_SAMPLES = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.]+)\.jsonl$")


def samples_files(folder: str | Path) -> dict[str, Path]:
    """task -> its newest samples file under `folder` (lm-eval writes them in a sub-folder named after the model)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a folder holding lm-eval's samples_*.jsonl "
                        "(an lm-eval --output_path run with --log_samples, or mlalign's eval/lm_eval/<side>/)")
    found: dict[str, Path] = {}
    parents = set()
    for path in sorted(folder.rglob("samples_*.jsonl")):
        match = _SAMPLES.match(path.name)
        if match is None:
            continue
        parents.add(path.parent)
        task = match["task"]
        if task not in found or match["date"] > _SAMPLES.match(found[task].name)["date"]:
            found[task] = path
    if not found:
        raise UserError(f"no samples_<task>_<date>.jsonl under {folder}; rerun lm-eval with --log_samples "
                        "(mlalign: eval.log_samples=true) and pass that output folder")
    if len(parents) > 1:
        raise UserError(f"{folder} holds samples of {len(parents)} runs ({', '.join(sorted(str(p) for p in parents))}); "
                        "pass one of those folders")
    return found


def _score(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_task_samples(path: Path) -> dict:
    """One task's row: acc (or exact_match) and acc_norm as means of the per-item scores, their standard errors,
    and `items` keyed `<task>/<doc_id>` (unfiltered responses only, as lm-eval's own metrics use)."""
    task = _SAMPLES.match(path.name)["task"]
    ids, scores = [], {"acc": [], "acc_norm": []}
    metric = None
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            sample = json.loads(line)
            if sample.get("filter", "none") not in ("none", None):
                continue
            if metric is None:
                metric = next((name for name in PAIRED_METRICS if name in sample), None)
                if metric is None:
                    raise UserError(f"{path}: no per-item {' or '.join(PAIRED_METRICS)} score; eval_compare pairs "
                                    "0/1 scores (multiple-choice acc, generation exact_match)")
            ids.append(f"{task}/{sample['doc_id']}")
            scores["acc"].append(_score(sample.get(metric)))
            scores["acc_norm"].append(_score(sample.get("acc_norm")))
    if len(set(ids)) != len(ids):
        raise UserError(f"{path} scores some doc_id twice (repeats or several filters); eval_compare needs one score "
                        "per item")
    row = {"task": task, "n_samples": len(ids), "num_fewshot": None, "metric": metric,
           "items": {"ids": ids, "acc": None, "acc_norm": None}}
    for name, values in scores.items():
        complete = bool(values) and all(v is not None for v in values)
        mean = sum(values) / len(values) if complete else None
        stderr = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
                  if complete and len(values) > 1 else None)
        row[name], row[f"{name}_stderr"] = mean, stderr
        row["items"][name] = values if complete else None
    return row


def read_run(folder: str | Path) -> dict:
    """{"results": {task: {"all": row}}, "skipped": [], "settings": {"folder": ...}}: `compare_results`' input."""
    files = samples_files(folder)
    return {"results": {task: {"all": read_task_samples(path)} for task, path in sorted(files.items())},
            "skipped": [], "settings": {"folder": str(Path(folder).resolve())}}
