"""Calibration tables of the environment: line loading, EVs, carbon intensity, welfare and cost per step.

Runs whole episodes at fixed prices and prints markdown tables:
  1. one fixed day and seed at mid-range prices, step by step;
  2. the per-step mean over ``--days`` evenly spaced training days at mid-range prices;
  3. a summary per price policy over the same days: median peak loading per
     monitored line, share of steps with a line above the limit, mean
     EV-charging carbon intensity, share of steps above the carbon limit, mean
     episode line and carbon cost, EV CO2 and welfare. "fav3" (CS1 and CS2 at
     their upper bounds, CS3 at its lower bound) steers EVs to the grid-fed CS3
     bus, "avoid3" the opposite: how far prices alone move carbon and load.
     ``--greedy`` adds a one-step lookahead on the true simulator.
Used to choose ``demand.mean_arrivals_per_step``, ``stations.chargers`` and
``carbon.limit``; ``--set section.key=value`` tries other values.

    python benchmarks/calibrate_env.py [--days 24] [--day 295] [--greedy] [--seed 0] [--set stations.chargers=[20,20,20]]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from evjax.config import Config, load
from evjax.data.scenarios import num_days
from evjax.env import EVPricingEnv


def policies(cfg: Config) -> dict[str, np.ndarray]:
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    return {
        "mid": (lower + upper) / 2.0,
        "upper": upper,
        "fav3": np.array([upper[0], upper[1], lower[2]]),
        "avoid3": np.array([lower[0], lower[1], upper[2]]),
    }


def run_episode(env: EVPricingEnv, prices: np.ndarray, day: int, seed: int, split: str = "train") -> list[dict]:
    """Infos of one episode at constant prices."""
    env.reset(seed=seed, options={"split": split, "day": day})
    infos, terminated = [], False
    while not terminated:
        _, _, terminated, _, info = env.step(prices)
        infos.append(info)
    return infos


def count(x) -> str:
    """An EV count: whole numbers as integers, means with one decimal."""
    return str(int(x)) if float(x).is_integer() else f"{float(x):.1f}"


def run_greedy_episode(env: EVPricingEnv, cfg: Config, day: int, seed: int, split: str = "train") -> list[dict]:
    """Infos of one episode where each step tries a 3 x 3 x 3 price grid and keeps the least cost, then the most welfare."""
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    candidates = [np.array(p) for p in itertools.product(*[np.linspace(lo, hi, 3) for lo, hi in zip(lower, upper)])]
    env.reset(seed=seed, options={"split": split, "day": day})
    infos, terminated = [], False
    while not terminated:
        saved = env.snapshot()
        scores = []
        for prices in candidates:
            env.restore(saved)
            info = env.step(prices)[4]
            scores.append((round(info["cost"], 6), -info["welfare"]))
        env.restore(saved)
        _, _, terminated, _, info = env.step(candidates[min(range(len(candidates)), key=scores.__getitem__)])
        infos.append(info)
    return infos


def step_rows(cfg: Config, infos: list[dict]) -> list[list]:
    rows = []
    for info in infos:
        t = info["step"]
        hour = cfg.env.start_hour + t * cfg.env.dt_hours
        rows.append([
            f"{int(hour) % 24:02d}:{int(round((hour % 1) * 60)):02d}", f"{info['load_multiplier']:.2f}", count(info["new_evs"]),
            *[f"{x:.0%}" for x in info["line_loading"]], *[count(x) for x in info["evs_present"]],
            f"{info['system_carbon_intensity']:.0f}", f"{info['ev_carbon_intensity']:.0f}", f"{info['welfare']:.0f}",
            f"{info['cost_line']:.3f}", f"{info['cost_carbon']:.3f}",
        ])
    return rows


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


STEP_HEADER = ["time", "mult", "new EVs", "line 27 (CS1)", "line 9 (CS2)", "line 17 (CS3)", "EVs CS1", "EVs CS2",
               "EVs CS3", "system CI", "EV CI", "SW", "line cost", "carbon cost"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=24, help="evenly spaced training days to average over")
    parser.add_argument("--day", type=int, default=295, help="training day of the step-by-step table (295: the median-demand day)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], help="override section.key=value")
    parser.add_argument("--greedy", action="store_true", help="add the one-step lookahead policy (slow: ~30x an episode)")
    args = parser.parse_args()
    cfg = load(args.config, args.set)
    env = EVPricingEnv(cfg)
    price = policies(cfg)

    print(f"mean_arrivals_per_step={cfg.demand.mean_arrivals_per_step}, chargers={list(cfg.stations.chargers)}, "
          f"carbon.limit={cfg.carbon.limit}\n")
    infos = run_episode(env, price["mid"], args.day, args.seed)
    print(f"### Train day {args.day} ({env.scenario.date}), seed {args.seed}, mid-range prices {np.round(price['mid'], 3).tolist()}\n")
    print(markdown(STEP_HEADER, step_rows(cfg, infos)) + "\n")

    days = np.linspace(0, num_days(cfg, "train") - 1, args.days).round().astype(int)
    summary = []
    runs = {name: (lambda day, seed, prices=prices: run_episode(env, prices, day, seed)) for name, prices in price.items()}
    if args.greedy:
        runs["greedy"] = lambda day, seed: run_greedy_episode(env, cfg, day, seed)
    for name, run in runs.items():
        episodes = [run(int(day), args.seed + i) for i, day in enumerate(days)]
        loading = np.array([[info["line_loading"] for info in ep] for ep in episodes])  # [D, T, K]
        if name == "mid":
            mean_rows = []
            for t in range(cfg.env.episode_steps):
                mean = {key: np.mean([ep[t][key] for ep in episodes], axis=0)
                        for key in ("line_loading", "evs_present", "system_carbon_intensity", "ev_carbon_intensity",
                                    "welfare", "cost_line", "cost_carbon")}
                mean.update(step=t, load_multiplier=episodes[0][t]["load_multiplier"],
                            new_evs=np.mean([ep[t]["new_evs"] for ep in episodes]))
                mean_rows.append(mean)
            rows = step_rows(cfg, mean_rows)
            print(f"### Mean over {len(days)} training days, mid-range prices\n")
            print(markdown(STEP_HEADER, rows) + "\n")
        peak = np.median(loading.max(axis=1), axis=0)
        over = np.mean((loading > cfg.grid.loading_limit).any(axis=2))
        charged = [info for ep in episodes for info in ep if info["station_energy_kwh"].sum() > 0]
        ev_ci = np.array([info["ev_carbon_intensity"] for info in charged])
        carbon_over = np.mean([info["cost_carbon"] > 0 for ep in episodes for info in ep])
        any_over = np.mean([info["cost"] > 0 for ep in episodes for info in ep])
        per_episode = {key: np.mean([sum(info[key] for info in ep) for ep in episodes])
                       for key in ("cost_line", "cost_carbon", "ev_co2_kg", "welfare")}
        label = str(np.round(price[name], 2).tolist()) if name in price else "per step"
        summary.append([name, label, *[f"{x:.0%}" for x in peak], f"{over:.0%}", f"{ev_ci.mean():.0f}",
                        f"{carbon_over:.0%}", f"{any_over:.0%}", f"{per_episode['cost_line']:.3f}",
                        f"{per_episode['cost_carbon']:.3f}", f"{per_episode['ev_co2_kg'] / 1000:.2f}",
                        f"{per_episode['welfare']:.0f}"])
    print(f"### Policies over {len(days)} training days (per episode), carbon limit {cfg.carbon.limit:.0f} "
          f"on {cfg.carbon.constraint}\n")
    print(markdown(["policy", "prices", "median peak line 27", "line 9", "line 17", "steps line > limit", "mean EV CI",
                    "steps CI > limit", "steps any violation", "line cost", "carbon cost", "EV CO2 (t)", "SW"],
                   summary))


if __name__ == "__main__":
    main()
