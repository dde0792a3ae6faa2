"""Constrained CEM planner against analytic dynamics with known optima (SPEC 10)."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evjax import fused_mlp
from evjax.config import ConfigError, PlannerConfig
from evjax import planner as cem
from evjax.planner import cost_scale, make_planner

LOWER = (1.1, 1.3, 1.2)
UPPER = (1.4, 1.5, 1.4)
MID = np.array([1.25, 1.4, 1.3])
TARGET = np.array([1.35, 1.45, 1.3])  # inside the bounds
MEMBERS = 5
STATE_DIM = 4
TOLERANCE = 0.02  # CNY/kWh; 7-10 % of a price range, what 8 iterations of 200 candidates reach on a 9-dim bowl
# A small problem that CEM solves reliably: horizon 3, 200 candidates, 20 elites, 8 iterations.
SMALL = PlannerConfig(horizon=3, popsize=200, num_elites=20, particles=5, iterations=8, uncertainty="max_std_norm",
                      constant_candidates=0)
ROOT = Path(__file__).resolve().parents[1]


class StepOut(NamedTuple):
    next_obs: jax.Array  # [E, M, S]
    reward: jax.Array  # [E, M]
    cost: jax.Array  # [E, M]
    std: jax.Array  # [E, M, S + 2]


def bowl_step(model, obs, act, key, cost_fn=None, std_value=0.0):
    """Reward -||a - target||^2, cost from ``cost_fn(a)`` (default 0); state counts steps in obs[..., 0]."""
    reward = -jnp.sum(jnp.square(act - model["target"]), axis=-1)
    cost = jnp.zeros_like(reward) if cost_fn is None else cost_fn(act)
    next_obs = obs.at[..., 0].add(1.0)
    std = jnp.full(obs.shape[:-1] + (obs.shape[-1] + 2,), std_value, jnp.float32)
    return StepOut(next_obs, reward, cost, std)


@functools.lru_cache(maxsize=None)
def cached_planner(cfg, step_fn, mean_step_fn=None):
    """One planner (so one compilation) per config and step function across tests."""
    return make_planner(cfg, LOWER, UPPER, MEMBERS, step_fn, mean_step_fn=mean_step_fn)


def plan_once(cfg, step_fn, seed=0, kappa=0.0, warm_start=None, target=TARGET, **kwargs):
    planner = cached_planner(cfg, step_fn, **kwargs)
    warm = planner.initial_warm_start() if warm_start is None else warm_start
    return planner.plan(jax.random.key(seed), {"target": jnp.asarray(target, jnp.float32)},
                        jnp.zeros(STATE_DIM), warm, kappa)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unconstrained_bowl_reaches_the_optimum(seed):
    action, _, diag = plan_once(SMALL, bowl_step, seed=seed)
    np.testing.assert_allclose(action, TARGET, atol=TOLERANCE)
    assert int(diag.iterations) == SMALL.iterations
    assert float(diag.feasible_fraction) == 1.0


def test_unconstrained_mode_ignores_the_cost():
    """An always-violated cost is no obstacle to the rewards-only baseline."""
    cfg = dataclasses.replace(SMALL, mode="unconstrained", cost_limit=0.0)
    step = functools.partial(bowl_step, cost_fn=lambda a: 10.0 + a[..., 0])
    action, _, diag = plan_once(cfg, step)
    np.testing.assert_allclose(action, TARGET, atol=TOLERANCE)
    assert float(diag.feasible_fraction) == 1.0


def test_constraint_gives_the_constrained_optimum():
    """Cost 10 * max(0, a_1 - 1.25) per step with limit 0 cuts the bowl at a_1 = 1.25 (optimum 1.35)."""
    cfg = dataclasses.replace(SMALL, cost_limit=0.0)
    step = functools.partial(bowl_step, cost_fn=lambda a: 10.0 * jnp.maximum(0.0, a[..., 0] - 1.25))
    action, _, diag = plan_once(cfg, step)
    assert float(action[0]) <= 1.25 + 1e-6  # the plan is feasible, not the unconstrained 1.35
    np.testing.assert_allclose(action, [1.25, TARGET[1], TARGET[2]], atol=TOLERANCE)
    assert float(diag.elite_cost) == 0.0
    assert float(diag.feasible_fraction) > cfg.num_elites / cfg.popsize


def test_all_infeasible_takes_lowest_cost_elites():
    """Cost 1 + 10 * (a_1 - 1.1) > 0 = limit everywhere: the plan minimises cost (a_1 -> 1.1), not -reward."""
    cfg = dataclasses.replace(SMALL, cost_limit=0.0)
    step = functools.partial(bowl_step, cost_fn=lambda a: 1.0 + 10.0 * (a[..., 0] - 1.1))
    action, _, diag = plan_once(cfg, step)
    assert float(diag.feasible_fraction) == 0.0
    np.testing.assert_allclose(action[0], 1.1, atol=TOLERANCE)
    # cost is the scaled sum over H steps of at least 1: its elite mean is near the minimum H * scale
    minimum = cfg.horizon * cost_scale(cfg.gamma, cfg.horizon)
    assert minimum <= float(diag.elite_cost) <= minimum * 1.1


def test_cap_penalty_is_kappa_times_summed_uncertainty():
    """Constant std vector of norm 2 * sqrt(S + 2): penalty = kappa * H * that norm * scale for every candidate."""
    kappa = 0.7
    step = functools.partial(bowl_step, std_value=2.0)
    _, _, diag = plan_once(SMALL, step, kappa=kappa)
    expected = kappa * SMALL.horizon * 2.0 * np.sqrt(STATE_DIM + 2) * cost_scale(SMALL.gamma, SMALL.horizon)
    np.testing.assert_allclose(float(diag.uncertainty_penalty), expected, rtol=1e-5)
    np.testing.assert_allclose(float(diag.elite_cost), expected, rtol=1e-5)
    _, _, diag_ccem = plan_once(dataclasses.replace(SMALL, mode="ccem"), step, kappa=kappa)
    assert float(diag_ccem.uncertainty_penalty) == 0.0 and float(diag_ccem.elite_cost) == 0.0


def test_cost_std_uncertainty_is_the_largest_cost_std_over_particles():
    """u = largest predicted cost std among a candidate's particles: member e predicts cost std 0.1 * (e + 1)."""
    def step(model, obs, act, key):
        out = bowl_step(model, obs, act, key)
        member = jnp.arange(obs.shape[0], dtype=jnp.float32)[:, None]
        cost_std = jnp.broadcast_to(0.1 * (member + 1.0), out.reward.shape)
        return out._replace(std=out.std.at[..., -1].set(cost_std).at[..., :-1].set(5.0))

    kappa = 0.7
    cfg = dataclasses.replace(SMALL, uncertainty="cost_std")
    _, _, diag = plan_once(cfg, step, kappa=kappa)
    largest = 0.1 * MEMBERS  # the last member's std; the other dims' std of 5 plays no part
    expected = kappa * SMALL.horizon * largest * cost_scale(SMALL.gamma, SMALL.horizon)
    np.testing.assert_allclose(float(diag.uncertainty_penalty), expected, rtol=1e-5)


