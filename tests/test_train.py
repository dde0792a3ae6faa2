"""End-to-end: smoke training, kill-and-resume, checkpoint errors, evaluation (subprocesses, smoke config)."""

import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evjax.metrics import WALL_TIME_COLUMNS
from tests.conftest import ROOT

SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _train(run_dir, *extra, env=None, check=True):
    cmd = [sys.executable, "-m", "evjax.train", "--config", SMOKE, "--run-dir", str(run_dir), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in WALL_TIME_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    _train(run_dir, env=env)
    return run_dir


def test_smoke_training_writes_metrics_and_checkpoints(trained):
    rows = _rows(trained)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("reward", "cost", "kappa", "kappa_next", "model_loss", "feasible_fraction"):
            assert key in row
    # the first training.random_episodes (2) episodes post random prices; later ones plan on the fitted model
    assert [float(r["planned_steps"]) for r in rows] == [0, 0, 12]
    assert (trained / "checkpoints" / "latest").is_dir()
    assert (trained / "config.yaml").is_file()
    assert any((trained / "tensorboard").iterdir())


def test_kappa_follows_the_episode_cost(trained):
    """kappa after each planned episode = one Adam step on -kappa * (C - C_perm) from the logged costs, clipped at 0;
    a random exploration episode leaves it alone."""
    import jax.numpy as jnp
    import optax

    from evjax.config import load

    cfg = load(SMOKE).planner
    optimizer = optax.adam(cfg.kappa_lr)
    kappa = jnp.asarray(cfg.kappa_init, jnp.float32)
    opt_state = optimizer.init(kappa)
    for row in _rows(trained):
        assert float(row["kappa"]) == pytest.approx(float(kappa), abs=1e-4)
        if float(row["planned_steps"]) == 0:
            assert float(row["kappa_next"]) == float(row["kappa"])
            continue
        gradient = jnp.asarray(-(float(row["cost"]) - cfg.permissible_episode_cost), jnp.float32)
        updates, opt_state = optimizer.update(gradient, opt_state, kappa)
        kappa = jnp.maximum(optax.apply_updates(kappa, updates), 0.0)
        assert float(row["kappa_next"]) == pytest.approx(float(kappa), abs=1e-4)


def test_resume_errors_name_the_problem(trained, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = _train(tmp_path / "absent", "--resume", env=env, check=False)
    assert proc.returncode == 2 and "absent" in proc.stderr and "Traceback" not in proc.stderr
    proc = _train(trained, "--resume", "--set", "model.hidden_sizes=[16, 16]", env=env, check=False)
    assert proc.returncode == 2 and "model.hidden_sizes" in proc.stderr
    proc = _train(trained, env=env, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    copy = tmp_path / "corrupt"
    shutil.copytree(trained, copy)
    for path in (copy / "checkpoints" / "latest").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    proc = _train(copy, "--resume", env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(copy / "checkpoints" / "latest") in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_runs_every_method_on_the_same_days(trained):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "evjax.evaluate", "--run-dir", str(trained), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = trained / "eval"
    with open(out / "metrics.csv") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert set(table) == {"fixed_mid", "fixed_upper", "fixed_tuned", "random", "cem_unconstrained", "ccem",
                          "cap_fixed_kappa", "cap_adaptive", "oracle"}
    for row in table.values():
        line, carbon, any_ = (float(row[k]) for k in ("steps_line_over_limit_pct", "steps_carbon_over_limit_pct",
                                                      "steps_any_violation_pct"))
        assert max(line, carbon) <= any_ <= line + carbon + 1e-9
        shares = sum(float(row[k]) for k in ("cs_share_pct", "dso_share_pct", "users_share_pct"))
        assert shares == pytest.approx(100.0, abs=1e-6)  # total surplus: the parties' terms add up to welfare
        assert float(row["ev_co2_t"]) > 0.0 and 700.0 <= float(row["ev_carbon_intensity"]) <= 900.0
    for name in ("prices.png", "evs.png", "line_loading.png", "carbon_intensity.png", "welfare.png",
                 "training_curves.png", "metrics.md"):
        assert (out / name).stat().st_size > 0
    with open(out / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    from evjax.config import load

    cfg = load(SMOKE)
    mid = [(lo + hi) / 2 for lo, hi in zip(cfg.env.price_lower, cfg.env.price_upper)]
    for row in steps:
        prices = [float(x) for x in row["price"].split()]
        assert all(lo - 1e-6 <= p <= hi + 1e-6 for p, lo, hi in zip(prices, cfg.env.price_lower, cfg.env.price_upper))
        if row["method"] == "fixed_mid":
            assert prices == pytest.approx(mid, abs=1e-3)
        if row["method"] == "fixed_upper":
            assert prices == pytest.approx(list(cfg.env.price_upper), abs=1e-3)
        if row["method"] == "fixed_tuned":  # one vector of the 2-level grid: each price at one of its bounds
            assert all(min(abs(p - lo), abs(p - hi)) < 1e-3
                       for p, lo, hi in zip(prices, cfg.env.price_lower, cfg.env.price_upper))
    tuned = {tuple(float(x) for x in r["price"].split()) for r in steps if r["method"] == "fixed_tuned"}
    assert len(tuned) == 1  # constant over every step and day
    # the same days for every method
    days = {m: sorted({r["date"] for r in steps if r["method"] == m}) for m in table}
    assert len({tuple(d) for d in days.values()}) == 1


def _wait_for(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_killed_run_resumes_to_the_same_metrics(trained, tmp_path):
    """SIGKILL during start-up (config written, nothing built), while epoch 0 runs and compiles, just after
    its metrics row is written, then once more after a checkpoint; each time ``--resume``, which is killed in
    turn. The per-epoch metrics must equal the uninterrupted run's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "evjax.train", "--config", SMOKE, "--run-dir", str(run_dir), "--no-progress"]
    latest = run_dir / "checkpoints" / "latest"

    def checkpoints():
        return {p.name for p in latest.iterdir() if p.name.isdigit()} if latest.is_dir() else set()

    moments = [
        ("start-up", lambda: (run_dir / "config.yaml").is_file()),
        ("compilation", lambda: (run_dir / "tensorboard").is_dir()),
        ("first metrics row", lambda: (run_dir / "metrics.csv").is_file()),
        ("after a checkpoint", lambda: checkpoints() - before),
    ]
    for index, (moment, reached) in enumerate(moments):
        args = cmd if index == 0 else cmd + ["--resume"]
        before = checkpoints()
        log = tmp_path / f"stderr_{index}.txt"
        with log.open("w") as stderr:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            assert _wait_for(proc, reached), f"{moment}: {log.read_text()[-2000:]}"
            if moment == "compilation":
                time.sleep(2.0)  # into epoch 0: environment steps and the first model fit's compilation
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    _train(run_dir, "--resume", env=env)
    assert _rows(run_dir) == _rows(trained)


def test_evaluate_overrides_layer_on_the_runs_saved_evaluation_settings(trained, monkeypatch, tmp_path):
    """``--set evaluation.x=...`` changes x and keeps the rest of the run's evaluation section (smoke sizes, a
    preset's cost limit); ``--config`` replaces the section."""
    from evjax import evaluate
    from evjax.config import load

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    seen = []

    def fake_evaluate(run_dir, evaluation, *args, **kwargs):
        seen.append(evaluation)
        (Path(run_dir) / "eval").mkdir(exist_ok=True)
        (Path(run_dir) / "eval" / "metrics.md").write_text("table\n")

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    saved = load(SMOKE).evaluation
    assert saved.cost_limit == 0.0
    assert evaluate.main(["--run-dir", str(run), "--set", "evaluation.cost_limit=null"]) == 0
    assert seen[-1] == dataclasses.replace(saved, cost_limit=None)  # smoke's 1 day and small oracle kept
    assert evaluate.main(["--run-dir", str(run)]) == 0
    assert seen[-1] is None  # the checkpoint's own section
    assert evaluate.main(["--run-dir", str(run), "--config", SMOKE, "--set", "evaluation.days=2"]) == 0
    assert seen[-1] == dataclasses.replace(saved, days=2)
