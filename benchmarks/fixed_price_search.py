"""The best constant prices: a grid of fixed price vectors tuned on training days, then scored on the test days.

A baseline a DSO could deploy without any learning: post the same price at each
station all evening, chosen by a grid search on days of the training split
(``evaluate.score_fixed_prices``, the ``fixed_tuned`` method of ``evjax.evaluate``).
Every vector of ``evaluation.tuned_levels`` evenly spaced prices per station runs
on the JAX twin over ``evaluation.tuned_days`` training days (one compiled,
day-vmapped program; one call per vector). The chosen vector has the fewest steps
with any violation (line or carbon) on those days, ties broken by welfare. It then
runs on the evaluation's test days and seeds (``evaluation.days``, ``evaluation.seed``)
with fixed upper-bound and mid-range prices, paired per day to fixed upper prices.

    python benchmarks/fixed_price_search.py [--levels 5] [--train-days 40] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from evjax import evaluate
from evjax.config import Config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=None, help="evaluation.tuned_levels (default: the config's)")
    parser.add_argument("--train-days", type=int, default=None, help="evaluation.tuned_days (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    cfg = Config()
    changes = {**({"tuned_levels": args.levels} if args.levels is not None else {}),
               **({"tuned_days": args.train_days} if args.train_days is not None else {})}
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, **changes))  # validated
    tic = time.perf_counter()
    scored = evaluate.score_fixed_prices(cfg)
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    candidates = {"fixed_upper": upper, "fixed_mid": (lower + upper) / 2, "fixed_tuned": scored[0][2]}
    test_ids = evaluate.evaluation_day_ids(cfg)
    test = evaluate.OpenLoopTwin(cfg, cfg.evaluation.split, test_ids,
                                 [cfg.evaluation.seed + i for i in range(len(test_ids))])
    runs = {name: test.rows(name, prices) for name, prices in candidates.items()}
    on_train = {tuple(np.round(p, 6)): (viol, welfare) for viol, welfare, p in scored}
    result = {"levels": cfg.evaluation.tuned_levels, "grid_size": len(scored), "train_days": cfg.evaluation.tuned_days,
              "test_days": len(test_ids), "test_seed": cfg.evaluation.seed,
              "train_top5": [{"prices": [round(float(x), 4) for x in p], "steps_any_violation_pct": viol,
                              "welfare_cny": welfare} for viol, welfare, p in scored[:5]],
              "train_fixed_upper": dict(zip(("steps_any_violation_pct", "welfare_cny"),
                                            on_train[tuple(np.round(upper, 6))])),
              "test": {}}
    for name, rows in runs.items():
        s = evaluate.summarise(name, rows, cfg)
        result["test"][name] = {"prices": [round(float(p), 4) for p in candidates[name]],
                                **{k: s[k] for k in ("welfare_cny", "welfare_ci95", "steps_line_over_limit_pct",
                                                     "steps_carbon_over_limit_pct", "steps_any_violation_pct")},
                                **evaluate.paired_differences(rows, runs["fixed_upper"])}
    result["wall_s"] = time.perf_counter() - tic
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{len(scored)} constant price vectors on {cfg.evaluation.tuned_days} training days; best five "
          f"(fixed upper: {result['train_fixed_upper']['steps_any_violation_pct']:.1f} %):")
    for entry in result["train_top5"]:
        print(f"  {entry['prices']}: {entry['steps_any_violation_pct']:.1f} % of steps violating, "
              f"welfare {entry['welfare_cny']:.0f} CNY per episode")
    print(f"\n{len(test_ids)} test days (seeds {cfg.evaluation.seed}..), paired to fixed upper-bound prices:\n")
    print("| method | prices (CNY/kWh) | welfare (CNY) | welfare − fixed upper | line > 90 % | carbon > limit "
          "| any violation | violations − fixed upper (pp) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, e in result["test"].items():
        prices = " / ".join(f"{p:.3f}" for p in e["prices"])
        print(f"| {name} | {prices} | {e['welfare_cny']:.0f} ± {e['welfare_ci95']:.0f} | "
              f"{e['welfare_diff_cny']:+.0f} ± {e['welfare_diff_ci95']:.0f} | {e['steps_line_over_limit_pct']:.1f} % "
              f"| {e['steps_carbon_over_limit_pct']:.1f} % | {e['steps_any_violation_pct']:.1f} % "
              f"| {e['violation_diff_pct']:+.1f} ± {e['violation_diff_ci95']:.1f} |")
    print(f"\nwall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
