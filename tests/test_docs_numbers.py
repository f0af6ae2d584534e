"""Every documented number is the one its committed result file gives (mlalign/docs_numbers.py, `make docs`), and the
check finds a number that disagrees, whichever side changed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mlalign.docs_numbers import BLOCK, blocks, check, doc_files, main, write
from tests.helpers import REPO

COST = "experiments/gemma3_270m_compare/testbed_cost.json"


def test_every_documented_number_agrees_with_its_result_file():
    assert check(REPO) == []


def test_the_docs_carry_generated_numbers_from_each_committed_result_file():
    specs = " ".join(b.spec for f in doc_files(REPO) for b in blocks(REPO, f))
    for source in ("experiments/performance/tables.py", "experiments/performance/cpu/latest.json",
                   "experiments/gemma3_270m/tables.py", "experiments/tolerance_calibration/calibrate.py",
                   "experiments/gemma3_270m_compare/tables.py",
                   "experiments/performance/gpu_h100/gemma2_2b_stacked.json"):
        assert source in specs, source


def test_every_source_a_block_names_is_committed():
    """A block's file must be in the repository (not an outputs/ directory that only one machine has)."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    tracked = set(subprocess.run([git, "-C", str(REPO), "ls-files"], capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    sources = {b.spec.split(" ")[0].split(":")[0] for f in doc_files(REPO) for b in blocks(REPO, f)}
    assert sources and not sources - tracked, sorted(sources - tracked)


def _copy(tmp_path: Path, *paths: str) -> Path:
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, tmp_path / path)
    return tmp_path / paths[0]


def test_a_wrong_inline_number_in_the_docs_is_reported(tmp_path):
    readme = _copy(tmp_path, "README.md")
    assert check(REPO, [readme]) == []
    marker = "tables.py:compare_over_train -->"
    text = readme.read_text()
    right = text[text.index(marker) + len(marker):].split("<!--")[0]
    readme.write_text(text.replace(marker + right, marker + "9.9"))
    problems = check(REPO, [readme])
    assert len(problems) == 1
    assert "compare_over_train" in problems[0] and "'9.9'" in problems[0] and f"'{right}'" in problems[0]
    assert problems[0].startswith(f"{readme}:")


def test_a_wrong_number_in_a_generated_table_is_reported_and_make_docs_restores_it(tmp_path):
    readme = _copy(tmp_path, "experiments/tolerance_calibration/README.md")
    original = readme.read_text()
    row = next(line for line in original.splitlines() if line.startswith("| hi |"))
    readme.write_text(original.replace(row, row.replace("| hi | 204 |", "| hi | 205 |")))
    problems = check(REPO, [readme])
    assert len(problems) == 1 and "calibrate.py:readme_table" in problems[0]
    write(REPO, [readme])
    assert readme.read_text() == original and check(REPO, [readme]) == []


def test_a_changed_result_file_is_reported_against_the_unchanged_docs(tmp_path):
    """The other side: the docs are as committed, the result file moved. The check reads the copy of the file."""
    docs = _copy(tmp_path, "docs/compare.md", COST, "experiments/gemma3_270m_compare/tables.py")
    assert check(tmp_path, [docs]) == []
    cost = json.loads((tmp_path / COST).read_text())
    cost["compare_wall_s"] += 100
    (tmp_path / COST).write_text(json.dumps(cost))
    problems = check(tmp_path, [docs])
    assert len(problems) == 1 and "tables.py:cost" in problems[0] and f"task=compare {cost['compare_wall_s']} s" in \
        problems[0]


def test_blocks_that_cannot_be_generated_are_reported_not_raised(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(f"a <!-- generated: {COST} no_such_key -->1<!-- /generated --> b\n"
                  f"<!-- generated: {COST} train_wall_s -->66<!-- /generated --> starts a line\n"
                  "c <!-- generated: experiments/nowhere.py:f -->2<!-- /generated -->\n")
    problems = check(REPO, [md])
    assert len(problems) == 3
    assert "KeyError" in problems[0] and "must not start a line" in problems[1] and "nowhere.py" in problems[2]


def test_json_specs_format_and_fenced_examples_are_not_blocks(tmp_path):
    cost = json.loads((REPO / COST).read_text())
    md = tmp_path / "x.md"
    md.write_text(f"ratio <!-- generated: {COST} compare_over_train .2f -->?<!-- /generated -->, "
                  f"units <!-- generated: {COST} compare_counts.held_out_units -->?<!-- /generated -->\n\n"
                  "```\nsee <!-- generated: no/such.json k -->1<!-- /generated -->\n```\n")
    assert len(blocks(REPO, md)) == 2 and len(BLOCK.findall(md.read_text())) == 3
    write(REPO, [md])
    text = md.read_text()
    assert f"-->{cost['compare_over_train']:.2f}<!--" in text
    assert f"-->{cost['compare_counts']['held_out_units']}<!--" in text
    assert "-->1<!-- /generated -->\n```" in text and check(REPO, [md]) == []


def test_the_command_line_check_exits_1_and_lists_the_block(tmp_path, capsys):
    assert main(["--check"]) == 0
    docs = _copy(tmp_path, "docs/compare.md")
    docs.write_text(docs.read_text().replace("task=train 66 s", "task=train 60 s"))
    assert main(["--check", str(docs)]) == 1
    out = capsys.readouterr().out
    assert "compare.md" in out and "tables.py:cost" in out and "1 of 1 generated blocks differ" in out


def test_the_cost_file_is_consistent_with_itself():
    """The recorded ratio is the ratio of the recorded wall-clocks (what docs/compare.md and README.md quote)."""
    cost = json.loads((REPO / COST).read_text())
    assert f"{cost['compare_wall_s'] / cost['train_wall_s']:.1f}" == f"{cost['compare_over_train']:.1f}"
