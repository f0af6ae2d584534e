#!/usr/bin/env bash
# The GPU benchmark of experiments/performance/README.md, as run on a lent H100/H200 (no network there): the
# Python packages the machine lacks travel as wheels in .whl/ (sae-lens, transformer-lens, hydra, ...; the machine's
# own torch, transformers, peft and accelerate are used). On a GPU box of your own, `make install` with a CUDA torch
# and then the two `python -m mlalign.bench` lines are all it takes.
# Usage: OUT=<dir> bash experiments/performance/gpu_run.sh
set -uo pipefail
OUT="${OUT:-outputs/bench}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, sae_lens, peft, accelerate, hydra; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sae_lens', sae_lens.__version__, 'peft', peft.__version__)" || exit 1
# 1. Smoke test of the CUDA path (seconds).
timeout 150 python3 -m mlalign.bench --quick --device cuda --no-rss --out "$OUT/quick_cuda.json" > "$OUT/quick_cuda.log" 2>&1
echo "quick: rc=$?"; tail -5 "$OUT/quick_cuda.log"
# 2. Every contender at Gemma-2-2B widths (bf16, 26 layers, 16k SAEs), 26 sentences x 10 languages.
timeout 330 python3 -m mlalign.bench --device cuda --shape gemma2-2b --no-rss --out "$OUT/gemma2_2b.json" > "$OUT/gemma2_2b.log" 2>&1
echo "gemma2-2b: rc=$?"; grep -v Warning "$OUT/gemma2_2b.log" | tail -32
# 3. The whole bundled corpus (1004 sentences x 10 languages), floors and analysis only.
timeout 240 python3 -m mlalign.bench --device cuda --shape gemma2-2b --no-rss --analysis-only --sentences 1004 --repeats 2 \
  --out "$OUT/gemma2_2b_whole_corpus.json" > "$OUT/gemma2_2b_whole_corpus.log" 2>&1
echo "whole corpus: rc=$?"; grep -v Warning "$OUT/gemma2_2b_whole_corpus.log" | tail -22
