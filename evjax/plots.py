"""PNG plots of an evaluation and of the training curves (host side, matplotlib Agg)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evjax.config import Config  # noqa: E402


def busiest_day(per_method: dict[str, list[dict]]) -> int:
    """The evaluation day with the highest line loading seen by any method: where the constraint matters."""
    rows = [r for method_rows in per_method.values() for r in method_rows]
    return max(rows, key=lambda r: float(np.nanmax(r["line_loading"])))["day"]


def _day_rows(rows: list[dict], day: int) -> list[dict]:
    return [r for r in rows if r["day"] == day]


def _per_station(out: Path, per_method: dict, key: str, ylabel: str, filename: str, cfg: Config, limit=None):
    k = cfg.num_stations
    day = busiest_day(per_method)
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.2), sharex=True)
    for method, rows in per_method.items():
        rows = _day_rows(rows, day)
        steps = [r["step"] for r in rows]
        values = np.array([r[key] for r in rows])
        for s in range(k):
            axes[s].plot(steps, values[:, s], marker=".", label=method)
    for s in range(k):
        axes[s].set_title(f"CS{s + 1}")
        axes[s].set_xlabel("step (15 min)")
        if limit is not None:
            axes[s].axhline(limit[s] if np.ndim(limit) else limit, color="k", ls="--", lw=1)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{rows[0]['date']} (the evaluation day with the highest line loading)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / filename, dpi=90)
    plt.close(fig)


def _scalar(out: Path, per_method: dict, key: str, ylabel: str, filename: str, limit=None):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    day = busiest_day(per_method)
    for method, rows in per_method.items():
        rows = _day_rows(rows, day)
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".", label=method)
    if limit is not None:
        ax.axhline(limit, color="k", ls="--", lw=1, label="limit")
    ax.set_xlabel("step (15 min)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{rows[0]['date']} (the evaluation day with the highest line loading)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / filename, dpi=90)
    plt.close(fig)


def evaluation_plots(out: Path, per_method: dict[str, list[dict]], cfg: Config) -> list[Path]:
    """Prices, EVs, line loading vs the limit, the constrained carbon intensity vs its limit and welfare, busiest day."""
    _per_station(out, per_method, "price", "posted price (CNY/kWh)", "prices.png", cfg)
    _per_station(out, per_method, "evs_present", "EVs at station", "evs.png", cfg)
    _per_station(out, per_method, "line_loading", "line loading (fraction of rating)", "line_loading.png", cfg,
                 limit=cfg.grid.loading_limit)
    measure = {"ev_charging": "EV-charging", "system": "system"}[cfg.carbon.constraint]
    _scalar(out, per_method, "carbon_intensity", f"{measure} carbon intensity (kg/MWh)", "carbon_intensity.png",
            limit=cfg.carbon.limit)
    _scalar(out, per_method, "welfare", "social welfare per step (CNY)", "welfare.png")
    return [out / n for n in ("prices.png", "evs.png", "line_loading.png", "carbon_intensity.png", "welfare.png")]


def _read_csv(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def welfare_vs_violations(png: Path, summaries: list[dict], cfg: Config) -> Path:
    """Every run on welfare against the share of steps with any violation, with 95 % intervals.

    Left: each run's own per-day mean (welfare interval over days); right: the
    paired per-day difference to ``evaluation.reference``, both axes with intervals.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summaries:
        label = f"{s['method']} ({s['simulator']})"
        axes[0].errorbar(s["steps_any_violation_pct"], s["welfare_cny"], yerr=_finite(s["welfare_ci95"]),
                         marker="o", capsize=3, ls="none", label=label)
        axes[1].errorbar(s["violation_diff_pct"], s["welfare_diff_cny"], xerr=_finite(s["violation_diff_ci95"]),
                         yerr=_finite(s["welfare_diff_ci95"]), marker="o", capsize=3, ls="none", label=label)
    axes[0].set_xlabel("steps with any violation (%)")
    axes[0].set_ylabel("welfare per episode (CNY)")
    axes[1].set_xlabel(f"violation steps minus {cfg.evaluation.reference} (percentage points)")
    axes[1].set_ylabel(f"welfare minus {cfg.evaluation.reference} (CNY per episode)")
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].axvline(0.0, color="k", lw=0.8)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{summaries[0]['days']} day(s); bars: 95 % t-intervals over days", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def _finite(ci: float) -> float:
    return 0.0 if not np.isfinite(ci) else ci


