"""Does a trained model know what a price does? One-step change of the EVs present per station, model vs environment.

Restores a run's checkpoint ("best", else "latest") and, on test days (seeds
``evaluation.seed + day``, mid-range prices posted between the probes), takes the
state of each of the first ``--steps`` steps and posts, from that same state
(``env.snapshot`` / ``restore``), each of four price vectors for one step:
A = CS3 cheap [1.4, 1.5, 1.2], B = CS1 cheap [1.1, 1.5, 1.4], C = CS2 cheap
[1.4, 1.3, 1.4] and U = upper bounds [1.4, 1.5, 1.4]. It prints the mean change of
the EVs present at each station over that step, as the environment makes it and as
the planning members' noise-free means predict it, and both as differences to U:
the price response the planner ranks candidates by. The carbon limit is met by
moving EVs to CS3 (README, "Results"), so A - U should put EVs at CS3.

    python benchmarks/price_response.py --run-dir RUN [--days 20] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from evjax import evaluate as ev
from evjax.cli import entry_point
from evjax.errors import UserError

PRICES = {"A (CS3 cheap)": [1.4, 1.5, 1.2], "B (CS1 cheap)": [1.1, 1.5, 1.4], "C (CS2 cheap)": [1.4, 1.3, 1.4],
          "U (upper bounds)": [1.4, 1.5, 1.4]}
REFERENCE = "U (upper bounds)"


def responses(run_dir: Path, days: int, steps: int) -> dict:
    """Mean one-step change of the EVs present [K] per price vector: {"env": {name: [K]}, "model": {...}}."""
    cfg, trainer, kind, epoch, _ = ev._load_trained(run_dir)
    parts = trainer.parts
    dyn, env = parts.dynamics, parts.env
    model = dyn.select_elites(trainer.state["model"])
    k = cfg.num_stations
    if len(cfg.env.price_lower) != 3:
        raise UserError(f"{run_dir}: the probe prices are for 3 stations, the run has {k}")
    day_ids = ev.evaluation_day_ids(dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation,
                                                                                           days=days)))
    mid = (np.asarray(cfg.env.price_lower) + np.asarray(cfg.env.price_upper)) / 2
    prices = {name: np.clip(np.asarray(p), cfg.env.price_lower, cfg.env.price_upper) for name, p in PRICES.items()}
    actions = jnp.asarray(np.stack(list(prices.values())), jnp.float32)  # [4, A]
    members = dyn.num_planning_members
    changes = {"env": {name: [] for name in prices}, "model": {name: [] for name in prices}}
    for i, day in enumerate(day_ids):
        obs, _ = env.reset(seed=cfg.evaluation.seed + i, options={"split": cfg.evaluation.split, "day": int(day)})
        for _ in range(min(steps, cfg.env.episode_steps - 1)):
            state = jnp.broadcast_to(jnp.asarray(obs), (members, len(prices), obs.size))  # [E, 4, S]
            predicted = dyn.step(model, state, jnp.broadcast_to(actions, (members,) + actions.shape), None,
                                 mean_only=True).next_obs  # [E, 4, S]
            predicted = np.asarray(predicted[..., k:2 * k]).mean(axis=0) - obs[k:2 * k]  # [4, K]
            snapshot = env.snapshot()
            for j, (name, price) in enumerate(prices.items()):
                env.restore(snapshot)
                next_obs, *_ = env.step(price)
                changes["env"][name].append(next_obs[k:2 * k] - obs[k:2 * k])
                changes["model"][name].append(predicted[j])
            env.restore(snapshot)
            obs, *_ = env.step(mid)
    means = {source: {name: np.mean(rows, axis=0) for name, rows in by_name.items()}
             for source, by_name in changes.items()}
    return {"run_dir": str(run_dir), "checkpoint": kind, "epoch": epoch, "states": len(changes["env"][REFERENCE]),
            "env": {name: value.tolist() for name, value in means["env"].items()},
            "model": {name: value.tolist() for name, value in means["model"].items()},
            "rmse_vs_env": float(np.sqrt(np.mean([
                np.square((means["model"][name] - means["model"][REFERENCE])
                          - (means["env"][name] - means["env"][REFERENCE])) for name in prices if name != REFERENCE])))}


@entry_point("price_response")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--days", type=int, default=20, help="test days (default 20)")
    parser.add_argument("--steps", type=int, default=10, help="probed steps per day, from the first (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.days < 1 or args.steps < 1:
        parser.error("--days and --steps must be at least 1")
    result = responses(args.run_dir, args.days, args.steps)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {result['run_dir']} ({result['checkpoint']} checkpoint, epoch {result['epoch']}); "
          f"{result['states']} states; change of the EVs present per station over one step")
    print("| prices posted | environment | model | environment − U | model − U |")
    print("|---|---|---|---|---|")
    fmt = lambda values: " / ".join(f"{v:+.2f}" for v in values)  # noqa: E731
    for name in PRICES:
        env_change, model_change = np.asarray(result["env"][name]), np.asarray(result["model"][name])
        env_diff = env_change - np.asarray(result["env"][REFERENCE])
        model_diff = model_change - np.asarray(result["model"][REFERENCE])
        print(f"| {name} | {fmt(env_change)} | {fmt(model_change)} | {fmt(env_diff)} | {fmt(model_diff)} |")
    print(f"RMSE of the model's differences to U against the environment's: {result['rmse_vs_env']:.2f} EVs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
