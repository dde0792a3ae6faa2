"""What "safe while learning" can reach: constant prices on the training episodes of ``safety_while_learning.py``.

    python benchmarks/safety_floor.py [--csv docs/results/safety_while_learning.csv] [--seeds 0 1 2] [--json]

Each training seed's episodes are a fixed sequence of (day, seed) pairs (``train.episode_seed``), the same for
every planner variant, and the first ``training.random_episodes`` post uniform random prices in every variant.
This replays those episodes on the host environment with constant prices from the first planned episode on
(fixed upper-bound, mid-range and the tuned constant of ``evaluation.fixed_tuned``, which needs no model but was
chosen on 40 training days with the simulator), adds the random episodes' cost from the CSV, and prints the
cumulative true constraint cost over the training run as a multiple of unconstrained CEM's (means over the seeds,
as in the README), and the welfare over the last 10 episodes as a multiple of CEM's. A learner that is no safer than the tuned constant
from its first planned episode on sets the floor of the 0.6 x CEM target of the decision-quality issue.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from evjax import cli
from evjax.config import Config, load
from evjax.env import EVPricingEnv
from evjax.errors import UserError
from evjax.evaluate import fixed_prices
from evjax.train import constant_price_episode

METHODS = ("fixed_upper", "fixed_mid", "fixed_tuned")


def read_runs(path: Path) -> dict:
    """(variant, seed) -> per-epoch arrays of cost and welfare, from ``safety_while_learning.csv``."""
    if not path.is_file():
        raise UserError(f"'{path}': no such file; run benchmarks/safety_while_learning.py first")
    runs = defaultdict(lambda: {"cost": [], "welfare": []})
    with path.open() as f:
        for row in csv.DictReader(f):
            run = runs[(row["variant"], int(row["seed"]))]
            run["cost"].append(float(row["cost"]))
            run["welfare"].append(float(row["welfare_cny"]))
    return {key: {name: np.asarray(values) for name, values in run.items()} for key, run in runs.items()}


def constant_episodes(cfg: Config, env: EVPricingEnv, prices: np.ndarray, epochs: range) -> tuple[np.ndarray, np.ndarray]:
    """True episode cost and welfare (CNY) [len(epochs)] of constant ``prices`` on the training episodes ``epochs``."""
    episodes = [constant_price_episode(env, cfg, epoch, prices) for epoch in epochs]
    return np.asarray([e[1] for e in episodes]), np.asarray([e[2] for e in episodes])


@cli.entry_point("benchmarks/safety_floor.py")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=Path("docs/results/safety_while_learning.csv"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    args = parser.parse_args(argv)
    runs = read_runs(args.csv)
    start = time.perf_counter()
    base = Config()
    warmup = base.training.random_episodes
    table = defaultdict(dict)  # policy -> seed -> (cumulative cost, last-10 welfare)
    for seed in args.seeds:
        if ("cem", seed) not in runs:
            raise UserError(f"'{args.csv}': no cem run of training seed {seed}")
        cem = runs[("cem", seed)]
        epochs = len(cem["cost"])
        cfg = load(None, [f"training.seed={seed}"])
        env = EVPricingEnv(cfg)
        for variant in ("cem", "ccem", "cap_fixed", "cap_adaptive"):
            if (variant, seed) in runs:
                run = runs[(variant, seed)]
                table[variant][seed] = (run["cost"].sum(), run["welfare"][-10:].mean())
        random_cost = runs[("cap_adaptive", seed)]["cost"][:warmup] if ("cap_adaptive", seed) in runs else cem["cost"][:warmup]
        for method in METHODS:
            cost, welfare = constant_episodes(cfg, env, fixed_prices(cfg, method, env=env), range(warmup, epochs))
            table[f"random, then {method}"][seed] = (random_cost.sum() + cost.sum(), welfare[-10:].mean())
    print(f"Cumulative true cost over the training episodes of seeds {args.seeds} ({warmup} random-price episodes "
          f"first, from the CSV), x CEM of the same seed; welfare over the last 10 episodes x CEM's "
          f"({time.perf_counter() - start:.0f} s):\n")
    print("| policy | cumulative cost: mean (per seed) | x CEM | last-10 welfare x CEM |")
    print("|---|---|---|---|")
    summary = {}
    for policy, per_seed in table.items():
        costs = [per_seed[s][0] for s in args.seeds]
        ratio = float(np.mean(costs) / np.mean([table["cem"][s][0] for s in args.seeds]))  # as the README's x CEM
        welfare = float(np.mean([per_seed[s][1] for s in args.seeds]) / np.mean([table["cem"][s][1] for s in args.seeds]))
        summary[policy] = {"cumulative_cost": costs, "x_cem": ratio, "welfare_x_cem": welfare}
        print(f"| {policy} | {np.mean(costs):.2f} ({', '.join(f'{c:.2f}' for c in costs)}) | {ratio:.2f} | "
              f"{welfare:.3f} |")
    if args.json:
        print(json.dumps({"seeds": args.seeds, "random_episodes": warmup, "policies": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
