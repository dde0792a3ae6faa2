"""Run the host environment and the JAX twin side by side on the same days and prices; report the worst deviations.

Host side, not jittable. The host episodes run one after another; the twin
runs all of them at once (vmap over days of a ``lax.scan`` over steps). Used
by ``tests/test_twin.py`` and ``benchmarks/twin_agreement.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from evjax.config import Config
from evjax.data.scenarios import Scenario, arrival_rates, load_figures, make_scenario, split_days
from evjax.env import EVPricingEnv
from evjax.twin import env as twin_env

WELFARE_TERMS = ("cs_profit", "dso_profit", "users_surplus", "users_time_cost", "welfare")


@dataclasses.dataclass(frozen=True)
class Episodes:
    """Paired episodes: days, price sequences [D, T, K], and the host's and the twin's per-step records."""

    scenarios: list
    prices: np.ndarray
    host: dict  # name -> [D, T, ...] (NaN-padded after an early end)
    twin: dict  # name -> [D, T, ...]
    host_steps: np.ndarray  # [D] steps the host episode ran


def draw_days(cfg: Config, pairs: int, seed: int, high_demand: int) -> list[Scenario]:
    """``pairs`` (split, day, seed) draws: ``high_demand`` of them from the days with most expected arrivals, the rest at random."""
    rng = np.random.default_rng(seed)
    figures = load_figures(cfg.demand.figures_dir)
    expected = arrival_rates(cfg, figures).sum(axis=1)  # [all days]
    scenarios = []
    for i in range(pairs):
        split = ("train", "test")[int(rng.integers(2))]
        days = split_days(len(figures.dates), cfg.demand.test_every, split)
        if i < high_demand:
            busiest = np.argsort(expected[days])[::-1][:max(high_demand, 8)]
            day = int(busiest[rng.integers(len(busiest))])
        else:
            day = int(rng.integers(len(days)))
        scenarios.append(make_scenario(cfg, split, day, seed=int(rng.integers(2**31 - 1))))
    return scenarios


def draw_prices(cfg: Config, num_days: int, seed: int) -> np.ndarray:
    """Uniform random prices [D, T, K] in the bounds, with a few out-of-bound values to exercise the clipping."""
    rng = np.random.default_rng(seed)
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    shape = (num_days, cfg.env.episode_steps, len(lower))
    prices = lower + (upper - lower) * rng.uniform(size=shape)
    outside = rng.uniform(size=shape) < 0.03
    return np.where(outside, prices + rng.choice([-0.2, 0.2], size=shape), prices)


HOST_KEYS = ("line_loading", "min_voltage_pu", "queue_length", "evs_present", "evs_charging", "arrivals", "unserved",
             "cost", "cost_line", "cost_carbon", "ev_co2_kg", "carbon_intensity", "station_energy_kwh",
             "power_flow_converged", "clipped_actions", *WELFARE_TERMS)


def run_host(env: EVPricingEnv, scenarios: list, prices: np.ndarray, max_evs: int) -> tuple[dict, np.ndarray]:
    """Host episodes: info records [D, T, ...], bus voltages, each EV's station and status (twin row order), rewards."""
    num_days, num_steps = prices.shape[:2]
    records: dict = {}
    steps = np.zeros(num_days, dtype=np.int64)

    def put(name, d, t, value):
        value = np.asarray(value, dtype=float)
        if name not in records:
            records[name] = np.full((num_days, num_steps) + value.shape, np.nan)
        records[name][d, t] = value

    for d, scenario in enumerate(scenarios):
        env.reset(seed=0, options={"scenario": scenario})
        order = np.argsort(scenario.arrival_step, kind="stable")  # the twin's row order
        for t in range(num_steps):
            obs, reward, terminated, _, info = env.step(prices[d, t])
            for name in HOST_KEYS:
                put(name, d, t, info[name])
            put("vm_pu", d, t, env.state.grid_result.vm_pu if info["power_flow_converged"] else
                np.full(env.grid.num_buses, np.nan))
            put("reward", d, t, reward)
            put("observation", d, t, obs)
            for name in ("station", "status"):
                padded = np.full(max_evs, -1.0 if name == "station" else 0.0)
                padded[:scenario.num_evs] = getattr(env.state, name)[order]
                put(name, d, t, padded)
            steps[d] = t + 1
            if terminated:
                break
    return records, steps


