"""A pure-JAX twin of the environment (SPEC 14), gymnax style; the host environment (``evjax.env``) stays the reference.

    from evjax import twin
    params = twin.make_params(cfg)
    days = twin.stack_scenarios([make_scenario(cfg, "test", d, seed) for d in range(30)], cfg)
    state, obs = jax.vmap(twin.reset, in_axes=(0, 0, None))(keys, days, params)
    state, obs, reward, cost, info = twin.jit(jax.vmap(twin.step, in_axes=(0, 0, 0, None)))(keys, state, prices, params)

Modules mirror the host's: ``powerflow`` (grid), ``carbon``, ``stations``,
``env``; ``agreement`` runs both side by side. The twin computes in float64
and must be jitted with ``twin.jit``
(64-bit types on at call time, the global flag left alone; see ``twin.env``).
"""

from evjax.twin.env import (
    EnvParams, EnvState, ScenarioArrays, Settings, jit, make_params, reset, rollout, scenario_arrays, stack_scenarios,
    step,
)

__all__ = ["EnvParams", "EnvState", "ScenarioArrays", "Settings", "jit", "make_params", "reset", "rollout",
           "scenario_arrays", "stack_scenarios", "step"]
