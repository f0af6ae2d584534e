"""The cost numbers docs/compare.md and README.md quote, from the committed `testbed_cost.json` (`make docs` writes them
into the marked blocks; mlalign/docs_numbers.py)."""

from __future__ import annotations

import json
from pathlib import Path

COST = Path(__file__).resolve().parent / "testbed_cost.json"


def load() -> dict:
    return json.loads(COST.read_text())


def compare_over_train() -> str:
    """task=compare's wall-clock over task=train's, from the two wall-clocks (not from the file's own rounded ratio)."""
    cost = load()
    return f"{cost['compare_wall_s'] / cost['train_wall_s']:.1f}"


def held_out_unit_s() -> str:
    """Seconds per held-out unit: the held-out stage over its units."""
    cost = load()
    return f"{cost['compare_stages_s']['held_out_units'] / cost['compare_counts']['held_out_units']:.0f}"


def cost() -> str:
    """docs/compare.md's measured cost: both wall-clocks, their ratio, and what the comparison ran."""
    c, n = load(), load()["compare_counts"]
    return (f"task=train {c['train_wall_s']} s, task=compare {c['compare_wall_s']} s ({compare_over_train()}x: "
            f"{n['training_runs']} trainings, {n['dev_scorings']} dev scorings, {n['held_out_units']} held-out units "
            f"of ~{held_out_unit_s()} s each)")
