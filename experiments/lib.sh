# Shell helpers the experiment scripts share; source it after setting OUT and PY.
# shellcheck shell=bash

timed() {  # name, then run.py arguments: the run goes to $OUT/<name>, its log to $OUT/<name>.log
  local name=$1; shift
  mkdir -p "$OUT"
  local start=$SECONDS
  echo "== $name: $PY run.py $*"
  "$PY" run.py "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}
