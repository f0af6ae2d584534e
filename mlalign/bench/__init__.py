"""`make bench`: time mlalign's analysis and training step against the floors and against peers, in one run.

One process, one model, the same length-sorted batches for every contender; repeats are interleaved (A B C D, A B C
D, ...) so that load from other jobs hits all of them alike, and the median is reported. Ratios are taken within the
run. Peak RSS growth (100 vs 1000 sentences) is measured in fresh subprocesses, where ru_maxrss means something.

    python -m mlalign.bench                      # CPU benchmark model (Gemma-2-shaped, hidden 256), ~12 minutes
    python -m mlalign.bench --quick              # tiny, for the test
    python -m mlalign.bench --device cuda --shape gemma2-2b   # Gemma-2-2B-sized random model + 16k SAEs, bf16

Writes outputs/bench/latest.json (see experiments/performance/README.md for what each number means). The package:
`workload` (model, SAEs, corpus), `contenders` (floors, engine, peers, reference), `training` (LoRA step
contenders), `memory` (timing, peak memory, RSS probes), `report` (table and targets), `runner` (the run itself).
"""

import os

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)
