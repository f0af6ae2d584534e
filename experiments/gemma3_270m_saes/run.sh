#!/usr/bin/env bash
# SAEs at every layer of Gemma 3 270M (offline, model=gemma3_270m_pypi) with the sae_train=real_small recipe, on a
# 2-core CPU: all 18 layers, ten languages, train split; fidelity (FVU, L0, dead features, spliced-in LM loss) on dev.
# Usage: bash experiments/gemma3_270m_saes/run.sh [saes|sweep|tables ...]     default: saes tables
#   sweep   the recipe sweep that chose real_small (dev split; resumable: finished recipe x layer records are kept)
#   saes    task=train_saes sae_train=real_small at all 18 layers -> $OUT/saes/saes (analyse with sae=local)
#   tables  results.md from the committed result files (fidelity.json, train_data.json, sweep.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
OUT="${OUT:-outputs/gemma3_270m_saes}"
PY="${PY:-.venv/bin/python}"
HERE=experiments/gemma3_270m_saes

part_sweep() {
  "$PY" "$HERE/sweep.py" --acts-cache "$OUT/sweep_acts.pt" "$@"
}

part_saes() {
  mkdir -p "$OUT"
  "$PY" run.py task=train_saes model=gemma3_270m_pypi sae_train=real_small \
    "langs=[zh,ru,es,it,id,ca,mr,ml,hi]" "hydra.run.dir=$OUT/saes" > "$OUT/saes.log" 2>&1
  mkdir -p "$HERE/results"
  cp "$OUT/saes/saes/fidelity.json" "$OUT/saes/saes/train_data.json" "$OUT/saes/saes/fidelity.png" "$HERE/results/"
}

part_tables() {
  "$PY" "$HERE/tables.py" > "$HERE/results.md"
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(saes tables)
for part in "${parts[@]}"; do "part_$part"; done
