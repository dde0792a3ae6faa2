"""Does the trained agent beat the baselines it exists to beat? The targets of the decision-quality issue, per seed.

Reads ``OUT/runs/cap_adaptive-seed<k>/eval/steps.csv`` (``python -m evjax.evaluate`` of each training seed's
run, all methods on the same held-out days and seeds) and prints a markdown table:

* violation share of the trained agent vs the best fixed-price baseline (target: at most half);
* vs the oracle (target: at most 1 percentage point more);
* the share of the oracle's paired welfare advantage over uniform random prices that the agent recovers
  (target: at least 75 %), mean(agent - random) / mean(oracle - random) over the days.

Below the table, each target with its 95 % interval over the days (the agent's per-day figures averaged over the
seeds, so the intervals are over days for these seeds): the paired t-intervals of agent - best fixed / 2 and
agent - oracle - 1 pp, and Fieller's interval of the recovered share (``evjax.evaluate.ratio_interval``), which
has no finite bounds while the oracle's own advantage over random prices is not resolved from zero.

    python benchmarks/agent_targets.py --out OUT [--seeds 0 1 2] [--twin-steps STEPS_CSV]

``--twin-steps`` (a ``steps.csv`` of non-learned methods on the same days and seeds, e.g. from
``benchmarks/twin_evaluation.py --methods ... forecast_oracle --steps-dir DIR``) supplies the methods a seed's
file lacks; with ``forecast_oracle`` rows it adds the oracle without foresight of the arrivals: its violation
share, and the welfare share the agent recovers against it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

AGENT, FIXED, RANDOM, ORACLE = "cap_adaptive", ("fixed_mid", "fixed_upper", "fixed_tuned"), "random", "oracle"
FORECAST = "forecast_oracle"


def per_day(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """Day -> (episode welfare, share of steps with any violation in %); one simulator's rows per method."""
    simulator = rows[0].get("simulator")
    rows = [r for r in rows if r.get("simulator") == simulator]
    days = sorted({r["day"] for r in rows})
    return {d: (sum(r["welfare"] for r in rows if r["day"] == d),
                100.0 * float(np.mean([r["cost"] > 0 for r in rows if r["day"] == d]))) for d in days}


def seed_targets(steps_csv: Path, twin_csv: Path | None = None) -> dict:
    from evjax.evaluate import read_steps

    runs = read_steps(steps_csv)
    if twin_csv is not None:
        runs = {**read_steps(twin_csv), **runs}
    methods = {name: per_day(rows) for name, rows in runs.items() if "@" not in name}
    days = sorted(set.intersection(*(set(m) for m in methods.values())))
    welfare = {name: np.array([m[d][0] for d in days]) for name, m in methods.items()}
    violation = {name: float(np.mean([m[d][1] for d in days])) for name, m in methods.items()}
    best_fixed = min((name for name in FIXED if name in violation), key=violation.get)
    advantage = float(np.mean(welfare[ORACLE] - welfare[RANDOM]))
    forecast = {}
    if FORECAST in methods:
        forecast_advantage = float(np.mean(welfare[FORECAST] - welfare[RANDOM]))
        forecast = {"forecast_violation_pct": violation[FORECAST], "forecast_minus_random_cny": forecast_advantage,
                    "recovered_of_forecast": float(np.mean(welfare[AGENT] - welfare[RANDOM])) / forecast_advantage}
    per_day_values = {name: (welfare[name], np.array([methods[name][d][1] for d in days]))
                      for name in (AGENT, best_fixed, ORACLE, RANDOM)}  # (welfare, violation %) per day
    return {**forecast, "days": len(days), "day_ids": days, "per_day": per_day_values,
            "agent_violation_pct": violation[AGENT], "best_fixed": best_fixed,
            "best_fixed_violation_pct": violation[best_fixed], "oracle_violation_pct": violation[ORACLE],
            "agent_minus_random_cny": float(np.mean(welfare[AGENT] - welfare[RANDOM])),
            "oracle_minus_random_cny": advantage,
            "recovered": float(np.mean(welfare[AGENT] - welfare[RANDOM])) / advantage if advantage else float("nan")}


