"""Non-learned methods on the JAX twin over held-out days: wall time, oracle ms per decision, welfare and violations.

Runs ``evaluate.run_on_twin`` (one jitted, vmapped, day-sharded program per
method; compile timed apart, ``block_until_ready`` before the clock stops) on
``--days`` test days (0 = all), at the oracle budget of the config
(``evaluation.oracle_popsize`` x ``oracle_iterations``, horizon the rest of the
episode), and prints per method: compile s, run s, ms per decision
(run s / (days x steps)), welfare mean and the share of steps with any violation,
and the paired per-day difference to the oracle. No checkpoint needed.

    python benchmarks/twin_evaluation.py [--days 30] [--methods fixed_mid fixed_upper random oracle]
        [--popsize 500] [--iterations 5] [--scenarios 4] [--prior P1 P2 P3] [--set KEY=VALUE ...] [--json]
        [--steps-dir DIR]

``--methods ... forecast_oracle`` adds the oracle without foresight of the arrivals (``evjax.oracle``), planning
on ``--scenarios`` other draws of each day's demand (``evaluation.forecast_scenarios``). ``--prior`` sets
``planner.prior_prices``, the oracles' first warm start (default mid-range); ``--set`` any other config key, as
in ``python -m evjax.train`` (e.g. ``planner.variance_cap=false``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax

from evjax import evaluate
from evjax import cli, config as config_lib
from evjax.config import Config


@cli.entry_point("twin_evaluation.py")
def main(argv=None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30, help="test days spread over the split; 0 = all")
    parser.add_argument("--methods", nargs="+", default=list(evaluate.TWIN_METHODS))
    parser.add_argument("--popsize", type=int, default=None, help="evaluation.oracle_popsize (default: config's)")
    parser.add_argument("--iterations", type=int, default=None, help="evaluation.oracle_iterations")
    parser.add_argument("--scenarios", type=int, default=None, help="evaluation.forecast_scenarios")
    parser.add_argument("--prior", type=float, nargs="+", default=None,
                        help="planner.prior_prices: the oracles' first CEM mean, one price per station")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps-dir", type=Path, help="also write every step of every method to DIR/steps.csv")
    args = parser.parse_args(argv)
    cfg = Config()
    changes = {"days": args.days, **({"oracle_popsize": args.popsize} if args.popsize else {}),
               **({"oracle_iterations": args.iterations} if args.iterations else {}),
               **({"forecast_scenarios": args.scenarios} if args.scenarios else {})}
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, **changes))
    overrides = [*args.overrides, *([f"planner.prior_prices={list(args.prior)}"] if args.prior else [])]
    if overrides:
        cfg = config_lib.load(overrides=overrides, base=cfg)
    day_ids = evaluate.evaluation_day_ids(cfg)
    seeds = [cfg.evaluation.seed + i for i in range(len(day_ids))]
    tic = time.perf_counter()
    runs, timings = evaluate.run_on_twin(cfg, args.methods, day_ids, seeds)
    wall = time.perf_counter() - tic
    if args.steps_dir:
        args.steps_dir.mkdir(parents=True, exist_ok=True)
        evaluate.write_steps(args.steps_dir, runs)
    reference = runs.get("oracle")
    result = {"days": len(day_ids), "devices": len(jax.devices()), "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0], "wall_s": wall,
              "oracle": f"{cfg.evaluation.oracle_popsize} x {cfg.evaluation.oracle_iterations}",
              "forecast_scenarios": cfg.evaluation.forecast_scenarios,
              "prior": list(cfg.planner.prior_prices) or "mid-range", "overrides": args.overrides, "methods": {}}
    for method, rows in runs.items():
        s = evaluate.summarise(method, rows, cfg)
        entry = {**timings[method], "welfare_cny": s["welfare_cny"], "welfare_ci95": s["welfare_ci95"],
                 "steps_any_violation_pct": s["steps_any_violation_pct"], "total_cost": s["total_cost"]}
        if reference is not None:
            entry.update(evaluate.paired_differences(rows, reference))
        result["methods"][method] = entry
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['days']} days on {result['devices']} {result['backend']} device(s), oracle {result['oracle']}, "
          f"wall {wall:.1f} s (load average {result['load_average']:.1f})")
    for method, e in result["methods"].items():
        diff = (f", vs oracle {e['welfare_diff_cny']:+.0f} ± {e['welfare_diff_ci95']:.0f} CNY, "
                f"{e['violation_diff_pct']:+.1f} ± {e['violation_diff_ci95']:.1f} pp" if "welfare_diff_cny" in e else "")
        print(f"{method:15s} compile {e['compile_s']:6.1f} s run {e['run_s']:8.2f} s "
              f"({e['ms_per_decision']:9.2f} ms/decision)  welfare {e['welfare_cny']:7.0f} ± {e['welfare_ci95']:4.0f}"
              f"  violation steps {e['steps_any_violation_pct']:5.1f} %{diff}")


if __name__ == "__main__":
    raise SystemExit(main())
