#!/usr/bin/env bash
# The study's questions on a real model on a 2-core CPU: Gemma-3-270M (offline, model=gemma3_270m_pypi), SAEs trained
# by mlalign (task=train_saes), analysis, activation-aware vs plain LoRA for hi+ml, bundled ARC/MMLU before/after.
# Sized for ~1 hour of a 2-core CPU; see README.md for what a GPU user should scale up.
# Usage: bash experiments/gemma3_270m/run.sh [a|b|c|c_tuned|c_tuned_choose|d|a_saes|a_analyze ...]
#   default: a b c c_tuned d; c and c_tuned need a's SAEs, d needs c's plain adapter and c_tuned's chosen one.
#   c, c_tuned and d run two jobs side by side: on a 2-core CPU set OMP_NUM_THREADS=1 (the follow-up session did).
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
EVAL="eval=bundled eval.limit=20 eval.batch_size=4 langs=[hi,ml]"

source experiments/lib.sh  # timed NAME ARGS...: one run.py run into $OUT/NAME, its log and wall time

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

# (c_tuned) loss weights / lr for this model, chosen on the dev split's alignment_score (train/metrics.json; it
# penalises FVU rises and English change), everything else as in (c). name:overrides; the later lr overrides TRAIN's.
TUNED=(
  "aa5_fid50_lr2e-3:loss.act_align=5 loss.sae_fidelity=50 train.optimizer.lr=2e-3"
  "aa5_fid5_lr5e-4:loss.act_align=5 loss.sae_fidelity=5 train.optimizer.lr=5e-4"
  "aa5_fid20_lr5e-4:loss.act_align=5 loss.sae_fidelity=20 train.optimizer.lr=5e-4"
  "aa1_fid20_lr5e-4:loss.act_align=1 loss.sae_fidelity=20 train.optimizer.lr=5e-4"
  "aa5_fid20_lr1e-3:loss.act_align=5 loss.sae_fidelity=20 train.optimizer.lr=1e-3"
)

part_c_tuned() {  # the sweep, two runs at a time, then the choice
  local i=0 entry name
  for entry in "${TUNED[@]}"; do
    name=${entry%%:*}
    # shellcheck disable=SC2086
    timed "c_tuned_$name" task=train $M $TRAIN sae=local "sae.path_template=$OUT/a_saes_balanced/saes" loss=act_align \
      ${entry#*:} &
    i=$((i + 1))
    if (( i % 2 == 0 )); then wait; fi
  done
  wait
  part_c_tuned_choose
}

part_c_tuned_choose() {  # the run with the highest dev alignment_score becomes $OUT/c_tuned_chosen (test numbers: once)
  "$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.parent.parent.name: json.loads(p.read_text())["alignment_score"]
        for p in sorted(out.glob("c_tuned_*/train/metrics.json")) if p.parent.parent.name != "c_tuned_chosen"}
for name, score in runs.items():
    print(f"{name}: dev alignment_score {score:.2f}")
best = max(runs, key=runs.get)
link = out / "c_tuned_chosen"
link.unlink(missing_ok=True)
link.symlink_to(best)
print(f"chosen on dev: {best} -> {link}")
PY
}

part_d() {  # (d) bundled ARC-Challenge / MMLU (en, hi, ml): the base model once (it goes to the evaluation cache), then
  # base vs the dev-chosen activation-aware adapter and base vs plain LoRA side by side (their base side: cache hits)
  timed d_eval_base task=eval $M $EVAL
  timed d_eval_tuned task=eval $M $EVAL "adapter=$OUT/c_tuned_chosen/adapter" &
  timed d_eval_plain task=eval $M $EVAL "adapter=$OUT/c_train_plain/adapter" &
  wait
}

for part in "${@:-a b c c_tuned d}"; do
  for p in $part; do "part_$p"; done
done
$PY experiments/gemma3_270m/tables.py "$OUT" > experiments/gemma3_270m/results.md
