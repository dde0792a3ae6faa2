"""Can the ensemble learn from random-price data which prices give the most welfare? And how much data does it need?

Prices are transfers, so they change welfare only through what drivers do: where they charge, how far they drive
and how long they queue. Among the 125 constant price vectors of the tuned-constant search that effect spans
hundreds of CNY per episode, almost all of it the drivers' time. This script builds N episodes of uniform random
prices (a new price each step, as the first training episodes post) on training days of the JAX twin, fits the
default ensemble on them (``--rounds`` warm-started fits on the growing data, as ``evjax.train`` refits), and
scores every constant vector with the members' noise-free means from the reset state over a whole episode: the
predicted welfare (sum of the reward output) and the predicted cost (the environment's formula on the predicted
observations, ``planner.make_cost_fn`` without back-off). It compares them with the twin's truth on
``evaluation.tuned_days`` training days:

* how many days it takes to tell the tuned constant's welfare from that of the ``--neighbours`` next least-violating
  vectors by trial: their per-day paired difference, its standard deviation, and the days a 95 % interval needs to
  be half as wide as the difference;
* the truth's own repeatability: the rank correlation of the true welfare (and cost) on those days with that on as
  many other training days drawn at random (other episode seeds), the most a model of the average day can reach;
* Spearman rank correlation of predicted and true welfare, over all vectors and among the ``--feasible`` vectors
  with the fewest true violating steps (where a constrained planner chooses by welfare);
* the same for the cost;
* the constant a planner would pick from the model (lowest predicted cost rounded to 1e-4, then highest predicted
  welfare, as ``benchmarks/model_constant.py`` ranks), with its true violation share and welfare, next to the
  tuned constant's (the twin's own pick).

    python benchmarks/welfare_identifiability.py [--episodes 5 50 200 1000] [--seeds 3] [--rounds 10] [--config FILE]
        [--set KEY=VALUE] [--json]
    python benchmarks/welfare_identifiability.py --run-dir RUN [RUN ...] [--checkpoint latest]

``--plot PNG`` draws the rank correlations against the episodes fitted on (``--from-jsonl FILE`` replots an earlier
``--json`` output, the rows of several calls, each with its ``--label``, as one line per label:
``docs/results/welfare_identifiability.png``). ``--run-dir`` scores trained runs' own models instead (the
checkpoint's elites, from the reset observation in its replay buffer; the run's config), on the data the agent
collected.

About 7 minutes with the defaults on 2 CPU cores (README Results, "Why the agents earn no more than the tuned
constant").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from evjax import evaluate as ev
from evjax import replay
from evjax.cli import entry_point
from evjax.config import Config, load
from evjax.data.scenarios import num_days
from evjax.dynamics import make_dynamics
from evjax.errors import UserError
from evjax.planner import make_cost_fn
import model_constant
from price_effect import Twin


def true_scores(cfg: Config, vectors: np.ndarray, day_ids=None,
                seeds=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The twin's steps with any violation (%), welfare (CNY per episode), true cost per episode and welfare per day
    [N, D] of each vector [N], by default on the ``evaluation.tuned_days`` training days of the tuned-constant
    search (episode seed = day order)."""
    if day_ids is None:
        day_ids = ev.spread_day_ids(cfg, "train", cfg.evaluation.tuned_days)
        seeds = list(range(len(day_ids)))
    sim = ev.OpenLoopTwin(cfg, "train", day_ids, seeds)
    violation, welfare, cost, per_day = [], [], [], []
    for prices in vectors:
        rows = sim.rows("constant", prices)
        s = ev.summarise("constant", rows, cfg)
        violation.append(s["steps_any_violation_pct"])
        welfare.append(s["welfare_cny"])
        cost.append(s["total_cost"] / s["days"])
        days = ev.per_day(rows)  # day -> (welfare, cost, violation %)
        per_day.append([days[d][0] for d in sorted(days)])
    return np.array(violation), np.array(welfare), np.array(cost), np.array(per_day)


