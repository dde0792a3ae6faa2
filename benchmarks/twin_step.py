"""Environment steps per second of the JAX twin at batch sizes 1, 64 and 1024, against the host environment in the same run.

The twin is timed on whole episodes: one compiled program runs ``rollout``
(a scan of 12 ``step`` calls) vmapped over a batch of days, at random prices,
from the reset state; steps/s = batch x 12 / wall time (compilation and one
warm-up call excluded, ``block_until_ready`` before the clock stops). The days
are drawn from the training split (one scenario per batch row, up to 64
distinct days reused cyclically) and padded to one EV count. The host is
``EVPricingEnv.step`` as in ``benchmarks/env_step.py``. Prints the median and
min/max over repeats and the ratio twin / host at each batch size.

    python benchmarks/twin_step.py [--json] [--batch 1 64 1024] [--repeats 5] [--power-flow sweep|newton]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import jax
import numpy as np

from env_step import time_env_steps
from evjax import twin
from evjax.config import Config
from evjax.data.scenarios import make_scenario


def twin_steps_per_second(cfg: Config, params, batch: int, repeats: int, distinct_days: int = 64) -> dict:
    """Median, min and max steps/s of the vmapped episode rollout at ``batch``, and its compile seconds."""
    scenarios = [make_scenario(cfg, "train", day=None, seed=s) for s in range(min(batch, distinct_days))]
    days = twin.stack_scenarios([scenarios[i % len(scenarios)] for i in range(batch)], cfg, max_evs=512)
    rng = np.random.default_rng(0)
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    prices = lower + (upper - lower) * rng.uniform(size=(batch, cfg.env.episode_steps, len(lower)))
    keys = jax.random.split(jax.random.key(0), batch)

    def episode(key, scenario, actions):
        state, _ = twin.reset(key, scenario, params)
        final, (obs, reward, cost, info) = twin.rollout(key, state, actions, params)
        return reward, cost, obs

    run = twin.jit(jax.vmap(episode))
    start = time.perf_counter()
    jax.block_until_ready(run(keys, days, prices))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(run(keys, days, prices))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(keys, days, prices))
        seconds.append(time.perf_counter() - start)
    steps = batch * cfg.env.episode_steps
    return {
        "batch": batch,
        "steps_per_s_median": steps / statistics.median(seconds),
        "steps_per_s_min": steps / max(seconds),
        "steps_per_s_max": steps / min(seconds),
        "episode_batch_ms_median": 1e3 * statistics.median(seconds),
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--host-steps", type=int, default=120, help="timed host environment steps")
    parser.add_argument("--power-flow", choices=["sweep", "newton"], default="sweep")
    args = parser.parse_args()
    logging.getLogger("pandapower").setLevel(logging.ERROR)
    cfg = Config()
    params = twin.make_params(cfg, power_flow=args.power_flow)
    host_s = time_env_steps(max(args.host_steps, 50))
    host_rate = 1.0 / statistics.median(host_s)
    rows = []
    for batch in args.batch:
        row = twin_steps_per_second(cfg, params, batch, args.repeats)
        row["ratio_to_host"] = row["steps_per_s_median"] / host_rate
        rows.append(row)
    result = {
        "host_steps_per_s_median": host_rate,
        "host_steps_per_s_min": 1.0 / max(host_s),
        "host_steps_per_s_max": 1.0 / min(host_s),
        "twin": rows,
        "power_flow": args.power_flow,
        "devices": str(jax.devices()),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"host env   {host_rate:9.0f} steps/s (min {result['host_steps_per_s_min']:.0f}, "
          f"max {result['host_steps_per_s_max']:.0f})")
    for row in rows:
        print(f"twin B={row['batch']:<5d} {row['steps_per_s_median']:9.0f} steps/s (min {row['steps_per_s_min']:.0f}, "
              f"max {row['steps_per_s_max']:.0f}), ratio to host {row['ratio_to_host']:.1f}, "
              f"compile {row['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
