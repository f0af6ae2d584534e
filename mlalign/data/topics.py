"""SIB-200 topic labels of the bundled FLORES-200 sentences (the `category` column, 7 classes), by sentence id."""

from __future__ import annotations

import csv
from pathlib import Path

from mlalign.errors import UserError

from mlalign.data.corpus import FLORES_DIR, SPLITS


def flores_topics(path: str | None = None) -> dict[str, str]:
    """index_id -> topic, from the English folder of a FLORES-200 copy (every language shares the ids)."""
    folder = Path(path or FLORES_DIR) / "eng_Latn"
    topics: dict[str, str] = {}
    for split in SPLITS:
        file = folder / f"{split}.tsv"
        if not file.is_file():
            raise UserError(f"{file} is missing; the topic outcome needs the bundled FLORES-200 copy (data=flores)")
        with file.open(encoding="utf-8-sig", newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                if not row.get("category"):
                    raise UserError(f"{file} has no `category` column; the topic outcome needs SIB-200's labels "
                                    "(the bundled FLORES-200 copy has them)")
                topics[row["index_id"]] = row["category"]
    return topics
