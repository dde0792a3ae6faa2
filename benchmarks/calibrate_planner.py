"""Scale of the planner's predicted candidate costs, to choose ``planner.cost_limit``.

Restores a run's checkpoint, plays mid-range prices on ``--days`` evenly spaced
training days and, at every step, scores ``planner.popsize`` uniformly random
price sequences (the first CEM iteration's population) with the trained
ensemble: the scaled predicted cost with the CAP penalty kappa * u and without
it (the CCEM scale). Prints the quantiles of both and the share of candidates
feasible at each ``--limits`` value, so the cost limit can be set where the
feasible set is neither empty nor everything.

    python benchmarks/calibrate_planner.py --run-dir runs/default [--checkpoint latest] [--days 6] [--kappa 19]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from evjax.data.scenarios import num_days
from evjax.evaluate import _load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="latest")
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kappa", type=float, default=None, help="CAP multiplier (default: the trained kappa)")
    parser.add_argument("--limits", type=float, nargs="+", default=[0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0])
    args = parser.parse_args()
    cfg, trainer, kind, epoch, _ = _load_trained(args.run_dir, args.checkpoint)
    parts = trainer.parts
    model = parts.dynamics.select_elites(trainer.state["model"])
    kappa = float(parts.agent.kappa) if args.kappa is None else args.kappa
    planner = parts.agent.planner
    evaluate = jax.jit(planner.evaluate)
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    mid = (lower + upper) / 2
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    env = parts.env
    capped, plain = [], []
    shape = (cfg.planner.popsize, planner.horizon, len(lower))
    for i, day in enumerate(np.linspace(0, num_days(cfg, "train") - 1, args.days).round().astype(int)):
        obs, _ = env.reset(seed=args.seed + i, options={"split": "train", "day": int(day)})
        for _ in range(cfg.env.episode_steps):
            actions = rng.uniform(lower, upper, shape).astype(np.float32)
            key, eval_key = jax.random.split(key)
            with_penalty = evaluate(eval_key, model, obs, actions, np.float32(kappa))
            without = evaluate(eval_key, model, obs, actions, np.float32(0.0))
            capped.append(np.asarray(with_penalty.cost))
            plain.append(np.asarray(without.cost))
            obs = env.step(mid)[0]
    capped, plain = np.array(capped), np.array(plain)  # [steps, N]
    print(f"checkpoint '{kind}' epoch {epoch}, kappa {kappa:.2f}, {len(capped)} states x {shape[0]} random candidates\n")
    print("| scale | p10 | p25 | p50 | p75 | p90 |")
    print("|---|---|---|---|---|---|")
    for name, values in (("CAP: cost + kappa u", capped), ("CCEM: cost", plain)):
        print(f"| {name} | " + " | ".join(f"{q:.3f}" for q in np.percentile(values, [10, 25, 50, 75, 90])) + " |")
    print("\n| cost limit | CAP feasible share (median over states) | states with none feasible | "
          "CCEM feasible share | CCEM states with none |")
    print("|---|---|---|---|---|")
    for limit in args.limits:
        cap_share, ccem_share = (capped <= limit).mean(axis=1), (plain <= limit).mean(axis=1)
        print(f"| {limit:g} | {np.median(cap_share):.2f} | {np.mean(cap_share == 0):.0%} | "
              f"{np.median(ccem_share):.2f} | {np.mean(ccem_share == 0):.0%} |")


if __name__ == "__main__":
    main()
