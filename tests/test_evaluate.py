"""Evaluation tables from hand-made step rows, the steps.csv round trip, and the twin runs of the baselines."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from evjax import evaluate
from evjax.config import Config
from evjax.errors import ConfigError, UserError
from tests.conftest import ROOT, TWIN_EVAL_DAYS, with_config

CFG = Config()


def row(day, step, welfare, cost_line, cost_carbon, energy, co2, cs, dso, users, time_cost, loading=(0.5, 0.5, 0.5)):
    return {
        "simulator": "host", "day": day, "date": f"d{day}", "step": step, "price": np.array([1.25, 1.4, 1.3]),
        "evs_present": np.array([1.0, 2.0, 3.0]), "line_loading": np.array(loading), "ev_energy_kwh": energy,
        "carbon_intensity": 840.0, "ev_carbon_intensity": 840.0, "system_carbon_intensity": 830.0,
        "ev_co2_kg": co2, "welfare": welfare, "cost": cost_line + cost_carbon, "cost_line": cost_line,
        "cost_carbon": cost_carbon, "cs_profit": cs, "dso_profit": dso, "users_surplus": users,
        "users_time_cost": time_cost, "min_voltage_pu": 0.95, "unserved": 0, "plan_ms": 2.0,
    }


ROWS = [
    row(0, 0, 100.0, 0.05, 0.0, 100.0, 85.0, 50.0, 40.0, 10.0, 20.0, loading=(0.95, 0.5, 0.5)),
    row(0, 1, 200.0, 0.0, 0.02, 200.0, 176.0, 100.0, 80.0, 20.0, 30.0),
    row(1, 0, 300.0, 0.0, 0.0, 100.0, 80.0, 150.0, 120.0, 30.0, 10.0),
    row(1, 1, 400.0, 0.05, 0.01, 100.0, 88.0, 200.0, 160.0, 40.0, 0.0, loading=(0.5, 0.95, 0.5)),
]


def test_summary_by_hand():
    s = evaluate.summarise("fixed_mid", ROWS, CFG)
    assert s["welfare_cny"] == pytest.approx(500.0)  # days: 300 and 700
    # 95 % t-interval of two values: t(0.975, 1) = 12.706 x std 282.84 / sqrt 2
    assert s["welfare_ci95"] == pytest.approx(12.7062 * np.std([300.0, 700.0], ddof=1) / np.sqrt(2), rel=1e-4)
    assert s["total_cost"] == pytest.approx(0.13)
    assert s["steps_line_over_limit_pct"] == 50.0 and s["steps_carbon_over_limit_pct"] == 50.0
    assert s["steps_any_violation_pct"] == 75.0
    assert s["ev_carbon_intensity"] == pytest.approx(1000.0 * 429.0 / 500.0)  # energy-weighted
    assert s["ev_co2_t"] == pytest.approx(0.429 / 2)
    assert s["users_time_cost_cny"] == pytest.approx(30.0)
    assert (s["cs_share_pct"], s["dso_share_pct"], s["users_share_pct"]) == pytest.approx((50.0, 40.0, 10.0))


def test_steps_round_trip(tmp_path):
    evaluate.write_steps(tmp_path, {"fixed_mid": ROWS})
    back = evaluate.read_steps(tmp_path / "steps.csv")["fixed_mid"]
    assert len(back) == len(ROWS)
    for a, b in zip(ROWS, back):
        assert set(b) == set(a) - {"method"}
        for key, value in a.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(b[key], value)
            else:
                assert b[key] == value


def test_paired_differences_by_hand():
    # reference: day 0 welfare 250, violations at 1 of 2 steps; day 1 welfare 500, none
    reference = [row(0, 0, 200.0, 0.1, 0.0, 1, 1, 1, 1, 1, 0), row(0, 1, 50.0, 0.0, 0.0, 1, 1, 1, 1, 1, 0),
                 row(1, 0, 100.0, 0.0, 0.0, 1, 1, 1, 1, 1, 0), row(1, 1, 400.0, 0.0, 0.0, 1, 1, 1, 1, 1, 0)]
    # ROWS: day 0 welfare 300, violations 2 of 2 steps; day 1 welfare 700, 1 of 2
    d = evaluate.paired_differences(ROWS, reference)
    welfare, violations = np.array([50.0, 200.0]), np.array([50.0, 50.0])
    assert d["welfare_diff_cny"] == pytest.approx(125.0)
    assert d["welfare_diff_ci95"] == pytest.approx(12.7062 * np.std(welfare, ddof=1) / np.sqrt(2), rel=1e-4)
    assert d["violation_diff_pct"] == pytest.approx(50.0) and d["violation_diff_ci95"] == 0.0
    same = evaluate.paired_differences(ROWS, ROWS)
    assert same["welfare_diff_cny"] == 0.0 and same["welfare_diff_ci95"] == 0.0
    with pytest.raises(ValueError, match="same days"):
        evaluate.paired_differences(ROWS, ROWS[:2])


def test_summaries_need_the_reference_run(tmp_path):
    runs = {"fixed_mid": ROWS, "random": ROWS}
    with pytest.raises(ConfigError, match=r"evaluation\.reference"):
        evaluate.summaries_of(runs, CFG)
    cfg = with_config(evaluation={"reference": "fixed_mid"})
    summaries = evaluate.summaries_of(runs, cfg)
    assert [s["welfare_diff_cny"] for s in summaries] == [0.0, 0.0]
    evaluate.write_tables(tmp_path, summaries, cfg, "note")
    assert "welfare − reference" in (tmp_path / "metrics.md").read_text()


def test_days_zero_means_every_day_and_the_cli_takes_all():
    every = evaluate.evaluation_day_ids(with_config(evaluation={"days": 0}))
    assert len(every) == 163 and list(every) == list(range(163))
    thirty = evaluate.evaluation_day_ids(Config())
    assert len(thirty) == 30 and thirty[0] == 0 and thirty[-1] == 162
    assert evaluate.parse_days("all") == 0 and evaluate.parse_days("7") == 7
    for bad in ("0", "-3", "x"):
        with pytest.raises(UserError, match="--days"):
            evaluate.parse_days(bad)


def test_episode_scenario_is_the_host_reset_draw():
    from evjax.env import EVPricingEnv

    env = EVPricingEnv(CFG)
    env.reset(seed=1003, options={"split": "test", "day": 40})
    mine = evaluate.episode_scenario(CFG, "test", 40, 1003)
    assert mine.seed == env.scenario.seed and mine.num_evs == env.scenario.num_evs
    np.testing.assert_array_equal(mine.arrival_step, env.scenario.arrival_step)


def test_twin_fixed_and_random_prices_equal_the_host_per_day(twin_evaluation):
    """The same days, seeds and price draws on both simulators: per-day welfare to 1e-6 relative."""
    from evjax.env import EVPricingEnv

    cfg, day_ids, seeds, runs, _ = twin_evaluation
    env = EVPricingEnv(cfg)
    policies = evaluate.make_policies(cfg, None, None, 0.0, ["fixed_mid", "random"])
    for method in ("fixed_mid", "random"):
        host = [{"method": method, **r} for day, seed in zip(day_ids[:2], seeds[:2])
                for r in evaluate.run_episode(env, policies[method], cfg.evaluation.split, day, seed)]
        twin_rows = [r for r in runs[method] if r["day"] in day_ids[:2]]
        gap = evaluate.simulator_agreement(twin_rows, host)
        assert gap["days"] == 2 and gap["welfare_rel"] < 1e-6 and gap["cost"] < 1e-6, (method, gap)
        for a, b in zip(twin_rows, host):
            np.testing.assert_allclose(a["price"], b["price"], rtol=1e-7)
            assert (a["day"], a["step"], a["simulator"], b["simulator"]) == (b["day"], b["step"], "twin", "host")
    runs_with_host = {"fixed_mid": runs["fixed_mid"], "fixed_mid@host": host, "oracle": runs["oracle"]}
    assert "largest per-day welfare deviation" in evaluate.agreement_note(runs_with_host)


def test_steps_round_trip_keeps_the_simulator(tmp_path, twin_evaluation):
    runs = {"fixed_mid": twin_evaluation[3]["fixed_mid"], "fixed_mid@host": ROWS}
    evaluate.write_steps(tmp_path, runs)
    back = evaluate.read_steps(tmp_path / "steps.csv")
    assert list(back) == ["fixed_mid", "fixed_mid@host"]
    assert {r["simulator"] for r in back["fixed_mid"]} == {"twin"} and len(back["fixed_mid@host"]) == len(ROWS)


SHARDED = """
import json, sys
import jax
from evjax import evaluate
from tests.conftest import small_oracle_config, TWIN_EVAL_DAYS
cfg = small_oracle_config()
seeds = [cfg.evaluation.seed + i for i in range(len(TWIN_EVAL_DAYS))]
runs, _ = evaluate.run_on_twin(cfg, ["fixed_mid", "random", "oracle"], TWIN_EVAL_DAYS, seeds)
print(json.dumps({"devices": len(jax.devices()), "runs": {m: [[r["day"], r["step"], r["welfare"], r["cost"],
                  list(map(float, r["price"]))] for r in rows] for m, rows in runs.items()}}))
