"""Worst deviations of the JAX twin from the host environment over random (day, seed) pairs and random prices.

Draws ``--pairs`` days (a quarter of them among the busiest days of either
split, the rest at random, each with its own scenario seed) and uniform random
prices per step (3 % pushed out of bounds to exercise the clipping), runs the
host environment day by day and the twin on all days at once, and prints the
worst deviation of each quantity with the issue's bound and PASS/FAIL. Exit
status 1 if any bound is exceeded.

    python benchmarks/twin_agreement.py [--pairs 50] [--seed 0] [--power-flow sweep|newton] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from evjax.config import Config
from evjax.twin import agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50, help="(day, seed) pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--power-flow", choices=["sweep", "newton"], default="sweep")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    logging.getLogger("pandapower").setLevel(logging.ERROR)
    start = time.perf_counter()
    episodes = agreement.run_episodes(Config(), args.pairs, seed=args.seed, power_flow=args.power_flow)
    result = agreement.deviations(episodes)
    result.update(pairs=args.pairs, seed=args.seed, power_flow=args.power_flow,
                  seconds=round(time.perf_counter() - start, 1))
    failed = agreement.failures(result)
    result["failures"] = failed
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            if name == "failures":
                continue
            bound = agreement.TOLERANCES.get(name)
            verdict = "" if bound is None else ("  PASS" if value <= bound else "  FAIL")
            limit = "" if bound is None else f"  (bound {bound:g})"
            print(f"{name:32s} {value!s:>24}{limit}{verdict}")
        print("all within bounds" if not failed else f"{len(failed)} bound(s) exceeded")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
