"""The twin oracle: the planner's CEM on the JAX twin (known answers on hand-picked test days, one trace)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate, oracle, twin
from tests.conftest import small_oracle_config


def test_settings_keep_the_planner_elite_fraction():
    from evjax.config import Config

    s = oracle.settings(Config())
    assert (s.num_candidates, s.iterations, s.num_elites, s.cost_limit) == (500, 5, 5, 1e-12)
    assert oracle.settings(small_oracle_config()).num_elites == 3  # round(16 x 80 / 500)


def test_a_prior_on_the_bounds_holds_the_oracle_there():
    """``planner.prior_prices`` is the oracle's first warm start and appended action; CEM's variance cap is 0 at a
    bound, so a prior at the upper bounds makes the oracle post the upper bounds at every step (a known answer)."""
    import dataclasses

    cfg = small_oracle_config()
    upper = tuple(cfg.env.price_upper)
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, prior_prices=upper))
    assert oracle.settings(cfg).prior == upper
    runs, _ = evaluate.run_on_twin(cfg, ["oracle"], [0], [1000])
    assert len(runs["oracle"]) == cfg.env.episode_steps
    for r in runs["oracle"]:
        np.testing.assert_allclose(r["price"], upper, rtol=1e-6)
    # without the cap the samples keep their spread at the bound, and the oracle moves off it
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, variance_cap=False))
    assert oracle.settings(cfg).variance_cap is False
    runs, _ = evaluate.run_on_twin(cfg, ["oracle"], [0], [1000])
    assert any(np.any(np.asarray(r["price"]) < np.asarray(upper) - 1e-3) for r in runs["oracle"])
    # with the cap kept, constant candidates on a 2-level grid (the 8 corners) can pull the oracle off the bound
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, variance_cap=True, constant_candidates=2))
    assert oracle.settings(cfg).constant_candidates == 2
    runs, _ = evaluate.run_on_twin(cfg, ["oracle"], [0], [1000])
    assert any(np.any(np.asarray(r["price"]) < np.asarray(upper) - 1e-3) for r in runs["oracle"])


def test_oracle_removes_violations_of_fixed_and_random_prices(twin_evaluation):
    """Test days 0 and 162: every non-learned price rule violates a limit; the oracle (16 x 2) none on day 0, less on 162."""
    cfg, _, _, runs, _ = twin_evaluation
    days = {m: evaluate.per_day(rows) for m, rows in runs.items()}
    lower, upper = np.asarray(cfg.env.price_lower), np.asarray(cfg.env.price_upper)
    for r in runs["oracle"]:
        assert np.all(r["price"] >= lower - 1e-6) and np.all(r["price"] <= upper + 1e-6)
    assert len(runs["oracle"]) == 3 * cfg.env.episode_steps
    assert days["oracle"][0][1] == 0.0 and min(days[m][0][1] for m in ("fixed_mid", "random")) > 0.1
    assert days["oracle"][162][1] < 0.5 * min(days[m][162][1] for m in ("fixed_mid", "random"))
    # welfare is the objective among feasible candidates: within 2 % of unconstrained fixed prices
    for day in (0, 81, 162):
        assert days["oracle"][day][0] > 0.98 * days["fixed_mid"][day][0]


def test_a_plan_traces_once_and_stays_in_bounds():
    cfg = small_oracle_config()
    params = twin.make_params(cfg)
    scenarios = [evaluate.episode_scenario(cfg, "test", day, 1000) for day in (0, 162)]
    with jax.enable_x64(True):
        days = twin.stack_scenarios(scenarios, cfg)
    mid = (np.asarray(params.price_lower) + np.asarray(params.price_upper)) / 2
    warm = jnp.broadcast_to(jnp.asarray(mid, jnp.float32),
                            (cfg.env.episode_steps, cfg.num_stations))

    @chex.assert_max_traces(n=1)
    def plan(key, state, warm_start, params):
        return oracle.plan(key, state, warm_start, params, oracle=oracle.settings(cfg))

    plan_jit = twin.jit(plan)
    for d in range(2):
        state, _ = twin.reset(jax.random.key(0), jax.tree.map(lambda x: x[d], days), params)
        action, next_warm = plan_jit(jax.random.key(d), state, warm, params)
        assert action.dtype == jnp.float32 and next_warm.shape == warm.shape
        assert np.all(np.asarray(action) >= np.asarray(params.price_lower) - 1e-6)
        assert np.all(np.asarray(action) <= np.asarray(params.price_upper) + 1e-6)


def test_constant_candidates_rolled_out_once_give_the_same_decisions():
    """The oracle and the forecast oracle (two draws) with 27 constant candidates among 40: rolling them out once
    per decision gives the decision of rolling them out in every CEM iteration, bit for bit, at three steps."""
    import dataclasses

    cfg = small_oracle_config()
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, constant_candidates=3),
                              evaluation=dataclasses.replace(cfg.evaluation, oracle_popsize=40))
    params = twin.make_params(cfg)
    _, _, arrays = _day_and_draw(cfg, 81, 1001)
    day = jax.tree.map(lambda x: x[0], arrays)
    alternatives = jax.tree.map(lambda x: jnp.stack([x[1], x[0]]), arrays)  # [S=2, V]
    warm = jnp.broadcast_to((params.price_lower + params.price_upper).astype(jnp.float32) / 2,
                            (cfg.env.episode_steps, cfg.num_stations))
    decide = twin.jit(functools.partial(oracle.plan, oracle=oracle.settings(cfg)), static_argnames="hoist_constants")
    for steps in (0, 5, 10):
        state = _state_after(cfg, params, day, steps)
        for draws in (None, alternatives):
            got, want = (decide(jax.random.key(steps), state, warm, params, alternatives=draws, hoist_constants=h)
                         for h in (True, False))
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


def _day_and_draw(cfg, day: int, seed: int):
    """Twin arrays [V] of the evaluation episode (day, seed) and of another draw of the same day, one V."""
    real = evaluate.episode_scenario(cfg, "test", day, seed)
    other = evaluate.forecast_scenarios(cfg, "test", day, seed)[0]
    max_evs = oracle.forecast_max_evs([real], [[other]], cfg.env.episode_steps)
    with jax.enable_x64(True):
        return real, other, twin.stack_scenarios([real, other], cfg, max_evs)


def _state_after(cfg, params, day_arrays, steps: int):
    """The twin state after ``steps`` steps at mid-range prices."""
    mid = (np.asarray(params.price_lower) + np.asarray(params.price_upper)) / 2
    state, _ = twin.jit(twin.reset)(jax.random.key(0), day_arrays, params)
    step = twin.jit(twin.step)
    for t in range(steps):
        state = step(jax.random.key(t), state, jnp.asarray(mid), params)[0]
    return state


def test_forecast_max_evs_counts_the_arrivals_so_far_plus_the_draws_remaining_ones():
    """Day: 40 EVs at step 0, 10 at step 1; draw: 5 and 45. Splice at step 1: 40 + 45 = 85 rows -> 128."""
    class Fake:
        def __init__(self, arrivals):
            self.arrival_step, self.num_evs = np.asarray(arrivals), len(arrivals)

    day, draw = Fake([0] * 40 + [1] * 10), Fake([0] * 5 + [1] * 45)
    assert oracle.forecast_max_evs([day], [[draw]], 2) == 128
    assert oracle.forecast_max_evs([draw], [[day]], 2) == 64  # 5 + 10 or 50 rows


def test_splicing_a_day_into_itself_changes_nothing():
    cfg = small_oracle_config()
    params = twin.make_params(cfg)
    _, _, arrays = _day_and_draw(cfg, 81, 1001)
    for steps in (0, 5):
        state = _state_after(cfg, params, jax.tree.map(lambda x: x[0], arrays), steps)
        spliced = twin.jit(oracle.splice_future)(state, state.scenario)
        chex.assert_trees_all_equal(spliced, state)


def test_splicing_keeps_the_past_and_takes_the_draws_future():
    """After 5 steps: the EVs that came stay as they are, those to come are the other draw's, and they arrive."""
    cfg = small_oracle_config()
    params = twin.make_params(cfg)
    real, other, arrays = _day_and_draw(cfg, 81, 1001)
    t = 5
    state = _state_after(cfg, params, jax.tree.map(lambda x: x[0], arrays), t)
    spliced = twin.jit(oracle.splice_future)(state, jax.tree.map(lambda x: x[1], arrays))
    arrived = int(np.sum(real.arrival_step < t))
    sc = spliced.scenario
    # the past: the first `arrived` rows, their status and charge untouched
    for name in ("status", "station", "remaining_kwh", "delivered_kwh", "join_step"):
        np.testing.assert_array_equal(np.asarray(getattr(spliced, name))[:arrived],
                                      np.asarray(getattr(state, name))[:arrived])
    np.testing.assert_array_equal(np.asarray(sc.need_kwh)[:arrived], np.asarray(state.scenario.need_kwh)[:arrived])
    # the future: exactly the draw's EVs arriving from step t on, none arrived yet
    valid = np.asarray(sc.valid)
    future = valid & (np.asarray(sc.arrival_step) >= t)
    np.testing.assert_array_equal(np.asarray(sc.arrival_step)[future], np.sort(other.arrival_step[other.arrival_step >= t]))
    assert valid.sum() == arrived + np.sum(other.arrival_step >= t)
    assert np.all(np.asarray(spliced.status)[future] == 0)  # NOT_ARRIVED
    np.testing.assert_array_equal(spliced.evs_present, state.evs_present)
    # and they are the ones who come at step t: chosen or unserved, the draw's count
    *_, info = twin.jit(twin.step)(jax.random.key(9), spliced, jnp.asarray(params.price_upper), params)
    assert int(info["new_evs"]) == int(np.sum(other.arrival_step == t)) != int(np.sum(real.arrival_step == t))


def test_the_forecast_oracle_told_the_true_day_is_the_oracle():
    """Planning on S copies of the day's own draw is planning with foresight: the same prices, step by step."""
    cfg = small_oracle_config()
    params = twin.make_params(cfg)
    scenarios = [evaluate.episode_scenario(cfg, "test", day, 1000 + i) for i, day in enumerate((0, 162))]
    with jax.enable_x64(True):
        days = twin.stack_scenarios(scenarios, cfg)
        alternatives = jax.tree.map(lambda x: jnp.stack([x, x], axis=1), days)  # [D, S=2, V]
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    settings = oracle.settings(cfg)
    prices, _, _ = twin.jit(functools.partial(oracle.episodes, oracle=settings))(keys, days, params)
    forecast, _, _ = twin.jit(functools.partial(oracle.episodes, oracle=settings))(keys, days, params,
                                                                                  alternatives=alternatives)
    np.testing.assert_array_equal(forecast, prices)
