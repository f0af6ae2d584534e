"""task=build_testbed: build (or find in the cache) the offline testbed model, tokenizer and per-layer SAEs."""

from __future__ import annotations

import json
from pathlib import Path

from mlalign.errors import UserError


def run(cfg, ctx) -> dict[str, float]:
    if not ctx.testbed_dir:
        raise UserError(f"task=build_testbed builds the offline testbed; add model=testbed (got model={cfg.model.name})")
    info = json.loads((Path(ctx.testbed_dir) / "build_info.json").read_text())
    print(f"testbed ready at {ctx.testbed_dir}")
    for key in ("seconds", "pretrain_loss"):
        if key in info:
            print(f"  {key}: {info[key]}")
    return {"num_layers": float(cfg.model.num_layers)}
