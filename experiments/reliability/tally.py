"""Print the before/after tally of two audit result files and the cases whose outcome changed.

    python experiments/reliability/tally.py [results_before.json] [results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
KEYS = ("cases", "one-line error", "correct handling", "traceback", "silent accept", "other", "passed")


def main() -> None:
    before_path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results_before.json"
    after_path = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "results.json"
    before, after = (json.loads(p.read_text()) for p in (before_path, after_path))
    print("| | " + " | ".join(KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name, data in (("before (e8cf768)", before), ("after", after)):
        print(f"| {name} | " + " | ".join(str(data["tally"].get(k, 0)) for k in KEYS) + " |")
    old = {r["id"]: r for r in before["cases"]}
    print("\nCases that did not pass before, or do not pass now:\n")
    for r in after["cases"]:
        was = old.get(r["id"])
        if (was and not was["pass"]) or not r["pass"]:
            print(f"- `{r['id']}` (class {r['class']}): {was['observed'] if was else 'not run'} -> {r['observed']}")
    missing = sorted(set(old) - {r["id"] for r in after["cases"]})
    if missing:
        print(f"\nIn the before file only: {missing}")


if __name__ == "__main__":
    main()
