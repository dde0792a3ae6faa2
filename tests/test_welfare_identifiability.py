"""benchmarks/welfare_identifiability.py: its truth is the tuned-constant search's, its rollout the model's own."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate
from evjax.config import load
from evjax.dynamics import make_dynamics
from evjax.planner import make_cost_fn
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import welfare_identifiability as wi  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"


def test_true_scores_are_the_tuned_constant_search():
    cfg = load(SMOKE)  # 8 corner vectors on 2 training days
    vectors = np.asarray(evaluate.fixed_price_grid(cfg), np.float32)
    violation, welfare, cost, per_day = wi.true_scores(cfg, vectors)
    by_search = {tuple(np.round(p, 4)): (v, w) for v, w, p in evaluate.score_fixed_prices(cfg)}
    for i, prices in enumerate(vectors):
        v, w = by_search[tuple(np.round(prices.astype(float), 4))]
        assert violation[i] == v and np.isclose(welfare[i], w, rtol=1e-12)
    assert np.all(cost >= 0) and np.all(np.isfinite(cost))
    np.testing.assert_allclose(per_day.mean(axis=1), welfare, rtol=1e-12)  # the episode mean is the days' mean
    tuned = evaluate.tuned_fixed_prices(cfg)
    np.testing.assert_allclose(vectors[int(np.lexsort((-welfare, violation))[0])], tuned)


def test_predicted_scores_roll_each_member_on_its_own_means():
    cfg = load(SMOKE)
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    model = dyn.init(jax.random.key(3))
    start = np.linspace(0.1, 0.9, cfg.obs_dim).astype(np.float32)
    start[-1] = 0.0
    vectors = np.array([[1.1, 1.3, 1.2], [1.4, 1.5, 1.4]], np.float32)
    welfare, cost = wi.predicted_scores(dyn, model, start, vectors, cfg)
    cost_fn = make_cost_fn(cfg, backoff=False)
    for n, prices in enumerate(vectors):  # reference: the model's predict, one member and one vector at a time
        totals = []
        for member in range(cfg.model.ensemble_size):
            obs, w, c = jnp.asarray(start)[None], 0.0, 0.0
            for _ in range(cfg.env.episode_steps):
                pred = dyn.predict(model, obs, jnp.asarray(prices)[None], None, jnp.array([member]), mean_only=True)
                w += float(pred.reward[0]) * cfg.env.reward_scale
                c += float(cost_fn(pred.next_obs, None, 0.0)[0])
                obs = pred.next_obs
            totals.append((w, c))
        np.testing.assert_allclose([welfare[n], cost[n]], np.mean(totals, axis=0), rtol=2e-4, atol=1e-4)


def test_planner_pick_takes_the_cheapest_then_the_most_welfare():
    cost = np.array([0.3, 0.10003, 0.1, 0.2])
    welfare = np.array([9.0, 5.0, 1.0, 7.0])
    assert wi.planner_pick(cost, welfare) == 1  # 0.10003 and 0.1 tie at 1e-4: the higher welfare wins


def test_bad_arguments_exit_2_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "welfare_identifiability.py"), "--episodes", "0"],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == 2
    assert "--episodes" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


def test_paired_resolution_by_hand():
    per_day = np.array([[100.0, 200.0, 300.0, 400.0],   # reference
                        [110.0, 190.0, 330.0, 410.0]])  # differences 10, -10, 30, 10: mean 10, sd sqrt(800 / 3)
    (row,) = wi.paired_resolution(per_day, 0, [1])
    assert row["index"] == 1 and row["mean_cny"] == 10.0
    np.testing.assert_allclose(row["sd_cny"], np.sqrt(800.0 / 3.0))
    np.testing.assert_allclose(row["days_for_half_width"], (2 * 1.96 * np.sqrt(800.0 / 3.0) / 10.0) ** 2)


def test_plot_from_rows_and_a_bad_file(tmp_path):
    rows = [{"setting": "default model", "episodes": n, "seed": s, "welfare_rank_corr": 0.1 * s,
             "cost_rank_corr": 0.5, "truth_repeat_welfare_rank_corr": 0.6, "truth_repeat_cost_rank_corr": 0.97}
            for n in (5, 50) for s in range(2)]
    rows.append({**rows[0], "setting": "trained agent", "run_dir": "r", "transitions": 180})
    png = wi.plot(rows, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "welfare_identifiability.py"), "--plot",
                           str(tmp_path / "x.png"), "--from-jsonl", str(bad)],
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert proc.returncode == 2 and "bad.jsonl" in proc.stderr and "Traceback" not in proc.stderr
