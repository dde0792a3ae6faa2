"""Evaluate a trained run against the baselines of SPEC 12: ``python -m evjax.evaluate --run-dir D``.

Host side, not jittable. Restores the "best" checkpoint (falling back to
"latest" when no episode met the cost threshold, and saying so) from the
checkpoint alone, runs every method on the same held-out days and seeds, and
writes ``eval/metrics.csv``, ``eval/metrics.md``, ``eval/steps.csv`` and PNG plots.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
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
    """Constrained CEM whose rollouts are copies of the real environment (snapshot/restore).

    Each decision samples ``oracle_popsize`` price sequences over ``oracle_horizon``
    steps for ``oracle_iterations`` iterations, simulates each on the true
    environment, and refits on its elites by the model planner's rule
    (``planner.elite_scores``, feasible meaning zero constraint cost): the highest
    welfare among feasible sequences, or the lowest cost when too few are feasible.
    It sees the scenario's future arrivals, so it is an upper reference, not a
    deployable policy.
    """

    def __init__(self, cfg: Config):
        ev = cfg.evaluation
        self.lower, self.upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
        self.horizon, self.popsize, self.iterations = ev.oracle_horizon, ev.oracle_popsize, ev.oracle_iterations
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
            score = elite_scores(reward, cost, cost <= 1e-12, num_elites=self.num_elites, xp=np)
            elites = candidates[np.argsort(-score, kind="stable")[: self.num_elites]]  # best first, ties by index
            mean, std = elites.mean(axis=0), elites.std(axis=0) + 1e-6
        env.restore(snapshot)
        return mean[0].astype(np.float32)


def make_policies(cfg: Config, parts, model, trained_kappa: float) -> dict:
    """The SPEC 12 methods named in ``evaluation.methods``, all on the same config and trained model.

    The planner variants (the methods of ``evjax.methods.METHODS`` with a planner
    mode) keep kappa fixed during evaluation: 0 for CEM and CCEM,
    ``evaluation.fixed_kappa`` for fixed-kappa CAP, the trained kappa for the agent.
    """
    from evjax.agent import Agent, planner_variant
    from evjax.planner import make_model_planner

    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    planners = {}  # one compiled planner per mode; the CAP variants differ only in kappa
    policies = {}
    for method in cfg.evaluation.methods:
        if method == "fixed_mid":
            policies[method] = FixedPolicy((lower + upper) / 2)
        elif method == "fixed_upper":
            policies[method] = FixedPolicy(upper)
        elif method == "random":
            policies[method] = RandomPolicy(lower, upper)
        elif method == "oracle":
            policies[method] = OraclePolicy(cfg)
        else:
            planner_cfg = planner_variant(cfg.planner, BY_NAME[method], cfg.evaluation.fixed_kappa, trained_kappa)
            if planner_cfg.mode not in planners:
                planners[planner_cfg.mode] = make_model_planner(dataclasses.replace(cfg, planner=planner_cfg),
                                                                parts.dynamics)
            kappa = method_kappa(BY_NAME[method], cfg.evaluation.fixed_kappa, trained_kappa)
            policies[method] = PlannerPolicy(Agent(planner_cfg, planners[planner_cfg.mode], kappa=kappa), model)
    return policies


ARRAY_FIELDS = ("price", "evs_present", "line_loading")
INT_FIELDS = ("day", "step", "unserved")
TEXT_FIELDS = ("method", "date")
SCALAR_INFO = ("carbon_intensity", "ev_carbon_intensity", "system_carbon_intensity", "ev_co2_kg", "welfare", "cost",
               "cost_line", "cost_carbon", "cs_profit", "dso_profit", "users_surplus", "users_time_cost",
               "min_voltage_pu")
STEP_FIELDS = ("method", "day", "date", "step", *ARRAY_FIELDS, "ev_energy_kwh", *SCALAR_INFO, "unserved", "plan_ms")


def run_episode(env, policy, split: str, day: int, seed: int) -> list[dict]:
    """One evaluation episode; a row per step with the quantities the table and plots need."""
    obs, _ = env.reset(seed=seed, options={"split": split, "day": day})
    policy.reset(seed)
    rows = []
    for step in range(env.cfg.env.episode_steps):
        tic = time.perf_counter()
        action = policy.act(env, obs)
        plan_ms = 1000.0 * (time.perf_counter() - tic)
        obs, _, terminated, truncated, info = env.step(action)
        rows.append({
            "day": day, "date": env.scenario.date, "step": step,
            "price": np.asarray(info["posted_price"], float),
            "evs_present": np.asarray(info["evs_present"], float),
            "line_loading": np.asarray(info["line_loading"], float),
            "ev_energy_kwh": float(np.sum(info["station_energy_kwh"])),
            **{key: float(info[key]) for key in SCALAR_INFO},
            "unserved": int(info["unserved"]),
            "plan_ms": plan_ms,
        })
        if terminated or truncated:
            break
    return rows


def _interval(per_day: np.ndarray) -> float:
    """Half-width of the 95 % t-interval of the mean of per-day values (NaN for one day)."""
    from scipy import stats

    n = len(per_day)
    return float(stats.t.ppf(0.975, n - 1) * per_day.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


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
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    measure = {"ev_charging": "EV-charging CI", "system": "system CI"}[cfg.carbon.constraint]
    lines = [
        f"{note}",
        "",
        f"Welfare: {cfg.economics.welfare}; carbon limit {cfg.carbon.limit:.0f} kg/MWh on the {measure}.",
        "",
        "| method | welfare per episode (CNY, 95 % CI) | total constraint cost | steps with a line > "
        f"{100 * cfg.grid.loading_limit:.0f} % | steps with {measure} > limit | steps with any violation | "
        "EV-charging CI (kg/MWh) | EV CO2 per episode (t) | users' time cost per episode (CNY) | "
        "welfare shares CS / DSO / users | unserved EVs | plan ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        ci = "" if math.isnan(s["welfare_ci95"]) else f" ± {s['welfare_ci95']:.0f}"
        lines.append(
            f"| {BY_NAME[s['method']].label} | {s['welfare_cny']:.0f}{ci} | {s['total_cost']:.3f} | "
            f"{s['steps_line_over_limit_pct']:.1f} % | {s['steps_carbon_over_limit_pct']:.1f} % | "
            f"{s['steps_any_violation_pct']:.1f} % | {s['ev_carbon_intensity']:.1f} | {s['ev_co2_t']:.2f} | "
            f"{s['users_time_cost_cny']:.0f} | {s['cs_share_pct']:.0f} / {s['dso_share_pct']:.0f} / "
            f"{s['users_share_pct']:.0f} % | {s['unserved_evs']} | {s['plan_ms_per_step']:.1f} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


def write_steps(out: Path, per_method: dict[str, list[dict]]) -> None:
    with (out / "steps.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(STEP_FIELDS)
        for method, rows in per_method.items():
            for r in rows:
                writer.writerow([method] + [" ".join(f"{v:.6g}" for v in r[k]) if isinstance(r[k], np.ndarray)
                                            else r[k] for k in STEP_FIELDS[1:]])


def read_steps(path: Path) -> dict[str, list[dict]]:
    """Per-method step rows from a ``steps.csv`` written by ``write_steps`` (arrays restored)."""
    per_method: dict[str, list[dict]] = {}
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
            per_method.setdefault(parsed.pop("method"), []).append(parsed)
    return per_method


def _load_trained(run_dir: Path, which: str = "best"):
    """Config, run parts and restored state of the best (else latest) checkpoint, from the checkpoint alone."""
    from evjax.train import Trainer

    kind = "best" if which == "best" and checkpoint.exists(run_dir, "best") else "latest"
    note = ("No episode met training.best_cost_threshold; evaluating the latest checkpoint instead of best."
            if kind != which else "")
    meta, cfg = checkpoint.restore_meta(run_dir, kind)
    trainer = Trainer(cfg, run_dir, metrics=False)
    trainer.state = checkpoint.restore(run_dir, kind, trainer.state)
    trainer.parts.agent.restore(trainer.state["agent"])
    return cfg, trainer, kind, int(meta["epoch"]), note


def evaluate(run_dir: Path, evaluation: EvaluationConfig | None = None, split: str | None = None,
             days: int | None = None, plots: bool = True, progress: bool = True,
             which: str = "best") -> list[dict]:
    """Run every method on the same days and seeds; write tables and plots under ``run_dir/eval``.

    ``evaluation`` replaces the checkpoint's evaluation section; the rest of the
    config always comes from the checkpoint.
    """
    from tqdm import tqdm

    from evjax.data.scenarios import num_days

    run_dir = Path(run_dir)
    cfg, trainer, kind, epoch, note = _load_trained(run_dir, which)
    evaluation = evaluation if evaluation is not None else cfg.evaluation
    changes = {k: v for k, v in (("split", split), ("days", days)) if v is not None}
    cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(evaluation, **changes))
    available = num_days(cfg, cfg.evaluation.split)
    count = min(cfg.evaluation.days, available)
    day_ids = np.unique(np.linspace(0, available - 1, count).round().astype(int))
    parts = trainer.parts
    model = parts.dynamics.select_elites(trainer.state["model"])
    trained_kappa = parts.agent.kappa
    policies = make_policies(cfg, parts, model, trained_kappa)
    per_method: dict[str, list[dict]] = {}
    bar = tqdm(total=len(policies) * len(day_ids), desc="evaluate", unit="episode", disable=not progress,
               file=sys.stderr)
    for method, policy in policies.items():
        rows = []
        for i, day in enumerate(day_ids):
            bar.set_postfix(method=method)
            for r in run_episode(parts.env, policy, cfg.evaluation.split, int(day), cfg.evaluation.seed + i):
                rows.append({"method": method, **r})
            bar.update()
        per_method[method] = rows
    bar.close()
    out = run_dir / ("eval" if which == "best" else f"eval_{which}")
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(m, rows, cfg) for m, rows in per_method.items()]
    header = (f"Checkpoint '{kind}' (epoch {epoch}, kappa {np.array2string(trained_kappa, precision=3)}); {len(day_ids)} {cfg.evaluation.split} "
              f"day(s), seeds {cfg.evaluation.seed}..{cfg.evaluation.seed + len(day_ids) - 1}. {note}").strip()
    write_tables(out, summaries, cfg, header)
    write_steps(out, per_method)
    if plots:
        from evjax import plots as plotting

        plotting.evaluation_plots(out, per_method, cfg)
        plotting.training_curves(run_dir / "metrics.csv", out / "training_curves.png", cfg)
        plotting.cost_calibration(run_dir / "calibration.csv", out / "cost_calibration.png")
    return summaries


@entry_point("evjax.evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("evjax.evaluate", "Evaluate a trained run against the SPEC 12 baselines.")
    parser.add_argument("--run-dir", metavar="DIR", required=True, help="run directory written by evjax.train")
    parser.add_argument("--split", choices=("train", "test"), help="days to evaluate on (default: evaluation.split)")
    parser.add_argument("--days", type=int, help="number of days (default: evaluation.days)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="which checkpoint to evaluate (default best; results of latest go to eval_latest/)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from an existing steps.csv")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    user_cfg = load(args.config, args.overrides)
    others = [o.split("=")[0] for o in args.overrides if not o.strip().startswith("evaluation.")]
    if others:
        raise ConfigError(f"config key '{others[0]}': evaluate only takes evaluation.* settings; "
                          "the rest comes from the checkpoint")
    if args.days is not None and args.days <= 0:
        raise UserError(f"--days must be positive, got {args.days}")
    run_dir = Path(args.run_dir)
    if not checkpoint.exists(run_dir, "latest") and not checkpoint.exists(run_dir, "best"):
        raise UserError(f"{run_dir / 'checkpoints'}: no checkpoint found; train first")
    evaluation = user_cfg.evaluation if (args.config is not None or args.overrides) else None
    out = run_dir / ("eval" if args.checkpoint == "best" else "eval_latest")
    if args.plots_only:
        if not (out / "steps.csv").is_file():
            raise UserError(f"{out / 'steps.csv'}: not found; run the evaluation first")
        from evjax import plots as plotting

        cfg = checkpoint.restore_meta(run_dir, "latest")[1]
        plotting.evaluation_plots(out, read_steps(out / "steps.csv"), cfg)
        plotting.training_curves(run_dir / "metrics.csv", out / "training_curves.png", cfg)
        print(f"plots redrawn in {out}")
        return 0
    evaluate(run_dir, evaluation, args.split, args.days, plots=not args.no_plots, progress=not args.no_progress,
             which=args.checkpoint)
    print((out / "metrics.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
