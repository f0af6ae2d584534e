"""Print the before/after tally of two audit result files and the cases whose outcome changed.

    python experiments/reliability/tally.py [results_before.json] [results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
KEYS = ("cases", "one-line error", "correct handling", "traceback", "silent accept", "other", "passed")


def _load(before_path: Path = HERE / "results_before.json", after_path: Path = HERE / "results.json"):
    return tuple(json.loads(Path(p).read_text()) for p in (before_path, after_path))


def table(before_path: Path = HERE / "results_before.json", after_path: Path = HERE / "results.json") -> str:
    """The before/after tally as a markdown table (README.md's generated block; mlalign/docs_numbers.py)."""
    before, after = _load(before_path, after_path)
    lines = ["| | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS)]
    for name, data in (("before (e8cf768)", before), ("after", after)):
        lines.append(f"| {name} | " + " | ".join(str(data["tally"].get(k, 0)) for k in KEYS) + " |")
    return "\n".join(lines)


def changed(before_path: Path = HERE / "results_before.json", after_path: Path = HERE / "results.json") -> str:
    """Every case that did not pass before or does not pass now, as a list: before -> after."""
    before, after = _load(before_path, after_path)
    old = {r["id"]: r for r in before["cases"]}
    lines = [f"- `{r['id']}` (class {r['class']}): {old[r['id']]['observed'] if r['id'] in old else 'not run'} -> "
             f"{r['observed']}" for r in after["cases"]
             if (r["id"] in old and not old[r["id"]]["pass"]) or not r["pass"]]
    missing = sorted(set(old) - {r["id"] for r in after["cases"]})
    return "\n".join(lines + ([f"\nIn the before file only: {missing}"] if missing else []))


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:3]]
    print(table(*paths))
    print("\nCases that did not pass before, or do not pass now:\n")
    print(changed(*paths))


if __name__ == "__main__":
    main()
