"""Can the ensemble learn which way prices move the carbon intensity, from the data a training run collects?

The carbon limit is met by moving EV energy to CS3 (about 705 kg/MWh against about 894 at CS1 and CS2), so
the model must learn that a cheap CS3 lowers the EV-charging intensity of the next steps. This script builds
the data of a 50-episode training run on the JAX twin (training-split days): K episodes of uniform random
prices, then 50 - K episodes of prices scattered narrowly around one point (CS1 cheap, CS3 dear: where a
planner that learned the wrong direction settles). It fits the default ensemble after every episode, as
``evjax.train`` does, for several model seeds, and compares on 30 test-day states (steps 2, 5 and 8 of
random-price episodes) the predicted and the true 3-step mean intensity under A = CS3 cheap
[1.4, 1.433, 1.2] minus B = CS1 cheap [1.1, 1.5, 1.4] (the model's members' noise-free means; the twin's
outcome from the same state). A negative effect is the right direction.

``--after 5 10 20`` also reports the models fitted after the first 5, 10 and 20 episodes (the early
models a training plans with; with K >= 20 these saw random prices only), and ``--set model.KEY=VALUE``
changes the model (README "Dynamics model": ``model.linear_ridge``).

    python benchmarks/price_effect.py [--random-episodes 1 5] [--seeds 3] [--after 5 10 50] [--set KEY=VALUE]
        [--price-seed 5] [--json]

About 1.5 minutes per value of K on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate as ev
from evjax import twin
from evjax.cli import entry_point
from evjax.config import Config, load
from evjax.data.scenarios import num_days
from evjax.dynamics import make_dynamics
from evjax.env import EVPricingEnv

CS3_CHEAP, CS1_CHEAP = np.array([1.4, 1.433, 1.2]), np.array([1.1, 1.5, 1.4])
SETTLED, SETTLED_SPREAD = np.array([1.19, 1.33, 1.37]), np.array([0.1, 0.04, 0.05])
EPISODES, EFFECT_STEPS, START_STEPS = 50, 3, (2, 5, 8)


class Twin:
    """Open-loop twin episodes of ``cfg`` on given days, as observations and transitions."""

    def __init__(self, cfg: Config):
        self.cfg, self.env = cfg, EVPricingEnv(cfg)
        self.params = twin.make_params(cfg, feeder=self.env.grid, travel=self.env.travel)
        self.run_fn = jax.jit(jax.vmap(self._episode, in_axes=(0, 0, 0, None)))

    @staticmethod
    def _episode(key, day, prices, params):
        """One day at prices [T, A], as ``oracle.open_loop_episodes`` runs it: (first obs, obs after each step, info)."""
        state, first = twin.reset(key, day, params)
        _, (obs, _, _, info) = twin.rollout(key, state, prices, params)
        return first, obs, info

    def run(self, split: str, day_ids, seeds, prices: np.ndarray):
        """(observations [D, T, S] before each step, next observations [D, T, S], info [D, T, ...])."""
        scenarios = [ev.episode_scenario(self.cfg, split, d, s) for d, s in zip(day_ids, seeds)]
        with jax.enable_x64(True):
            days = twin.stack_scenarios(scenarios, self.cfg, travel=self.env.travel)
            keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
            first, nxt, info = self.run_fn(keys, days, jnp.asarray(prices, jnp.float32), self.params)
        info = {k: np.asarray(info[k]) for k in ("welfare", "carbon_intensity", "cost")}
        nxt = np.asarray(nxt, np.float32)
        obs = np.concatenate([np.asarray(first, np.float32)[:, None], nxt[:, :-1]], 1)
        return obs, nxt, info


def training_prices(rng, random_episodes: int, lower, upper, steps: int) -> np.ndarray:
    prices = rng.uniform(lower, upper, size=(EPISODES, steps, len(lower)))
    settled = SETTLED + rng.normal(size=(EPISODES - random_episodes, steps, len(lower))) * SETTLED_SPREAD
    prices[random_episodes:] = np.clip(settled, lower, upper)
    return prices


def true_effects(sim: Twin, day_ids, seeds, prices) -> tuple[np.ndarray, np.ndarray]:
    """(start observations [N, S], true 3-step mean intensity under A minus under B [N])."""
    obs, _, _ = sim.run("test", day_ids, seeds, prices)
    starts, effects = [], []
    for t in START_STEPS:
        intensity = {}
        for name, price in (("A", CS3_CHEAP), ("B", CS1_CHEAP)):
            changed = prices.copy()
            changed[:, t:t + EFFECT_STEPS] = price
            intensity[name] = sim.run("test", day_ids, seeds, changed)[2]["carbon_intensity"][:, t:t + EFFECT_STEPS]
        effects.append(intensity["A"].mean(1) - intensity["B"].mean(1))
        starts.append(obs[:, t])
    return np.concatenate(starts), np.concatenate(effects)


def predicted_effects(dyn, model, starts: np.ndarray, cfg: Config) -> np.ndarray:
    """Members' noise-free 3-step mean intensity under A minus under B, averaged over members [N]."""
    carbon = 2 * cfg.num_stations + 1
    members = dyn.ensemble_size

    def mean_intensity(price):
        state = jnp.broadcast_to(jnp.asarray(starts), (members,) + starts.shape)  # [E, N, S]
        act = jnp.broadcast_to(jnp.asarray(price, jnp.float32), state.shape[:-1] + (len(price),))
        total = 0.0
        for _ in range(EFFECT_STEPS):
            state = dyn.step(model, state, act, None, mean_only=True).next_obs
            total = total + state[..., carbon] * cfg.env.carbon_obs_scale
        return np.asarray(total / EFFECT_STEPS).mean(0)

    return mean_intensity(CS3_CHEAP) - mean_intensity(CS1_CHEAP)