def test_cap_penalty_pushes_away_from_uncertain_actions():
    """Std grows with a_1: with kappa > 0 and a cost limit the plan lowers a_1 below the bowl optimum."""
    def step(model, obs, act, key):
        out = bowl_step(model, obs, act, key)
        std = jnp.broadcast_to(jnp.maximum(0.0, act[..., :1] - 1.2), out.std.shape)  # norm sqrt(S+2)*(a_1-1.2)+
        return out._replace(std=std)

    cfg = dataclasses.replace(SMALL, cost_limit=0.05)
    action_free, _, _ = plan_once(cfg, step, kappa=0.0)
    action_cap, _, diag = plan_once(cfg, step, kappa=1.0)
    np.testing.assert_allclose(action_free, TARGET, atol=TOLERANCE)
    # feasible iff sum_t sqrt(6) * (a_1,t - 1.2)+ * scale <= 0.05, so a_1 <= ~1.2068 at every step
    assert float(action_cap[0]) < 1.21 + 1e-3
    assert float(diag.elite_cost) <= cfg.cost_limit


def test_disagreement_uncertainty_is_member_spread():
    """Members predicting next obs e (e = member index) disagree by std(0..4) = sqrt(2) in each of S dims."""
    def step(model, obs, act, key):
        out = bowl_step(model, obs, act, key)
        member = jnp.arange(obs.shape[0], dtype=jnp.float32)[:, None, None]
        return out._replace(next_obs=jnp.broadcast_to(member, obs.shape))

    cfg = dataclasses.replace(SMALL, uncertainty="disagreement")
    _, _, diag = plan_once(cfg, step, kappa=1.0)
    expected = SMALL.horizon * np.sqrt(2.0) * np.sqrt(STATE_DIM) * cost_scale(SMALL.gamma, SMALL.horizon)
    np.testing.assert_allclose(float(diag.uncertainty_penalty), expected, rtol=1e-5)


def noisy_reward_step(model, obs, act):
    """Mean step of ``bowl_step`` with a reward std of 1: the sampled reward is -||a - target||^2 + eps."""
    out = bowl_step(model, obs, act, None)
    return out._replace(std=out.std.at[..., STATE_DIM].set(1.0))


