"""What a trained agent's model predicts for three price policies, against what the environment does.

Restores a run's checkpoint ("best", else "latest") and, on test days (seeds ``evaluation.seed + day``),
posts mid-range prices for 4 steps, then holds one of A = CS3 cheap [1.4, 1.433, 1.2], B = CS1 cheap
[1.1, 1.5, 1.4] or M = mid-range for the rest of the episode. Prints

1. the planner's score of each constant sequence from the step-4 state (``planner.evaluate`` with the
   trained kappa: predicted reward, cost and CAP penalty), with the step cost split into its line and its
   carbon terms (the other term's limit lifted);
2. what really happened under each (host env): reward, line and carbon cost summed over the same steps;
3. the members' noise-free predicted line loadings along the horizon under A, beside the real ones.

    python benchmarks/model_bias.py --run-dir RUN [--days 10] [--no-particle-noise]

``--no-particle-noise`` scores with ``planner.particle_noise: false`` (each particle follows its member's means).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate as ev
from evjax import planner as cem

POLICIES = {"A (CS3 cheap)": np.array([1.4, 1.433, 1.2]), "B (CS1 cheap)": np.array([1.1, 1.5, 1.4])}
WARM_UP = 4


def scorer(cfg, dyn, grid=None, carbon=None):
    """Jitted ``planner.evaluate`` of the run's planner (``make_model_planner``), with the grid and carbon settings
    replaced by ``grid`` / ``carbon`` (dicts of fields; a lifted limit leaves the other constraint's cost alone)."""
    cfg = dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, **(grid or {})),
                              carbon=dataclasses.replace(cfg.carbon, **(carbon or {})))
    return jax.jit(cem.make_model_planner(cfg, dyn).evaluate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--no-particle-noise", action="store_true")
    args = parser.parse_args(argv)
    cfg, trainer, kind, epoch, _ = ev._load_trained(args.run_dir)
    if args.no_particle_noise:
        cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, particle_noise=False))
    if cfg.planner.cost_model != "observation":
        parser.error("the run must plan with planner.cost_model: observation")
    parts = trainer.parts
    dyn, env = parts.dynamics, parts.env
    model = dyn.select_elites(trainer.state["model"])
    kappa = jnp.asarray(parts.agent.kappa, jnp.float32)
    mid = (np.asarray(cfg.env.price_lower) + np.asarray(cfg.env.price_upper)) / 2
    policies = {**POLICIES, "M (mid-range)": mid}
    scorers = {"total": scorer(cfg, dyn), "line": scorer(cfg, dyn, carbon={"limit": 1e9}),
               "carbon": scorer(cfg, dyn, grid={"loading_limit": 1e9})}
    day_ids = ev.evaluation_day_ids(dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation,
                                                                                           days=args.days)))
    predicted = {name: [] for name in policies}
    real = {name: [] for name in policies}
    loading_pred, loading_real = [], []
    num_candidates, horizon = cfg.planner.popsize, cfg.planner.horizon
    for i, day in enumerate(day_ids):
        obs, _ = env.reset(seed=cfg.evaluation.seed + i, options={"split": cfg.evaluation.split, "day": int(day)})
        for _ in range(WARM_UP):
            obs, *_ = env.step(mid)
        snapshot = env.snapshot()
        sequences = np.stack([np.broadcast_to(p, (horizon, len(p))) for p in policies.values()])
        candidates = jnp.asarray(np.resize(sequences, (num_candidates,) + sequences.shape[1:]), jnp.float32)
        scores = {part: fn(jax.random.key(i), model, jnp.asarray(obs), candidates, kappa) for part, fn in
                  scorers.items()}
        for j, (name, price) in enumerate(policies.items()):
            predicted[name].append([float(scores["total"].reward[j]), float(scores["line"].cost[j]),
                                    float(scores["carbon"].cost[j]), float(scores["total"].penalty[j])])
            env.restore(snapshot)
            reward = line = carbon = 0.0
            state = jnp.broadcast_to(jnp.asarray(obs), (dyn.num_planning_members, 1, obs.size))
            for t in range(cfg.env.episode_steps - WARM_UP):
                _, r, terminated, _, info = env.step(price)
                reward, line, carbon = reward + r, line + info["cost_line"], carbon + info["cost_carbon"]
                if j == 0:
                    action = jnp.broadcast_to(jnp.asarray(price, jnp.float32), state.shape[:-1] + (len(price),))
                    state = dyn.step(model, state, action, None, mean_only=True).next_obs
                    loading_pred.append((i, t, np.asarray(state[:, 0, :cfg.num_stations]).mean(0)))
                    loading_real.append((i, t, info["line_loading"]))
                if terminated:
                    break
            real[name].append([reward, line, carbon])
    print(f"run {args.run_dir} ({kind} checkpoint, epoch {epoch}, kappa {np.asarray(parts.agent.kappa).round(3)}); "
          f"{len(day_ids)} test days, prices held from step {WARM_UP}")
    print("| prices held | predicted reward | predicted line cost | predicted carbon cost | CAP penalty "
          "| real reward | real line cost | real carbon cost |")
    print("|---|---|---|---|---|---|---|---|")
    for name in policies:
        p, r = np.mean(predicted[name], 0), np.mean(real[name], 0)
        print(f"| {name} | {p[0]:.2f} | {p[1]:.3f} | {p[2]:.3f} | {p[3]:.3f} | {r[0]:.2f} | {r[1]:.3f} | {r[2]:.3f} |")
    print("(predicted costs are the planner's discounted, horizon-scaled sums over the steps left; real ones are sums)")
    print(f"\nline loading under {next(iter(POLICIES))}, mean over days: predicted (members' means) | real")
    for t in range(cfg.env.episode_steps - WARM_UP):
        pred = np.mean([x for _, s, x in loading_pred if s == t], 0)
        true = np.mean([x for _, s, x in loading_real if s == t], 0)
        print(f"step {WARM_UP + t}: {np.round(pred, 2)} | {np.round(true, 2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
