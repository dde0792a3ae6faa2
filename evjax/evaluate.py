"""Evaluate a trained run against the baselines of SPEC 12: ``python -m evjax.evaluate --run-dir D``.

Host side, not jittable. Restores the "best" checkpoint (falling back to
"latest" when no episode met the cost threshold, and saying so) from the
checkpoint alone, runs every method on the same held-out days and seeds, and
writes ``eval/metrics.csv``, ``eval/metrics.md``, ``eval/steps.csv`` and PNG plots.

The learned planners always run on the host environment (the "real" system).
The non-learned methods (fixed prices, random prices, ``evaluation.baseline_simulator``)
and the oracle (``evaluation.oracle``) run by default on the JAX twin, every day
in one jitted, vmapped call whose day axis is sharded over ``jax.devices()``
(``run_on_twin``). Fixed mid-range prices then also run on the host, on the same
days, as a second row, and the table states the largest per-day deviation
between the two simulators. Each table row carries the paired per-day
difference of welfare and of the violation-step share to ``evaluation.reference``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evjax import checkpoint
from evjax.cli import entry_point, make_parser
from evjax.config import Config, EvaluationConfig, load
from evjax.errors import ConfigError, UserError
from evjax.methods import BY_NAME, method_kappa


class FixedPolicy:
    def __init__(self, prices):
        self.prices = np.asarray(prices, np.float32)

    def reset(self, seed: int) -> None:
        pass

    def act(self, env, obs):
        return self.prices


class RandomPolicy:
    def __init__(self, lower, upper):
        self.lower, self.upper = np.asarray(lower), np.asarray(upper)
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, env, obs):
        return self.rng.uniform(self.lower, self.upper).astype(np.float32)


class PlannerPolicy:
    """A CEM variant planning on the trained ensemble with a fixed kappa."""

    def __init__(self, agent, model):
        self.agent, self.model = agent, model
        self.agent.mark_fitted()
        self.key = jax.random.key(0)

    def reset(self, seed: int) -> None:
        self.agent.reset_episode()
        self.key = jax.random.key(seed)

    def act(self, env, obs):
        self.key, plan_key = jax.random.split(self.key)
        return self.agent.act(plan_key, self.model, obs)


class OraclePolicy:
    """Constrained CEM whose rollouts are copies of the host environment (snapshot/restore): ``evaluation.oracle: host``.

    A small-budget comparison for the twin oracle (``evjax.oracle``). Each
    decision samples ``host_oracle_popsize`` price sequences over ``host_oracle_horizon``
    steps for ``host_oracle_iterations`` iterations, simulates each on the true
    environment, and refits on its elites by the model planner's rule
    (``planner.elite_scores``, feasible meaning cost <= ``evaluation.oracle_cost_limit``): the highest
    welfare among feasible sequences, or the lowest cost when too few are feasible.
    It sees the scenario's future arrivals, so it is an upper reference, not a
    deployable policy.
    """

    def __init__(self, cfg: Config):
        ev = cfg.evaluation
        self.lower, self.upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
        self.horizon, self.popsize, self.iterations = (ev.host_oracle_horizon, ev.host_oracle_popsize,
                                                       ev.host_oracle_iterations)
        self.cost_limit = ev.oracle_cost_limit
        self.num_elites = max(2, self.popsize // 5)
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _rollout(self, env, snapshot, prices) -> tuple[float, float]:
        env.restore(snapshot)
        reward = cost = 0.0
        for action in prices:
            _, r, terminated, truncated, info = env.step(action)
            reward += r
            cost += info["cost"]
            if terminated or truncated:
                break
        return reward, cost

    def act(self, env, obs):
        from evjax.planner import elite_scores

        snapshot = env.snapshot()
        steps_left = self.horizon
        mean = np.tile((self.lower + self.upper) / 2, (steps_left, 1))
        std = np.tile((self.upper - self.lower) / 4, (steps_left, 1))
        for _ in range(self.iterations):
            noise = np.clip(self.rng.standard_normal((self.popsize, *mean.shape)), -2.0, 2.0)
            candidates = np.clip(mean + std * noise, self.lower, self.upper)
            values = np.array([self._rollout(env, snapshot, c) for c in candidates])
            reward, cost = values[:, 0], values[:, 1]
            score = elite_scores(reward, cost, cost <= self.cost_limit, num_elites=self.num_elites, xp=np)
            elites = candidates[np.argsort(-score, kind="stable")[: self.num_elites]]  # best first, ties by index
            mean, std = elites.mean(axis=0), elites.std(axis=0) + 1e-6
        env.restore(snapshot)
        return mean[0].astype(np.float32)


def make_policies(cfg: Config, parts, model, trained_kappa: float, methods: Sequence[str] | None = None) -> dict:
    """Host policies of ``methods`` (default ``evaluation.methods``), all on the same config and trained model.

    The planner variants (the methods of ``evjax.methods.METHODS`` with a planner
    mode) keep kappa fixed during evaluation: 0 for CEM and CCEM,
    ``evaluation.fixed_kappa`` for fixed-kappa CAP, the trained kappa for the agent;
    they plan with the ``evaluation.*`` deployment settings (``EvaluationConfig.DEPLOYED``) where they are set
    (else the run's ``planner.*``).
    """
    from evjax.agent import Agent, planner_variant
    from evjax.planner import make_model_planner

    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    planners = {}  # one compiled planner per mode; the CAP variants differ only in kappa
    policies = {}
    for method in (cfg.evaluation.methods if methods is None else methods):
        if method in FIXED_METHODS:
            policies[method] = FixedPolicy(fixed_prices(cfg, method))
        elif method == "random":
            policies[method] = RandomPolicy(lower, upper)
        elif method == "oracle":
            policies[method] = OraclePolicy(cfg)
        else:
            planner_cfg = planner_variant(cfg.planner, BY_NAME[method], cfg.evaluation.fixed_kappa, trained_kappa,
                                          cfg.evaluation)
            if planner_cfg.mode not in planners:
                planners[planner_cfg.mode] = make_model_planner(dataclasses.replace(cfg, planner=planner_cfg),
                                                                parts.dynamics)
            kappa = method_kappa(BY_NAME[method], cfg.evaluation.fixed_kappa, trained_kappa)
            policies[method] = PlannerPolicy(Agent(planner_cfg, planners[planner_cfg.mode], kappa=kappa), model)
    return policies


FIXED_METHODS = ("fixed_mid", "fixed_upper", "fixed_tuned")  # constant prices at every step (``fixed_prices``)
TWIN_METHODS = ("fixed_mid", "fixed_upper", "fixed_tuned", "random", "oracle", "forecast_oracle")  # the methods that can run on the twin
TWIN_PLANNERS = ("oracle", "forecast_oracle")  # of those, the ones that plan (CEM on the twin), the rest open loop


def method_simulator(method: str, evaluation: EvaluationConfig) -> str:
    """Where ``method`` runs: "twin" or "host" (the learned planners always on the host)."""
    if method == "oracle":
        return evaluation.oracle
    if method == "forecast_oracle":
        return "twin"
    return evaluation.baseline_simulator if method in TWIN_METHODS else "host"


def run_name(method: str, simulator: str, primary: str) -> str:
    """Key of a method's rows: its name on its own simulator, ``method@simulator`` for the agreement copy."""
    return method if simulator == primary else f"{method}@{simulator}"


def evaluation_day_ids(cfg: Config) -> np.ndarray:
    """Day indices of ``evaluation.split``: ``evaluation.days`` of them spread evenly, or all when it is 0."""
    from evjax.data.scenarios import num_days

    split = cfg.evaluation.split
    return spread_day_ids(cfg, split, cfg.evaluation.days or num_days(cfg, split))


def forecast_scenarios(cfg: Config, split: str, day: int, seed: int) -> list:
    """The ``evaluation.forecast_scenarios`` demand draws of ``day`` the forecast oracle plans on (host side).

    Other draws of the same day (its arrival rates; other Poisson counts, origins and EVs); scenario seed s of
    episode ``seed`` is drawn from the seed sequence (seed, s), s = 1..S, apart from the episode's own draw.
    """
    from evjax.data.scenarios import make_scenario

    return [make_scenario(cfg, split=split, day=int(day),
                          seed=int(np.random.default_rng([int(seed), s]).integers(2**31 - 1)))
            for s in range(1, cfg.evaluation.forecast_scenarios + 1)]


def episode_scenario(cfg: Config, split: str, day: int, seed: int):
    """The scenario the host env draws on ``reset(seed=seed, options={"split": split, "day": day})``.

    Host side. The env seeds its generator with gymnasium's ``np_random(seed)``
    and draws the scenario seed from it first; the twin gets the same EVs.
    """
    from gymnasium.utils import seeding

    from evjax.data.scenarios import make_scenario

    rng, _ = seeding.np_random(int(seed))
    return make_scenario(cfg, split=split, day=int(day), seed=int(rng.integers(2**31 - 1)))


def random_prices(cfg: Config, seed: int) -> np.ndarray:
    """Prices [T, A] that ``RandomPolicy`` posts in an episode reset with ``seed`` (the same draws, in order)."""
    policy = RandomPolicy(cfg.env.price_lower, cfg.env.price_upper)
    policy.reset(seed)
    return np.stack([policy.act(None, None) for _ in range(cfg.env.episode_steps)])


def day_mesh() -> jax.sharding.Mesh:
    """A one-axis mesh ("days") over every device (of every host under ``jax.distributed``)."""
    return jax.sharding.Mesh(np.asarray(jax.devices()), ("days",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_days(tree, mesh: jax.sharding.Mesh):
    """Pad the leading day axis of every leaf to a multiple of the mesh size (repeating day 0) and shard it."""
    size = mesh.shape["days"]
    count = jax.tree.leaves(tree)[0].shape[0]
    pad = -count % size

    def put(leaf):
        leaf = jnp.concatenate([leaf, jnp.repeat(leaf[:1], pad, axis=0)]) if pad else leaf
        return jax.device_put(leaf, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("days")))

    return jax.tree.map(put, tree)


def _compiled_call(fn, *args):
    """Compile ``fn`` for ``args`` (64-bit types on), then run it once; returns (outputs, compile s, run s)."""
    with jax.enable_x64(True):
        tic = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        toc = time.perf_counter()
        outputs = jax.block_until_ready(compiled(*args))
        return outputs, toc - tic, time.perf_counter() - toc


def twin_rows(method: str, prices, info, active, scenarios, day_ids, plan_ms: float) -> list[dict]:
    """The step rows of ``run_episode`` from a twin batch (arrays [D, T, ...]; steps after the episode's end dropped)."""
    keys = ("posted_price", "evs_present", "line_loading", "station_energy_kwh", "unserved", *SCALAR_INFO)
    info = {key: np.asarray(info[key], dtype=float) for key in keys}
    active = np.asarray(active)
    rows = []
    for d, (day, scenario) in enumerate(zip(day_ids, scenarios)):
        for t in np.flatnonzero(active[d]):
            rows.append({
                "method": method, "simulator": "twin", "day": int(day), "date": scenario.date, "step": int(t),
                "price": info["posted_price"][d, t], "evs_present": info["evs_present"][d, t],
                "line_loading": info["line_loading"][d, t],
                "ev_energy_kwh": float(np.sum(info["station_energy_kwh"][d, t])),
                **{key: float(info[key][d, t]) for key in SCALAR_INFO},
                "unserved": int(info["unserved"][d, t]), "plan_ms": plan_ms,
            })
    return rows


def twin_days(cfg: Config, split: str, day_ids: Sequence[int], seeds: Sequence[int], *, mesh: jax.sharding.Mesh,
              env=None, forecast: bool = False):
    """The twin's inputs for episodes (day_ids[i], seeds[i]) of ``split``, day axis sharded over ``mesh``. Host side.

    Returns (keys [D], days [D, ...], params, the host scenarios, the forecast oracle's alternative draws
    [D, S, ...] with ``forecast`` else []); D is padded to a multiple of the mesh size (``shard_days``).
    """
    from evjax import oracle, twin

    steps = cfg.env.episode_steps
    scenarios = [episode_scenario(cfg, split, day, seed) for day, seed in zip(day_ids, seeds)]
    alternatives = ([forecast_scenarios(cfg, split, day, seed) for day, seed in zip(day_ids, seeds)]
                    if forecast else [])
    max_evs = oracle.forecast_max_evs(scenarios, alternatives, steps) if alternatives else None
    travel = env.travel if env is not None else None
    params = twin.make_params(cfg, **({"feeder": env.grid, "travel": env.travel} if env is not None else {}))
    with jax.enable_x64(True):
        days = shard_days(twin.stack_scenarios(scenarios, cfg, max_evs, travel=travel), mesh)
        if alternatives:  # [D, S, V]
            alternatives = shard_days(jax.tree.map(lambda *days: jnp.stack(days), *[
                twin.stack_scenarios(alts, cfg, max_evs, travel=travel) for alts in alternatives]), mesh)
        keys = shard_days(jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)), mesh)
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return keys, days, params, scenarios, alternatives


