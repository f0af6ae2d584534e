#!/usr/bin/env bash
# The study's questions on a real model on a 2-core CPU: Gemma-3-270M (offline, model=gemma3_270m_pypi), SAEs trained
# by mlalign (task=train_saes), analysis, activation-aware vs plain LoRA for hi+ml, bundled ARC/MMLU before/after.
# Sized for ~1 hour of a 2-core CPU; see README.md for what a GPU user should scale up.
# Usage: bash experiments/gemma3_270m/run.sh [a|b|c|d|a_saes|a_analyze ...]   (default: a b c d; c, d need a's SAEs)
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
OUT="${OUT:-outputs/gemma3_270m}"
PY=".venv/bin/python"
M="model=gemma3_270m_pypi"
ALL_LANGS="langs=[zh,ru,es,it,id,ca,mr,ml,hi]"
MIX_LAYERS="layers=[3,9]"
# SAE recipe (CPU-sized): 1024 features (1.6 x hidden), 15k activation tokens per layer, 60 Adam steps;
# threshold_travel 0.6 (the default 2.4 gives L0 ~3 and FVU ~0.6 at this budget on this model).
SAE="sae_train.tokens=15000 sae_train.width=1024 sae_train.steps=60 sae_train.threshold_travel=0.6 sae_train.eval_sentences=12"
ANALYSIS="data.max_sentences=40 analysis.bootstrap=1000"
# A train step of the real model (262k-vocabulary head, KL retention) took ~3 minutes on the shared box: 6 steps.
TRAIN="langs=[hi,ml] layers=[3,9] train.max_steps=6 train.batch_size=1 train.max_length=48 train.warmup_steps=1 train.optimizer.lr=2e-3 train.save_every=0 train.eval_every=0 data.max_sentences=16 analysis.bootstrap=1000"
EVAL="eval=bundled eval.limit=6 eval.batch_size=4 langs=[hi,ml]"

timed() {  # name, then run.py arguments: the run goes to $OUT/<name>, its log to $OUT/<name>.log
  local name=$1; shift
  mkdir -p "$OUT"
  local start=$SECONDS
  echo "== $name: $PY run.py $*"
  "$PY" run.py "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

part_a_saes() {
  timed a_saes_balanced task=train_saes $M $ALL_LANGS sae_train.lang_mix=balanced $SAE
}

part_a_analyze() {
  # 12 sentences per language (b's analysis: 40): all that fit the session's time on the shared box.
  timed a_analyze task=analyze $M $ALL_LANGS sae=local "sae.path_template=$OUT/a_saes_balanced/saes" $ANALYSIS data.max_sentences=12
}

part_a() {  # (a) all ten languages x all 18 layers, SAEs trained on a balanced mix
  part_a_saes
  part_a_analyze
}

part_b() {  # (b) the same analysis with SAEs trained on an English-heavy mix (2 layers; balanced = a's SAEs)
  timed b_saes_english_heavy task=train_saes $M $ALL_LANGS $MIX_LAYERS sae_train.lang_mix=english_heavy $SAE
  timed b_analyze_english_heavy task=analyze $M $ALL_LANGS $MIX_LAYERS sae=local \
    "sae.path_template=$OUT/b_saes_english_heavy/saes" $ANALYSIS
}

part_c() {  # (c) activation-aware LoRA for hi+ml (conf/loss/act_align.yaml as committed) vs plain LoRA
  # The two runs go side by side (each takes one core's worth of the box; sequential is the same command without &).
  timed c_train_act_align task=train $M $TRAIN sae=local "sae.path_template=$OUT/a_saes_balanced/saes" loss=act_align &
  timed c_train_plain task=train $M $TRAIN sae=local "sae.path_template=$OUT/a_saes_balanced/saes" loss=plain &
  wait
}

part_d() {  # (d) bundled ARC-Challenge / MMLU, base vs the activation-aware adapter (en, hi, ml)
  timed d_eval task=eval $M $EVAL "adapter=$OUT/c_train_act_align/adapter"
}

for part in "${@:-a b c d}"; do
  for p in $part; do "part_$p"; done
done
$PY experiments/gemma3_270m/tables.py "$OUT" > experiments/gemma3_270m/results.md
