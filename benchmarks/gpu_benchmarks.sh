#!/usr/bin/env bash
# The README's H200 planner figures in one call (about 5 minutes on an H100/H200): the Mosaic kernel's settings
# against the XLA step, the XLA path and the Mosaic kernel side by side (one plan and B = 256), one plan under the
# default XLA flags and with the kernel's custom calls in XLA's CUDA graphs (alternated, three runs each), and a
# profile of one plan with the kernel.
#
#   bash benchmarks/gpu_benchmarks.sh OUT
#
# Writes OUT/settings.jsonl (benchmarks/mosaic_settings.py), OUT/plans.jsonl (benchmarks/gpu_planner.py),
# OUT/flags.jsonl (one benchmarks/planner.py line per run, with its variant and XLA_FLAGS) and OUT/kernels.txt
# (benchmarks/kernel_summary.py). A step that fails is reported on stderr and the next one runs.
set -uo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
command_buffers=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN

python "$here/mosaic_settings.py" > "$out/settings.jsonl" || echo "mosaic_settings.py failed" >&2
python "$here/gpu_planner.py" --quick --kernels xla,mosaic --batches 256 --repeats 20 > "$out/plans.jsonl" \
  || echo "gpu_planner.py failed" >&2
for run in 1 2 3; do
  for variant in default command_buffers; do
    flags=${XLA_FLAGS:-}
    [ "$variant" = command_buffers ] && flags="$flags $command_buffers"
    if line=$(XLA_FLAGS="$flags" python "$here/planner.py" --json --repeats 20 --kernel mosaic | tail -1); then
      echo "{\"variant\": \"mosaic-$variant-$run\", \"xla_flags\": \"${flags# }\", \"result\": $line}" >> "$out/flags.jsonl"
    else
      echo "planner.py ($variant, run $run) failed" >&2
    fi
  done
done
python "$here/planner.py" --json --repeats 3 --kernel mosaic --profile "$out/profile" > /dev/null \
  && python "$here/kernel_summary.py" "$out/profile" --top 12 > "$out/kernels.txt" || echo "profile failed" >&2