"""


def test_days_sharded_over_two_devices_equal_one_device(twin_evaluation, subprocess_env):
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + subprocess_env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sharded["devices"] == 2
    runs = twin_evaluation[3]
    for method, rows in runs.items():
        other = sharded["runs"][method]
        assert len(other) == len(rows) == len(TWIN_EVAL_DAYS) * CFG.env.episode_steps
        for r, (day, step, welfare, cost, price) in zip(rows, other):
            assert (r["day"], r["step"]) == (day, step)
            np.testing.assert_allclose(price, r["price"], rtol=1e-6, atol=1e-7)
            assert welfare == pytest.approx(r["welfare"], rel=1e-9, abs=1e-9)
            assert cost == pytest.approx(r["cost"], rel=1e-9, abs=1e-12)


def test_planner_days_in_lockstep_equal_day_by_day_episodes():
    """``run_planner_days`` (one plan_batch per step over all days) gives the rows ``run_episode`` gives per day."""
    from evjax.agent import Agent
    from evjax.config import load
    from evjax.dynamics import make_dynamics
    from evjax.env import EVPricingEnv
    from evjax.evaluate import PlannerPolicy, run_episode, run_planner_days
    from evjax.planner import make_model_planner

    cfg = load(None, ["model.ensemble_size=2", "model.num_elites=2", "model.hidden_sizes=[16]",
                      "model.weight_decays=[0.0, 0.0]", "planner.particles=4", "planner.popsize=16",
                      "planner.constant_candidates=0", "planner.num_elites=4", "planner.horizon=3",
                      "planner.iterations=2", "planner.matmul_dtype=float32", "planner.kappa_per_constraint=true"])
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    model = dyn.init(jax.random.key(0))
    planner = make_model_planner(cfg, dyn)
    env = EVPricingEnv(cfg)
    days, seeds = [0, 40, 80], [7, 8, 9]
    policy = PlannerPolicy(Agent(cfg.planner, planner, kappa=[0.5, 2.0]), model)
    batched = run_planner_days(env, policy, "test", days, seeds)
    single = [r for day, seed in zip(days, seeds) for r in run_episode(env, policy, "test", day, seed)]
    assert len(batched) == len(single) == 3 * cfg.env.episode_steps
    for b, s in zip(batched, single):
        assert (b["day"], b["step"]) == (s["day"], s["step"])
        np.testing.assert_allclose(b["price"], s["price"], atol=1e-5)
        assert b["welfare"] == pytest.approx(s["welfare"], rel=1e-6, abs=1e-6)


def test_fixed_price_grid_spans_the_bounds():
    import dataclasses

    cfg = dataclasses.replace(CFG, evaluation=dataclasses.replace(CFG.evaluation, tuned_levels=3))
    grid = np.asarray(evaluate.fixed_price_grid(cfg))
    lower, upper = np.asarray(CFG.env.price_lower), np.asarray(CFG.env.price_upper)
    assert grid.shape == (27, 3)
    assert len({tuple(v) for v in grid.round(9)}) == 27  # all distinct
    for vector in (lower, upper, (lower + upper) / 2, np.array([upper[0], upper[1], lower[2]])):
        assert np.any(np.all(np.isclose(grid, vector), axis=1)), vector


def test_tuned_fixed_prices_beat_every_other_grid_vector_on_the_training_days():
    """The open-loop twin of the tuning equals ``run_on_twin``'s fixed prices on the same episodes, and the
    chosen vector has the fewest violating steps (then the most welfare) of the grid, upper bounds included."""
    import dataclasses

    cfg = dataclasses.replace(CFG, evaluation=dataclasses.replace(CFG.evaluation, tuned_levels=2, tuned_days=3,
                                                                  split="train"))
    scored = evaluate.score_fixed_prices(cfg)
    assert len(scored) == 8
    keys = [(viol, -welfare) for viol, welfare, _ in scored]
    assert keys == sorted(keys)
    upper = np.asarray(cfg.env.price_upper)
    upper_entry = next(e for e in scored if np.allclose(e[2], upper))
    assert scored[0][0] <= upper_entry[0]
    np.testing.assert_allclose(evaluate.tuned_fixed_prices(cfg), scored[0][2], rtol=1e-6)
    day_ids = evaluate.spread_day_ids(cfg, "train", 3)
    runs, _ = evaluate.run_on_twin(cfg, ["fixed_upper"], day_ids, [0, 1, 2])
    summary = evaluate.summarise("fixed_upper", runs["fixed_upper"], cfg)
    assert summary["steps_any_violation_pct"] == pytest.approx(upper_entry[0])
    assert summary["welfare_cny"] == pytest.approx(upper_entry[1], rel=1e-9)
    assert len({round(e[1], 3) for e in scored}) > 1  # the prices change the welfare: the search has a signal


@pytest.mark.parametrize("override", [None, 0.0])
def test_evaluation_cost_limit_replaces_the_planners_limit(monkeypatch, override):
    """CCEM and CAP plan with ``evaluation.cost_limit`` where it is set (rewards-only CEM ignores any limit)."""
    import dataclasses
    import types

    import evjax.planner as planner_module
    from evjax.dynamics import make_dynamics

    cfg = Config()
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, cost_limit=0.1),  # a run trained at 0.1
                              evaluation=dataclasses.replace(cfg.evaluation, cost_limit=override))
    limits = {}
    real = planner_module.make_model_planner

    def recording(run_cfg, dyn):
        limits[run_cfg.planner.mode] = run_cfg.planner.cost_limit
        return real(run_cfg, dyn)

    monkeypatch.setattr(planner_module, "make_model_planner", recording)
    parts = types.SimpleNamespace(dynamics=make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim))
    evaluate.make_policies(cfg, parts, None, 0.7, ["cem_unconstrained", "ccem", "cap_adaptive"])
    expected = 0.1 if override is None else override
    assert limits == {"unconstrained": expected, "ccem": expected, "cap": expected}
    assert cfg.planner.cost_limit == 0.1  # the run's own limit is left alone


def test_deployment_prior_and_backoff_replace_the_runs_own(monkeypatch):
    """evaluation.prior_prices / constraint_backoff / reward_pessimism / particle_noise / variance_cap reach every
    learned planner; null keeps the run's settings; by default the planners deploy with the 20 kg/MWh carbon
    back-off."""
    import dataclasses
    import types

    import evjax.planner as planner_module
    from evjax.dynamics import make_dynamics

    seen = {}
    real = planner_module.make_model_planner

    def recording(run_cfg, dyn):
        seen[run_cfg.planner.mode] = (run_cfg.planner.prior_prices, run_cfg.planner.constraint_backoff,
                                      run_cfg.planner.reward_pessimism, run_cfg.planner.particle_noise,
                                      run_cfg.planner.variance_cap)
        return real(run_cfg, dyn)

    monkeypatch.setattr(planner_module, "make_model_planner", recording)
    default = Config()
    parts = types.SimpleNamespace(dynamics=make_dynamics(default.model, default.obs_dim, default.action_dim))
    evaluate.make_policies(default, parts, None, 0.7, ["ccem", "cap_adaptive"])
    assert seen == {"ccem": ((), (0.0, 20.0), 0.0, False, True), "cap": ((), (0.0, 20.0), 0.0, False, True)}
    base = dataclasses.replace(default, planner=dataclasses.replace(default.planner, constraint_backoff=(0.0, 0.0)),
                               evaluation=dataclasses.replace(default.evaluation, constraint_backoff=None))
    evaluate.make_policies(base, parts, None, 0.7, ["ccem", "cap_adaptive"])  # a run trained without a back-off
    assert seen == {"ccem": ((), (0.0, 0.0), 0.0, False, True), "cap": ((), (0.0, 0.0), 0.0, False, True)}
    cfg = dataclasses.replace(base, evaluation=dataclasses.replace(
        base.evaluation, prior_prices=(1.325, 1.45, 1.25), constraint_backoff=(0.0, 20.0), reward_pessimism=1.5,
        particle_noise=True, variance_cap=False))
    policies = evaluate.make_policies(cfg, parts, None, 0.7, ["ccem", "cap_adaptive"])
    deployed = ((1.325, 1.45, 1.25), (0.0, 20.0), 1.5, True, False)
    assert seen == {"ccem": deployed, "cap": deployed}
    # the prior is where the deployed CEM starts: the first warm start holds it at every horizon step
    warm = np.asarray(policies["cap_adaptive"].agent.planner.initial_warm_start())
    np.testing.assert_allclose(warm, np.broadcast_to([1.325, 1.45, 1.25], warm.shape), rtol=1e-6)


@pytest.mark.parametrize("override, key", [
    ("evaluation.prior_prices=[1.3, 1.4]", "evaluation.prior_prices"),
    ("evaluation.prior_prices=[1.3, 1.4, 1.5]", "evaluation.prior_prices"),  # CS3's upper bound is 1.4
    ("evaluation.constraint_backoff=[20.0]", "evaluation.constraint_backoff"),
    ("evaluation.constraint_backoff=[0.0, -1.0]", "evaluation.constraint_backoff"),
    ("evaluation.reward_pessimism=-1.0", "evaluation.reward_pessimism"),
])
def test_bad_deployment_settings_name_their_key(override, key):
    from evjax import config as C

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        C.load(overrides=[override])


def test_evaluation_cost_limit_must_stay_below_the_nan_cost():
    with pytest.raises(ConfigError, match="evaluation.cost_limit"):
        from evjax import config as C
        C.load(overrides=["evaluation.cost_limit=2e6"])


def test_ratio_interval_hand_values_and_the_t_test_it_inverts():
    """N = [5, 7, 4, 4], D = [10, 12, 8, 10]: means 5 and 10, s_NN = 2, s_ND = 2, s_DD = 8/3, t(0.975, 3) = 3.1824,
    q = t^2 / 4 = 2.5320; a = 100 - 8q/3 = 93.248, b = 50 - 2q = 44.936, c = 25 - 2q = 19.936, so
    R in (b -+ sqrt(b^2 - ac)) / a = [0.3461, 0.6177]. Every R inside passes the paired t-test of N - R D at zero,
    every R outside fails it."""
    from scipy import stats

    num, den = np.array([5.0, 7.0, 4.0, 4.0]), np.array([10.0, 12.0, 8.0, 10.0])
    got = evaluate.ratio_interval(num, den)
    assert got.kind == "bounded" and got.estimate == pytest.approx(0.5)
    assert (got.low, got.high) == pytest.approx((0.34614, 0.61765), abs=1e-5)
    for r in np.linspace(0.0, 1.0, 201):
        diff = num - r * den
        p = stats.ttest_1samp(diff, 0.0).pvalue
        assert (p >= 0.05) == (got.low <= r <= got.high), r


def test_ratio_interval_of_an_unresolved_denominator_is_unbounded():
    """D = [5, -3, 1, 3, -1] has mean 1 and standard error sqrt(10 / 5) = 1.41 (t = 0.71): its mean is not resolved,
    so no finite set holds the ratio. With N = 0.5 D + small noise no ratio is rejected at all; with N = 3 + small
    noise (resolved from zero) only a band around R = 0 is, and the estimate 3 lies outside that band. Both agree
    with the t-test of N - R D on a grid of R."""
    from scipy import stats

    den = np.array([5.0, -3.0, 1.0, 3.0, -1.0])
    noise = np.array([0.1, -0.1, 0.0, 0.1, -0.1])
    everything = evaluate.ratio_interval(0.5 * den + noise, den)
    assert everything.kind == "everything" and everything.estimate == pytest.approx(0.5)
    num = 3.0 + noise
    band = evaluate.ratio_interval(num, den)
    assert band.kind == "outside" and band.low < 0.0 < band.high < band.estimate == pytest.approx(3.0)
    for r in np.linspace(-20.0, 20.0, 401):
        p = stats.ttest_1samp(num - r * den, 0.0).pvalue
        assert (p >= 0.05) == (r <= band.low or r >= band.high), r
    with pytest.raises(ValueError, match="at least 2 days"):
        evaluate.ratio_interval(np.array([1.0]), np.array([1.0]))
