"""A sweep's W&B dashboard as code (wandb-workspaces): one workspace, and online a report, with mlalign's panels.

The panels are the ones docs ask a reader to look at: the LoRA rank against the dev activation gain, each target
language's FVU ratio and English retention against the rank, the LM loss during training, parallel coordinates from
every swept parameter to the outcomes, and per-language gain bars. `dashboard_spec` is plain data (what each panel
shows); `workspace` turns it into wandb-workspaces objects; offline, both are written as JSON next to the same plots
rendered locally, so the spec is inspectable (and testable) without a W&B account.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mlalign.errors import UserError

RANK = "lora.r"
GAIN = "dev_activation_gain_pct_mean"
RETENTION = "dev_english_retention_pct"
LM_LOSS = ("train/step", "train/ce")
"""The step axis and the next-token loss (nats) task=train logs during training (mlalign/training/loop.py)."""
_PER_LANG = re.compile(r"^dev_(activation_gain_pct|fvu_ratio)_(?P<lang>[a-z]{2,3})$")


def _job_config(sweep_dir: Path) -> tuple[dict, dict]:
    """(resolved job config, Hydra's runtime choices) of the sweep's first job that has them."""
    for config in sorted(sweep_dir.glob("*/config.yaml")):
        hydra_file = config.parent / ".hydra" / "hydra.yaml"
        choices = {}
        if hydra_file.is_file():
            choices = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        return yaml.safe_load(config.read_text()) or {}, choices
    return {}, {}


def wandb_target(sweep_dir: Path, logger_cfg) -> dict:
    """entity, project and group of the sweep's W&B runs: the group each job was logged under (the job's logger.group,
    else `<experiment or task>-<sweep folder>`, as mlalign.tasks.common.job_name_and_group names it)."""
    job, choices = _job_config(sweep_dir)
    job_logger = job.get("logger") or {}
    experiment = choices.get("experiment")
    if experiment in (None, "null"):
        experiment = None
    group = job_logger.get("group") or f"{experiment or job.get('task', 'train')}-{sweep_dir.name}"
    return {"entity": job_logger.get("entity") or logger_cfg.get("entity"),
            "project": job_logger.get("project") or logger_cfg.get("project") or "mlalign",
            "group": str(group), "logged_to_wandb": job_logger.get("backend") == "wandb"}


def dashboard_spec(rows: list[dict], params: list[str], title: str, target: dict) -> dict:
    """The panels as plain data: {"title", "target", "sections": [{"name", "panels": [{"kind", "title", ...}]}]}.
    x axes are run config keys (`config:`), y axes run summary keys (`summary:`) or logged history keys."""
    metrics = sorted({key for row in rows for key, value in row.items() if isinstance(value, (int, float))
                      and not isinstance(value, bool)})
    langs = sorted({m["lang"] for key in metrics if (m := _PER_LANG.match(key))})
    x = RANK if RANK in params or not params else params[0]
    outcomes = [
        {"kind": "scatter", "title": f"{x} vs valid (dev) activation gain (%)", "x": f"config:{x}", "y": f"summary:{GAIN}"},
        *({"kind": "scatter", "title": f"{x} vs FVU ratio, {lang} (1 = SAE fits as well as before)",
           "x": f"config:{x}", "y": f"summary:dev_fvu_ratio_{lang}"} for lang in langs),
        {"kind": "scatter", "title": f"{x} vs English retention (%)", "x": f"config:{x}", "y": f"summary:{RETENTION}"},
        {"kind": "line", "title": "LM loss (nats) during training", "x": LM_LOSS[0], "y": [LM_LOSS[1]]},
    ]
    parallel_metrics = [m for m in ("alignment_score", GAIN, *(f"dev_fvu_ratio_{lang}" for lang in langs), RETENTION)
                        if m in metrics]
    overview = [
        {"kind": "parallel_coordinates", "title": "swept parameters -> outcomes",
         "columns": [f"config:{p}" for p in params] + [f"summary:{m}" for m in parallel_metrics]},
        {"kind": "bar", "title": "dev activation gain (%) per language",
         "metrics": [f"summary:dev_activation_gain_pct_{lang}" for lang in langs]},
    ]
    return {"title": title, "target": target, "langs": langs, "params": params,
            "sections": [{"name": "Outcomes vs " + x, "panels": outcomes}, {"name": "Sweep overview", "panels": overview}]}


def _axis(key: str):
    import wandb_workspaces.reports.v2 as wr

    section, _, name = key.partition(":")
    if section == "config":
        return wr.Config(name)
    if section == "summary":
        return wr.SummaryMetric(name)
    return key  # a logged history key


def panels(section: dict) -> list:
    """wandb-workspaces panel objects of one spec section."""
    import wandb_workspaces.reports.v2 as wr

    out = []
    for panel in section["panels"]:
        kind = panel["kind"]
        if kind == "scatter":
            out.append(wr.ScatterPlot(title=panel["title"], x=_axis(panel["x"]), y=_axis(panel["y"])))
        elif kind == "line":
            out.append(wr.LinePlot(title=panel["title"], x=panel["x"], y=list(panel["y"])))
        elif kind == "parallel_coordinates":
            out.append(wr.ParallelCoordinatesPlot(title=panel["title"], columns=[
                wr.ParallelCoordinatesPlotColumn(metric=_axis(column)) for column in panel["columns"]]))
        elif kind == "bar":
            out.append(wr.BarPlot(title=panel["title"], metrics=[_axis(m) for m in panel["metrics"]]))
        else:
            raise ValueError(f"unknown panel kind {kind!r}")
    return out


def workspace(spec: dict):
    """The wandb-workspaces Workspace of `spec`: its sections, runs filtered to the sweep's W&B group."""
    import wandb_workspaces.workspaces as ws

    target = spec["target"]
    return ws.Workspace(
        entity=target["entity"] or "", project=target["project"], name=spec["title"],
        sections=[ws.Section(name=section["name"], panels=panels(section), is_open=True) for section in spec["sections"]],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == target["group"]]))


