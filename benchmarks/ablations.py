"""Ablations of the agent: each variant trained (one seed or several) and evaluated on the same held-out days and
seeds as the default agent of the same training seed, reported as paired per-day differences with 95 % intervals.

    python benchmarks/ablations.py train    --out OUT [--jobs 2] [--seed S]   # OUT/runs/ablation-<name>[-seedS]/
    python benchmarks/ablations.py evaluate --out OUT [--days 30] [--seed S]  # each run's agent (cap_adaptive) only
    python benchmarks/ablations.py report   --out OUT [--seeds 0 1]           # OUT/ablations.{csv,md}

The reference of training seed S is the default agent of
``safety_while_learning.py`` with that seed (``OUT/runs/cap_adaptive-seedS``,
evaluated by ``python -m evjax.evaluate``); a difference is ablation minus
default, per day, welfare (CNY per episode) and share of steps with any
violation (%). With several seeds the report gives each seed's paired
difference and their mean, with the interval over all (seed, day) pairs:
an interval over days, not over training seeds.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safety_while_learning import train_one  # noqa: E402

ABLATIONS = {  # name -> (what changes, overrides of the default config)
    "learned_cost": ("step cost = the model's cost output, CAP u = its largest std (kappa0 19, lr 0.01, limit 6)",
                     ["planner.cost_model=learned", "planner.cost_limit=6.0", "planner.kappa_init=19.0",
                      "planner.kappa_lr=0.01", "evaluation.fixed_kappa=19.0", "evaluation.cost_limit=null",
                      "planner.constraint_backoff=[0.0, 0.0]", "evaluation.constraint_backoff=null"]),
    "disagreement_margin": ("CAP margin in member disagreement instead of each particle's predicted stds",
                            ["planner.margin_std=disagreement"]),
    "particle_noise": ("particles sample the model's predicted std along the horizon (SPEC's trajectory sampling, "
                       "30 per candidate, noise shared across candidates)", ["planner.particle_noise=true"]),
    "one_random_episode": ("random prices in the first episode only (SPEC's minimum; default 5 episodes)",
                           ["training.random_episodes=1"]),
    "epochs_5": ("the ensemble fitted 5 epochs per round (SPEC 8) instead of 30", ["model.epochs=5"]),
    "cost_limit_1": ("training cost limit 1.0 instead of 0 (more candidates feasible while learning; deployed with 0)",
                     ["planner.cost_limit=1.0"]),
    "cost_limit_01": ("training cost limit 0.1 instead of 0 (the former default; deployed with 0)",
                      ["planner.cost_limit=0.1"]),
    "no_training_backoff": ("trained without the 20 kg/MWh carbon back-off (deployed with it)",
                            ["planner.constraint_backoff=[0.0, 0.0]"]),
    "plain_cem": ("CEM without the 125 constant-price candidates and with 80 elites (the source's sampling), trained "
                  "and deployed", ["planner.constant_candidates=0", "planner.num_elites=80"]),
    "elites_80": ("80 elites instead of 5 (the constant candidates kept), trained and deployed",
                  ["planner.num_elites=80"]),
    "kappa_per_constraint": ("one kappa for the lines and one for carbon", ["planner.kappa_per_constraint=true"]),
    "full_horizon": ("horizon steps after the episode's end count", ["planner.stop_at_episode_end=false"]),
    "horizon_6": ("planning horizon 6 steps", ["planner.horizon=6"]),
    "holdout_elites": ("20 % holdout, 3 elite members of 5", ["model.holdout_fraction=0.2", "model.num_elites=3"]),
    "extra_observations": ("observation + posted prices, queues, energy backlog and arrivals per station",
                           ["env.extra_observations=[backlog, arrivals, queues, prices]"]),
    "validation_16": ("checkpoint selected on 16 validation days instead of 8", ["training.validation_days=16"]),
    "no_backoff": ("deployed without the 20 kg/MWh carbon back-off (the planner plans to 850 kg/MWh; it trained with "
                   "the back-off)", ["evaluation.constraint_backoff=[0.0, 0.0]"]),
    "no_variance_cap": ("CEM without its variance cap (samples may settle on a price bound), trained and deployed",
                        ["planner.variance_cap=false"]),
    "deploy_no_variance_cap": ("CEM without its variance cap at deployment only", ["evaluation.variance_cap=false"]),
}
METHOD = "cap_adaptive"


def reference(seed: int) -> str:
    return f"cap_adaptive-seed{seed}"


def run_dir(out: Path, name: str | None, seed: int = 0) -> Path:
    """The run of ablation ``name`` (or of the reference, ``name`` None) for training seed ``seed``."""
    if name is None:
        return out / "runs" / reference(seed)
    return out / "runs" / (f"ablation-{name}" if seed == 0 else f"ablation-{name}-seed{seed}")


def deploy_only(name: str) -> bool:
    """An ablation that changes only evaluation settings deploys the default agent itself: nothing to train."""
    return all(o.startswith("evaluation.") for o in ABLATIONS[name][1])


def train(args) -> None:
    def one(name):
        if deploy_only(name):
            return
        path = run_dir(args.out, name, args.seed)
        seconds = train_one(path, ABLATIONS[name][1] + [f"training.seed={args.seed}"], args.config,
                            path.with_name(path.name + ".log"))
        print(f"{name}: trained in {seconds:.0f} s", flush=True)

    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, args.names))


def evaluate(args) -> None:
    def one(name):
        path = run_dir(args.out, name, args.seed)
        command = [sys.executable, "-m", "evjax.evaluate", "--run-dir", str(path), "--days",
                   str(args.days), "--no-progress", "--no-plots", "--set", f"evaluation.methods=[{METHOD}]",
                   "--set", f"evaluation.reference={METHOD}"]
        if deploy_only(name):  # a copy of the default agent's run, evaluated with the ablation's settings
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(run_dir(args.out, None, args.seed), path, ignore=shutil.ignore_patterns("eval*"))
            for override in ABLATIONS[name][1]:
                command += ["--set", override]
        with path.with_name(path.name + ".eval.log").open("w") as f:
            if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"evaluation of {name} failed; see its .eval.log")

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, args.names))


def per_day(steps_csv: Path) -> dict[int, tuple[float, float]]:
    """Day -> (episode welfare, share of steps with any violation in %) of the trained agent."""
    from evjax.evaluate import read_steps

    rows = read_steps(steps_csv)[METHOD]
    days = sorted({r["day"] for r in rows})
    return {d: (sum(r["welfare"] for r in rows if r["day"] == d),
                100.0 * float(np.mean([r["cost"] > 0 for r in rows if r["day"] == d]))) for d in days}


def paired(variant: dict, reference_days: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-day welfare and violation-share differences, variant minus reference, on the days both have."""
    days = sorted(set(variant) & set(reference_days))
    return (np.array([variant[d][0] - reference_days[d][0] for d in days]),
            np.array([variant[d][1] - reference_days[d][1] for d in days]))