def training_curves(metrics_csv: Path, png: Path, cfg: Config) -> Path | None:
    """Per epoch: episode reward and its paired score, cost (with the permissible cost), kappa, model errors."""
    rows = _read_csv(metrics_csv)
    if not rows:
        return None
    epoch = [int(r["epoch"]) for r in rows]
    column = lambda key: [float(r[key]) for r in rows]  # noqa: E731
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    axes = axes.ravel()
    axes[0].plot(epoch, column("reward"), marker=".", label="episode")
    if "paired_reward" in rows[0]:
        axes[0].plot(epoch, column("paired_reward"), marker=".", label="minus fixed mid prices, same day")
    axes[0].set_ylabel("episode reward (SW / 600)")
    axes[0].legend(fontsize=7)
    axes[1].plot(epoch, column("cost"), marker=".", label="total")
    for key, label in (("cost_line", "lines"), ("cost_carbon", "carbon")):
        if key in rows[0]:
            axes[1].plot(epoch, column(key), lw=1, alpha=0.7, label=label)
    validated = [r for r in rows if np.isfinite(float(r.get("val_cost", "nan") or "nan"))]
    if validated:  # training.best_selection "validation": the deployed planner's mean cost on the validation days
        axes[1].plot([int(r["epoch"]) for r in validated], [float(r["val_cost"]) for r in validated], "ks",
                     ms=4, label="deployed, validation days")
    axes[1].axhline(cfg.planner.permissible_episode_cost, color="k", ls="--", lw=1, label="permissible")
    axes[1].set_ylabel("episode constraint cost")
    axes[1].legend(fontsize=7)
    if "kappa_line" in rows[0] and cfg.planner.kappa_per_constraint:
        axes[2].plot(epoch, column("kappa_line"), marker=".", label="line")
        axes[2].plot(epoch, column("kappa_carbon"), marker=".", label="carbon")
        axes[2].legend(fontsize=7)
    else:
        axes[2].plot(epoch, column("kappa_next"), marker=".")
    axes[2].set_ylabel("kappa after the episode")
    panels = (("loading", "line loading RMSE (fraction)"), ("carbon", "carbon measure RMSE (kg/MWh)"),
              ("welfare", "welfare RMSE (CNY/step)"))
    for ax, (quantity, label) in zip(axes[3:], panels):
        for horizon in ("1step", "horizon"):
            key = f"err_{horizon}_{quantity}"
            if key in rows[0]:
                ax.plot(epoch, column(key), marker=".", label={"1step": "one step", "horizon": "12-step rollout"}[horizon])
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        ax.set_title("model error on the episode's own (unseen) steps", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def cost_calibration(calibration_csv: Path, png: Path) -> Path | None:
    """Predicted step cost (without and with the CAP margin) against the realised cost, per executed step."""
    rows = _read_csv(calibration_csv)
    if not rows:
        return None
    realised = np.array([float(r["realised_cost"]) for r in rows])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for key, label in (("predicted_cost", "predicted"), ("predicted_cost_margin", "predicted + CAP margin")):
        ax.scatter(realised, [float(r[key]) for r in rows], s=6, alpha=0.5, label=label)
    top = float(max(np.max(realised), 1e-3))
    ax.plot([0, top], [0, top], color="k", lw=1, ls="--", label="perfect")
    ax.set_xlabel("realised step cost")
    ax.set_ylabel("predicted step cost (executed action)")
    ax.set_title("cost calibration over training (model of the episode, unseen steps)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
