#!/usr/bin/env bash
# The GPU benchmark of experiments/performance/README.md, as run on a lent H100 (no network there): the Python
# packages the machine lacks travel as wheels in .whl/ (sae-lens, transformer-lens, hydra, ...; the machine's own
# torch, transformers, peft and accelerate are used). On a GPU box of your own, `make install` with a CUDA torch
# and then the `python -m mlalign.bench` lines are all it takes.
# Usage: OUT=<dir> bash experiments/performance/gpu_run.sh [full]   (full: also the naive and training contenders)
set -uo pipefail
OUT="${OUT:-outputs/bench}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, sae_lens, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sae_lens', sae_lens.__version__, 'peft', peft.__version__)" || exit 1
bench() {  # name, timeout, then bench arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m mlalign.bench --device cuda --no-rss --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$?"; grep -v -i warn "$OUT/$name.log" | tail -28
}
# 1. (full only) Smoke test of the CUDA path on the tiny model.
[ "${1:-}" = full ] && bench quick_cuda 50 --quick --analysis-only
# 2. Gemma-2-2B widths (bf16, 26 layers, 16k SAEs), 26 sentences x 10 languages: floors, analysis, sae-lens.
if [ "${1:-}" = full ]; then
  bench gemma2_2b 330 --shape gemma2-2b
else
  bench gemma2_2b 95 --shape gemma2-2b --no-naive --no-train
fi
# 3. 100 sentences x 10 languages (~58k tokens): tokens/s for the whole-corpus estimate.
bench gemma2_2b_100 70 --shape gemma2-2b --analysis-only --sentences 100 --repeats 1
