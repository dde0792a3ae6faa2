"""Median wall time of one environment step against one bare pandapower power flow, measured in the same run.

The environment step is ``EVPricingEnv.step`` at mid-range prices (EV choice,
queues, charging, settlement, the feeder's AC power flow and the carbon
intensity), timed over ``--steps`` steps after a warm-up episode; resets
between episodes are not timed. The ceiling is ``pandapower.runpp`` on the
unmodified ``case33bw`` (numba on only if it is installed), timed as many
times. Prints both medians with min/max and the ratio env step / runpp; a
ratio below 1 means a step costs less than one bare power flow.

    python benchmarks/env_step.py [--json] [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import pandapower as pp
import pandapower.networks as pn
from pandapower.pf.run_newton_raphson_pf import numba_installed

from evjax.config import Config
from evjax.env import EVPricingEnv


def time_env_steps(num_steps: int, seed: int = 0) -> list[float]:
    """Seconds per ``env.step`` over ``num_steps`` steps (one untimed warm-up episode first)."""
    cfg = Config()
    env = EVPricingEnv(cfg)
    mid = (np.asarray(cfg.env.price_lower) + np.asarray(cfg.env.price_upper)) / 2.0
    episode = 0
    env.reset(seed=seed)
    for _ in range(cfg.env.episode_steps):
        env.step(mid)
    seconds: list[float] = []
    terminated = True
    while len(seconds) < num_steps:
        if terminated:
            episode += 1
            env.reset(seed=seed + episode)
        start = time.perf_counter()
        _, _, terminated, _, _ = env.step(mid)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_bare_runpp(repeats: int) -> list[float]:
    """Seconds per ``pandapower.runpp`` on the unmodified case33bw (three untimed warm-up runs)."""
    net = pn.case33bw()
    for _ in range(3):
        pp.runpp(net, numba=numba_installed)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        pp.runpp(net, numba=numba_installed)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--steps", type=int, default=120, help="timed environment steps (>= 50)")
    args = parser.parse_args()
    logging.getLogger("pandapower").setLevel(logging.ERROR)
    steps = max(args.steps, 50)
    env_s = time_env_steps(steps)
    runpp_s = time_bare_runpp(steps)
    result = {
        "env_step_ms_median": 1e3 * statistics.median(env_s),
        "env_step_ms_min": 1e3 * min(env_s),
        "env_step_ms_max": 1e3 * max(env_s),
        "runpp_ms_median": 1e3 * statistics.median(runpp_s),
        "runpp_ms_min": 1e3 * min(runpp_s),
        "runpp_ms_max": 1e3 * max(runpp_s),
        "ratio_env_over_runpp": statistics.median(env_s) / statistics.median(runpp_s),
        "steps": steps,
        "numba": numba_installed,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"env step   median {result['env_step_ms_median']:.2f} ms  (min {result['env_step_ms_min']:.2f}, "
          f"max {result['env_step_ms_max']:.2f}) over {steps} steps")
    print(f"bare runpp median {result['runpp_ms_median']:.2f} ms  (min {result['runpp_ms_min']:.2f}, "
          f"max {result['runpp_ms_max']:.2f}) on case33bw, numba={numba_installed}")
    print(f"ratio env step / runpp = {result['ratio_env_over_runpp']:.2f}")


if __name__ == "__main__":
    main()