def pooled_targets(results: dict) -> list[str]:
    """The three targets with 95 % intervals over the days, the agent's per-day values averaged over the seeds."""
    from evjax.evaluate import _interval, ratio_interval

    first = next(iter(results.values()))
    if any(r["day_ids"] != first["day_ids"] for r in results.values()):
        raise SystemExit("agent_targets: the seeds were evaluated on different days; pooled targets need the same days")
    welfare = np.mean([r["per_day"][AGENT][0] for r in results.values()], axis=0)
    violation = np.mean([r["per_day"][AGENT][1] for r in results.values()], axis=0)
    best = first["best_fixed"]
    fixed_v = first["per_day"][best][1]
    oracle_w, oracle_v = first["per_day"][ORACLE]
    random_w = first["per_day"][RANDOM][0]
    half = violation - 0.5 * fixed_v
    above = violation - oracle_v - 1.0
    advantage = oracle_w - random_w
    share = ratio_interval(welfare - random_w, advantage)
    n = len(welfare)
    return [
        f"Over the {n} days, the agent averaged over seeds {', '.join(map(str, results))} (95 % intervals over days):",
        f"- agent − best fixed ({best}) / 2: {half.mean():+.1f} ± {_interval(half):.1f} pp (target ≤ 0)",
        f"- agent − oracle − 1 pp: {above.mean():+.1f} ± {_interval(above):.1f} pp (target ≤ 0)",
        f"- oracle − random welfare: {advantage.mean():+.0f} ± {_interval(advantage):.0f} CNY/ep; recovered share "
        f"(Fieller): {share} (target ≥ 0.75)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--twin-steps", type=Path, help="steps.csv of non-learned methods on the same days")
    args = parser.parse_args()
    results = {s: seed_targets(args.out / "runs" / f"{AGENT}-seed{s}" / "eval" / "steps.csv", args.twin_steps)
               for s in args.seeds}
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in
            ("agent_violation_pct", "best_fixed_violation_pct", "oracle_violation_pct", "agent_minus_random_cny",
             "oracle_minus_random_cny", "recovered")}
    print("| training seed | days | agent: steps with a violation | best fixed (which) | oracle | "
          "agent − random (CNY/ep) | oracle − random (CNY/ep) | recovered |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, r in results.items():
        print(f"| {seed} | {r['days']} | {r['agent_violation_pct']:.1f} % | {r['best_fixed_violation_pct']:.1f} % "
              f"({r['best_fixed']}) | {r['oracle_violation_pct']:.1f} % | {r['agent_minus_random_cny']:+.0f} | "
              f"{r['oracle_minus_random_cny']:+.0f} | {100 * r['recovered']:.0f} % |")
    print(f"| mean | | {mean['agent_violation_pct']:.1f} % | {mean['best_fixed_violation_pct']:.1f} % | "
          f"{mean['oracle_violation_pct']:.1f} % | {mean['agent_minus_random_cny']:+.0f} | "
          f"{mean['oracle_minus_random_cny']:+.0f} | {100 * mean['recovered']:.0f} % |")
    print()
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    print(f"- at most half the best fixed baseline's violation share: {mean['agent_violation_pct']:.1f} % vs "
          f"{0.5 * mean['best_fixed_violation_pct']:.1f} %: {ok(mean['agent_violation_pct'] <= 0.5 * mean['best_fixed_violation_pct'])}")
    print(f"- at most 1 pp above the oracle: {mean['agent_violation_pct']:.1f} % vs "
          f"{mean['oracle_violation_pct'] + 1:.1f} %: {ok(mean['agent_violation_pct'] <= mean['oracle_violation_pct'] + 1)}")
    print(f"- recovers at least 75 % of the oracle's advantage over random: {100 * mean['recovered']:.0f} %: "
          f"{ok(mean['recovered'] >= 0.75)}")
    print()
    for line in pooled_targets(results):
        print(line)
    first = next(iter(results.values()))  # the twin methods are the same for every seed
    if "forecast_violation_pct" in first:
        recovered = float(np.mean([r["recovered_of_forecast"] for r in results.values()]))
        print(f"\nWithout foresight of the arrivals (forecast oracle, {args.twin_steps}): it violates on "
              f"{first['forecast_violation_pct']:.1f} % of steps (the agent {mean['agent_violation_pct']:.1f} %) "
              f"and earns {first['forecast_minus_random_cny']:+.0f} CNY/ep over random; the agent recovers "
              f"{100 * recovered:.0f} % of that.")


if __name__ == "__main__":
    main()