def rollout_values(shared: bool, actions, noise_key=jax.random.key(3)):
    """``cem.rollout`` of candidate ``actions`` [N, H, A] through ``noisy_reward_step`` (5 members, 2 particles each)."""
    members, per_member = MEMBERS, 2
    noise = cem.draw_model_noise(noise_key, actions.shape[0], STATE_DIM, horizon=actions.shape[1],
                                 num_members=members, particles_per_member=per_member, planner_samples=True,
                                 shared=shared)
    values = cem.rollout({"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM), actions,
                         jnp.float32(0.0), noise, step_fn=None, mean_step_fn=noisy_reward_step,
                         num_members=members, particles_per_member=per_member, state_clip=1e6, uncertainty=None,
                         scale=1.0, nan_reward=-1e6, nan_cost=1e6, scan_unroll=1)
    return noise, values


def test_shared_noise_scores_identical_candidates_identically():
    """With shared noise, candidates with the same actions get the same sampled reward, and two candidates'
    scores differ by exactly their noise-free reward difference; independent draws add a sampling error."""
    actions = jnp.broadcast_to(jnp.asarray(TARGET, jnp.float32), (6, SMALL.horizon, 3))
    actions = actions.at[3:].add(0.1)  # candidates 3..5 are 0.1 off the target in every price: reward -0.03 a step
    noise, shared = rollout_values(True, actions)
    chex.assert_shape(noise, (SMALL.horizon, MEMBERS, 2, STATE_DIM + 2))  # [H, E, P/E, S+2]: no candidate axis
    np.testing.assert_allclose(np.asarray(shared.reward[:3]), float(shared.reward[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(shared.reward[0] - shared.reward[3]), SMALL.horizon * 0.03, rtol=1e-4)
    _, independent = rollout_values(False, actions)
    assert np.ptp(np.asarray(independent.reward[:3])) > 0.05  # sum of 3 steps of N(0, 1) over 10 particles


def test_without_particle_noise_every_particle_follows_its_members_means():
    """``sample_noise`` False: the reward std of 1 is not sampled; each candidate scores its noise-free reward."""
    actions = jnp.broadcast_to(jnp.asarray(TARGET, jnp.float32), (4, SMALL.horizon, 3)).at[2:].add(0.1)
    noise = cem.draw_model_noise(jax.random.key(3), 4, STATE_DIM, horizon=SMALL.horizon, num_members=MEMBERS,
                                 particles_per_member=2, planner_samples=True, shared=False)
    values = cem.rollout({"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM), actions,
                         jnp.float32(0.0), noise, step_fn=None, mean_step_fn=noisy_reward_step,
                         num_members=MEMBERS, particles_per_member=2, state_clip=1e6, uncertainty=None,
                         scale=1.0, nan_reward=-1e6, nan_cost=1e6, scan_unroll=1, sample_noise=False)
    np.testing.assert_allclose(np.asarray(values.reward), [0.0, 0.0, -0.09, -0.09], atol=1e-6)


def test_particle_noise_setting_reaches_the_rollout():
    """``planner.particle_noise: false`` in the config: the planner scores candidates by their noise-free reward."""
    cfg = dataclasses.replace(SMALL, popsize=4, num_elites=2, particles=10, particle_noise=False, mode="unconstrained")
    planner = make_planner(cfg, LOWER, UPPER, MEMBERS, lambda *a: None, mean_step_fn=noisy_reward_step)
    actions = jnp.broadcast_to(jnp.asarray(TARGET, jnp.float32), (4, cfg.horizon, 3)).at[2:].add(0.1)
    values = planner.evaluate(jax.random.key(0), {"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM),
                              actions, 0.0)
    np.testing.assert_allclose(np.asarray(values.reward), [0.0, 0.0, -0.09, -0.09], atol=1e-6)


@pytest.mark.parametrize("particle_noise, rows_after_first_step", [(True, 4 * 2), (False, 4)])
def test_without_particle_noise_the_rollout_steps_one_particle_per_member(particle_noise, rows_after_first_step):
    """The model steps [E, N * P/E] samples with particle noise and [E, N] without (the P/E copies are equal)."""
    rows = []

    def recording_step(model, obs, act):
        rows.append(obs.shape[1])  # at trace time
        return noisy_reward_step(model, obs, act)

    cfg = dataclasses.replace(SMALL, popsize=4, num_elites=2, particles=10, particle_noise=particle_noise,
                              mode="unconstrained")
    planner = make_planner(cfg, LOWER, UPPER, MEMBERS, lambda *a: None, mean_step_fn=recording_step)
    actions = jnp.broadcast_to(jnp.asarray(TARGET, jnp.float32), (4, cfg.horizon, 3))
    planner.evaluate(jax.random.key(0), {"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM),
                     actions, 0.0)
    assert rows[0] == 4 and set(rows[1:]) == {rows_after_first_step}


def test_shared_noise_equals_per_particle_noise_tiled_over_candidates():
    """Shared draws [H, E, P/E, S+2] act as per-particle draws with candidate n's particle p taking draw p."""
    actions = jax.random.uniform(jax.random.key(0), (4, SMALL.horizon, 3), minval=1.1, maxval=1.5)
    noise, shared = rollout_values(True, actions)
    tiled = jnp.tile(noise, (1, 1, actions.shape[0], 1))  # [H, E, N * P/E, S+2], candidate-major particles
    members, per_member = MEMBERS, 2
    values = cem.rollout({"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM), actions,
                         jnp.float32(0.0), tiled, step_fn=None, mean_step_fn=noisy_reward_step,
                         num_members=members, particles_per_member=per_member, state_clip=1e6, uncertainty=None,
                         scale=1.0, nan_reward=-1e6, nan_cost=1e6, scan_unroll=1)
    np.testing.assert_allclose(np.asarray(values.reward), np.asarray(shared.reward), rtol=1e-6)


def test_nan_predictions_give_a_finite_action_away_from_them():
    """The model returns NaN reward, cost and state for a_1 > 1.3; the plan stays finite and below 1.3."""
    def step(model, obs, act, key):
        out = bowl_step(model, obs, act, key)
        bad = act[..., 0] > 1.3
        nan_state = jnp.where(bad[..., None], jnp.nan, out.next_obs)
        return out._replace(next_obs=nan_state, reward=jnp.where(bad, jnp.nan, out.reward),
                            cost=jnp.where(bad, jnp.nan, out.cost))

    action, warm, diag = plan_once(dataclasses.replace(SMALL, mode="cap"), step, kappa=1.0)
    assert np.all(np.isfinite(action)) and np.all(np.isfinite(warm))
    assert np.isfinite(float(diag.elite_reward)) and np.isfinite(float(diag.elite_cost))
    assert float(action[0]) <= 1.3 + 1e-6


@pytest.mark.parametrize("target", [(0.0, 0.0, 0.0), (9.0, 9.0, 9.0), (0.0, 9.0, 1.3)])
def test_actions_stay_in_bounds(target):
    """Optima outside the box drive the plan onto the bounds, never past them."""
    for seed in range(3):
        action, warm, _ = plan_once(SMALL, bowl_step, seed=seed, target=target)
        assert np.all(np.asarray(action) >= np.asarray(LOWER)) and np.all(np.asarray(action) <= np.asarray(UPPER))
        assert np.all(np.asarray(warm) >= np.asarray(LOWER) - 1e-6)
        assert np.all(np.asarray(warm) <= np.asarray(UPPER) + 1e-6)
    # the variance cap (half the distance to the bound) makes the approach to a bound geometric: 2x tolerance
    np.testing.assert_allclose(action, np.clip(target, LOWER, UPPER), atol=2 * TOLERANCE)


def test_out_of_bounds_warm_start_is_clipped():
    warm = jnp.full((SMALL.horizon, 3), 5.0)
    action, _, _ = plan_once(dataclasses.replace(SMALL, smoothing=1.0), bowl_step, warm_start=warm)
    np.testing.assert_allclose(action, UPPER, rtol=1e-6)


def test_warm_start_shifts_along_time():
    """With smoothing 1 the mean stays at the warm start: output = warm[1:] then mid, step by step."""
    cfg = dataclasses.replace(SMALL, smoothing=1.0, horizon=4)
    warm = jnp.asarray([[1.1 + 0.05 * t, 1.3 + 0.04 * t, 1.2 + 0.03 * t] for t in range(4)], jnp.float32)
    action, next_warm, _ = plan_once(cfg, bowl_step, warm_start=warm)
    np.testing.assert_allclose(action, warm[0], rtol=1e-6)
    np.testing.assert_allclose(next_warm[:-1], warm[1:], rtol=1e-6)
    np.testing.assert_allclose(next_warm[-1], MID, rtol=1e-6)


def test_prior_prices_start_the_episode_and_fill_the_shifted_warm_start():
    """``prior_prices``: the first warm start holds them at every step, and each plan appends them (not mid)."""
    prior = (1.35, 1.45, 1.25)
    cfg = dataclasses.replace(SMALL, smoothing=1.0, horizon=4, prior_prices=prior)
    planner = cached_planner(cfg, bowl_step)
    np.testing.assert_allclose(planner.initial_warm_start(), np.broadcast_to(prior, (4, 3)), rtol=1e-6)
    action, next_warm, _ = plan_once(cfg, bowl_step)
    np.testing.assert_allclose(action, prior, rtol=1e-6)  # smoothing 1: the mean stays at the prior
    np.testing.assert_allclose(next_warm, np.broadcast_to(prior, (4, 3)), rtol=1e-6)


def test_planned_sequence_tracks_a_time_varying_optimum():
    """Target at step t is TARGET + t * 0.02 on station 3: warm start row t holds the step t + 1 optimum."""
    def step(model, obs, act, key):
        t = obs[..., 0:1]
        out = bowl_step(model, obs, act, key)
        target = model["target"] + jnp.concatenate([jnp.zeros_like(t), jnp.zeros_like(t), 0.02 * t], -1) - \
            jnp.asarray([0.0, 0.0, 0.05])
        return out._replace(reward=-jnp.sum(jnp.square(act - target), axis=-1))

    action, warm, _ = plan_once(SMALL, step)
    expected_third = TARGET[2] - 0.05 + 0.02 * np.arange(SMALL.horizon)
    np.testing.assert_allclose(action[2], expected_third[0], atol=TOLERANCE)
    np.testing.assert_allclose(warm[:-1, 2], expected_third[1:], atol=TOLERANCE)
    np.testing.assert_allclose(warm[-1], MID, rtol=1e-6)


def test_early_stop_when_variance_collapses():
    cfg = dataclasses.replace(SMALL, iterations=50, min_variance=1e-4)
    _, _, diag = plan_once(cfg, bowl_step)
    iterations = int(diag.iterations)
    assert iterations > 1 and iterations < cfg.iterations  # stopped early, after refitting at least once


def test_plan_traces_once():
    model_steps_traced = []

    def counting_step(model, obs, act, key):
        model_steps_traced.append(obs.shape)  # runs only while a plan is traced
        return bowl_step(model, obs, act, key)

    planner = make_planner(SMALL, LOWER, UPPER, MEMBERS, counting_step)
    traced = jax.jit(chex.assert_max_traces(planner.plan_fn, n=1))
    model = {"target": jnp.asarray(TARGET, jnp.float32)}
    for seed in range(3):
        warm = planner.initial_warm_start() + 0.01 * seed
        traced(jax.random.key(seed), model, jnp.full(STATE_DIM, float(seed)), warm, jnp.float32(seed))
    traced_by_one_plan = len(model_steps_traced)
    for seed, kappa in enumerate((0, 0.5, jnp.float32(2.0))):  # python ints, floats, numpy and jax arrays
        warm = planner.initial_warm_start() + 0.01 * seed
        planner.plan(jax.random.key(seed), model, np.full(STATE_DIM, seed), np.asarray(warm), kappa)
        planner.plan(jax.random.key(seed), model, jnp.full(STATE_DIM, seed), warm, kappa)
    assert len(model_steps_traced) == 2 * traced_by_one_plan  # ``plan`` traced once: first step and horizon scan


@pytest.mark.parametrize("path", ["step_fn", "mean_step_fn"])
def test_plan_batch_equals_single_plans(path):
    """B plans in one call (different keys, states, warm starts and kappas) equal B single plans.

    The model's std grows with the state's first entry, so the plans differ in
    their noise, penalty and feasible set, and the calm first plan stops early
    (variance collapsed) while the batch's other plans run on.
    """
    def uncertain_step(model, obs, act, key=None):
        out = bowl_step(model, obs, act, None, cost_fn=lambda a: jnp.maximum(0.0, a[..., 0] - 1.25))
        std = jnp.broadcast_to(0.01 * jnp.square(obs[..., :1]), out.std.shape)  # [E, M, S+2]
        if key is not None:
            eps = jax.random.normal(key, std.shape)
            out = out._replace(next_obs=out.next_obs + std[..., :STATE_DIM] * eps[..., :STATE_DIM],
                               reward=out.reward + std[..., STATE_DIM] * eps[..., STATE_DIM])
        return out._replace(std=std)

    kwargs = {"mean_step_fn": uncertain_step} if path == "mean_step_fn" else {}
    # sampled particles with independent noise per candidate keep the noisy plans from collapsing their variance early
    cfg = dataclasses.replace(SMALL, cost_limit=0.2, min_variance=1e-3, shared_noise=False, particle_noise=True)
    planner = make_planner(cfg, LOWER, UPPER, MEMBERS, uncertain_step, **kwargs)
    model = {"target": jnp.asarray(TARGET, jnp.float32)}
    batch = 3
    keys = jax.random.split(jax.random.key(7), batch)
    obs = jnp.array([0.0, 2.0, 5.0])[:, None] * jnp.ones((batch, STATE_DIM))  # [B, S]
    warm = planner.initial_warm_start() + jnp.linspace(-0.05, 0.05, batch)[:, None, None]  # [B, H, A]
    kappa = jnp.array([0.0, 0.5, 2.0])  # [B]
    batched = planner.plan_batch(keys, model, obs, warm, kappa)
    chex.assert_shape(batched[0], (batch, 3))  # [B, A]
    chex.assert_shape(batched[1], (batch, cfg.horizon, 3))  # [B, H, A]
    assert int(batched[2].iterations[0]) < cfg.iterations == int(batched[2].iterations[2])
    for sequential in (True, False):  # plan_batch's choice on CPU, and on accelerators
        other = jax.jit(functools.partial(cem.batch_plans, plan_fn=planner.plan_fn, sequential=sequential))
        for got, want in zip(jax.tree.leaves(other(keys, model, obs, warm, kappa)), jax.tree.leaves(batched)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for b in range(batch):
        single = planner.plan(keys[b], model, obs[b], warm[b], kappa[b])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the pieces of a CEM iteration, on their own

def test_constant_grid_hand_values():
    lower, upper = jnp.asarray(LOWER), jnp.asarray(UPPER)
    assert cem.constant_grid(0, lower, upper) is None
    corners = np.asarray(cem.constant_grid(2, lower, upper))
    assert corners.shape == (8, 3)
    want = [(a, b, c) for a in (1.1, 1.4) for b in (1.3, 1.5) for c in (1.2, 1.4)]
    np.testing.assert_allclose(corners, want, rtol=1e-6)  # the first station's level varies slowest
    grid = np.asarray(cem.constant_grid(3, lower, upper))
    assert grid.shape == (27, 3)
    assert any(np.allclose(row, MID) for row in grid)  # the middle level is the mid-range price


def test_constant_candidates_replace_the_first_samples_only():
    key = jax.random.key(0)
    mean, var = jnp.broadcast_to(jnp.asarray(MID, jnp.float32), (4, 3)), jnp.full((4, 3), 0.01)
    lower, upper = jnp.asarray(LOWER, jnp.float32), jnp.asarray(UPPER, jnp.float32)
    samples = cem.sample_candidates(key, mean, var, lower=lower, upper=upper, num_candidates=20, truncation_sigma=3.0)
    grid = cem.constant_grid(2, lower, upper)
    mixed = cem.with_constant_candidates(samples, grid)
    np.testing.assert_array_equal(mixed[:8], jnp.broadcast_to(grid[:, None, :], (8, 4, 3)))
    np.testing.assert_array_equal(mixed[8:], samples[8:])



def test_constant_candidates_larger_than_the_population_are_refused():
    """A planner built outside the config check (PlannerConfig by hand) gets a clear error, not a silent slice."""
    lower, upper = jnp.asarray(LOWER, jnp.float32), jnp.asarray(UPPER, jnp.float32)
    samples = jnp.zeros((20, 4, 3), jnp.float32)
    with pytest.raises(ValueError, match="27 constant sequences exceed the 20 candidates"):
        cem.with_constant_candidates(samples, cem.constant_grid(3, lower, upper))

def test_constant_candidates_bring_the_plan_to_a_corner_optimum():
    """A bowl centred on a corner of the price box: the Gaussian samples approach it from the mid-range prior
    within their capped spread; with the 27 constant sequences of a 3-level grid in every iteration the
    corner itself is a candidate, and the plan ends closer to it on every seed."""
    corner = np.array([UPPER[0], UPPER[1], LOWER[2]])
    for seed in range(3):
        plain, _, _ = plan_once(SMALL, bowl_step, seed=seed, target=corner)
        gridded, _, _ = plan_once(dataclasses.replace(SMALL, constant_candidates=3), bowl_step, seed=seed,
                                  target=corner)
        assert np.max(np.abs(gridded - corner)) < 0.7 * np.max(np.abs(plain - corner))
        np.testing.assert_allclose(gridded, corner, atol=0.01)


@pytest.mark.parametrize("hoist, traced_batches", [(True, [8, 32]), (False, [40])])
def test_constant_candidates_are_rolled_out_once_per_plan(hoist, traced_batches):
    """With 8 constant sequences among 40 candidates the plan rolls the 8 out once, before the CEM loop, and
    each iteration the 32 samples (``hoist_constants``); the reference rolls all 40 out every iteration."""
    batches = []

    def recording_step(model, obs, act):
        batches.append(obs.shape[1])  # at trace time: [E, N] without particle noise
        return noisy_reward_step(model, obs, act)

    cfg = dataclasses.replace(SMALL, popsize=40, num_elites=4, particles=5, particle_noise=False,
                              constant_candidates=2, mode="unconstrained")
    planner = make_planner(cfg, LOWER, UPPER, MEMBERS, lambda *a: None, mean_step_fn=recording_step,
                           hoist_constants=hoist)
    planner.plan(jax.random.key(0), {"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM),
                 planner.initial_warm_start(), 0.0)
    assert list(dict.fromkeys(batches)) == traced_batches  # in the order traced


@pytest.mark.parametrize("particle_noise, shared_noise", [(False, True), (True, True), (True, False)])
def test_hoisted_constant_candidates_give_the_reference_plan(particle_noise, shared_noise):
    """A small ensemble (random weights, the default observation cost and CAP margin):
    rolling the constant candidates out once gives the reference plan bit for bit (action, warm start,
    feasible share, elite values); only the mean penalty diagnostic may differ in its summation order."""
    from evjax.config import load
    from evjax.dynamics import make_dynamics

    cfg = load(None, ["model.hidden_sizes=[32, 32]", "model.weight_decays=[0.0, 0.0, 0.0]", "planner.popsize=96",
                      "planner.constant_candidates=3", "planner.particles=10", "planner.matmul_dtype=float32",
                      f"planner.particle_noise={str(particle_noise).lower()}",
                      f"planner.shared_noise={str(shared_noise).lower()}"])
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    model = dyn.init(jax.random.key(1))
    hoisted, reference = (cem.make_model_planner(cfg, dyn, hoist_constants=h) for h in (True, False))
    obs = jax.random.normal(jax.random.key(2), (cfg.obs_dim,), jnp.float32)
    for seed in range(2):
        got, want = (p.plan(jax.random.key(seed), model, obs, p.initial_warm_start(), 0.7)
                     for p in (hoisted, reference))
        for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])):
            np.testing.assert_array_equal(a, b)
        for name in ("feasible_fraction", "elite_reward", "elite_cost", "iterations"):
            assert getattr(got[2], name) == getattr(want[2], name), name
        np.testing.assert_allclose(got[2].uncertainty_penalty, want[2].uncertainty_penalty, rtol=1e-5)


def test_planner_benchmark_refuses_to_compare_the_reference_with_itself(subprocess_env):
    """``benchmarks/planner.py --no-hoist --against-no-hoist``: a one-line usage error, exit status 2."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "planner.py"), "--no-hoist", "--against-no-hoist"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "--against-no-hoist compares" in done.stderr.strip().splitlines()[-1]


def test_capped_variance_hand_values():
    """v = min(sigma^2, ((mu - lb) / 2)^2, ((ub - mu) / 2)^2) on bounds [1, 2]."""
    mean = jnp.array([[1.5, 1.1, 1.9, 1.0]])
    var = jnp.array([[0.01, 0.01, 1.0, 0.5]])
    got = cem.capped_variance(mean, var, lower=jnp.float32(1.0), upper=jnp.float32(2.0))
    np.testing.assert_allclose(got, [[0.01, 0.0025, 0.0025, 0.0]], rtol=1e-5, atol=1e-9)


def test_sample_candidates_stay_within_the_truncated_spread_and_bounds():
    """Mean 1.5 and variance 0.01 on [1, 2] truncated at 1 sigma: every sample within 1.5 +- 0.1; a mean on a
    bound has no spread left (its capped variance is 0)."""
    mean = jnp.array([[1.5, 1.0]])
    var = jnp.array([[0.01, 0.01]])
    samples = cem.sample_candidates(jax.random.key(0), mean, var, lower=jnp.float32(1.0), upper=jnp.float32(2.0),
                                    num_candidates=4000, truncation_sigma=1.0)
    chex.assert_shape(samples, (4000, 1, 2))  # [N, H, A]
    first, second = np.asarray(samples[:, 0, 0]), np.asarray(samples[:, 0, 1])
    assert first.min() >= 1.4 - 1e-6 and first.max() <= 1.6 + 1e-6
    # a normal truncated at +-1 sigma has std sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396 sigma
    assert np.std(first) == pytest.approx(0.5396 * 0.1, rel=0.05) and np.mean(first) == pytest.approx(1.5, abs=3e-3)
    np.testing.assert_array_equal(second, 1.0)


def test_uncapped_samples_from_a_bound_pile_half_on_it():
    """Without the variance cap a mean on the lower bound keeps its spread: the half of the truncated normal
    below the bound is clipped onto it (P = 1/2), the other half lies in (1, 1 + 3 sigma] with mean
    1 + sigma * E[z | 0 < z < 3] = 1 + 0.1 * 0.7912."""
    mean, var = jnp.array([[1.0]]), jnp.array([[0.01]])
    samples = np.asarray(cem.sample_candidates(jax.random.key(1), mean, var, lower=jnp.float32(1.0),
                                               upper=jnp.float32(2.0), num_candidates=20000, truncation_sigma=3.0,
                                               variance_cap=False))[:, 0, 0]
    on_bound = samples == 1.0
    assert np.mean(on_bound) == pytest.approx(0.5, abs=0.015)
    # E[z | 0 < z < 3] for a standard normal: (phi(0) - phi(3)) / (Phi(3) - 1/2) = 0.7912
    assert np.mean(samples[~on_bound]) == pytest.approx(1.0 + 0.1 * 0.7912, abs=2e-3)
    assert samples.max() <= 1.3 + 1e-6


# six hand-made candidates: (reward, cost); limit 1.0 makes 0, 2 and 4 feasible
REWARD = jnp.array([5.0, 9.0, 7.0, 8.0, 6.0, 1.0])
COST = jnp.array([0.5, 3.0, 0.2, 2.0, 1.0, 1.5])


def test_refit_takes_the_best_rewarded_feasible_candidates():
    """3 feasible (0, 2, 4), 2 elites: the feasible ones with rewards 7 and 6, not the infeasible 9 and 8."""
    index = cem.elite_indices(REWARD, COST, COST <= 1.0, num_elites=2)
    np.testing.assert_array_equal(index, [2, 4])


def test_refit_with_too_few_feasible_takes_the_lowest_costs():
    """Limit 0.3: only candidate 2 is feasible, fewer than 2 elites, so the two lowest costs (0.2 and 0.5)."""
    index = cem.elite_indices(REWARD, COST, COST <= 0.3, num_elites=2)
    np.testing.assert_array_equal(index, [2, 0])


def test_host_side_cem_uses_the_same_elite_rule():
    """The oracle's numpy CEM ranks by ``elite_scores`` too: a stable sort of the scores gives the same elites."""
    reward, cost = np.asarray(REWARD, np.float64), np.asarray(COST, np.float64)
    for limit, expected in ((1.0, [2, 4]), (0.3, [2, 0])):
        score = cem.elite_scores(reward, cost, cost <= limit, num_elites=2, xp=np)
        np.testing.assert_array_equal(np.argsort(-score, kind="stable")[:2], expected)


def test_refit_smooths_mean_and_variance_toward_the_elites():
    """Elites 1 and 3 at every step: elite mean 2, variance 1; smoothing 0.25 keeps a quarter of the old (0, 4)."""
    elites = jnp.stack([jnp.full((2, 1), 1.0), jnp.full((2, 1), 3.0)])  # [J, H, A]
    mean, var = cem.refit(jnp.zeros((2, 1)), jnp.full((2, 1), 4.0), elites, smoothing=0.25)
    np.testing.assert_allclose(mean, 1.5)
    np.testing.assert_allclose(var, 0.25 * 4.0 + 0.75 * 1.0)


def test_candidate_uncertainty_hand_values():
    """E = 2 members, N = 2 candidates, P/E = 2 particles each; M = 4 samples per member, S = 1.

    cost_std: largest cost std over a candidate's 4 particles; max_std_norm: largest norm of the
    (delta, reward, cost) std vector; disagreement: std over the members of their particle-mean obs.
    """
    cost_std = jnp.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.0, 0.1, 0.9]])  # [E, M]
    std = jnp.stack([jnp.zeros_like(cost_std), jnp.zeros_like(cost_std), cost_std], axis=-1)  # [E, M, S+2]
    std = std.at[0, 0, 0].set(3.0).at[0, 0, 1].set(4.0)  # member 0, candidate 0, particle 0: norm sqrt(9+16+0.01)
    next_obs = jnp.array([[1.0, 3.0, 0.0, 0.0], [5.0, 7.0, 0.0, 2.0]])[..., None]  # [E, M, S]
    out = StepOut(next_obs, jnp.zeros((2, 4)), jnp.zeros((2, 4)), std)
    sizes = dict(num_members=2, num_candidates=2, particles_per_member=2)
    np.testing.assert_allclose(cem.candidate_uncertainty(out, kind="cost_std", **sizes), [0.5, 0.9], rtol=1e-6)
    np.testing.assert_allclose(cem.candidate_uncertainty(out, kind="max_std_norm", **sizes),
                               [math.sqrt(25.01), 0.9], rtol=1e-6)
    # candidate 0: member means 2 and 6 -> std 2; candidate 1: means 0 and 1 -> std 0.5
    np.testing.assert_allclose(cem.candidate_uncertainty(out, kind="disagreement", **sizes), [2.0, 0.5], rtol=1e-6)


class TestJitAgreement(chex.TestCase):
    """The plan gives the same answer compiled and run op by op (``jax.disable_jit``)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jitted_and_unjitted_agree(self):
        self._check_agreement(self.variant)

    def test_disable_jit_agrees(self):
        """Every loop (CEM iterations, horizon scan) run in Python, op by op."""
        def run_without_jit(fn):
            def run(*args):
                with jax.disable_jit():
                    return fn(*args)
            return run

        self._check_agreement(run_without_jit)

    def _check_agreement(self, variant):
        cfg = dataclasses.replace(SMALL, popsize=40, num_elites=8, iterations=2, horizon=2, cost_limit=0.05)
        step = functools.partial(bowl_step, cost_fn=lambda a: jnp.maximum(0.0, a[..., 0] - 1.25), std_value=0.01)
        planner = make_planner(cfg, LOWER, UPPER, MEMBERS, step)
        plan = variant(planner.plan_fn)
        args = (jax.random.key(3), {"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM),
                planner.initial_warm_start(), jnp.float32(0.5))
        action, warm, diag = plan(*args)
        reference_action, reference_warm, reference_diag = planner.plan(*args)
        np.testing.assert_allclose(action, reference_action, rtol=1e-5)
        np.testing.assert_allclose(warm, reference_warm, rtol=1e-5)
        for got, want in zip(diag, reference_diag):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        assert 0.0 < float(diag.feasible_fraction) < 1.0  # both branches of the feasibility filter exercised


@pytest.mark.parametrize("change, name", [
    ({"num_elites": 300}, "planner.num_elites"),
    ({"horizon": 0}, "planner.horizon"),
    ({"mode": "greedy"}, "planner.mode"),
    ({"uncertainty": "entropy"}, "planner.uncertainty"),
    ({"smoothing": 1.5}, "planner.smoothing"),
    ({"nan_cost": 0.1, "cost_limit": 0.5}, "planner.nan_cost"),
    ({"gamma": 0.0}, "planner.gamma"),
])
def test_impossible_settings_fail_when_the_config_is_built(change, name):
    """The section checks its own fields on construction, so no factory ever sees these values."""
    with pytest.raises(ConfigError, match=name):
        dataclasses.replace(SMALL, **change)


def test_factory_rejects_particles_not_divisible_by_its_members():
    """particles (7) against num_members (5), an argument the config does not know."""
    cfg = dataclasses.replace(SMALL, particles=7)
    with pytest.raises(ValueError, match="planner.particles"):
        make_planner(cfg, LOWER, UPPER, MEMBERS, bowl_step)


def test_factory_rejects_bad_bounds():
    with pytest.raises(ValueError, match="price_lower"):
        make_planner(SMALL, (1.5, 1.3, 1.2), UPPER, MEMBERS, bowl_step)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_planner import SMALL, LOWER, UPPER, MEMBERS, STATE_DIM, TARGET, bowl_step
    from evjax.planner import make_planner
    import dataclasses, functools
    assert len(jax.devices()) == 2, jax.devices()
    cfg = dataclasses.replace(SMALL, cost_limit=0.01)
    step = functools.partial(bowl_step, cost_fn=lambda a: jnp.maximum(0.0, a[..., 0] - 1.25), std_value=0.01)
    mesh = jax.make_mesh((2,), ("population",))
    args = (jax.random.key(7), {"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM))
    single = make_planner(cfg, LOWER, UPPER, MEMBERS, step)
    sharded = make_planner(cfg, LOWER, UPPER, MEMBERS, step, mesh=mesh)
    a1, w1, d1 = single.plan(*args, single.initial_warm_start(), 0.5)
    a2, w2, d2 = sharded.plan(*args, sharded.initial_warm_start(), 0.5)
    hlo = jax.jit(sharded.plan_fn).lower(*args, sharded.initial_warm_start(), jnp.float32(0.5)).compile().as_text()
    print(json.dumps({"a1": np.asarray(a1).tolist(), "a2": np.asarray(a2).tolist(),
                      "w1": np.asarray(w1).tolist(), "w2": np.asarray(w2).tolist(),
                      "r1": float(d1.elite_reward), "r2": float(d2.elite_reward),
                      "partitioned": "num_partitions=2" in hlo}))
""")


def test_sharded_population_matches_single_device(subprocess_env, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(script), str(ROOT / "tests")], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["partitioned"]
    np.testing.assert_allclose(result["a2"], result["a1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["w2"], result["w1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["r2"], result["r1"], rtol=1e-5, atol=1e-6)


class NoiseModel:
    """Next obs = 0 + N(0, 1) per obs dim, reward = obs[0] of the state entering the step, no cost.

    A candidate's return is eps_1 + ... + eps_{H-1} (first-dim noise of steps 0..H-2), so its
    particle mean has variance (H - 1) / P exactly when every particle draws its own noise.
    """

    @staticmethod
    def mean_step(model, obs, act):
        reward = obs[..., 0]
        std = jnp.concatenate([jnp.ones_like(obs), jnp.zeros(obs.shape[:-1] + (2,))], axis=-1)
        return StepOut(jnp.zeros_like(obs), reward, jnp.zeros_like(reward), std)

    @staticmethod
    def step(model, obs, act, key):
        out = NoiseModel.mean_step(model, obs, act)
        return out._replace(next_obs=jax.random.normal(key, obs.shape))


@pytest.mark.parametrize("path", ["step_fn", "mean_step_fn"])
def test_every_particle_draws_its_own_noise(path):
    """Without ``shared_noise`` the particle means of identical candidates scatter with variance (H - 1) / P;
    with it (mean_step_fn path) every candidate sees the same draws and they all score the same."""
    cfg = dataclasses.replace(SMALL, popsize=2000, particles=10, shared_noise=False, particle_noise=True)
    kwargs = {"mean_step_fn": NoiseModel.mean_step} if path == "mean_step_fn" else {}
    planner = make_planner(cfg, LOWER, UPPER, MEMBERS, NoiseModel.step, **kwargs)
    actions = jnp.broadcast_to(planner.initial_warm_start(), (cfg.popsize, cfg.horizon, 3))
    values = jax.jit(planner.evaluate)(jax.random.key(0), None, jnp.zeros(STATE_DIM), actions, 0.0)
    expected = (cfg.horizon - 1) / cfg.particles
    standard_error = expected * np.sqrt(2.0 / cfg.popsize)
    assert abs(float(jnp.var(values.reward)) - expected) < 4 * standard_error
    assert abs(float(jnp.mean(values.reward))) < 4 * np.sqrt(expected / cfg.popsize)
    if path == "mean_step_fn":
        shared = make_planner(dataclasses.replace(cfg, shared_noise=True), LOWER, UPPER, MEMBERS, NoiseModel.step,
                              **kwargs)
        values = jax.jit(shared.evaluate)(jax.random.key(0), None, jnp.zeros(STATE_DIM), actions, 0.0)
        assert float(jnp.ptp(values.reward)) == 0.0 and float(jnp.abs(values.reward[0])) > 0.0


def test_mean_step_path_shares_the_first_forward_pass():
    """The first step runs once per (member, candidate); with a noise-free model both paths agree exactly."""
    seen_rows = []

    def mean_step(model, obs, act):
        seen_rows.append(obs.shape[1])  # recorded while tracing
        return bowl_step(model, obs, act, None, cost_fn=lambda a: jnp.maximum(0.0, a[..., 0] - 1.25))

    step = functools.partial(bowl_step, cost_fn=lambda a: jnp.maximum(0.0, a[..., 0] - 1.25), std_value=0.0)
    cfg = dataclasses.replace(SMALL, cost_limit=0.05, particle_noise=True)
    shared = plan_once(cfg, step, mean_step_fn=mean_step, kappa=0.3)
    per_particle = plan_once(cfg, step, kappa=0.3)
    samples_per_member = cfg.popsize * cfg.particles // MEMBERS
    assert seen_rows == [cfg.popsize, samples_per_member]  # first step, then the scanned later steps
    for got, want in zip(jax.tree.leaves(shared), jax.tree.leaves(per_particle)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def fitted_ensemble():
    """The real ensemble (paper architecture) fitted for 20 epochs on 600 synthetic transitions.

    Reward is a bowl in the prices with its optimum at (1.3, 1.42, 1.28); the cost
    5 * max(0, a_1 - 1.25) makes the limit bind, so the plan trades reward against cost.
    """
    from evjax.config import Config
    from evjax.dynamics import make_dynamics

    cfg = Config()
    # the model's learned cost, with a limit on this synthetic cost's scale (the defaults compute the
    # environment's cost from the predicted observation, which these synthetic observations do not carry)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, epochs=20),
                              planner=dataclasses.replace(cfg.planner, cost_limit=2.5, cost_model="learned",
                                                          stop_at_episode_end=False, constraint_backoff=(0.0, 0.0)),
                              evaluation=dataclasses.replace(cfg.evaluation, constraint_backoff=None))
    dyn = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim)
    rng = np.random.default_rng(0)
    lower, upper = np.array(cfg.env.price_lower), np.array(cfg.env.price_upper)
    obs = rng.normal(size=(600, cfg.obs_dim)).astype(np.float32)
    act = rng.uniform(lower, upper, size=(600, cfg.action_dim)).astype(np.float32)
    reward = 1.0 - 30.0 * np.sum(np.square(act - [1.3, 1.42, 1.28]), axis=-1) + 0.1 * obs[:, 0]
    cost = 5.0 * np.maximum(0.0, act[:, 0] - 1.25)
    next_obs = 0.9 * obs + 0.5 * (act - lower) @ rng.normal(size=(cfg.action_dim, cfg.obs_dim))
    model, _ = dyn.fit(jax.random.key(0), dyn.init(jax.random.key(1)), obs, act, reward.astype(np.float32),
                       cost.astype(np.float32), next_obs.astype(np.float32))
    return cfg, dyn, model, obs[0]


def test_bfloat16_plan_matches_float32_plan(fitted_ensemble):
    """Paper sizes (500 candidates, 30 particles, horizon 12, 5 iterations, 5 x 4 x 256 members).

    Same model, observation and key: the bfloat16-matmul plan's predicted return is
    within 1 % of the float32 plan's and its first action within 2 % of each price range,
    also with the hidden products stored in bfloat16 (``planner.hidden_dtype``, the GPU's setting).
    """
    from evjax.planner import make_model_planner

    cfg, dyn, model, obs = fitted_ensemble
    results = {}
    for dtype, hidden in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")):
        dtype_cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, matmul_dtype=dtype,
                                                                         hidden_dtype=hidden))
        planner = make_model_planner(dtype_cfg, dyn)
        results[dtype, hidden] = planner.plan(jax.random.key(3), model, obs, planner.initial_warm_start(), 0.0)
    action32, _, diag32 = results["float32", "float32"]
    assert 0.0 < float(diag32.feasible_fraction) < 1.0  # the constraint binds: reward and cost both matter
    assert abs(float(diag32.elite_reward)) > 1.0  # a non-trivial predicted return
    price_range = np.asarray(cfg.env.price_upper) - np.asarray(cfg.env.price_lower)
    for hidden in ("float32", "bfloat16"):
        action16, _, diag16 = results["bfloat16", hidden]
        assert abs(float(diag16.elite_reward) - float(diag32.elite_reward)) <= 0.01 * abs(float(diag32.elite_reward))
        assert np.all(np.abs(np.asarray(action16) - np.asarray(action32)) <= 0.02 * price_range)


