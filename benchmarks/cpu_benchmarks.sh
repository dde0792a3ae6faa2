#!/usr/bin/env bash
# The README's 2-core CPU figures in one run (about 10 minutes, the default training half of it), one after
# another on an otherwise idle machine: the planner rows of benchmarks/planner.py, one environment step, one
# model fit, the JAX twin against the host environment, and a default training under /usr/bin/time.
#
#   bash benchmarks/cpu_benchmarks.sh OUT [ROW ...]
#
# ROW names limit the run to those rows (plan, plan_steps_done6, ..., twin_step, train); none: all of them.
# Writes OUT/<row>.json (the script's last JSON line) for each row and OUT/train_time.txt (/usr/bin/time -v);
# the training's run directory is OUT/train. A row that fails is reported on stderr and the next one runs.
set -uo pipefail
out=${1:?usage: cpu_benchmarks.sh OUT [ROW ...]}
shift
only=" $* "
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

selected() {  # NAME: no ROW given, or NAME among them
  [ "$only" = "  " ] || [[ "$only" == *" $1 "* ]]
}

row() {  # NAME SCRIPT ARGS...
  local name=$1 script=$2; shift 2
  selected "$name" || return 0
  echo "== $name $(date +%T)" >&2
  python "$here/$script" --json "$@" | tail -1 > "$out/$name.json" || echo "$script ($name) failed" >&2
}

row plan planner.py --repeats 10 --against-no-hoist
row plan_steps_done6 planner.py --repeats 10 --steps-done 6
row batch8 planner.py --repeats 3 --batch 8
row batch8_vmap planner.py --repeats 3 --batch 8 --vmap
row hidden_bf16 planner.py --repeats 10 --hidden-dtype bfloat16
row matmul_f32 planner.py --repeats 3 --matmul-dtype float32
row noise_tiled planner.py --repeats 5 --particle-noise true
row noise_untiled planner.py --repeats 5 --particle-noise true --tile-rows 3000
row env_step env_step.py
row model_fit model_fit.py
row twin_step twin_step.py
selected train || exit 0
echo "== train $(date +%T)" >&2
/usr/bin/time -v python -m evjax.train --no-progress --set training.seed=3 --run-dir "$out/train" \
  > /dev/null 2> "$out/train_time.txt" || echo "training failed" >&2
grep -E "Elapsed|Maximum resident" "$out/train_time.txt"