def run_twin(params: twin_env.EnvParams, days: twin_env.ScenarioArrays, prices: np.ndarray, seed: int = 0) -> dict:
    """Twin episodes of all days at once; records [D, T, ...] as numpy float64."""
    def episode(key, scenario, actions):
        reset_key, roll_key = jax.random.split(key)
        state, _ = twin_env.reset(reset_key, scenario, params)

        def one(state, inputs):
            step_key, action = inputs
            state, obs, reward, cost, info = twin_env.step(step_key, state, action, params)
            record = {name: info[name] for name in HOST_KEYS}
            record.update(vm_pu=info["vm_pu"], reward=reward, observation=obs, station=state.station,
                          status=state.status, cost=cost)
            return state, record

        keys = jax.random.split(roll_key, actions.shape[0])
        return jax.lax.scan(one, state, (keys, actions))[1]

    keys = jax.random.split(jax.random.key(seed), prices.shape[0])
    records = twin_env.jit(jax.vmap(episode))(keys, days, prices)
    return {name: np.asarray(value, dtype=float) for name, value in records.items()}


def paired_episodes(cfg: Config, scenarios: list, prices: np.ndarray, power_flow: str = "sweep",
                    seed: int = 0) -> Episodes:
    """Run both implementations on the given days and price sequences [D, T, K]."""
    env = EVPricingEnv(cfg)
    params = twin_env.make_params(cfg, power_flow=power_flow, feeder=env.grid, travel=env.travel)
    days = twin_env.stack_scenarios(scenarios, cfg, travel=env.travel)
    host, steps = run_host(env, scenarios, prices, int(days.valid.shape[1]))
    twin = run_twin(params, days, prices, seed)
    return Episodes(scenarios, prices, host, twin, steps)


def run_episodes(cfg: Config, pairs: int, seed: int = 0, high_demand: int | None = None,
                 power_flow: str = "sweep") -> Episodes:
    """Draw ``pairs`` days (a quarter of them high-demand by default) and random prices; run both implementations."""
    high_demand = pairs // 4 if high_demand is None else high_demand
    scenarios = draw_days(cfg, pairs, seed, high_demand)
    prices = draw_prices(cfg, pairs, seed + 1)
    return paired_episodes(cfg, scenarios, prices, power_flow, seed)


TOLERANCES = {  # the bounds: worst twin-host deviation allowed per quantity
    "line_loading_abs": 1e-4, "vm_pu_abs": 1e-6, "cost_abs": 1e-5, "ev_co2_rel": 1e-6,
    **{f"{name}_rel": 1e-6 for name in WELFARE_TERMS},
    **{f"{name}_mismatches": 0 for name in ("station", "status", "queue_length", "evs_present", "evs_charging",
                                            "arrivals", "unserved", "power_flow_converged", "clipped_actions")},
}


def failures(result: dict) -> list[str]:
    """The quantities whose worst deviation exceeds ``TOLERANCES`` (NaN counts as a failure)."""
    return [f"{name}: {result[name]} > {bound}" for name, bound in TOLERANCES.items() if not result[name] <= bound]


def _relative(a, b):
    """|a - b| / max(|b|, 1): relative above 1 (CNY, kg), absolute below (values near zero)."""
    return np.abs(a - b) / np.maximum(np.abs(b), 1.0)


def deviations(episodes: Episodes) -> dict:
    """Worst deviation per quantity over every step both implementations ran (NaN-aware: NaN on both sides is equal)."""
    host, twin = episodes.host, episodes.twin
    ran = np.arange(twin["cost"].shape[1])[None, :] < episodes.host_steps[:, None]  # [D, T]

    def worst(name, measure):
        a, b = twin[name][ran], host[name][ran]
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.where(both_nan, 0.0, measure(a, b))
        return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))

    absolute = lambda a, b: np.abs(a - b)  # noqa: E731
    result = {
        "line_loading_abs": worst("line_loading", absolute),
        "vm_pu_abs": worst("vm_pu", absolute),
        "cost_abs": worst("cost", absolute),
        "ev_co2_rel": worst("ev_co2_kg", _relative),
        "carbon_intensity_abs": worst("carbon_intensity", absolute),
        "reward_abs": worst("reward", absolute),
        "observation_abs": worst("observation", absolute),
    }
    result.update({f"{name}_rel": worst(name, _relative) for name in WELFARE_TERMS})
    for name in ("station", "status", "queue_length", "evs_present", "evs_charging", "arrivals", "unserved",
                 "power_flow_converged", "clipped_actions"):
        result[f"{name}_mismatches"] = int(np.sum(np.where(ran[..., None] if twin[name].ndim > 2 else ran,
                                                           twin[name] != host[name], False)))
    result["steps_compared"] = int(ran.sum())
    result["evs_compared"] = int(sum(s.num_evs for s in episodes.scenarios))
    result["max_evs_per_day"] = int(max(s.num_evs for s in episodes.scenarios))
    result["host_nonconverged_steps"] = int(np.sum(host["power_flow_converged"][ran] == 0))
    result["host_queued_ev_steps"] = int(np.nansum(host["queue_length"][ran]))
    result["host_unserved_evs"] = int(np.nansum(host["unserved"][ran]))
    result["host_clipped_prices"] = int(np.nansum(host["clipped_actions"][ran]))
    return result
