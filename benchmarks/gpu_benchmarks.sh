#!/usr/bin/env bash
# The README's H200 planner figures in one call (about 5 minutes on an H100/H200): the Mosaic kernel's settings
# against the XLA step, the XLA path and the Mosaic kernel side by side (one plan and B = 256), one plan with the
# defaults (planner.kernel auto, the command-buffer flag evjax adds on import) and under XLA's own flags
# (EVJAX_XLA_FLAGS=keep), alternated, three runs each, and a profile of one plan with the defaults.
#
#   bash benchmarks/gpu_benchmarks.sh OUT
#
# Writes OUT/settings.jsonl (benchmarks/mosaic_settings.py), OUT/plans.jsonl (benchmarks/gpu_planner.py),
# OUT/flags.jsonl (one benchmarks/planner.py line per run, with its variant; the line records the kernel and
# XLA_FLAGS it ran with) and OUT/kernels.txt (benchmarks/kernel_summary.py). A step that fails is reported on
# stderr and the next one runs.
set -uo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1

python "$here/mosaic_settings.py" > "$out/settings.jsonl" || echo "mosaic_settings.py failed" >&2
python "$here/gpu_planner.py" --quick --kernels xla,mosaic --batches 256 --repeats 20 > "$out/plans.jsonl" \
  || echo "gpu_planner.py failed" >&2
for run in 1 2 3; do
  for variant in default xla_flags; do
    keep=; [ "$variant" = xla_flags ] && keep=keep
    if line=$(EVJAX_XLA_FLAGS=$keep python "$here/planner.py" --json --repeats 20 | tail -1); then
      echo "{\"variant\": \"$variant-$run\", \"result\": $line}" >> "$out/flags.jsonl"
    else
      echo "planner.py ($variant, run $run) failed" >&2
    fi
  done
done
python "$here/planner.py" --json --repeats 3 --profile "$out/profile" > /dev/null \
  && python "$here/kernel_summary.py" "$out/profile" --top 12 > "$out/kernels.txt" || echo "profile failed" >&2