def test_hidden_dtype_auto_is_bfloat16_on_accelerators_only():
    from evjax.planner import resolve_hidden_dtype

    assert resolve_hidden_dtype("auto", "bfloat16", "gpu") == "bfloat16"
    assert resolve_hidden_dtype("auto", "bfloat16", "tpu") == "bfloat16"
    assert resolve_hidden_dtype("auto", "bfloat16", "cpu") == "float32"
    assert resolve_hidden_dtype("auto", "float32", "gpu") == "float32"  # float32 matmuls keep float32 products
    assert resolve_hidden_dtype("bfloat16", "float32", "cpu") == "bfloat16"  # an explicit choice is kept


@pytest.mark.parametrize("margin_std", ["predicted", "disagreement"])
def test_without_particle_noise_one_particle_per_member_scores_like_all_of_them(fitted_ensemble, margin_std):
    """``particle_noise: false``: the planner rolls out one particle per (member, candidate), since the P/E
    particles of a member follow the same means; its values equal a rollout of all P particles (paper's
    30 = 6 per member) with the observation cost and either margin."""
    from evjax.config import Config
    from evjax.planner import make_cost_fn, make_model_planner

    cfg, dyn, model, obs = fitted_ensemble
    cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, particle_noise=False, margin_std=margin_std,
                                                               matmul_dtype="float32", cost_model="observation"))
    planner = make_model_planner(cfg, dyn)
    actions = jax.random.uniform(jax.random.key(5), (64, cfg.planner.horizon, 3), minval=1.1, maxval=1.5)
    obs = jnp.asarray(obs).at[:3].set(0.88)  # loadings near the limit: the margin and the hinge are active
    got = planner.evaluate(jax.random.key(0), model, obs, actions, 2.0)
    per_member = cfg.planner.particles // MEMBERS
    noise = cem.draw_model_noise(jax.random.key(0), 64, cfg.obs_dim, horizon=cfg.planner.horizon,
                                 num_members=MEMBERS, particles_per_member=per_member, planner_samples=True)
    step = functools.partial(dyn.step, key=None, mean_only=True, matmul_dtype="float32", tile_rows=0)
    want = cem.rollout(model, obs, actions, jnp.float32(2.0), noise, step_fn=None, mean_step_fn=step,
                       num_members=MEMBERS, particles_per_member=per_member, state_clip=cfg.planner.state_clip,
                       uncertainty=cfg.planner.uncertainty, scale=cost_scale(cfg.planner.gamma, cfg.planner.horizon),
                       nan_reward=-1e6, nan_cost=1e6, scan_unroll=1, cost_fn=make_cost_fn(Config()), penalise=True,
                       sample_noise=False, margin_std_kind=margin_std)
    assert float(jnp.max(want.penalty)) > 0.0 and float(jnp.ptp(want.cost)) > 0.0
    for name in ("reward", "cost", "penalty"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kernel", ["pallas", "pallas_layers", "mosaic"])
def test_pallas_kernel_plans_like_the_xla_path(kernel, monkeypatch):
    """Batched plans through a fused Pallas kernel (interpret mode on CPU) match the XLA path's.

    A small random ensemble (2 x 32 hidden units) and population keep interpret
    mode quick; ``make_model_planner`` refuses the kernel off the GPU.
    """
    from evjax.config import Config, ModelConfig
    from evjax.dynamics import make_dynamics, prepare
    from evjax.planner import make_model_planner

    cfg = Config()
    width = 64 if kernel == "mosaic" else 32  # the Mosaic kernel's weight blocks are 64 wide
    monkeypatch.setattr(fused_mlp, "MOSAIC_SPLIT", 0)  # one warpgroup: see test_mosaic_kernel_matches_the_xla_step
    dyn = make_dynamics(ModelConfig(hidden_sizes=(width, width), weight_decays=(0.0,) * 3), cfg.obs_dim,
                        cfg.action_dim)
    fresh = dyn.init(jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 16))
    model = fresh.replace(params=jax.tree.map(lambda leaf: leaf + 0.3 * jax.random.normal(next(keys), leaf.shape),
                                              fresh.params))
    planner_cfg = dataclasses.replace(SMALL, popsize=40, num_elites=8, particles=5, iterations=2, cost_limit=0.5)
    batch = 2
    obs = jax.random.normal(jax.random.key(2), (batch, cfg.obs_dim))  # [B, S]
    results = {}
    for name in ("xla", kernel):
        step = functools.partial(dyn.step, matmul_dtype="bfloat16", kernel=name)
        planner = make_planner(planner_cfg, cfg.env.price_lower, cfg.env.price_upper, dyn.num_planning_members,
                               step, mean_step_fn=functools.partial(step, key=None, mean_only=True),
                               prepare_fn=functools.partial(prepare, layout=dyn.layout, kernel=name))
        warm = jnp.broadcast_to(planner.initial_warm_start(), (batch, planner_cfg.horizon, cfg.action_dim))
        results[name] = planner.plan_batch(jax.random.split(jax.random.key(3), batch), model, obs, warm, 1.0)
    price_range = np.asarray(cfg.env.price_upper) - np.asarray(cfg.env.price_lower)
    (action_xla, warm_xla, diag_xla), (action_pallas, warm_pallas, diag_pallas) = results["xla"], results[kernel]
    assert np.all(np.abs(np.asarray(action_pallas) - np.asarray(action_xla)) <= 0.02 * price_range)
    assert np.all(np.abs(np.asarray(warm_pallas) - np.asarray(warm_xla)) <= 0.02 * price_range)
    np.testing.assert_allclose(diag_pallas.elite_reward, diag_xla.elite_reward, rtol=0.01)
    pallas_cfg = dataclasses.replace(cfg, planner=dataclasses.replace(cfg.planner, kernel=kernel))
    with pytest.raises(ValueError, match="planner.kernel"):
        make_model_planner(pallas_cfg, dyn)