def paired_resolution(per_day: np.ndarray, reference: int, others) -> list[dict]:
    """Welfare of each vector in ``others`` minus the ``reference`` vector's, paired per day: mean, per-day standard
    deviation and the days a 95 % interval needs to be half as wide as the mean difference, (2 * 1.96 * sd / mean)^2."""
    rows = []
    for i in others:
        diff = per_day[i] - per_day[reference]
        mean, sd = float(diff.mean()), float(diff.std(ddof=1))
        rows.append({"index": int(i), "mean_cny": mean, "sd_cny": sd,
                     "days_for_half_width": float((2 * 1.96 * sd / abs(mean)) ** 2) if mean else float("inf")})
    return rows


def predicted_scores(dyn, model, start: np.ndarray, vectors: np.ndarray, cfg: Config,
                     particles: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predicted (welfare CNY, cost) over one episode from ``start`` [S] at each constant vector [N, A], averaged over
    the members. ``particles`` 0: each member follows its own noise-free means; P > 0: P trajectories per member
    sample its predicted std at every step (trajectory sampling, SPEC 10), averaged."""
    cost_fn = make_cost_fn(cfg, backoff=False)
    members = jax.tree.leaves(model.params)[0].shape[0]  # E, or E' after select_elites
    copies = max(particles, 1)
    rows = np.repeat(np.asarray(vectors, np.float32), copies, axis=0)  # [N * P, A]
    obs = jnp.broadcast_to(jnp.asarray(start, jnp.float32), (members, len(rows), start.size))  # [E, N*P, S]
    act = jnp.broadcast_to(jnp.asarray(rows), (members,) + rows.shape)  # [E, N*P, A]
    welfare, cost = 0.0, 0.0
    for t in range(cfg.env.episode_steps):
        key = jax.random.key(t) if particles else None
        pred = dyn.step(model, obs, act, key, mean_only=not particles)
        welfare = welfare + pred.reward * cfg.env.reward_scale
        cost = cost + cost_fn(pred.next_obs, None, 0.0)
        obs = pred.next_obs
    per_vector = lambda x: np.asarray(x).reshape(members, len(vectors), copies).mean((0, 2))  # noqa: E731
    return per_vector(welfare), per_vector(cost)


def planner_pick(cost: np.ndarray, welfare: np.ndarray) -> int:
    """Index of the vector a constrained planner prefers: lowest cost (rounded to 1e-4), then highest welfare."""
    return int(model_constant.rank(cost, welfare)[0])


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).correlation)


def plot(rows: list[dict], png: Path) -> Path:
    """Rank correlations against the random-price episodes fitted on, one panel each for welfare and cost: every
    (setting, seed) as a point, the mean per setting as a line, the agents' own models as stars at the episodes
    their checkpoints had seen, and the truth's own repeatability as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, quantity in zip(axes, ("welfare", "cost")):
        key = f"{quantity}_rank_corr"
        settings = list(dict.fromkeys(r.get("setting", "random prices") for r in rows if "episodes" in r))
        for i, setting in enumerate(settings):
            mine = [r for r in rows if "episodes" in r and r.get("setting", "random prices") == setting]
            episodes = sorted({r["episodes"] for r in mine})
            color = f"C{i}"
            ax.scatter([r["episodes"] for r in mine], [r[key] for r in mine], color=color, s=14, alpha=0.6)
            ax.plot(episodes, [np.mean([r[key] for r in mine if r["episodes"] == n]) for n in episodes], color=color,
                    label=setting.split(" (")[0])
        agents = [r for r in rows if "run_dir" in r]
        if agents:
            ax.scatter([r["transitions"] / 12 for r in agents], [r[key] for r in agents], marker="*", s=120,
                       color="k", label="trained agents' models (episodes seen, 5 random)")
        ax.axhline(rows[0][f"truth_repeat_{key}"], color="grey", ls="--",
                   label="truth on other training days")
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("episodes fitted on (random prices)")
        ax.set_title(f"{quantity} ranking of 125 constant prices")
    axes[0].set_ylabel("Spearman rank correlation")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


@entry_point("welfare_identifiability")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=[5, 50, 200, 1000],
                        help="random-price episodes to fit on (each a training day drawn with replacement)")
    parser.add_argument("--seeds", type=int, default=3, help="data and model seeds per number of episodes")
    parser.add_argument("--rounds", type=int, default=10, help="warm-started fits on the growing data")
    parser.add_argument("--feasible", type=int, default=30,
                        help="the vectors with the fewest true violating steps, for the within-feasible correlation")
    parser.add_argument("--config", default=None, help="base config (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], help="override section.key=value")
    parser.add_argument("--neighbours", type=int, default=4,
                        help="the next least-violating vectors whose welfare is paired per day to the tuned constant's")
    parser.add_argument("--particles", type=int, default=0,
                        help="trajectories per member sampling the predicted std (default 0: the members' means)")
    parser.add_argument("--run-dir", type=Path, nargs="+", default=None,
                        help="score these trained runs' models instead of fitting on random prices")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="with --run-dir")
    parser.add_argument("--json", action="store_true", help="one JSON line per (episodes, seed)")
    parser.add_argument("--label", default=None, help="a 'setting' key for every row (the plot's line name)")
    parser.add_argument("--plot", type=Path, default=None, help="write the rank correlations to this PNG")
    parser.add_argument("--from-jsonl", type=Path, default=None,
                        help="with --plot: plot the rows of an earlier --json output instead of computing")
    args = parser.parse_args(argv)
    if args.from_jsonl is not None:
        if args.plot is None:
            parser.error("--from-jsonl needs --plot")
        try:
            rows = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{args.from_jsonl}: not a JSON-lines file of this script ({error})") from None
        if not rows or "truth_repeat_welfare_rank_corr" not in rows[0]:
            raise UserError(f"{args.from_jsonl}: no rows of this script")
        print(plot(rows, args.plot))
        return 0
    if min(args.episodes) < 1 or min(args.particles, args.neighbours) < 0 or min(args.seeds, args.rounds) < 1 \
            or args.feasible < 3:
        parser.error("--episodes, --seeds and --rounds must be at least 1, --particles and --neighbours at least 0, "
                     "--feasible at least 3")
    cfg = load(args.config, args.set)
    if cfg.planner.cost_model != "observation":
        parser.error("the predicted cost is the environment's formula on predicted observations: "
                     "planner.cost_model must be 'observation'")
    vectors = np.asarray(ev.fixed_price_grid(cfg), np.float32)
    violation, welfare, cost, per_day = true_scores(cfg, vectors)
    order = np.lexsort((-welfare, violation))  # ranked as evaluate.score_fixed_prices: the first is the tuned constant
    tuned, feasible = int(order[0]), np.argsort(violation, kind="stable")[:args.feasible]
    neighbours = paired_resolution(per_day, tuned, order[1:1 + args.neighbours])
    # the truth's own repeatability: as many other training days (drawn at random, other seeds) rank them alike?
    other_days = np.sort(np.random.default_rng(7).choice(num_days(cfg, "train"), cfg.evaluation.tuned_days,
                                                         replace=False))
    _, other_welfare, other_cost, _ = true_scores(cfg, vectors, other_days, [500 + i for i in range(len(other_days))])
    repeat = {"welfare": rank_correlation(other_welfare, welfare), "cost": rank_correlation(other_cost, cost)}

    rows = []

    def report(head: dict, pred_welfare: np.ndarray, pred_cost: np.ndarray) -> None:
        pick = planner_pick(pred_cost, pred_welfare)
        row = {**({"setting": args.label} if args.label else {}), **head,
               "welfare_rank_corr": rank_correlation(pred_welfare, welfare),
               "welfare_rank_corr_feasible": rank_correlation(pred_welfare[feasible], welfare[feasible]),
               "cost_rank_corr": rank_correlation(pred_cost, cost),
               "pick": np.round(vectors[pick].astype(float), 4).tolist(), "pick_violation_pct": float(violation[pick]),
               "pick_welfare_cny": float(welfare[pick]), "tuned_welfare_cny": float(welfare[tuned]),
               "tuned_violation_pct": float(violation[tuned]), "truth_repeat_welfare_rank_corr": repeat["welfare"],
               "truth_repeat_cost_rank_corr": repeat["cost"],
               "neighbours": [{"prices": np.round(vectors[n["index"]].astype(float), 4).tolist(),
                               "violation_pct": float(violation[n["index"]]),
                               **{k: n[k] for k in ("mean_cny", "sd_cny", "days_for_half_width")}} for n in neighbours]}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
            return
        print(f"| {head.get('run_dir', head.get('episodes'))} | {head.get('epoch', head.get('seed'))} "
              f"| {row['welfare_rank_corr']:+.2f} / {row['welfare_rank_corr_feasible']:+.2f} "
              f"| {row['cost_rank_corr']:+.2f} | {row['pick']} | {row['pick_violation_pct']:.1f} % "
              f"| {row['pick_welfare_cny']:.0f} |", flush=True)

    if args.run_dir:
        if not args.json:
            print("| run | epoch | welfare rank corr. (all / fewest-violating) | cost rank corr. | model's pick "
                  "| its violating steps | its welfare (CNY) |\n|---|---|---|---|---|---|---|")
        for run_dir in args.run_dir:
            run_cfg, trainer, kind, epoch, _ = ev._load_trained(run_dir, args.checkpoint)
            obs = np.asarray(replay.contents(trainer.state["buffer"])[0])
            dyn = trainer.parts.dynamics
            model = dyn.select_elites(trainer.state["model"])
            report({"run_dir": str(run_dir), "checkpoint": kind, "epoch": epoch, "transitions": len(obs)},
                   *predicted_scores(dyn, model, obs[0], vectors, run_cfg, args.particles))
        if args.plot:
            print(plot(rows, args.plot))
        return 0
    sim = Twin(cfg)
    lower, upper, steps = np.array(cfg.env.price_lower), np.array(cfg.env.price_upper), cfg.env.episode_steps
    if not args.json:
        print(f"{len(vectors)} constant vectors on {cfg.evaluation.tuned_days} training days: true welfare "
              f"{welfare.min():.0f}-{welfare.max():.0f} CNY per episode; tuned constant "
              f"{np.round(vectors[tuned].astype(float), 3).tolist()} ({violation[tuned]:.1f} % of steps violating, "
              f"{welfare[tuned]:.0f} CNY); {len(other_days)} other training days rank them alike at "
              f"{repeat['welfare']:+.2f} (welfare) and {repeat['cost']:+.2f} (cost)")
        print("next least-violating vectors, welfare minus the tuned constant's paired per day:")
        for n in neighbours:
            print(f"  {np.round(vectors[n['index']].astype(float), 4).tolist()} ({violation[n['index']]:.1f} %): "
                  f"{n['mean_cny']:+.0f} CNY, per-day SD {n['sd_cny']:.0f}; {n['days_for_half_width']:.0f} days for a "
                  f"95 % interval half as wide as the difference")
        print("| random episodes | seed | welfare rank corr. (all / fewest-violating) | cost rank corr. "
              "| model's pick | its violating steps | its welfare (CNY) |")
        print("|---|---|---|---|---|---|---|")
    for episodes in args.episodes:
        for seed in range(args.seeds):
            rng = np.random.default_rng([episodes, seed])
            days = rng.choice(num_days(cfg, "train"), episodes, replace=True)
            prices = rng.uniform(lower, upper, size=(episodes, steps, len(lower))).astype(np.float32)
            obs, nxt, info = sim.run("train", days, [10_000 * seed + i for i in range(episodes)], prices)
            reward = (info["welfare"] / cfg.env.reward_scale).astype(np.float32)
            step_cost = info["cost"].astype(np.float32)
            dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
            key = jax.random.key(seed)
            model = dyn.init(key)
            for r in range(1, args.rounds + 1):
                n = max(1, round(episodes * r / args.rounds))
                take = lambda x: x[:n].reshape(-1, *x.shape[2:])  # noqa: E731
                model, _ = dyn.fit(jax.random.fold_in(key, r), model, take(obs), take(prices), take(reward),
                                   take(step_cost), take(nxt))
            report({"episodes": episodes, "seed": seed},
                   *predicted_scores(dyn, model, obs[0, 0], vectors, cfg, args.particles))
    if args.plot:
        print(plot(rows, args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
