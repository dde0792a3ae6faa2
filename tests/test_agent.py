"""The host-side agent: exploration before the fit, planning after, adaptive kappa, state export (SPEC 10)."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evjax.agent import Agent, initial_kappa
from evjax.config import PlannerConfig
from evjax.planner import make_planner

LOWER = np.array([1.1, 1.3, 1.2])
UPPER = np.array([1.4, 1.5, 1.4])
TARGET = np.array([1.35, 1.45, 1.3])
MEMBERS = 5
SMALL = PlannerConfig(horizon=3, popsize=200, num_elites=20, particles=5, iterations=8, constant_candidates=0)


class StepOut(NamedTuple):
    next_obs: jax.Array
    reward: jax.Array
    cost: jax.Array
    std: jax.Array


def bowl_step(model, obs, act, key):
    """Reward -||a - target||^2, no cost, no uncertainty."""
    reward = -jnp.sum(jnp.square(act - model["target"]), axis=-1)
    return StepOut(obs, reward, jnp.zeros_like(reward), jnp.zeros(obs.shape[:-1] + (obs.shape[-1] + 2,)))


def make_agent(**changes) -> Agent:
    cfg = dataclasses.replace(SMALL, **changes)
    return Agent(cfg, make_planner(cfg, LOWER, UPPER, MEMBERS, bowl_step))


MODEL = {"target": jnp.asarray(TARGET, jnp.float32)}
OBS = np.zeros(2)


def test_random_prices_before_fit_are_in_bounds_and_deterministic():
    agent = make_agent()
    actions = np.stack([agent.act(jax.random.key(seed), None, OBS) for seed in range(200)])
    assert actions.shape == (200, 3)
    assert np.all(actions >= LOWER) and np.all(actions <= UPPER)
    np.testing.assert_array_equal(agent.act(jax.random.key(7), None, OBS), actions[7])
    assert len(np.unique(actions[:, 0])) == 200  # different keys, different prices
    # uniform: each station's mean within 4 standard errors of mid-range
    assert np.all(np.abs(actions.mean(axis=0) - (LOWER + UPPER) / 2) < 4 * (UPPER - LOWER) / np.sqrt(12 * 200))
    np.testing.assert_array_equal(agent.state().warm_start, agent.planner.initial_warm_start())
    assert agent.last_diagnostics is None


def test_exploring_after_fit_posts_the_random_prices_and_keeps_the_warm_start():
    agent = make_agent()
    random_prices = agent.act(jax.random.key(3), None, OBS)
    agent.mark_fitted()
    np.testing.assert_array_equal(agent.act(jax.random.key(3), MODEL, OBS, explore=True), random_prices)
    assert agent.last_diagnostics is None
    np.testing.assert_array_equal(agent.state().warm_start, agent.planner.initial_warm_start())
    assert np.max(np.abs(agent.act(jax.random.key(3), MODEL, OBS) - TARGET)) < 0.02  # plans again without it


def test_plans_after_fit_and_keeps_the_shifted_warm_start():
    agent = make_agent()
    agent.mark_fitted()
    action = agent.act(jax.random.key(0), MODEL, OBS)
    np.testing.assert_allclose(action, TARGET, atol=0.02)
    warm = np.asarray(agent.state().warm_start)
    np.testing.assert_allclose(warm[:-1], np.broadcast_to(TARGET, (SMALL.horizon - 1, 3)), atol=0.03)
    np.testing.assert_allclose(warm[-1], (LOWER + UPPER) / 2, rtol=1e-6)
    assert agent.last_diagnostics["iterations"] == SMALL.iterations
    assert agent.last_diagnostics["kappa"] == SMALL.kappa_init
    agent.reset_episode()
    np.testing.assert_allclose(agent.state().warm_start, np.broadcast_to((LOWER + UPPER) / 2, (SMALL.horizon, 3)),
                               rtol=1e-6)


def test_kappa_rises_after_a_costly_episode_and_falls_after_a_cheap_one():
    """The first Adam step moves kappa by lr (m_hat / sqrt(v_hat) = sign of the gradient)."""
    costly, cheap = make_agent(), make_agent()
    assert costly.end_episode(SMALL.permissible_episode_cost + 2.0) == pytest.approx(SMALL.kappa_init + SMALL.kappa_lr, abs=1e-5)
    assert cheap.end_episode(SMALL.permissible_episode_cost - 0.3) == pytest.approx(SMALL.kappa_init - SMALL.kappa_lr, abs=1e-5)


def test_kappa_follows_adam_by_hand():
    """Two episodes with costs C_perm + 1 and C_perm + 3: Adam(b1 0.9, b2 0.999, eps 1e-8) on g = -(C - C_perm)."""
    agent = make_agent()
    kappa, m, v = SMALL.kappa_init, 0.0, 0.0
    for step, excess in enumerate([1.0, 3.0], start=1):
        g = -excess
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        kappa -= SMALL.kappa_lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
        assert agent.end_episode(SMALL.permissible_episode_cost + excess) == pytest.approx(kappa, abs=1e-5)


def test_kappa_is_clipped_at_zero():
    agent = make_agent(kappa_init=0.004)
    assert agent.end_episode(0.0) == 0.0
    assert agent.end_episode(0.0) == 0.0
    assert agent.end_episode(SMALL.permissible_episode_cost + 1.0) > 0.0


@pytest.mark.parametrize("changes, kappa", [
    ({"learn_kappa": False}, SMALL.kappa_init),
    ({"mode": "ccem"}, 0.0),
    ({"mode": "unconstrained"}, 0.0),
    ({"mode": "cap", "learn_kappa": False, "kappa_init": 5.0}, 5.0),
])
def test_fixed_kappa_variants(changes, kappa):
    agent = make_agent(**changes)
    assert agent.kappa == kappa == initial_kappa(dataclasses.replace(SMALL, **changes))
    assert agent.end_episode(100.0) == kappa
    assert agent.end_episode(0.0) == kappa


def test_non_finite_episode_cost_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        make_agent().end_episode(float("nan"))


def test_mode_mismatch_is_rejected():
    planner = make_planner(SMALL, LOWER, UPPER, MEMBERS, bowl_step)
    with pytest.raises(ValueError, match="planner.mode"):
        Agent(dataclasses.replace(SMALL, mode="ccem"), planner)


def test_state_round_trips_through_a_checkpoint(tmp_path):
    """Export, save with orbax, restore into a fresh agent: the same kappa, Adam moments and warm start."""
    import orbax.checkpoint as ocp

    agent = make_agent()
    agent.mark_fitted()
    agent.act(jax.random.key(0), MODEL, OBS)
    agent.end_episode(3.0)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "agent", jax.tree.map(np.asarray, agent.state()))
        checkpointer.wait_until_finished()
        fresh = make_agent()
        template = jax.tree.map(np.asarray, fresh.state())
        fresh.restore(checkpointer.restore(tmp_path / "agent", template))
    for got, want in zip(jax.tree.leaves(fresh.state()), jax.tree.leaves(agent.state())):
        np.testing.assert_array_equal(got, want)
    assert fresh.fitted and fresh.kappa == agent.kappa
    assert fresh.end_episode(0.0) == agent.end_episode(0.0)  # the Adam moments came back too


def test_restore_rejects_a_state_of_another_shape():
    agent = make_agent()
    other = make_agent(horizon=4)
    with pytest.raises(ValueError, match="shape"):
        agent.restore(other.state())