def test_check_kernel_refuses_what_the_device_cannot_run():
    """Any kernel on a GPU passes except mosaic off Hopper (compute capability 8.0, 10.0) or with float32; the
    refusals are config errors, one line and exit status 2 from the command line."""
    cem.check_kernel("xla", "cpu", "float32", None)
    cem.check_kernel("mosaic", "gpu", "bfloat16", "9.0")
    cem.check_kernel("pallas", "gpu", "float32", "8.0")
    for args, match in ((("pallas", "cpu", "bfloat16", None), "needs a GPU backend"),
                        (("mosaic", "gpu", "bfloat16", "8.0"), "Hopper GPU .* this one is 8.0"),
                        (("mosaic", "gpu", "bfloat16", "10.0"), "Hopper GPU .* this one is 10.0"),
                        (("mosaic", "gpu", "float32", "9.0"), "planner.matmul_dtype bfloat16")):
        with pytest.raises(ConfigError, match=match):
            cem.check_kernel(*args)


def test_auto_kernel_is_mosaic_only_where_it_runs():
    """``planner.kernel: auto`` picks the Mosaic kernel on a Hopper GPU with bfloat16 matmuls and an MLP it takes
    (the default 4 x 256), the XLA path on CPU, on other GPUs, with float32 matmuls or with uneven widths; an
    explicit kernel is kept as it is, so that ``check_kernel`` still refuses what the device cannot run."""
    from evjax.config import Config, ModelConfig
    from evjax.dynamics import make_dynamics

    cfg = Config()
    assert cfg.planner.kernel == "auto"
    layout = make_dynamics(cfg.model, cfg.obs_dim, cfg.action_dim).layout
    uneven = make_dynamics(ModelConfig(hidden_sizes=(256, 192), weight_decays=(0.0,) * 3), cfg.obs_dim,
                           cfg.action_dim).layout
    assert cem.resolve_kernel("auto", "gpu", "bfloat16", "9.0", layout) == "mosaic"
    for args in (("cpu", "bfloat16", None, layout), ("gpu", "bfloat16", "8.0", layout),
                 ("gpu", "bfloat16", "10.0", layout), ("gpu", "float32", "9.0", layout),
                 ("gpu", "bfloat16", "9.0", uneven)):
        assert cem.resolve_kernel("auto", *args) == "xla", args
    assert cem.resolve_kernel("mosaic", "cpu", "bfloat16", None, layout) == "mosaic"
    assert cem.resolve_kernel("xla", "gpu", "bfloat16", "9.0", layout) == "xla"


