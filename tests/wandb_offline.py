"""Read the run records of W&B offline runs (`run-*.wandb`: a LevelDB-style log of protobuf records), offline."""

from __future__ import annotations

import struct
from pathlib import Path

HEADER_LEN, BLOCK_LEN = 7, 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, pending = HEADER_LEN, b""
    while pos + HEADER_LEN <= len(data):
        room = BLOCK_LEN - pos % BLOCK_LEN
        if room < HEADER_LEN:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER_LEN])
        chunk = data[pos + HEADER_LEN:pos + HEADER_LEN + length]
        pos += HEADER_LEN + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            break


def offline_runs(root: Path) -> list[dict]:
    """group, name and job_type of every offline run under `root`."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(Path(root).rglob("run-*.wandb")):
        for raw in _records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "run":
                runs.append({"group": record.run.run_group, "name": record.run.display_name,
                             "job_type": record.run.job_type, "id": record.run.run_id, "path": path})
                break
    return runs


def offline_records(root: Path, kind: str) -> list:
    """Every record of one type ("history", "artifact", ...) in the offline runs under `root`, in file order."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted(Path(root).rglob("run-*.wandb")):
        for raw in _records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == kind:
                found.append(getattr(record, kind))
    return found


def offline_history(root: Path) -> list[dict]:
    """The logged rows (key -> JSON text) of the offline runs under `root`: what W&B kept, after its step checks."""
    return [{item.key or "/".join(item.nested_key): item.value_json for item in history.item}
            for history in offline_records(root, "history")]


def offline_summary(root: Path) -> dict:
    """The run summary (key -> value) of the offline runs under `root`, as W&B last recorded it."""
    import json

    summary: dict = {}
    for record in offline_records(root, "summary"):
        for item in record.update:
            summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary
