"""Safety while learning (the CAP paper's claim, SPEC 12): every planner variant trained from scratch, several seeds.

Trains unconstrained CEM, CCEM, CAP with fixed kappa and CAP with adaptive
kappa with ``python -m evjax.train`` (same config, same training days per
seed: a run's days depend only on ``training.seed``), ``--jobs`` runs at a
time, then writes

* ``safety_while_learning.csv``: per variant, seed and epoch the true episode
  cost, its cumulative sum, the episode welfare (CNY) and kappa;
* ``safety_while_learning.json``: per variant the mean over seeds of the
  cumulative cost over training and of the welfare over the last 10 epochs,
  each as a ratio to unconstrained CEM's with Fieller's 95 % set (the seeds
  paired, ``evjax.evaluate.ratio_interval``), each run's training seconds
  (kept in its ``done`` file) and the wall time of the call (null when it
  trained nothing);
* ``safety_while_learning.png``: cumulative cost and welfare per epoch, mean
  and range over seeds per variant.

    python benchmarks/safety_while_learning.py --out docs/results --jobs 2 [--seeds 0 1 2] [--set planner.popsize=200]

The runs stay under ``OUT/runs/<variant>-seed<k>`` (evaluate them with
``python -m evjax.evaluate --run-dir ...``); a finished run is not trained
again, a killed one resumes. ``--take cem=FILE`` reads a variant's rows from an
earlier ``safety_while_learning.csv`` instead of training it: only for a
variant whose training the changed settings do not touch (README "Results"
says where it was used and why).

Only the training trajectory is read here, and validating a checkpoint draws
no key of the run's stream (``tests/test_safety.py``), so ``--set
training.best_selection=reward`` gives the same CSV rows in about half the
time (no validation days are planned); the runs' "best" checkpoint is then the
highest-reward episode's, so evaluate such runs with ``--checkpoint latest``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> overrides of the training config
    "cem": ["planner.mode=unconstrained"],
    "ccem": ["planner.mode=ccem"],
    "cap_fixed": ["planner.mode=cap", "planner.learn_kappa=false"],
    "cap_adaptive": ["planner.mode=cap", "planner.learn_kappa=true"],
}
LABELS = {"cem": "CEM, rewards only", "ccem": "CCEM", "cap_fixed": "CAP, fixed kappa",
          "cap_adaptive": "CAP, adaptive kappa"}
LAST_EPOCHS = 10


def train_one(run_dir: Path, overrides: list[str], config: str | None, log: Path) -> float:
    """Train (or resume) one run in a subprocess; returns its wall seconds, for a finished run those its ``done``
    file recorded (NaN if it holds none). Raises if it fails."""
    command = [sys.executable, "-m", "evjax.train", "--run-dir", str(run_dir), "--no-progress"]
    if run_dir.exists():
        if (run_dir / "done").is_file():
            try:
                return float((run_dir / "done").read_text())
            except ValueError:
                return float("nan")
        command.append("--resume")
    else:
        if config:
            command += ["--config", config]
        for override in overrides:
            command += ["--set", override]
    tic = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode != 0:
        raise RuntimeError(f"{run_dir}: training failed (exit {result.returncode}); see {log}")
    seconds = time.perf_counter() - tic
    (run_dir / "done").write_text(f"{seconds:.1f}\n")
    return seconds


def read_metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def collect(out: Path, variants: list[str], seeds: list[int], reward_scale: float) -> list[dict]:
    rows = []
    for variant in variants:
        for seed in seeds:
            cumulative = 0.0
            for r in read_metrics(out / "runs" / f"{variant}-seed{seed}"):
                cost = float(r["cost"])
                cumulative += cost
                rows.append({"variant": variant, "seed": seed, "epoch": int(r["epoch"]), "cost": cost,
                             "cumulative_cost": cumulative, "welfare_cny": float(r["reward"]) * reward_scale,
                             "kappa": float(r["kappa"])})
    return rows


def read_taken(path: Path, variant: str, seeds: list[int]) -> list[dict]:
    """``variant``'s rows of an earlier CSV (``--take``), every seed present."""
    with path.open() as f:
        rows = [{"variant": r["variant"], "seed": int(r["seed"]), "epoch": int(r["epoch"]), "cost": float(r["cost"]),
                 "cumulative_cost": float(r["cumulative_cost"]), "welfare_cny": float(r["welfare_cny"]),
                 "kappa": float(r["kappa"])} for r in csv.DictReader(f) if r["variant"] == variant]
    missing = sorted(set(seeds) - {r["seed"] for r in rows})
    if missing:
        raise SystemExit(f"{path}: no rows of {variant} for seed(s) {missing}")
    return [r for seed in seeds for r in rows if r["seed"] == seed]


