#!/usr/bin/env bash
# Regenerate the README's "Results": safety while learning (4 planner variants x 3 training seeds), the held-out
# evaluation of the trained agent of each seed on 30 test days, and the ablations (one training seed each).
#
#   bash benchmarks/reproduce_results.sh OUT [JOBS]
#
# JOBS runs train at the same time in each of the two training scripts (default 2). Timings: README "Results". Results go to OUT:
# safety_while_learning.{csv,json,png} and safety_floor.txt, runs/<variant>-seed<k>/ with eval/ for the trained agents,
# ablations.{csv,md} (benchmarks/ablations.py), forecast_oracle.json and forecast/steps.csv
# (benchmarks/twin_evaluation.py), agent_targets.md (benchmarks/agent_targets.py) and welfare_identifiability.jsonl
# (benchmarks/welfare_identifiability.py: random-price models, then the trained agents' own).
# Environment: EVJAX_CONFIG (base config of every run), EVJAX_EVAL_DAYS (default 30), EVJAX_SEEDS (default
# "0 1 2"), EVJAX_ABLATIONS (names, default all): smaller values make a quick dry run; EVJAX_FORECAST_STEPS (above).
set -euo pipefail
out=${1:?usage: reproduce_results.sh OUT [JOBS]}
jobs=${2:-2}
days=${EVJAX_EVAL_DAYS:-30}
seeds=${EVJAX_SEEDS:-0 1 2}
config=()
[ -n "${EVJAX_CONFIG:-}" ] && config=(--config "$EVJAX_CONFIG")
names=()
[ -n "${EVJAX_ABLATIONS:-}" ] && names=(--names $EVJAX_ABLATIONS)
forecast_steps=${EVJAX_FORECAST_STEPS:-$out/forecast/steps.csv}
if [ -n "${EVJAX_FORECAST_STEPS:-}" ] && [ ! -f "$forecast_steps" ]; then
  echo "EVJAX_FORECAST_STEPS: no file $forecast_steps" >&2
  exit 2
fi
mkdir -p "$out"

# safety while learning and the ablation runs, all trained at once
python benchmarks/safety_while_learning.py --out "$out" --jobs "$jobs" --seeds $seeds "${config[@]}" &
safety=$!
python benchmarks/ablations.py train --out "$out" --jobs "$jobs" "${names[@]}" "${config[@]}" &
ablations=$!
# the oracle without foresight of the arrivals (8 demand draws), on the same days (no checkpoint needed; ~1 h on 2 CPU
# cores). It does not depend on the agent: EVJAX_FORECAST_STEPS=FILE takes the steps.csv of an earlier run instead.
forecast=
if [ -z "${EVJAX_FORECAST_STEPS:-}" ]; then
  python benchmarks/twin_evaluation.py --days "$days" --methods random oracle forecast_oracle --scenarios 8 --json \
    --steps-dir "$out/forecast" > "$out/forecast_oracle.json" &
  forecast=$!
fi
wait $safety
python benchmarks/safety_floor.py --csv "$out/safety_while_learning.csv" --seeds $seeds --json > "$out/safety_floor.txt"
wait $ablations
if [ -n "$forecast" ]; then wait "$forecast"; fi

# the trained agent of each seed against every baseline, on the same held-out days and seeds; the oracle does not
# depend on the agent, so only the first seed runs it (the others pair to fixed upper prices, and agent_targets.py
# takes the oracle's rows from the forecast run's steps.csv)
pids=()
first=
without_oracle="evaluation.methods=[fixed_mid,fixed_upper,fixed_tuned,random,cem_unconstrained,ccem,cap_fixed_kappa,cap_adaptive]"
for seed in $seeds; do
  extra=()
  [ -n "$first" ] && extra=(--set "$without_oracle" --set evaluation.reference=fixed_upper)
  first=${first:-$seed}
  python -m evjax.evaluate --run-dir "$out/runs/cap_adaptive-seed$seed" --days "$days" --no-progress "${extra[@]}" \
    > "$out/runs/cap_adaptive-seed$seed.eval.log" 2>&1 &
  pids+=($!)
done
python benchmarks/ablations.py evaluate --out "$out" --days "$days" --jobs "$jobs" "${names[@]}"
for pid in "${pids[@]}"; do wait "$pid"; done
python benchmarks/ablations.py report --out "$out" "${names[@]}"
python benchmarks/agent_targets.py --out "$out" --seeds $seeds --twin-steps "$forecast_steps" > "$out/agent_targets.md"
cat "$out/agent_targets.md"

# can a model learn which prices give more welfare? (README Results, "Why the agents earn no more than the tuned
# constant")
runs=()
for seed in $seeds; do runs+=("$out/runs/cap_adaptive-seed$seed"); done
wi=benchmarks/welfare_identifiability.py
python $wi --json "${config[@]}" --label "default model" > "$out/welfare_identifiability.jsonl"
python $wi --json --run-dir "${runs[@]}" --label "trained agent (default)" >> "$out/welfare_identifiability.jsonl"
python $wi --json "${config[@]}" --episodes 50 200 1000 --set model.linear_ridge=0 \
  --label "network alone (model.linear_ridge=0)" >> "$out/welfare_identifiability.jsonl"
python $wi --json "${config[@]}" --episodes 50 200 1000 \
  --set "env.extra_observations=[backlog,arrivals,queues,prices]" \
  --label "extra observations (env.extra_observations=[backlog,arrivals,queues,prices])" \
  >> "$out/welfare_identifiability.jsonl"
python $wi --plot "$out/welfare_identifiability.png" --from-jsonl "$out/welfare_identifiability.jsonl"