def workspace_json(spec: dict) -> dict:
    """What `Workspace.save()` would send (the view model wandb-workspaces builds), without a W&B account."""
    return workspace(spec)._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def publish(spec: dict) -> list[str]:
    """Save the workspace and a report of the same panels to W&B; their URLs. Needs `wandb login`."""
    import wandb_workspaces.reports.v2 as wr

    if not spec["target"]["entity"]:  # logger.entity=null: the account's default entity, as wandb.init uses
        import wandb

        spec = {**spec, "target": {**spec["target"], "entity": wandb.Api().default_entity}}
    target = spec["target"]
    saved = workspace(spec).save()
    runset = wr.Runset(entity=target["entity"], project=target["project"], name=target["group"],
                       filters=f"Group = '{target['group']}'")
    report = wr.Report(entity=target["entity"], project=target["project"], title=spec["title"],
                       description="Written by mlalign task=dashboard (wandb-workspaces).",
                       blocks=[block for section in spec["sections"]
                               for block in (wr.H2(section["name"]), wr.PanelGrid(runsets=[runset], panels=panels(section)))])
    report.save()
    return [saved.url, report.url]


def plot_language_bars(rows: list[dict], langs: list[str], path: Path) -> Path | None:
    """Per-language dev activation gain, one group of bars per completed job (the per-language bar panel, locally)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r.get("status") == "ok" and any(f"dev_activation_gain_pct_{l}" in r for l in langs)]
    if not done or not langs:
        return None
    figure = Figure(figsize=(max(4.0, 1.2 * len(langs) + 2), 3.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(done)
    for k, row in enumerate(done):
        values = [row.get(f"dev_activation_gain_pct_{lang}", float("nan")) for lang in langs]
        axes.bar([i + (k - (len(done) - 1) / 2) * width for i in range(len(langs))], values, width,
                 label=f"job {row['job']}")
    axes.set_xticks(range(len(langs)), langs)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_ylabel("dev activation gain (%)")
    axes.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    from mlalign.io import save_figure

    return save_figure(figure, path, format="png", dpi=120)  # atomic: no cut image under the final name


def write_offline(spec: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    """spec.json (the panels), workspace.json (what would be saved to W&B) and the panels rendered locally."""
    from mlalign.io import write_json_atomic
    from mlalign.sweeps import plot_parallel_coordinates, plot_sweep

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "spec.json", spec)
    write_json_atomic(out_dir / "workspace.json", workspace_json(spec))
    langs = spec["langs"]
    metrics = [GAIN, *(f"dev_fvu_ratio_{lang}" for lang in langs), RETENTION, "final_ce"]
    plots = plot_sweep(rows, out_dir, metrics) + [plot_parallel_coordinates(rows, out_dir),
                                                   plot_language_bars(rows, langs, out_dir / "language_bars.png")]
    return [out_dir / "spec.json", out_dir / "workspace.json", *(p for p in plots if p is not None)]


def check_rows(rows: list[dict], sweep_dir: Path) -> None:
    if not rows:
        raise UserError(f"{sweep_dir} holds no job (no */metrics.json or */.hydra); pass sweep_dir=multirun/train/<date>")
    if not any(isinstance(r.get(GAIN), (int, float)) for r in rows):
        raise UserError(f"no job in {sweep_dir} has {GAIN}: the dashboard is for task=train sweeps "
                        "(python run.py -m task=train lora.r=4,8,16 ...)")

