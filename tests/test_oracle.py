"""The twin oracle: the planner's CEM on the JAX twin (known answers on hand-picked test days, one trace)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from evjax import evaluate, oracle, twin
from tests.conftest import small_oracle_config


def test_settings_keep_the_planner_elite_fraction():
    from evjax.config import Config

    s = oracle.settings(Config())
    assert (s.num_candidates, s.iterations, s.num_elites, s.cost_limit) == (500, 5, 80, 1e-12)
    assert oracle.settings(small_oracle_config()).num_elites == 3  # round(16 x 80 / 500)


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
