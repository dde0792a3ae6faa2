#!/usr/bin/env bash
# The README's H200 planner figures in one call (about 5 minutes on an H100/H200), most important first: one plan
# with the defaults (planner.kernel auto, the command-buffer flag evjax adds on import) and under XLA's own flags
# (EVJAX_XLA_FLAGS=keep), alternated, three runs each; B = 256 plans with the defaults; the XLA path and the Mosaic
# kernel side by side (one plan and B = 256); the Mosaic kernel's settings against the XLA step; a profile of one
# plan with the defaults.
#
#   bash benchmarks/gpu_benchmarks.sh OUT
#
# Writes OUT/flags.jsonl (one benchmarks/planner.py line per run, with its variant; the line records the kernel and
# XLA_FLAGS it ran with), OUT/plans.jsonl (benchmarks/gpu_planner.py), OUT/settings.jsonl
# (benchmarks/mosaic_settings.py) and OUT/kernels.txt (benchmarks/kernel_summary.py). Each step has a time limit;
# a step that fails or runs out is reported on stderr and the next one runs, and what a step printed is kept.
set -uo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1

planner_line() {  # VARIANT LIMIT_S ARGS...: one planner.py run appended to flags.jsonl
  local variant=$1 limit=$2 line; shift 2
  if line=$(timeout "$limit" python "$here/planner.py" --json "$@" | tail -1) && [ -n "$line" ]; then
    echo "{\"variant\": \"$variant\", \"result\": $line}" >> "$out/flags.jsonl"
  else
    echo "planner.py ($variant) failed" >&2
  fi
}

for run in 1 2 3; do
  planner_line "default-$run" 90 --repeats 20
  EVJAX_XLA_FLAGS=keep planner_line "xla_flags-$run" 90 --repeats 20
done
planner_line default-batch256 120 --repeats 5 --batch 256
timeout 150 python "$here/gpu_planner.py" --quick --kernels xla,mosaic --batches 256 --repeats 20 \
  > "$out/plans.jsonl" || echo "gpu_planner.py failed" >&2
timeout 90 python "$here/mosaic_settings.py" > "$out/settings.jsonl" || echo "mosaic_settings.py failed" >&2
profile=$(mktemp -d)  # the trace itself stays out of OUT
timeout 90 python "$here/planner.py" --json --repeats 3 --profile "$profile" > /dev/null \
  && python "$here/kernel_summary.py" "$profile" --top 12 > "$out/kernels.txt" || echo "profile failed" >&2
