#!/usr/bin/env bash
# Are Gemma-3-270M's language-specific SAE features causal? (issue 28, docs/method.md §8c): ablation, steering and
# dashboards with the SAEs of experiments/gemma3_270m_saes (sae_train=real_small, all 18 layers, ten languages).
# Layers and k fixed before any result (README.md): layers 3 and 9 (the layers experiments/gemma3_270m's parts b-d
# study), k = 10 (analysis.features.top_k's default). Started 2026-12-06.
# Usage: bash experiments/gemma3_270m_causal/run.sh [3|9 ...]   (default: 3 9)
#   needs $SAES (default outputs/gemma3_270m_saes/saes/saes): `bash experiments/gemma3_270m_saes/run.sh saes`.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="${OUT:-outputs/gemma3_270m_causal}"
SAES="${SAES:-outputs/gemma3_270m_saes/saes/saes}"
PY=".venv/bin/python"
K=10
# The features are chosen on the analysis split (test, 40 sentences per language); ablation and dashboards read dev,
# steering prompts are the first 24 English dev sentences.
COMMON="task=analyze model=gemma3_270m_pypi langs=[zh,ru,es,it,id,ca,mr,ml,hi] sae=local sae.path_template=$SAES data.max_sentences=40 analysis.bootstrap=1000"
CAUSAL="analysis.features.ablate.enabled=true analysis.features.ablate.k=$K analysis.features.steer.enabled=true analysis.features.steer.k=$K analysis.features.steer.prompts=24 analysis.features.steer.max_new_tokens=24 analysis.features.steer.alphas=[0,0.25,0.5,1,2] analysis.features.dashboard.enabled=true"

for layer in "${@:-3 9}"; do
  for L in $layer; do
    mkdir -p "$OUT"
    if [ -f "$OUT/layer_$L/COMPLETE" ]; then echo "== layer $L: finished earlier, kept"; continue; fi
    # A stopped layer reruns into its folder: the analysis comes from its cache and every causal step that finished
    # is kept (analysis/causal_record.json).
    start=$SECONDS
    echo "== layer $L"
    # shellcheck disable=SC2086
    "$PY" run.py $COMMON "layers=[$L]" $CAUSAL "hydra.run.dir=$OUT/layer_$L" > "$OUT/layer_$L.log" 2>&1
    echo "== layer $L: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
  done
done
