"""The cost numbers docs/compare.md and README.md print are the ones in experiments/gemma3_270m_compare/testbed_cost.json."""

from __future__ import annotations

import json

from tests.helpers import REPO


def test_cost_numbers_in_the_docs_come_from_the_committed_measurement():
    cost = json.loads((REPO / "experiments/gemma3_270m_compare/testbed_cost.json").read_text())
    ratio = cost["compare_wall_s"] / cost["train_wall_s"]
    assert f"{ratio:.1f}" == f"{cost['compare_over_train']:.1f}"
    docs = (REPO / "docs/compare.md").read_text()
    assert f"task=train {cost['train_wall_s']} s" in docs and f"task=compare {cost['compare_wall_s']} s" in docs
    assert f"({cost['compare_over_train']:.1f}x: {cost['compare_counts']['training_runs']} trainings" in docs
    assert f"took {cost['compare_over_train']:.1f}x one task=train" in (REPO / "README.md").read_text()
