"""task=eval_compare a=DIR b=DIR: task=eval's paired tests (McNemar exact, paired bootstrap CI, Holm over tasks, minimum
detectable effect) on any two lm-eval output folders holding samples_*.jsonl, mlalign's or not; b minus a."""

from __future__ import annotations

from pathlib import Path

from mlalign.errors import UserError
from mlalign.evaluation.report import compare_results, headline_lines, summary_metrics, write_eval_outputs
from mlalign.evaluation.samples import read_run

USAGE = "task=eval_compare a=DIR b=DIR (two lm-eval output folders with samples_*.jsonl, e.g. from --log_samples)"


def check_config(cfg) -> None:
    """Both folders read (kilobytes to megabytes of JSON lines) before anything else starts."""
    for side in ("a", "b"):
        if not cfg.get(side):
            raise UserError(f"{side}= is not set; {USAGE}")
    read_run(cfg.a), read_run(cfg.b)


def compare_folders(a_dir, b_dir, alpha: float = 0.05, ci: float = 0.95, resamples: int = 10000, seed: int = 0) -> dict:
    """compare_results of the tasks both folders scored (b minus a); tasks only one of them scored are `skipped`."""
    a, b = read_run(a_dir), read_run(b_dir)
    common = sorted(set(a["results"]) & set(b["results"]))
    if not common:
        raise UserError(f"{a_dir} and {b_dir} share no task (a: {', '.join(a['results'])}; "
                        f"b: {', '.join(b['results'])}); compare two runs of the same lm-eval tasks")
    for task in common:
        a_row, b_row = a["results"][task]["all"], b["results"][task]["all"]
        if set(a_row["items"]["ids"]) != set(b_row["items"]["ids"]) or a_row["metric"] != b_row["metric"]:
            raise UserError(f"task {task}: a scored {a_row['n_samples']} items ({a_row['metric']}), b "
                            f"{b_row['n_samples']} ({b_row['metric']}) that are not the same items; compare runs "
                            "with the same --limit and task version")
    skipped = [{"benchmark": task, "lang": "all", "reason": f"only in {side}"}
               for side, run, other in (("a", a, b), ("b", b, a)) for task in run["results"]
               if task not in other["results"]]
    keep = lambda run: {**run, "results": {task: run["results"][task] for task in common}}  # noqa: E731
    comparison = compare_results(keep(a), keep(b), alpha=alpha, ci=ci, resamples=resamples, seed=seed)
    comparison.update(labels=["a", "b"], skipped=skipped,
                      settings={"a": str(Path(a_dir).resolve()), "b": str(Path(b_dir).resolve())})
    return comparison


def run(cfg, ctx) -> dict[str, float]:
    from mlalign.console import headline, output

    ecfg = cfg.eval
    comparison = compare_folders(cfg.a, cfg.b, alpha=float(ecfg.get("alpha", 0.05)), ci=float(ecfg.get("ci", 0.95)),
                                 resamples=int(ecfg.get("bootstrap", 10000)), seed=int(cfg.seed))
    paths = write_eval_outputs(ctx.run_dir / "eval_compare", comparison)
    print(paths["markdown"].read_text())
    headline(*headline_lines(comparison))
    output("results", paths["markdown"])
    return summary_metrics(comparison)