@pytest.mark.parametrize("flags, env, plugin, want", [
    ("", {}, True, "{ours}"),
    ("--xla_dump_to=/tmp/x", {}, True, "--xla_dump_to=/tmp/x {ours}"),
    ("--xla_gpu_enable_command_buffer=FUSION", {}, True, "--xla_gpu_enable_command_buffer=FUSION"),
    ("", {"EVJAX_XLA_FLAGS": "keep"}, True, ""),
    ("", {}, False, ""),
])
def test_gpu_command_buffer_flag_is_added_only_for_a_cuda_install(monkeypatch, flags, env, plugin, want):
    """Importing evjax adds the command-buffer flag where a CUDA plugin is installed, after the user's flags;
    a user's own setting of that flag, or ``EVJAX_XLA_FLAGS=keep``, wins."""
    import evjax

    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.delenv("EVJAX_XLA_FLAGS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(evjax, "_has_cuda_plugin", lambda: plugin)
    evjax._set_gpu_xla_flags()
    assert os.environ["XLA_FLAGS"] == want.format(ours=evjax.GPU_COMMAND_BUFFERS)


@pytest.mark.parametrize("pessimism", [0.5, 2.0])
def test_reward_pessimism_subtracts_the_members_return_spread(pessimism):
    """Member e predicts reward bowl + e every step: over H steps the members' returns H*bowl + H*e have mean
    H*bowl + 2H and std H*sqrt(2) (std of 0..4), so the scored reward drops by exactly pessimism * H * sqrt(2)."""
    def offset_step(model, obs, act):
        out = bowl_step(model, obs, act, None)
        member = jnp.arange(obs.shape[0], dtype=jnp.float32)[:, None]
        return out._replace(reward=out.reward + member)

    actions = jax.random.uniform(jax.random.key(4), (6, SMALL.horizon, len(LOWER)), minval=jnp.asarray(LOWER),
                                 maxval=jnp.asarray(UPPER))
    noise = cem.draw_model_noise(jax.random.key(3), actions.shape[0], STATE_DIM, horizon=SMALL.horizon,
                                 num_members=MEMBERS, particles_per_member=2, planner_samples=True, shared=True)
    values = {}
    for lam in (0.0, pessimism):
        values[lam] = cem.rollout({"target": jnp.asarray(TARGET, jnp.float32)}, jnp.zeros(STATE_DIM), actions,
                                  jnp.float32(0.0), noise, step_fn=None, mean_step_fn=offset_step,
                                  num_members=MEMBERS, particles_per_member=2, state_clip=1e6, uncertainty=None,
                                  scale=1.0, nan_reward=-1e6, nan_cost=1e6, scan_unroll=1, sample_noise=False,
                                  reward_pessimism=lam)
    bowl = -np.sum(np.square(np.asarray(actions) - np.asarray(TARGET)), axis=-1).sum(axis=1)  # [N]
    np.testing.assert_allclose(np.asarray(values[0.0].reward), bowl + 2.0 * SMALL.horizon, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(values[0.0].reward - values[pessimism].reward),
                               pessimism * SMALL.horizon * np.sqrt(2.0), rtol=1e-5)