def run_on_twin(cfg: Config, methods: Sequence[str], day_ids: Sequence[int], seeds: Sequence[int], *,
                env=None, mesh: jax.sharding.Mesh | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Non-learned ``methods`` (of ``TWIN_METHODS``) on the twin, every day of ``day_ids`` at once. Host side.

    Day i is the scenario the host env draws for (day_ids[i], seeds[i])
    (``episode_scenario``), and random prices are the host ``RandomPolicy``'s
    draws for seeds[i], so the rows pair with host rows. Each method is one
    jitted program vmapped over days, its day axis sharded over ``mesh``
    (default every device; days padded to a multiple of the device count).
    Returns (rows per method, timings {method: {"compile_s", "run_s", "ms_per_decision"}});
    ``plan_ms`` of the oracle's rows is its run time / (days x steps), 0 for the open-loop methods.
    ``env`` (a host ``EVPricingEnv`` of ``cfg``) lends its feeder and road tables.
    """
    from evjax import oracle

    unknown = [m for m in methods if m not in TWIN_METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} cannot run on the twin (only {list(TWIN_METHODS)})")
    mesh = mesh if mesh is not None else day_mesh()
    split, steps = cfg.evaluation.split, cfg.env.episode_steps
    keys, days, params, scenarios, alternatives = twin_days(cfg, split, day_ids, seeds, mesh=mesh, env=env,
                                                            forecast="forecast_oracle" in methods)
    count = len(day_ids)
    per_method, timings = {}, {}
    for method in methods:
        if method in TWIN_PLANNERS:
            fn = functools.partial(oracle.episodes, oracle=oracle.settings(cfg),
                                   alternatives=alternatives if method == "forecast_oracle" else None)
            args = (keys, days, params)
        else:
            if method == "random":
                prices = np.stack([random_prices(cfg, seed) for seed in seeds])
            else:
                prices = np.broadcast_to(fixed_prices(cfg, method, env=env), (count, steps, cfg.action_dim))
            fn = oracle.open_loop_episodes
            args = (keys, days, shard_days(jnp.asarray(prices, jnp.float32), mesh), params)
        (prices, info, active), compile_s, run_s = _compiled_call(fn, *args)
        ms = 1000.0 * run_s / (count * steps)
        timings[method] = {"compile_s": compile_s, "run_s": run_s, "ms_per_decision": ms}
        crop = lambda x: np.asarray(x)[:count]  # noqa: E731  drop the padding days
        per_method[method] = twin_rows(method, crop(prices), jax.tree.map(crop, info), crop(active), scenarios,
                                       day_ids, ms if method in TWIN_PLANNERS else 0.0)
    return per_method, timings


class OpenLoopTwin:
    """Fixed price vectors on the twin over one set of episodes (day_ids[i], seeds[i]) of ``split``. Host side.

    The day-vmapped ``oracle.open_loop_episodes`` is compiled once; ``rows(name, prices[A])`` runs one vector
    over every day (the rows of ``twin_rows``).
    """

    def __init__(self, cfg: Config, split: str, day_ids: Sequence[int], seeds: Sequence[int], env=None):
        from evjax import oracle

        mesh = day_mesh()
        self.day_ids, self.count, self.steps = list(day_ids), len(day_ids), cfg.env.episode_steps
        self.keys, self.days, self.params, self.scenarios, _ = twin_days(cfg, split, day_ids, seeds, mesh=mesh,
                                                                         env=env)
        self.padded = jax.tree.leaves(self.days)[0].shape[0]
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("days"))
        prices = jax.ShapeDtypeStruct((self.padded, self.steps, cfg.action_dim), jnp.float32, sharding=self.sharding)
        with jax.enable_x64(True):
            self.compiled = jax.jit(oracle.open_loop_episodes).lower(self.keys, self.days, prices,
                                                                     self.params).compile()

    def rows(self, name: str, prices) -> list[dict]:
        prices = np.broadcast_to(np.asarray(prices, np.float32), (self.padded, self.steps, len(prices)))
        with jax.enable_x64(True):
            prices, info, active = self.compiled(self.keys, self.days, jax.device_put(prices, self.sharding),
                                                 self.params)
        crop = lambda x: np.asarray(x)[:self.count]  # noqa: E731  drop the padding days
        return twin_rows(name, crop(prices), jax.tree.map(crop, info), crop(active), self.scenarios,
                         self.day_ids, 0.0)


def spread_day_ids(cfg: Config, split: str, count: int) -> np.ndarray:
    """``count`` day indices spread evenly over ``split`` (all of it when it has fewer)."""
    from evjax.data.scenarios import num_days

    available = num_days(cfg, split)
    return np.unique(np.linspace(0, available - 1, min(count, available)).round().astype(int))


def fixed_price_grid(cfg: Config) -> list[np.ndarray]:
    """Every vector of ``evaluation.tuned_levels`` evenly spaced prices per station, bounds included."""
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    from evjax.planner import grid_indices

    levels = cfg.evaluation.tuned_levels
    return [lower + (upper - lower) * index / (levels - 1) for index in grid_indices(levels, len(lower))]


def score_fixed_prices(cfg: Config, env=None) -> list[tuple[float, float, np.ndarray]]:
    """Every grid vector on ``evaluation.tuned_days`` training days: (violation-step %, welfare, prices), best first.

    Best = fewest steps with any violation, then the highest mean welfare per episode. Training day i runs
    with episode seed i; no test day is seen.
    """
    day_ids = spread_day_ids(cfg, "train", cfg.evaluation.tuned_days)
    twin = OpenLoopTwin(cfg, "train", day_ids, list(range(len(day_ids))), env=env)
    scored = []
    for prices in fixed_price_grid(cfg):
        s = summarise("fixed_tuned", twin.rows("fixed_tuned", prices), cfg)
        scored.append((s["steps_any_violation_pct"], s["welfare_cny"], prices))
    return sorted(scored, key=lambda entry: (entry[0], -entry[1]))


_TUNED: dict = {}


def fixed_prices(cfg: Config, method: str, env=None) -> np.ndarray:
    """The constant prices [A] (float32) a method of ``FIXED_METHODS`` posts: mid-range, upper bounds or tuned."""
    if method == "fixed_tuned":
        return tuned_fixed_prices(cfg, env=env)
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    return np.asarray({"fixed_mid": (lower + upper) / 2, "fixed_upper": upper}[method], np.float32)


def tuned_fixed_prices(cfg: Config, env=None) -> np.ndarray:
    """The ``fixed_tuned`` baseline's prices [A]: the best constant vector of ``score_fixed_prices`` (cached)."""
    key = (cfg.evaluation.tuned_levels, cfg.evaluation.tuned_days,
           *(repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "evaluation"))
    if key not in _TUNED:
        _TUNED[key] = np.asarray(score_fixed_prices(cfg, env=env)[0][2], np.float32)
    return _TUNED[key]


ARRAY_FIELDS = ("price", "evs_present", "line_loading")
INT_FIELDS = ("day", "step", "unserved")
TEXT_FIELDS = ("method", "simulator", "date")
SCALAR_INFO = ("carbon_intensity", "ev_carbon_intensity", "system_carbon_intensity", "ev_co2_kg", "welfare", "cost",
               "cost_line", "cost_carbon", "cs_profit", "dso_profit", "users_surplus", "users_time_cost",
               "min_voltage_pu")
STEP_FIELDS = ("method", "simulator", "day", "date", "step", *ARRAY_FIELDS, "ev_energy_kwh", *SCALAR_INFO, "unserved", "plan_ms")


def step_row(env, info: dict, day: int, step: int, plan_ms: float) -> dict:
    """The quantities the table and plots need from one host step."""
    return {
        "simulator": "host", "day": day, "date": env.scenario.date, "step": step,
        "price": np.asarray(info["posted_price"], float),
        "evs_present": np.asarray(info["evs_present"], float),
        "line_loading": np.asarray(info["line_loading"], float),
        "ev_energy_kwh": float(np.sum(info["station_energy_kwh"])),
        **{key: float(info[key]) for key in SCALAR_INFO},
        "unserved": int(info["unserved"]),
        "plan_ms": plan_ms,
    }


def run_episode(env, policy, split: str, day: int, seed: int) -> list[dict]:
    """One evaluation episode on the host env; a row per step with the quantities the table and plots need."""
    obs, _ = env.reset(seed=seed, options={"split": split, "day": day})
    policy.reset(seed)
    rows = []
    for step in range(env.cfg.env.episode_steps):
        tic = time.perf_counter()
        action = policy.act(env, obs)
        plan_ms = 1000.0 * (time.perf_counter() - tic)
        obs, _, terminated, truncated, info = env.step(action)
        rows.append(step_row(env, info, day, step, plan_ms))
        if terminated or truncated:
            break
    return rows


def run_planner_days(env, policy: "PlannerPolicy", split: str, day_ids, seeds) -> list[dict]:
    """A planner method on all days at once: one host env copy per day, stepped in lockstep.

    Each step plans every day still running in one call of ``planner.plan_batch``,
    with each day's own key stream (the keys ``PlannerPolicy`` would draw for that
    seed), warm start and the policy's kappa, so the plans equal the day-by-day
    ones (``run_episode``). ``plan_ms`` is the batch's wall time over its days.
    """
    agent = policy.agent
    envs = [copy.deepcopy(env) for _ in day_ids]
    obs = np.stack([e.reset(seed=seed, options={"split": split, "day": int(day)})[0]
                    for e, day, seed in zip(envs, day_ids, seeds)])
    keys = [jax.random.key(seed) for seed in seeds]
    warm = np.stack([np.asarray(agent.planner.initial_warm_start())] * len(envs))
    kappa = np.broadcast_to(agent.kappa, (len(envs),) + agent.kappa.shape)
    running = np.ones(len(envs), bool)
    rows: list[list[dict]] = [[] for _ in envs]
    for step in range(env.cfg.env.episode_steps):
        plan_keys = []
        for i in range(len(envs)):
            keys[i], plan_key = jax.random.split(keys[i])
            plan_keys.append(plan_key)
        tic = time.perf_counter()
        actions, next_warm, _ = agent.planner.plan_batch(jnp.stack(plan_keys), policy.model, obs, warm, kappa)
        actions = np.asarray(actions, np.float64)  # blocks until the plans are done
        plan_ms = 1000.0 * (time.perf_counter() - tic) / max(int(running.sum()), 1)
        warm = np.asarray(next_warm)
        for i in np.flatnonzero(running):
            obs[i], _, terminated, truncated, info = envs[i].step(actions[i])
            rows[i].append(step_row(envs[i], info, int(day_ids[i]), step, plan_ms))
            running[i] = not (terminated or truncated)
        if not running.any():
            break
    return [row for day_rows in rows for row in day_rows]


def _interval(per_day: np.ndarray) -> float:
    """Half-width of the 95 % t-interval of the mean of per-day values (NaN for one day)."""
    from scipy import stats

    n = len(per_day)
    return float(stats.t.ppf(0.975, n - 1) * per_day.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


class RatioInterval(NamedTuple):
    """A 95 % Fieller set for mean(N) / mean(D): [low, high] (``bounded``), R <= low or R >= high (``outside``),
    or every R (``everything``)."""

    estimate: float
    low: float
    high: float
    kind: str

    def __str__(self) -> str:
        if self.kind == "bounded":
            return f"{self.estimate:.2f} [{self.low:.2f}, {self.high:.2f}]"
        if self.kind == "outside":
            return f"{self.estimate:.2f} (interval unbounded: R <= {self.low:.2f} or R >= {self.high:.2f})"
        return f"{self.estimate:.2f} (interval unbounded: every ratio)"


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, confidence: float = 0.95) -> RatioInterval:
    """Fieller's interval for the ratio of the means of paired per-day values N_d and D_d.

    R is in the set when the per-day N_d - R D_d have a mean that a t-test does not reject at zero:
    (mean N - R mean D)^2 <= q (s_NN - 2 R s_ND + R^2 s_DD), q = t^2 / n, which is the quadratic
    a R^2 - 2 b R + c <= 0 with a = mean(D)^2 - q s_DD, b = mean(N) mean(D) - q s_ND, c = mean(N)^2 - q s_NN.
    The set is bounded only when the denominator's own mean is resolved from zero (a > 0); a ratio
    "recovered share" of a denominator that is not resolved has no finite interval.
    """
    from scipy import stats

    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    n = len(num)
    if n < 2 or len(den) != n:
        raise ValueError(f"ratio_interval needs two paired series of at least 2 days, got {len(num)} and {len(den)}")
    q = stats.t.ppf(0.5 + confidence / 2, n - 1) ** 2 / n
    cov = np.cov(num, den, ddof=1)
    a = den.mean() ** 2 - q * cov[1, 1]
    b = num.mean() * den.mean() - q * cov[0, 1]
    c = num.mean() ** 2 - q * cov[0, 0]
    estimate = float(num.mean() / den.mean()) if den.mean() else float("nan")
    disc = b * b - a * c
    if a > 0:  # the estimate itself satisfies the inequality, so disc >= 0
        root = math.sqrt(max(disc, 0.0))
        return RatioInterval(estimate, float((b - root) / a), float((b + root) / a), "bounded")
    if disc > 0:
        low, high = sorted(((b + math.sqrt(disc)) / a, (b - math.sqrt(disc)) / a))
        return RatioInterval(estimate, float(low), float(high), "outside")
    return RatioInterval(estimate, -math.inf, math.inf, "everything")


def per_day(rows: list[dict]) -> dict[int, tuple[float, float, float]]:
    """Day -> (welfare summed over the day's steps, constraint cost summed, % of its steps with any violation)."""
    days: dict[int, list[dict]] = {}
    for r in rows:
        days.setdefault(r["day"], []).append(r)
    return {day: (float(sum(r["welfare"] for r in day_rows)), float(sum(r["cost"] for r in day_rows)),
                  100.0 * float(np.mean([r["cost"] > 0 for r in day_rows]))) for day, day_rows in days.items()}


def paired_differences(rows: list[dict], reference_rows: list[dict]) -> dict:
    """Per-day (method - reference) welfare and violation-step share: means and 95 % t-intervals.

    Raises ``ValueError`` if the two were not run on the same days.
    """
    mine, ref = per_day(rows), per_day(reference_rows)
    if set(mine) != set(ref):
        raise ValueError(f"paired differences need the same days; got {sorted(mine)} and {sorted(ref)}")
    days = sorted(mine)
    welfare = np.array([mine[d][0] - ref[d][0] for d in days])
    violations = np.array([mine[d][2] - ref[d][2] for d in days])
    return {"welfare_diff_cny": float(welfare.mean()), "welfare_diff_ci95": _interval(welfare),
            "violation_diff_pct": float(violations.mean()), "violation_diff_ci95": _interval(violations)}


def simulator_agreement(twin_rows: list[dict], host_rows: list[dict]) -> dict:
    """Largest per-day deviation between a method's twin and host rows: welfare (CNY and relative) and cost."""
    twin_days, host_days = per_day(twin_rows), per_day(host_rows)
    welfare = np.array([[twin_days[d][0], host_days[d][0]] for d in sorted(host_days)])
    cost = np.array([[twin_days[d][1], host_days[d][1]] for d in sorted(host_days)])
    gap = np.abs(welfare[:, 0] - welfare[:, 1])
    return {"days": len(host_days), "welfare_cny": float(gap.max()),
            "welfare_rel": float(np.max(gap / np.maximum(np.abs(welfare[:, 1]), 1e-12))),
            "cost": float(np.max(np.abs(cost[:, 0] - cost[:, 1])))}


def summarise(method: str, rows: list[dict], cfg: Config) -> dict:
    """Table row: welfare mean and 95 % t-interval over days, costs, violation shares, carbon and welfare split."""
    days = sorted({r["day"] for r in rows})
    per_day = lambda key: np.array([sum(r[key] for r in rows if r["day"] == d) for d in days])  # noqa: E731
    welfare = per_day("welfare")
    loading = np.array([r["line_loading"] for r in rows])
    total = lambda key: float(np.nansum([r[key] for r in rows]))  # noqa: E731
    energy, co2, welfare_sum = total("ev_energy_kwh"), total("ev_co2_kg"), total("welfare")
    share = lambda key: 100.0 * total(key) / welfare_sum if welfare_sum else float("nan")  # noqa: E731
    return {
        "method": method,
        "simulator": rows[0].get("simulator", "host"),
        "welfare_cny": float(welfare.mean()),
        "welfare_ci95": _interval(welfare),
        "total_cost": float(sum(r["cost"] for r in rows)),
        "steps_line_over_limit_pct": 100.0 * float(np.mean(np.any(loading > cfg.grid.loading_limit, axis=1))),
        "steps_carbon_over_limit_pct": 100.0 * float(np.mean([r["cost_carbon"] > 0 for r in rows])),
        "steps_any_violation_pct": 100.0 * float(np.mean([r["cost"] > 0 for r in rows])),
        "ev_carbon_intensity": 1000.0 * co2 / energy if energy > 0 else float("nan"),
        "ev_co2_t": co2 / 1000.0 / len(days),
        "users_time_cost_cny": total("users_time_cost") / len(days),
        "cs_share_pct": share("cs_profit"),
        "dso_share_pct": share("dso_profit"),
        "users_share_pct": share("users_surplus"),
        "unserved_evs": int(sum(r["unserved"] for r in rows)),
        "plan_ms_per_step": float(np.median([r["plan_ms"] for r in rows])),
        "days": len(days),
    }


def write_tables(out: Path, summaries: list[dict], cfg: Config, note: str) -> None:
    """``metrics.csv`` and ``metrics.md``; each summary holds ``summarise``'s and ``paired_differences``' fields."""
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    measure = {"ev_charging": "EV-charging CI", "system": "system CI"}[cfg.carbon.constraint]
    reference = BY_NAME[cfg.evaluation.reference].label
    with_ci = lambda value, ci, fmt: value.__format__(fmt) + ("" if math.isnan(ci) else f" ± {ci:{fmt}}")  # noqa: E731
    lines = [
        f"{note}",
        "",
        f"Welfare: {cfg.economics.welfare}; carbon limit {cfg.carbon.limit:.0f} kg/MWh on the {measure}. "
        f"Differences are paired per day to the {reference} (method minus reference, 95 % t-interval).",
        "",
        "| method | simulator | welfare per episode (CNY, 95 % CI) | welfare − reference (CNY) | "
        "violation steps − reference (pp) | total constraint cost | steps with a line > "
        f"{100 * cfg.grid.loading_limit:.0f} % | steps with {measure} > limit | steps with any violation | "
        "EV-charging CI (kg/MWh) | EV CO2 per episode (t) | users' time cost per episode (CNY) | "
        "welfare shares CS / DSO / users | unserved EVs | plan ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {BY_NAME[s['method']].label} | {s['simulator']} | {with_ci(s['welfare_cny'], s['welfare_ci95'], '.0f')} | "
            f"{with_ci(s['welfare_diff_cny'], s['welfare_diff_ci95'], '.0f')} | "
            f"{with_ci(s['violation_diff_pct'], s['violation_diff_ci95'], '.1f')} | {s['total_cost']:.3f} | "
            f"{s['steps_line_over_limit_pct']:.1f} % | {s['steps_carbon_over_limit_pct']:.1f} % | "
            f"{s['steps_any_violation_pct']:.1f} % | {s['ev_carbon_intensity']:.1f} | {s['ev_co2_t']:.2f} | "
            f"{s['users_time_cost_cny']:.0f} | {s['cs_share_pct']:.0f} / {s['dso_share_pct']:.0f} / "
            f"{s['users_share_pct']:.0f} % | {s['unserved_evs']} | {s['plan_ms_per_step']:.1f} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


def write_steps(out: Path, per_method: dict[str, list[dict]]) -> None:
    with (out / "steps.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(STEP_FIELDS)
        for run, rows in per_method.items():
            for r in rows:
                writer.writerow([run.split("@")[0]] + [" ".join(f"{v:.6g}" for v in r[k])
                                                       if isinstance(r[k], np.ndarray) else r[k]
                                                       for k in STEP_FIELDS[1:]])


def read_steps(path: Path) -> dict[str, list[dict]]:
    """Per-run step rows from a ``steps.csv`` written by ``write_steps`` (arrays restored).

    A run is keyed by its method, or ``method@simulator`` for a method's rows on a
    second simulator (the first simulator a method's rows appear with is its own,
    as ``write_steps`` writes each method's own run first).
    """
    per_method: dict[str, list[dict]] = {}
    primary: dict[str, str] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                if k in ARRAY_FIELDS:
                    parsed[k] = np.array([float(x) for x in v.split()])
                elif k in INT_FIELDS:
                    parsed[k] = int(v)
                elif k in TEXT_FIELDS:
                    parsed[k] = v
                else:
                    parsed[k] = float(v)
            method = parsed.pop("method")
            simulator = parsed.setdefault("simulator", "host")
            per_method.setdefault(run_name(method, simulator, primary.setdefault(method, simulator)), []).append(parsed)
    return per_method


def _run_config(run_dir: Path) -> Config:
    """The config a trained run saved with its checkpoints (the latest's, else the best's; both hold the same)."""
    return checkpoint.restore_meta(run_dir, "latest" if checkpoint.exists(run_dir, "latest") else "best")[1]


def _load_trained(run_dir: Path, which: str = "best"):
    """Config, run parts and restored state of the best (else latest) checkpoint, from the checkpoint alone."""
    from evjax.train import Trainer

    kind = "best" if which == "best" and checkpoint.exists(run_dir, "best") else "latest"
    meta, cfg = checkpoint.restore_meta(run_dir, kind)
    why = ("no planned epoch was validated" if cfg.training.best_selection == "validation"
           else "no planned episode met training.best_cost_threshold")
    note = f"No 'best' checkpoint ({why}); evaluating the latest checkpoint instead." if kind != which else ""
    trainer = Trainer(cfg, run_dir, metrics=False)
    trainer.state = checkpoint.restore(run_dir, kind, trainer.state)
    trainer.parts.agent.restore(trainer.state["agent"])
    return cfg, trainer, kind, int(meta["epoch"]), note


def run_methods(cfg: Config, host_policies: dict, env, day_ids, progress: bool = True) -> tuple[dict, dict]:
    """Every method of ``evaluation.methods`` on the same days and seeds, each on its simulator (``method_simulator``).

    ``host_policies`` holds a host policy for every method run on the host
    (``make_policies``). When a method runs on the twin and fixed_mid is
    evaluated, fixed_mid also runs on the other simulator (run
    ``fixed_mid@host`` or ``fixed_mid@twin``) to show that the two agree.
    Returns (rows per run, in table order; twin timings per method).
    """
    from tqdm import tqdm

    ev = cfg.evaluation
    seeds = [ev.seed + i for i in range(len(day_ids))]
    on_twin = [m for m in ev.methods if method_simulator(m, ev) == "twin"]
    runs = [(m, method_simulator(m, ev)) for m in ev.methods]
    if on_twin and "fixed_mid" in ev.methods:
        own = method_simulator("fixed_mid", ev)
        runs.insert([m for m, _ in runs].index("fixed_mid") + 1, ("fixed_mid", "host" if own == "twin" else "twin"))
    twin_methods = [m for m, sim in runs if sim == "twin"]
    twin_runs, timings = (run_on_twin(cfg, twin_methods, day_ids, seeds, env=env) if twin_methods else ({}, {}))
    host_runs = [(m, sim) for m, sim in runs if sim == "host"]
    bar = tqdm(total=len(host_runs) * len(day_ids), desc="evaluate (host)", unit="episode", disable=not progress,
               file=sys.stderr)
    per_run: dict[str, list[dict]] = {}
    for method, simulator in runs:
        name = run_name(method, simulator, method_simulator(method, ev))
        if simulator == "twin":
            per_run[name] = twin_runs[method]
            continue
        policy = host_policies.get(method) or make_policies(cfg, None, None, 0.0, [method])[method]  # the check run
        bar.set_postfix(method=method)
        if isinstance(policy, PlannerPolicy) and ev.batch_days:
            rows = [{"method": method, **r} for r in run_planner_days(env, policy, ev.split, day_ids, seeds)]
            bar.update(len(day_ids))
        else:
            rows = []
            for day, seed in zip(day_ids, seeds):
                rows += [{"method": method, **r} for r in run_episode(env, policy, ev.split, int(day), seed)]
                bar.update()
        per_run[name] = rows
    bar.close()
    return per_run, timings


def summaries_of(per_run: dict[str, list[dict]], cfg: Config) -> list[dict]:
    """``summarise`` of every run with its ``paired_differences`` to ``evaluation.reference``."""
    if cfg.evaluation.reference not in per_run:
        raise ConfigError(f"config key 'evaluation.reference': method {cfg.evaluation.reference!r} was not "
                          f"evaluated (runs: {list(per_run)})")
    reference = per_run[cfg.evaluation.reference]
    return [{**summarise(name.split("@")[0], rows, cfg), **paired_differences(rows, reference)}
            for name, rows in per_run.items()]


def agreement_note(per_run: dict[str, list[dict]]) -> str:
    """The line of ``metrics.md`` comparing a method run on both simulators ("" when none was)."""
    for name in per_run:
        if "@" in name:
            method, other = name.split("@")
            rows = {other: per_run[name], ("host" if other == "twin" else "twin"): per_run[method]}
            gap = simulator_agreement(rows["twin"], rows["host"])
            return (f"Twin vs host, {BY_NAME[method].label} on the same {gap['days']} day(s): largest per-day "
                    f"welfare deviation {gap['welfare_cny']:.2g} CNY ({gap['welfare_rel']:.1e} relative), "
                    f"largest per-day constraint-cost deviation {gap['cost']:.2g}.")
    return ""


def evaluate(run_dir: Path, evaluation: EvaluationConfig | None = None, split: str | None = None,
             days: int | None = None, plots: bool = True, progress: bool = True,
             which: str = "best") -> list[dict]:
    """Run every method on the same days and seeds; write tables and plots under ``run_dir/eval``.

    ``evaluation`` replaces the checkpoint's evaluation section; the rest of the
    config always comes from the checkpoint. ``days`` 0 means every day of the split.
    """
    run_dir = Path(run_dir)
    cfg, trainer, kind, epoch, note = _load_trained(run_dir, which)
    evaluation = evaluation if evaluation is not None else cfg.evaluation
    changes = {k: v for k, v in (("split", split), ("days", days)) if v is not None}
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(evaluation, **changes))
    day_ids = evaluation_day_ids(cfg)
    parts = trainer.parts
    model = parts.dynamics.select_elites(trainer.state["model"])
    trained_kappa = parts.agent.kappa
    host_methods = [m for m in cfg.evaluation.methods if method_simulator(m, cfg.evaluation) == "host"]
    policies = make_policies(cfg, parts, model, trained_kappa, host_methods)
    per_run, timings = run_methods(cfg, policies, parts.env, day_ids, progress)
    out = run_dir / ("eval" if which == "best" else f"eval_{which}")
    out.mkdir(parents=True, exist_ok=True)
    summaries = summaries_of(per_run, cfg)
    header = (f"Checkpoint '{kind}' (epoch {epoch}, kappa {np.array2string(trained_kappa, precision=3)}); {len(day_ids)} {cfg.evaluation.split} "
              f"day(s), seeds {cfg.evaluation.seed}..{cfg.evaluation.seed + len(day_ids) - 1}. {note}").strip()
    if cfg.evaluation.cost_limit is not None:
        header += (f"\n\nThe planner methods plan with cost limit {cfg.evaluation.cost_limit:g} (evaluation.cost_limit; "
                   f"the run trained with planner.cost_limit {cfg.planner.cost_limit:g}).")
    shown = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731  (as in the YAML)
    for name in (n for n in EvaluationConfig.DEPLOYED if n != "cost_limit"):  # the cost limit has its sentence above
        deployed, trained = getattr(cfg.evaluation, name), getattr(cfg.planner, name)
        if deployed is not None:
            header += (f" The learned planners deploy with evaluation.{name} {shown(deployed)} "
                       f"(trained with planner.{name} {shown(trained)}).")
    timing = "; ".join(f"{m} compile {t['compile_s']:.1f} s, run {t['run_s']:.1f} s" for m, t in timings.items())
    if timing:
        header += (f"\n\nTwin runs on {len(jax.devices())} {jax.default_backend()} device(s): {timing}; "
                   "the oracle's plan ms/step is its run time / (days x steps).")
    agreement = agreement_note(per_run)
    write_tables(out, summaries, cfg, header + (f"\n\n{agreement}" if agreement else ""))
    write_steps(out, per_run)
    if plots:
        from evjax import plots as plotting

        plotting.evaluation_plots(out, {k: v for k, v in per_run.items() if "@" not in k}, cfg)
        plotting.welfare_vs_violations(out / "welfare_vs_violations.png", summaries, cfg)
        plotting.training_curves(run_dir / "metrics.csv", out / "training_curves.png", cfg)
        plotting.cost_calibration(run_dir / "calibration.csv", out / "cost_calibration.png")
    return summaries


def parse_days(text: str) -> int:
    """``--days``: a positive number of days, or ``all`` (0: every day of the split)."""
    if text.strip().lower() == "all":
        return 0
    try:
        days = int(text)
    except ValueError:
        days = -1
    if days <= 0:
        raise UserError(f"--days must be a positive number of days or 'all', got {text!r}")
    return days


@entry_point("evjax.evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("evjax.evaluate", "Evaluate a trained run against the SPEC 12 baselines.")
    parser.add_argument("--run-dir", metavar="DIR", required=True, help="run directory written by evjax.train")
    parser.add_argument("--split", choices=("train", "test"), help="days to evaluate on (default: evaluation.split)")
    parser.add_argument("--days", metavar="N|all", help="number of days, or all of the split (default: evaluation.days)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="which checkpoint to evaluate (default best; results of latest go to eval_latest/)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from an existing steps.csv")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    user_cfg = load(args.config, args.overrides)  # a bad value fails here, before the run directory is read
    others = [o.split("=")[0] for o in args.overrides if not o.strip().startswith("evaluation.")]
    if others:
        raise ConfigError(f"config key '{others[0]}': evaluate only takes evaluation.* settings; "
                          "the rest comes from the checkpoint")
    days = parse_days(args.days) if args.days is not None else None
    run_dir = Path(args.run_dir)
    if not checkpoint.exists(run_dir, "latest") and not checkpoint.exists(run_dir, "best"):
        raise UserError(f"{run_dir / 'checkpoints'}: no checkpoint found; train first")
    evaluation = None  # the checkpoint's own evaluation section
    if args.config is not None:
        evaluation = user_cfg.evaluation
    elif args.overrides:  # layered on the run's saved settings (evaluation.cost_limit of a preset, say)
        evaluation = load(None, args.overrides, base=_run_config(run_dir)).evaluation
    out = run_dir / ("eval" if args.checkpoint == "best" else "eval_latest")
    if args.plots_only:
        if not (out / "steps.csv").is_file():
            raise UserError(f"{out / 'steps.csv'}: not found; run the evaluation first")
        from evjax import plots as plotting

        cfg = _run_config(run_dir)
        runs = read_steps(out / "steps.csv")
        plotting.evaluation_plots(out, {k: v for k, v in runs.items() if "@" not in k}, cfg)
        plotting.welfare_vs_violations(out / "welfare_vs_violations.png", summaries_of(runs, cfg), cfg)
        plotting.training_curves(run_dir / "metrics.csv", out / "training_curves.png", cfg)
        plotting.cost_calibration(run_dir / "calibration.csv", out / "cost_calibration.png")
        print(f"plots redrawn in {out}")
        return 0
    evaluate(run_dir, evaluation, args.split, days, plots=not args.no_plots, progress=not args.no_progress,
             which=args.checkpoint)
    print((out / "metrics.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
