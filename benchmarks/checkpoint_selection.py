"""Checkpoint selection by validation against the paired training-episode score, per training seed.

    python benchmarks/checkpoint_selection.py RUN_DIR... [--baseline docs/results/epochs30_limit0.csv] [--csv OUT]

Each RUN_DIR is a run trained with ``training.best_selection: validation`` and evaluated with
``python -m evjax.evaluate --run-dir RUN_DIR --set "evaluation.methods=[fixed_upper,cap_adaptive]"
--set evaluation.reference=fixed_upper`` (30 held-out days, seeds 1000-1029). The baseline CSV holds, per
training seed, the same evaluation of the run trained with ``best_selection: paired`` (its
``epochs30_limit0_*`` columns). Validation draws no key of the run's stream, so both runs trained
identically and differ only in the checkpoint evaluated. Prints, per seed and as a mean with a 95 %
t-interval over seeds, the agent's share of held-out steps with any violation and its welfare per episode;
``--csv`` writes the per-seed rows. Where a run also holds ``eval_latest/`` (the same evaluation with
``--checkpoint latest``: the last epoch, no selection at all), both selections are paired with it as well.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from evjax import checkpoint
from evjax.evaluate import _interval

AGENT = "cap_adaptive"
BASELINE_COLUMNS = ("epochs30_limit0_violation_pct", "epochs30_limit0_welfare_cny")


def run_row(run_dir: Path) -> dict:
    """Seed, selected epoch, its validation scores and the agent's held-out figures of one run."""
    meta, cfg = checkpoint.restore_meta(run_dir, "best")
    epoch = int(meta["epoch"])
    agent = agent_figures(run_dir / "eval" / "metrics.csv")
    with (run_dir / "metrics.csv").open() as f:
        validated = next(r for r in csv.DictReader(f) if int(r["epoch"]) == epoch)
    latest = agent_figures(run_dir / "eval_latest" / "metrics.csv")
    return {"training_seed": cfg.training.seed, "epoch": epoch,
            "val_welfare_cny": float(validated["val_welfare"]), "val_cost": float(validated["val_cost"]),
            "val_violation_pct": float(validated["val_violation_pct"]),
            "violation_pct": agent[0], "welfare_cny": agent[1],
            "latest_violation_pct": latest[0], "latest_welfare_cny": latest[1]}


def agent_figures(metrics_csv: Path) -> tuple[float, float]:
    """(share of steps with any violation in %, welfare per episode) of the agent in an evaluation's metrics.csv;
    NaN when the file does not exist."""
    if not metrics_csv.is_file():
        return float("nan"), float("nan")
    with metrics_csv.open() as f:
        agent = next(r for r in csv.DictReader(f) if r["method"] == AGENT)
    return float(agent["steps_any_violation_pct"]), float(agent["welfare_cny"])


def paired_line(rows: list[dict], name: str, prefix: str, reference: str) -> str:
    """``name``: mean and 95 % t-interval over seeds of the agent's figures under ``prefix`` minus ``reference``."""
    violation = np.array([r[f"{prefix}violation_pct"] - r[f"{reference}violation_pct"] for r in rows])
    welfare = np.array([r[f"{prefix}welfare_cny"] - r[f"{reference}welfare_cny"] for r in rows])
    mean = lambda key: np.mean([r[key] for r in rows])  # noqa: E731
    return (f"{name} over {len(rows)} seeds (95 % t): violating steps {violation.mean():+.1f} ± "
            f"{_interval(violation):.1f} pp ({mean(prefix + 'violation_pct'):.1f} % against "
            f"{mean(reference + 'violation_pct'):.1f} %), welfare {welfare.mean():+.0f} ± {_interval(welfare):.0f} CNY "
            "per episode")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--baseline", type=Path, default=Path("docs/results/epochs30_limit0.csv"))
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    with args.baseline.open() as f:
        baseline = {int(r["training_seed"]): r for r in csv.DictReader(f)}
    rows = []
    for run in args.runs:
        row = run_row(run)
        if row["training_seed"] not in baseline:
            print(f"{args.baseline}: no row for training seed {row['training_seed']} ({run})", file=sys.stderr)
            return 2
        paired = baseline[row["training_seed"]]
        row["paired_violation_pct"], row["paired_welfare_cny"] = (float(paired[c]) for c in BASELINE_COLUMNS)
        rows.append(row)
    rows.sort(key=lambda r: r["training_seed"])
    print("| training seed | selected epoch | on the validation days: welfare, cost, steps violating | held-out steps "
          "violating (paired selection; last epoch) | held-out welfare, CNY (paired selection; last epoch) |")
    print("|---|---|---|---|---|")
    for r in rows:
        latest = np.isfinite(r["latest_violation_pct"])
        last_v = f"; {r['latest_violation_pct']:.1f} %" if latest else ""
        last_w = f"; {r['latest_welfare_cny']:.0f}" if latest else ""
        print(f"| {r['training_seed']} | {r['epoch']} | {r['val_welfare_cny']:.0f} CNY, {r['val_cost']:.3f}, "
              f"{r['val_violation_pct']:.1f} % | {r['violation_pct']:.1f} % ({r['paired_violation_pct']:.1f} %{last_v}) | "
              f"{r['welfare_cny']:.0f} ({r['paired_welfare_cny']:.0f}{last_w}) |")
    print("\n" + paired_line(rows, "validation − paired selection", "", "paired_"))
    with_latest = [r for r in rows if np.isfinite(r["latest_violation_pct"])]
    if with_latest:
        print(paired_line(with_latest, "validation selection − last epoch", "", "latest_"))
        print(paired_line(with_latest, "paired selection − last epoch", "paired_", "latest_"))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