def summarise(rows: list[dict], variants: list[str], seeds: list[int]) -> dict:
    summary = {}
    for variant in variants:
        total, last = [], []
        for seed in seeds:
            run = [r for r in rows if r["variant"] == variant and r["seed"] == seed]
            total.append(run[-1]["cumulative_cost"])
            last.append(float(np.mean([r["welfare_cny"] for r in run[-LAST_EPOCHS:]])))
        summary[variant] = {"cumulative_cost_mean": float(np.mean(total)), "cumulative_cost_per_seed": total,
                            "last10_welfare_mean": float(np.mean(last)), "last10_welfare_per_seed": last}
    if "cem" in summary:
        from evjax.evaluate import ratio_interval

        cem = summary["cem"]
        for variant, s in summary.items():
            s["cost_ratio_to_cem"] = s["cumulative_cost_mean"] / cem["cumulative_cost_mean"]
            s["welfare_ratio_to_cem"] = s["last10_welfare_mean"] / cem["last10_welfare_mean"]
            if len(seeds) > 1:  # Fieller's 95 % set of the ratio of the means, the seeds paired
                for key, per_seed in (("cost", "cumulative_cost_per_seed"), ("welfare", "last10_welfare_per_seed")):
                    interval = ratio_interval(np.array(s[per_seed]), np.array(cem[per_seed]))
                    s[f"{key}_ratio_interval"] = {"low": interval.low, "high": interval.high, "kind": interval.kind}
    return summary


def ratio_text(s: dict, key: str) -> str:
    """'0.655 x CEM [0.29, 0.84]': the ratio to CEM with its Fieller set where there is one."""
    text = f"{s.get(f'{key}_ratio_to_cem', float('nan')):.3f} x CEM"
    interval = s.get(f"{key}_ratio_interval")
    if interval is None:
        return text
    if interval["kind"] == "bounded":
        return f"{text} [{interval['low']:.2f}, {interval['high']:.2f}]"
    return f"{text} (95 % set unbounded)"


def plot(rows: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant in variants:
        seeds = sorted({r["seed"] for r in rows if r["variant"] == variant})
        for ax, key in zip(axes, ("cumulative_cost", "welfare_cny")):
            curves = np.array([[r[key] for r in rows if r["variant"] == variant and r["seed"] == s] for s in seeds])
            epochs = np.arange(curves.shape[1])
            line, = ax.plot(epochs, curves.mean(axis=0), label=LABELS[variant])
            ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="training epoch (episode)", ylabel="cumulative true constraint cost",
                title="Constraint cost while learning")
    axes[1].set(xlabel="training epoch (episode)", ylabel="episode welfare (CNY)", title="Welfare while learning")
    axes[0].legend()
    fig.suptitle(f"mean and range over {len({r['seed'] for r in rows})} training seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--config", help="base config of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override of every run (repeatable)")
    parser.add_argument("--take", action="append", default=[], metavar="VARIANT=CSV",
                        help="a variant's rows from an earlier safety_while_learning.csv instead of training it")
    args = parser.parse_args()
    taken, taken_from = {}, {}
    for item in args.take:
        variant, _, path = item.partition("=")
        if variant not in VARIANTS or not Path(path).is_file():
            parser.error(f"--take {item}: needs VARIANT=CSV with VARIANT one of {', '.join(VARIANTS)} and an "
                         "existing file")
        taken[variant], taken_from[variant] = read_taken(Path(path), variant, args.seeds), path
    from evjax.config import load

    cfg = load(args.config, args.overrides)  # fails early, naming a bad key
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants if variant not in taken]
    trains = any(not (args.out / "runs" / f"{v}-seed{s}" / "done").is_file() for v, s in jobs)
    tic = time.perf_counter()

    def run(job):
        variant, seed = job
        run_dir = args.out / "runs" / f"{variant}-seed{seed}"
        overrides = args.overrides + VARIANTS[variant] + [f"training.seed={seed}"]
        seconds = train_one(run_dir, overrides, args.config, args.out / "runs" / f"{variant}-seed{seed}.log")
        print(f"{variant} seed {seed}: {seconds:.0f} s", flush=True)
        return seconds

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        run_seconds = list(pool.map(run, jobs))
    wall = time.perf_counter() - tic if trains else None  # None: every run had finished before this call
    rows = [row for variant in args.variants for row in (
        taken[variant] if variant in taken else collect(args.out, [variant], args.seeds, cfg.env.reward_scale))]
    with (args.out / "safety_while_learning.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"wall_seconds": wall, "run_seconds": dict(zip([f"{v}-seed{s}" for v, s in jobs], run_seconds)),
               "jobs": args.jobs, "overrides": args.overrides, "taken": taken_from,
               "variants": summarise(rows, args.variants, args.seeds)}
    (args.out / "safety_while_learning.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, args.variants, args.out / "safety_while_learning.png")
    for variant, s in summary["variants"].items():
        print(f"{variant:13s} cumulative cost {s['cumulative_cost_mean']:.3f} ({ratio_text(s, 'cost')}), "
              f"last-{LAST_EPOCHS} welfare {s['last10_welfare_mean']:.0f} CNY ({ratio_text(s, 'welfare')})")
    print(f"wall time {wall:.0f} s with {args.jobs} job(s)" if wall is not None else
          "wall time: nothing trained in this call (each run's own seconds are above)")


if __name__ == "__main__":
    main()
