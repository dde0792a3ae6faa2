"""Which constant prices does a trained model rate best? The fixed-price search, on the agent's own model.

Restores a run's checkpoint ("best", else "latest") and scores every constant price vector of
``--levels`` prices per station (``evaluate.fixed_price_grid``, the grid of
``benchmarks/fixed_price_search.py``) held over the
planner's horizon, from each episode-start state in the checkpoint's replay buffer (the agent's own
data, no simulator): the planner's candidate evaluation (``planner.evaluate``, kappa 0: the nominal
predicted cost without the CAP margin, the run's ``planner.constraint_backoff`` included) averaged over
those states. It prints the vectors ranked by predicted cost (rounded to 1e-4), then predicted
reward: what the model believes, to compare with the simulator's tuned constant [1.4, 1.5, 1.2]
(README, "Results"), and a CEM prior chosen from the model alone: mid-range moved halfway to the best
vector, as ``--set evaluation.prior_prices=...`` takes it.

    python benchmarks/model_constant.py --run-dir RUN [--levels 5] [--top 5] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate as ev
from evjax import replay
from evjax.cli import entry_point
from evjax.errors import UserError


def rank(cost: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """Indices by predicted cost (rounded to 1e-4, so that near-ties go by reward), then by reward, best first."""
    return np.lexsort((-reward, np.round(cost, 4)))


def score(run_dir: Path, levels: int) -> dict:
    """Predicted cost and reward of each constant vector, averaged over the replay's episode-start states."""
    cfg, trainer, kind, epoch, _ = ev._load_trained(run_dir)
    if not cfg.env.time_features:
        raise UserError(f"{run_dir}: episode starts are read from the time feature; the run has env.time_features off")
    model = trainer.parts.dynamics.select_elites(trainer.state["model"])
    planner = trainer.parts.agent.planner
    obs = np.asarray(replay.contents(trainer.state["buffer"])[0])
    starts = obs[obs[:, -1] == 0.0]
    if len(starts) == 0:
        raise UserError(f"{run_dir}: the checkpoint's replay buffer holds no episode start")
    grid_cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, tuned_levels=levels))
    vectors = np.asarray(ev.fixed_price_grid(grid_cfg), np.float32)  # [levels ** K, K]
    actions = jnp.asarray(np.repeat(vectors[:, None, :], cfg.planner.horizon, axis=1))
    kappa = jnp.zeros(np.shape(trainer.parts.agent.kappa), jnp.float32)
    rewards, costs = [], []
    for i, start in enumerate(starts):
        values = planner.evaluate(jax.random.key(i), model, jnp.asarray(start), actions, kappa)
        rewards.append(np.asarray(values.reward))
        costs.append(np.asarray(values.cost))
    reward, cost = np.mean(rewards, axis=0), np.mean(costs, axis=0)
    order = rank(cost, reward)
    mid = (np.asarray(cfg.env.price_lower) + np.asarray(cfg.env.price_upper)) / 2
    best = vectors[order[0]]
    return {"run_dir": str(run_dir), "checkpoint": kind, "epoch": epoch, "states": int(len(starts)),
            "ranked": [{"prices": [round(float(p), 4) for p in vectors[j]], "cost": float(cost[j]), "reward": float(reward[j])}
                       for j in order],
            "prior": [round(float(p), 4) for p in (mid + best) / 2]}


@entry_point("model_constant")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--levels", type=int, default=5, help="prices per station (default 5: 125 vectors)")
    parser.add_argument("--top", type=int, default=5, help="vectors printed (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.levels < 2 or args.top < 1:
        parser.error("--levels must be at least 2 and --top at least 1")
    result = score(args.run_dir, args.levels)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"run {result['run_dir']} ({result['checkpoint']} checkpoint, epoch {result['epoch']}); "
          f"{result['states']} episode-start states of its replay buffer")
    print("| rank | prices (CNY/kWh) | predicted cost | predicted reward |")
    print("|---|---|---|---|")
    for i, entry in enumerate(result["ranked"][:args.top]):
        print(f"| {i + 1} | {entry['prices']} | {entry['cost']:.4f} | {entry['reward']:.3f} |")
    print(f"prior halfway from mid-range: {result['prior']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
