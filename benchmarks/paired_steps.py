"""Paired per-day difference of two methods' episodes, each read from a ``steps.csv`` (the same or two runs).

    python benchmarks/paired_steps.py RUN_A/steps.csv:METHOD_A RUN_B/steps.csv:METHOD_B [--by-step] [--json]
        [--pair RUN_C/steps.csv:METHOD_C RUN_D/steps.csv:METHOD_D ...]

Prints METHOD_A minus METHOD_B per day, averaged over the days with a 95 %
t-interval (``evaluate.paired_differences``): welfare (CNY per episode) and
the share of steps with any violation (pp), with both methods' own means.
The two must cover the same days with the same dates (the same
``evaluation.days``, split and seed), else it stops naming the first
mismatch. A ``steps.csv`` is what ``evjax.evaluate`` writes to ``eval/`` and
``benchmarks/twin_evaluation.py --steps-dir DIR`` to ``DIR``; a method's rows
on a second simulator are ``METHOD@host``. Example (README, "What is achievable
without foresight"): the forecast oracle of an H200 run against the tuned
constant of an agent's evaluation. ``--by-step`` adds, for each side, the share
of days with a violation at each step of the day (where in the day one
method loses to the other). Each ``--pair C D`` adds another A - B pair, e.g.
the agents of other training seeds on the same days; the differences are then
also pooled over every (pair, day), with a 95 % t-interval over those (README Results,
"How the ridge map became the default": nine seeds, 270 pairs), and with one over the pairs' own means (wider when
the pairs are training seeds whose agents differ as a whole).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evjax import cli, evaluate
from evjax.errors import UserError


def load_run(spec: str) -> tuple[str, list[dict]]:
    """``PATH:METHOD`` -> (label, that method's step rows); a one-line ``UserError`` for a bad path or method."""
    path, sep, method = spec.rpartition(":")
    if not sep or not path or not method:
        raise UserError(f"'{spec}': expected PATH:METHOD, e.g. runs/x/eval/steps.csv:cap_adaptive")
    if not Path(path).is_file():
        raise UserError(f"'{path}': no such steps file")
    try:
        runs = evaluate.read_steps(Path(path))
    except (KeyError, ValueError) as exc:
        raise UserError(f"'{path}': not a steps.csv written by evjax ({exc})") from None
    if method not in runs:
        raise UserError(f"'{path}': no method '{method}' (it has {sorted(runs)})")
    return f"{method} ({path})", runs[method]


def compare(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Paired differences A - B and each side's means over the days; the days must agree in number and date."""
    dates_a = {r["day"]: r.get("date") for r in rows_a}
    dates_b = {r["day"]: r.get("date") for r in rows_b}
    if sorted(dates_a) != sorted(dates_b):
        raise UserError(f"the runs cover different days: {len(dates_a)} against {len(dates_b)}")
    for day in sorted(dates_a):
        if dates_a[day] != dates_b[day]:
            raise UserError(f"day {day} is {dates_a[day]} in one run and {dates_b[day]} in the other")
    mine, ref = evaluate.per_day(rows_a), evaluate.per_day(rows_b)
    return {"days": len(mine), **evaluate.paired_differences(rows_a, rows_b),
            "welfare_a_cny": float(np.mean([v[0] for v in mine.values()])),
            "welfare_b_cny": float(np.mean([v[0] for v in ref.values()])),
            "violation_a_pct": float(np.mean([v[2] for v in mine.values()])),
            "violation_b_pct": float(np.mean([v[2] for v in ref.values()]))}


def pooled(pairs: list[tuple[list[dict], list[dict]]]) -> dict:
    """Paired differences A - B over every (pair, day) of several pairs; ``each`` holds each pair's ``compare``
    (which checks its days). ``*_pairs_ci95`` is the 95 % t-interval over the pairs' own mean differences
    instead: the honest one when the pairs are training seeds, whose agents differ as a whole, so that their
    days are not independent draws (NaN for one pair)."""
    each = [compare(rows_a, rows_b) for rows_a, rows_b in pairs]
    keyed = lambda k, rows: [{**r, "day": (k, r["day"])} for r in rows]  # noqa: E731
    rows_a = [r for k, (a, _) in enumerate(pairs) for r in keyed(k, a)]
    rows_b = [r for k, (_, b) in enumerate(pairs) for r in keyed(k, b)]
    return {"pairs": len(pairs), "days": sum(c["days"] for c in each), "each": each,
            **evaluate.paired_differences(rows_a, rows_b),
            "welfare_pairs_ci95": evaluate._interval(np.array([c["welfare_diff_cny"] for c in each])),
            "violation_pairs_ci95": evaluate._interval(np.array([c["violation_diff_pct"] for c in each]))}


def violations_by_step(rows: list[dict]) -> np.ndarray:
    """Share of days (%) with any violation at each step of the day [steps]."""
    steps = max(r["step"] for r in rows) + 1
    hits, days = np.zeros(steps), np.zeros(steps)
    for r in rows:
        hits[r["step"]] += r["cost"] > 0
        days[r["step"]] += 1
    return 100.0 * hits / np.maximum(days, 1)


@cli.entry_point("paired_steps.py")
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="paired_steps.py", description=__doc__.splitlines()[0])
    parser.add_argument("a", metavar="PATH:METHOD", help="the method whose differences are reported")
    parser.add_argument("b", metavar="PATH:METHOD", help="the reference")
    parser.add_argument("--by-step", action="store_true",
                        help="also the share of days violating at each step of the day, A and B")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar="PATH:METHOD",
                        help="another A - B pair (e.g. another training seed), pooled with the first")
    args = parser.parse_args(argv)
    (label_a, rows_a), (label_b, rows_b) = load_run(args.a), load_run(args.b)
    more = [(load_run(spec_c), load_run(spec_d)) for spec_c, spec_d in args.pair]
    pool = pooled([(rows_a, rows_b)] + [(c[1], d[1]) for c, d in more])  # one pair alone: pool is its own compare
    first, *others = pool.pop("each")
    result = {"a": label_a, "b": label_b, **first}
    if more:
        result["pooled"] = pool
        result["more"] = [{"a": c[0], "b": d[0], **each} for (c, d), each in zip(more, others)]
    if args.by_step:
        result["violation_by_step_a_pct"] = violations_by_step(rows_a).tolist()
        result["violation_by_step_b_pct"] = violations_by_step(rows_b).tolist()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{label_a} minus {label_b}, {result['days']} days paired:")
    print(f"  welfare   {result['welfare_a_cny']:.0f} - {result['welfare_b_cny']:.0f} CNY per episode: "
          f"{result['welfare_diff_cny']:+.0f} ± {result['welfare_diff_ci95']:.0f}")
    print(f"  violation {result['violation_a_pct']:.1f} % - {result['violation_b_pct']:.1f} % of steps: "
          f"{result['violation_diff_pct']:+.1f} ± {result['violation_diff_ci95']:.1f} pp")
    for more in result.get("more", []):
        print(f"{more['a']} minus {more['b']}, {more['days']} days paired: welfare {more['welfare_diff_cny']:+.0f} ± "
              f"{more['welfare_diff_ci95']:.0f} CNY, violation {more['violation_diff_pct']:+.1f} ± "
              f"{more['violation_diff_ci95']:.1f} pp")
    if "pooled" in result:
        p = result["pooled"]
        print(f"pooled over {p['pairs']} pairs, {p['days']} (pair, day): welfare {p['welfare_diff_cny']:+.0f} ± "
              f"{p['welfare_diff_ci95']:.0f} CNY per episode, violation {p['violation_diff_pct']:+.1f} ± "
              f"{p['violation_diff_ci95']:.1f} pp")
        print(f"  t over the {p['pairs']} pairs' means instead: welfare ± {p['welfare_pairs_ci95']:.0f} CNY, "
              f"violation ± {p['violation_pairs_ci95']:.1f} pp")
    if args.by_step:
        for side in ("a", "b"):
            shares = " ".join(f"{v:4.0f}" for v in result[f"violation_by_step_{side}_pct"])
            print(f"  days violating at each step, {side.upper()}: {shares} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