@entry_point("price_effect")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-episodes", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per value of K")
    parser.add_argument("--after", type=int, nargs="+", default=[EPISODES],
                        help="report the model fitted after each of these numbers of episodes (1-50)")
    parser.add_argument("--set", action="append", default=[], help="override section.key=value")
    parser.add_argument("--price-seed", type=int, default=None,
                        help="seed of the training prices (default: K, the number of random episodes)")
    parser.add_argument("--json", action="store_true", help="one JSON line per (K, seed, episodes fitted)")
    args = parser.parse_args(argv)
    if not all(1 <= n <= EPISODES for n in args.after):
        parser.error(f"--after takes numbers of episodes from 1 to {EPISODES}")
    cfg = load(None, args.set)
    sim = Twin(cfg)
    lower, upper, steps = np.array(cfg.env.price_lower), np.array(cfg.env.price_upper), cfg.env.episode_steps
    rng = np.random.default_rng(0)
    train_days = rng.choice(num_days(cfg, "train"), EPISODES, replace=False)
    test_days = np.linspace(0, num_days(cfg, "test") - 1, 30).round().astype(int)
    test_seeds = list(range(1000, 1030))
    starts, truth = true_effects(sim, test_days, test_seeds, rng.uniform(lower, upper, size=(30, steps, 3)))
    if not args.json:
        print(f"true effect of CS3 cheap vs CS1 cheap on the 3-step EV-charging intensity: mean {truth.mean():.1f} "
              f"kg/MWh (sd {truth.std():.1f}) over {truth.size} test states")
        print("| random episodes | episodes fitted | model seed | predicted effect (kg/MWh) | states with the right sign |")
        print("|---|---|---|---|---|")
    for k in args.random_episodes:
        price_rng = np.random.default_rng(k if args.price_seed is None else args.price_seed)
        prices = training_prices(price_rng, k, lower, upper, steps)
        obs, nxt, info = sim.run("train", train_days, list(range(EPISODES)), prices)
        reward = (info["welfare"] / cfg.env.reward_scale).astype(np.float32)
        cost = info["cost"].astype(np.float32)
        for seed in range(args.seeds):
            dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
            key = jax.random.key(seed)
            model = dyn.init(key)
            for episodes in range(1, max(args.after) + 1):  # refit after every episode on all data so far, as training does
                take = lambda x: x[:episodes].reshape(-1, *x.shape[2:])  # noqa: E731
                model, _ = dyn.fit(jax.random.fold_in(key, episodes), model, take(obs),
                                   take(prices).astype(np.float32), take(reward), take(cost), take(nxt))
                if episodes not in args.after:
                    continue
                effect = predicted_effects(dyn, model, starts, cfg)
                row = {"random_episodes": k, "episodes_fitted": episodes, "seed": seed,
                       "true_effect_mean": float(truth.mean()), "predicted_effect_mean": float(effect.mean()),
                       "right_sign_share": float(np.mean(np.sign(effect) == np.sign(truth)))}
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"| {k} | {episodes} | {seed} | {effect.mean():+.1f} | {100 * row['right_sign_share']:.0f} % |",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
