"""Train the CAP agent on the real environment: ``python -m evjax.train`` (SPEC 11).

Host side, not jittable. Each epoch is one episode on a training day. Prices
are uniform random in the first ``training.random_episodes`` episodes and until
the first model fit (exploration: the model learns which way prices move the
load from data that does not follow one plan); the ensemble is refitted on all
data every ``training.model_train_freq`` steps; the planner runs every step
after that; kappa is updated after every episode the planner acted in. After
every epoch the whole run state goes to the "latest" orbax checkpoint, and to
"best" when the episode was planned and its score is the highest so far among
episodes with cost <= ``training.best_cost_threshold``.
The score (``training.best_selection: paired``) is the episode reward minus
that of fixed mid-range prices on the same day and seed, so a busy day does
not win by being busy. With ``best_selection: validation`` the planner as it
would be deployed (``agent.deployed_planner``) is run every
``training.validation_every`` epochs on the same ``training.validation_days``
training days and seeds, and "best" is the validated checkpoint ranked as the
planner ranks candidates (``validation_score``). After each episode the model it planned with predicts
the episode's transitions (``evjax.diagnostics``): prediction errors go to
``metrics.csv``, predicted and realised step costs to ``calibration.csv``.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from evjax import checkpoint, replay
from evjax.cli import config_from_args, entry_point, make_parser
from evjax.config import Config, load as load_config, save as save_config, to_dict
from evjax.errors import ConfigError, UserError

CONFIG_FILE = "config.yaml"  # the resolved config, written before anything else of a run
ERROR_COLUMNS = tuple(f"err_{h}_{q}" for h in ("1step", "horizon") for q in ("loading", "carbon", "welfare")) + (
    "err_1step_cost",)


def episode_seed(cfg: Config, epoch: int) -> int:
    """Seed of the training episode of ``epoch``: its day, arrivals and choices depend on nothing else."""
    return int(np.random.SeedSequence([cfg.training.seed, epoch]).generate_state(1)[0])


INFEASIBLE = -1e9  # validation_score below every checkpoint whose validation cost is permissible


def validation_score(welfare: float, cost: float, permissible: float) -> float:
    """Rank of a validated checkpoint, by the planner's elite rule (``planner.elite_scores``): its mean episode
    welfare when its mean episode cost is at most ``permissible``, else below all of those, lower cost first."""
    return float(welfare) if cost <= permissible else INFEASIBLE - float(cost)


def constant_price_episode(env, cfg: Config, epoch: int, prices) -> tuple[float, float, float]:
    """(reward, true cost, welfare in CNY) summed over the training episode of ``epoch`` on ``env`` with ``prices``
    [A] posted at every step (the paired score's baseline, ``benchmarks/safety_floor.py``)."""
    env.reset(seed=episode_seed(cfg, epoch), options={"split": "train"})
    reward_sum = cost = welfare = 0.0
    for _ in range(cfg.env.episode_steps):
        _, reward, terminated, truncated, info = env.step(prices)
        reward_sum += float(reward)
        cost += info["cost"]
        welfare += info["welfare"]
        if terminated or truncated:
            break
    return reward_sum, cost, welfare


@dataclasses.dataclass
class Components:
    """The pieces of a run built from a config: environment, model functions, agent."""

    env: object
    dynamics: object
    agent: object


def build(cfg: Config) -> Components:
    """Environment, dynamics model and agent for ``cfg`` (host side)."""
    from evjax.agent import Agent
    from evjax.dynamics import make_dynamics
    from evjax.env import EVPricingEnv
    from evjax.planner import make_model_planner

    env = EVPricingEnv(cfg)
    dynamics = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    agent = Agent(cfg.planner, make_model_planner(cfg, dynamics))
    return Components(env, dynamics, agent)


class Trainer:
    """One training run: state, loop, checkpoints and metrics in ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: Path, metrics: bool = True):
        from evjax.metrics import MetricsLog

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.parts = build(cfg)
        key = jax.random.key(cfg.training.seed)
        key, init_key = jax.random.split(key)
        capacity = cfg.training.epochs * cfg.env.episode_steps
        self.state = {
            "model": self.parts.dynamics.init(init_key),
            "agent": self.parts.agent.state(),
            "buffer": replay.empty(capacity, cfg.obs_dim, cfg.action_dim),
            "key": jax.random.key_data(key),
            "epoch": np.asarray(-1, np.int64),  # last completed epoch
            "best_reward": np.asarray(-np.inf, np.float64),
        }
        self.log = MetricsLog(self.run_dir) if metrics else None
        self.calibration = MetricsLog(self.run_dir, tensorboard=False, name="calibration.csv") if metrics else None
        self._side_env = None  # a second environment for the paired score's baseline and validation
        self._validator = None  # (planner config, planner, day ids) of validation, built on first use

    def resume(self) -> int:
        """Load "latest" (if the run got that far; else start afresh); return the first epoch still to run.

        Metrics rows of epochs after the checkpoint are dropped: those epochs run
        again and give the same rows.
        """
        done = -1
        if checkpoint.exists(self.run_dir, "latest"):
            self.state = checkpoint.restore(self.run_dir, "latest", self.state)
            self.parts.agent.restore(self.state["agent"])
            done = int(self.state["epoch"])
        self.log.load(up_to_epoch=done)
        self.calibration.load(up_to_epoch=done)
        return done + 1

    def _next_key(self):
        key, sub = jax.random.split(jax.random.wrap_key_data(self.state["key"]))
        self.state["key"] = np.asarray(jax.random.key_data(key))
        return sub

    def _fit(self) -> dict:
        obs, action, reward, cost, next_obs = replay.contents(self.state["buffer"])
        model, metrics = self.parts.dynamics.fit(self._next_key(), self.state["model"], obs, action, reward, cost,
                                                 next_obs)
        self.state["model"] = model
        self.parts.agent.mark_fitted()
        return metrics

    def _planning_model(self):
        """The members the planner uses (the elites after a holdout fit); None before the first fit."""
        return self.parts.dynamics.select_elites(self.state["model"]) if self.parts.agent.fitted else None

    def reference_reward(self, epoch: int) -> float:
        """Episode reward of fixed mid-range prices on the day and seed of ``epoch`` (the paired score's baseline).

        Runs on a second environment, so the training episode's state is untouched.
        """
        prices = (np.asarray(self.cfg.env.price_lower) + np.asarray(self.cfg.env.price_upper)) / 2.0
        return constant_price_episode(self.side_env(), self.cfg, epoch, prices)[0]

    def side_env(self):
        """An environment beside the training one (its state is not the training episode's)."""
        from evjax.env import EVPricingEnv

        if self._side_env is None:
            self._side_env = EVPricingEnv(self.cfg)
        return self._side_env

    def validation_due(self, epoch: int, planned: bool) -> bool:
        """Whether ``epoch``'s checkpoint is validated under ``best_selection: validation``."""
        t = self.cfg.training
        return planned and ((epoch + 1) % t.validation_every == 0 or epoch == t.epochs - 1)

    def validate(self, model) -> dict:
        """The deployed planner with the current model and kappa on the validation days (host env, all days at once).

        Returns the mean episode welfare (CNY) and cost, and the share of steps with any violation (%). The days
        and seeds are fixed, and no key of the training stream is drawn: validating leaves the run unchanged.
        """
        from evjax.agent import Agent, deployed_planner
        from evjax.evaluate import PlannerPolicy, run_planner_days, spread_day_ids
        from evjax.planner import make_model_planner

        cfg = self.cfg
        if self._validator is None:
            planner_cfg = deployed_planner(cfg.planner, cfg.evaluation)
            planner = make_model_planner(dataclasses.replace(cfg, planner=planner_cfg), self.parts.dynamics)
            self._validator = (planner_cfg, planner, spread_day_ids(cfg, "train", cfg.training.validation_days))
        planner_cfg, planner, day_ids = self._validator
        seeds = [cfg.training.validation_seed + i for i in range(len(day_ids))]
        policy = PlannerPolicy(Agent(planner_cfg, planner, kappa=self.parts.agent.kappa), model)
        rows = run_planner_days(self.side_env(), policy, "train", day_ids, seeds)
        return {"val_welfare": sum(r["welfare"] for r in rows) / len(day_ids),
                "val_cost": sum(r["cost"] for r in rows) / len(day_ids),
                "val_violation_pct": 100.0 * float(np.mean([r["cost"] > 0 for r in rows]))}

    def run_epoch(self, epoch: int) -> dict:
        """One episode: act, store, refit on schedule; then diagnose the model, update kappa and checkpoint."""
        from evjax.diagnostics import episode_diagnostics

        cfg, env, agent = self.cfg, self.parts.env, self.parts.agent
        start = time.perf_counter()
        obs, _ = env.reset(seed=episode_seed(cfg, epoch), options={"split": "train"})
        agent.reset_episode()
        episode_reward = episode_cost = line_cost = carbon_cost = 0.0
        plan_seconds, diagnostics, losses = [], [], []
        first_row = int(self.state["buffer"]["size"])  # this episode's transitions follow in the buffer
        model = episode_model = self._planning_model()
        kappa_planned = agent.kappa
        explore = epoch < cfg.training.random_episodes
        held = None  # the episode's random prices with training.random_hold "episode"
        for _ in range(cfg.env.episode_steps):
            tic = time.perf_counter()
            action = agent.act(self._next_key(), model, obs, explore=explore)
            if explore and cfg.training.random_hold == "episode":
                held = action if held is None else held
                action = held
            if agent.last_diagnostics is not None:
                plan_seconds.append(time.perf_counter() - tic)
                diagnostics.append(agent.last_diagnostics)
            next_obs, reward, terminated, truncated, info = env.step(action)
            replay.add(self.state["buffer"], obs, action, reward, info["cost"], next_obs)
            episode_reward += float(reward)
            episode_cost += float(info["cost"])
            line_cost += float(np.nan_to_num(info["cost_line"]))
            carbon_cost += float(np.nan_to_num(info["cost_carbon"]))
            if int(self.state["buffer"]["size"]) % cfg.training.model_train_freq == 0:
                losses.append(float(self._fit()["train_loss"]))
                model = self._planning_model()
            obs = next_obs
            if terminated or truncated:
                break
        planned = bool(diagnostics)  # the planner acted in this episode (not random exploration)
        kappa_used = agent.kappa_log()
        if planned:  # kappa adapts to the planner's episodes only
            agent.end_episode(episode_cost, (line_cost, carbon_cost))
        kappa_next = agent.kappa_log()
        self.state["agent"] = agent.state()
        self.state["epoch"] = np.asarray(epoch, np.int64)
        reference = self.reference_reward(epoch)
        errors, calibration = {name: float("nan") for name in ERROR_COLUMNS}, []
        if episode_model is not None:
            errors, calibration = episode_diagnostics(cfg, self.parts.dynamics, episode_model, kappa_planned,
                                                      *[x[first_row:] for x in replay.contents(self.state["buffer"])])
        row = {
            "epoch": epoch,
            "reward": episode_reward,
            "reference_reward": reference,
            "paired_reward": episode_reward - reference,
            "cost": episode_cost,
            "cost_line": line_cost,
            "cost_carbon": carbon_cost,
            "kappa": kappa_used["kappa"],
            "kappa_next": kappa_next["kappa"],
            "kappa_line": kappa_next.get("kappa_line", kappa_next["kappa"]),
            "kappa_carbon": kappa_next.get("kappa_carbon", kappa_next["kappa"]),
            "model_loss": losses[-1] if losses else float("nan"),
            **errors,
            **{name: float(np.mean([d[name] for d in diagnostics])) if diagnostics else float("nan")
               for name in ("feasible_fraction", "uncertainty_penalty", "elite_reward", "elite_cost")},
            "planned_steps": len(diagnostics),
            "date": env.scenario.date,
            "plan_ms": 1000.0 * float(np.median(plan_seconds)) if plan_seconds else float("nan"),
            "epoch_seconds": time.perf_counter() - start,
        }
        validation = dict.fromkeys(("val_welfare", "val_cost", "val_violation_pct"), float("nan"))
        if cfg.training.best_selection == "validation":
            is_best = False
            if self.validation_due(epoch, planned):
                validation = self.validate(model)
                score = validation_score(validation["val_welfare"], validation["val_cost"],
                                         cfg.planner.permissible_episode_cost)
                is_best = score > float(self.state["best_reward"])
        else:
            score = row["paired_reward"] if cfg.training.best_selection == "paired" else episode_reward
            is_best = (planned and episode_cost <= cfg.training.best_cost_threshold
                       and score > float(self.state["best_reward"]))
        row.update(validation)
        if is_best:
            self.state["best_reward"] = np.asarray(score, np.float64)
        # Order matters for a kill at any moment: the CSV rows and "best" are rewritten
        # identically when an epoch without a "latest" checkpoint is run again.
        self.log.append(row)
        for entry in calibration:
            self.calibration.append({"epoch": epoch, **entry})
        if is_best:
            checkpoint.save(self.run_dir, "best", epoch, self.state, cfg, {"reward": episode_reward,
                                                                          "cost": episode_cost})
        checkpoint.save(self.run_dir, "latest", epoch, self.state, cfg)
        return row

    def train(self, start_epoch: int = 0, progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        bar = tqdm(range(start_epoch, self.cfg.training.epochs), initial=start_epoch, total=self.cfg.training.epochs,
                   desc="train", unit="epoch", disable=not progress, file=sys.stderr)
        rows = []
        for epoch in bar:
            row = self.run_epoch(epoch)
            rows.append(row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", cost=f"{row['cost']:.2f}", kappa=f"{row['kappa_next']:.2f}")
        self.log.close()
        self.calibration.close()
        return rows


def _config_differences(a: Config, b: Config) -> list[str]:
    da, db = to_dict(a), to_dict(b)
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s][k]]


def _saved_config(run_dir: Path) -> Config:
    """The config a run saved in ``run_dir``: its "latest" checkpoint's, else the ``config.yaml`` written at its start.

    A run killed before its first checkpoint has only the latter.
    """
    if checkpoint.exists(run_dir, "latest"):
        return checkpoint.restore_meta(run_dir, "latest")[1]
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir / 'checkpoints' / 'latest'}: no checkpoint found, and no {CONFIG_FILE} "
                        "of a started run")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError(f"{path}: saved config unusable ({exc})") from None


def resolve_run(args, cfg: Config) -> tuple[Path, Config]:
    """The run directory and config; on ``--resume`` the run's saved config rules."""
    if args.resume:
        if args.run_dir is None:
            raise UserError("--resume needs --run-dir")
        run_dir = Path(args.run_dir)
        stored = _saved_config(run_dir)
        if args.config is not None or args.overrides:
            differing = _config_differences(stored, cfg)
            if differing:
                raise UserError(f"{run_dir}: config key '{differing[0]}' differs from the run's saved config "
                                f"({len(differing)} key(s) differ); resume without --config/--set or start a new run")
        return run_dir, stored
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        if checkpoint.exists(run_dir, "latest") or (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --run-dir")
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.training.run_root) / stamp
        suffix = 1
        while run_dir.exists():
            run_dir = Path(cfg.training.run_root) / f"{stamp}-{suffix}"
            suffix += 1
        print(f"run directory: {run_dir}", file=sys.stderr)
    return run_dir, cfg


def start(cfg: Config, run_dir: Path) -> Trainer:
    """Create ``run_dir`` holding ``config.yaml`` first, so that a run killed at any later moment can resume.

    A config whose environment cannot be built (say, a feeder whose power flow
    diverges) raises its ``ConfigError`` with the directory removed again.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    try:
        return Trainer(cfg, run_dir)
    except (ConfigError, UserError):
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        raise


@entry_point("evjax.train")
def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("evjax.train", "Train the CAP pricing agent (SPEC 11).")
    parser.add_argument("--run-dir", metavar="DIR", help="where checkpoints and metrics go (default: runs/<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest checkpoint (from epoch 0 if it has none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    run_dir, cfg = resolve_run(args, cfg)
    if args.resume:
        trainer = Trainer(cfg, run_dir)
        first_epoch = trainer.resume()
    else:
        trainer = start(cfg, run_dir)
        first_epoch = 0
    wall = time.perf_counter()
    rows = trainer.train(first_epoch, progress=not args.no_progress)
    if rows:
        last = rows[-1]
        print(f"trained epochs {first_epoch}..{last['epoch']} in {time.perf_counter() - wall:.1f} s; last reward "
              f"{last['reward']:.3f}, cost {last['cost']:.3f}, kappa {last['kappa_next']:.3f}; run dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