def summary(name: str, seed, welfare: np.ndarray, violation: np.ndarray) -> dict:
    from evjax.evaluate import _interval

    return {"ablation": name, "change": ABLATIONS[name][0], "seed": seed, "days": len(welfare),
            "welfare_diff_cny": float(welfare.mean()), "welfare_diff_ci95": _interval(welfare),
            "violation_diff_pp": float(violation.mean()), "violation_diff_ci95": _interval(violation)}


def cell(row: dict) -> str:
    return (f"{row['welfare_diff_cny']:+.0f} ± {row['welfare_diff_ci95']:.0f} CNY, "
            f"{row['violation_diff_pp']:+.1f} ± {row['violation_diff_ci95']:.1f} pp")


def report(args) -> None:
    seeds = args.seeds
    references = {seed: per_day(run_dir(args.out, None, seed) / "eval" / "steps.csv") for seed in seeds}
    rows, lines = [], []
    for name in args.names:
        per_seed = {}
        for seed in seeds:
            path = run_dir(args.out, name, seed) / "eval" / "steps.csv"
            if path.is_file():
                per_seed[seed] = paired(per_day(path), references[seed])
            else:
                print(f"{name}, seed {seed}: no evaluation ({path} missing); skipped", file=sys.stderr)
        if not per_seed:
            continue
        seed_rows = {seed: summary(name, seed, *diffs) for seed, diffs in per_seed.items()}
        rows.extend(seed_rows.values())
        if len(seeds) == 1:
            r = seed_rows[seeds[0]]
            lines.append(f"| {r['change']} | {r['welfare_diff_cny']:+.0f} ± {r['welfare_diff_ci95']:.0f} | "
                         f"{r['violation_diff_pp']:+.1f} ± {r['violation_diff_ci95']:.1f} |")
            continue
        cells = [cell(seed_rows[seed]) if seed in seed_rows else "—" for seed in seeds]
        if len(per_seed) == len(seeds):  # the mean over (seed, day) pairs
            pooled = summary(name, "all", *(np.concatenate(d) for d in zip(*per_seed.values())))
            rows.append(pooled)
            cells.append(f"**{cell(pooled)}**")
        else:
            cells.append("—")
        lines.append(f"| {ABLATIONS[name][0]} | " + " | ".join(cells) + " |")
    if not rows:
        raise SystemExit("no ablation has an evaluation")
    with (args.out / "ablations.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if len(seeds) == 1:
        head = [f"| ablation (vs the default agent, training seed {seeds[0]}) | welfare per episode (CNY, paired, "
                "95 %) | steps with any violation (pp, paired, 95 %) |", "|---|---|---|"]
    else:
        head = ["| ablation (vs the default agent of the same training seed; welfare per episode, steps with any "
                "violation; paired per day, 95 %) | " + " | ".join(f"seed {s}" for s in seeds) + " | all days |",
                "|---|" + "---|" * (len(seeds) + 1)]
    (args.out / "ablations.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("train", "evaluate", "report"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--names", nargs="+", choices=tuple(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--config", help="base config (default: the package defaults)")
    parser.add_argument("--seed", type=int, default=0, help="train/evaluate: the training seed (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="report: the training seeds (default 0)")
    args = parser.parse_args()
    {"train": train, "evaluate": evaluate, "report": report}[args.action](args)


if __name__ == "__main__":
    main()
