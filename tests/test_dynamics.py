"""Tests of the probabilistic ensemble dynamics model (evjax/dynamics.py, SPEC 9)."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evjax.config import ModelConfig
from evjax import dynamics, fused_mlp
from evjax.dynamics import (Layout, ModelState, adam_step, bucket_rows, ensemble_loss, fit_padded, fit_settings,
                            gaussian_nll, make_dynamics, masked_moments, member_nll, pad_transitions,
                            soft_bound_logvar, swish_via_tanh)

OBS_DIM, ACTION_DIM = 3, 2
SMALL = dict(hidden_sizes=(32, 32), weight_decays=(1e-5, 1e-5, 1e-5), batch_size=32, learning_rate=3e-3)


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def layout_of(cfg: ModelConfig, obs_dim: int = OBS_DIM, action_dim: int = ACTION_DIM) -> Layout:
    return Layout(obs_dim=obs_dim, action_dim=action_dim, num_members=cfg.ensemble_size,
                  hidden_sizes=cfg.hidden_sizes, binary_cost=cfg.binary_cost)


def transitions(num_rows: int, seed: int = 0):
    """A smooth nonlinear system with noise: obs [n,S], act [n,A], reward [n], cost [n], next_obs [n,S]."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1.0, 1.0, (num_rows, OBS_DIM))
    act = rng.uniform(-1.0, 1.0, (num_rows, ACTION_DIM))
    delta = 0.5 * np.tanh(obs @ np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [0.1, 0.4, 0.6]]) + act[:, :1])
    next_obs = obs + delta + 0.02 * rng.normal(size=obs.shape)
    reward = np.sin(2.0 * obs[:, 0]) + act[:, 1] + 0.05 * rng.normal(size=num_rows)
    cost = np.maximum(0.0, obs[:, 1] + 0.3 * act[:, 0]) + 0.01 * rng.normal(size=num_rows)
    return obs, act, reward, cost, next_obs


@pytest.fixture(scope="module")
def fitted():
    """A small ensemble fitted to 300 transitions (shared by the read-only tests)."""
    dyn = make_dynamics(small_config(epochs=20), OBS_DIM, ACTION_DIM)
    state, metrics = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), *transitions(300))
    return dyn, state, metrics


@pytest.mark.parametrize("rows, min_steps, epochs", [(20, 0, 2), (20, 9, 9), (70, 9, 3), (130, 9, 2)])
def test_min_gradient_steps_raise_the_epochs_on_little_data(rows, min_steps, epochs):
    """Batch 32: 20 rows are 1 minibatch an epoch, 70 rows 3, 130 rows 5. With 2 epochs and at least 9 steps a fit
    runs max(2, ceil(9 / batches)) epochs: 9 on 20 rows, 3 on 70, 2 on 130; 0 keeps the 2 epochs."""
    dyn = make_dynamics(small_config(epochs=2, min_gradient_steps=min_steps), OBS_DIM, ACTION_DIM)
    _, metrics = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), *transitions(rows))
    assert metrics["epochs"] == epochs


def test_gaussian_nll_matches_hand_computed_value():
    mean = jnp.array([[0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    logvar = jnp.array([[0.0, math.log(4.0)], [math.log(0.25), 0.0], [9.0, 9.0]])
    target = jnp.array([[1.0, 3.0], [1.5, 2.0], [0.0, 0.0]])
    weight = jnp.array([1.0, 1.0, 0.0])  # third row is padding
    # row 0: (1^2/1 + 0 + 2^2/4 + ln 4) / 2; row 1: (0.5^2/0.25 + ln 0.25 + 0 + 0) / 2; mean of the two rows
    row0 = (1.0 + 1.0 + math.log(4.0)) / 2
    row1 = (1.0 + math.log(0.25)) / 2
    assert float(gaussian_nll(mean, logvar, target, weight)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_soft_logvar_bounds_hand_values():
    softplus = lambda v: math.log1p(math.exp(v))
    lv = jnp.array([-20.0, 0.0, 3.0])
    bounded = np.asarray(soft_bound_logvar(lv, jnp.float32(0.5), jnp.float32(-10.0)))
    for raw, got in zip([-20.0, 0.0, 3.0], bounded):
        upper = 0.5 - softplus(0.5 - raw)
        assert got == pytest.approx(-10.0 + softplus(upper + 10.0), abs=1e-5)
    assert np.all(bounded < 0.5) and np.all(bounded > -10.0)


def test_loss_is_member_nll_plus_weight_decay_plus_bound_term():
    cfg = small_config()
    dyn = make_dynamics(cfg, OBS_DIM, ACTION_DIM)
    params = dyn.init(jax.random.key(0)).params
    x = jax.random.normal(jax.random.key(1), (5, 8, OBS_DIM + ACTION_DIM))
    y = jax.random.normal(jax.random.key(2), (5, 8, OBS_DIM + 2))
    loss, nll = ensemble_loss(params, x, y, jnp.ones((5, 8)), layout=layout_of(cfg), weight_decays=cfg.weight_decays,
                              logvar_bound_weight=cfg.logvar_bound_weight)
    chex.assert_shape(nll, (5,))  # [E]
    weights = [np.asarray(params[name]["w"]) for name in ("hidden_0", "hidden_1", "head")]
    decay = sum(wd * 0.5 * np.sum(w.astype(np.float64) ** 2) for wd, w in zip(cfg.weight_decays, weights))
    bounds = cfg.logvar_bound_weight * 5 * (OBS_DIM + 2) * (0.5 - (-10.0))  # at init: E * G * (max - min)
    assert float(loss) == pytest.approx(float(np.sum(nll)) + decay + bounds, rel=1e-5)


def test_init_weights_truncated_normal_scale_and_zero_biases():
    dyn = make_dynamics(ModelConfig(), 9, 3)
    params = dyn.init(jax.random.key(0)).params
    w = np.asarray(params["hidden_1"]["w"])  # [E, 256, 256], fan_in 256
    chex.assert_shape(w, (5, 256, 256))
    scale = 1.0 / (2.0 * math.sqrt(256))
    assert np.abs(w).max() <= 2.0 * scale + 1e-7  # cut at 2 std
    # std of a standard normal truncated at +-2 is 0.8796
    assert np.std(w) == pytest.approx(0.8796 * scale, rel=0.02)
    assert all(np.all(np.asarray(params[name]["b"]) == 0.0) for name in ("hidden_0", "hidden_3", "head"))
    chex.assert_tree_shape_prefix(params, (5,))


def test_sine_fit_recovers_mean_and_input_dependent_noise():
    """1-D y = sin(x) + sigma(x) eps with sigma(x) = 0.05 + 0.1 (x/pi)^2, 2000 samples on [-pi, pi]: the
    probabilistic network alone (no ridge map under it)."""
    cfg = ModelConfig(hidden_sizes=(64, 64), weight_decays=(1e-5,) * 3, epochs=100, learning_rate=3e-3,
                      linear_ridge=0.0)
    dyn = make_dynamics(cfg, 1, 1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-np.pi, np.pi, 2000)
    noise_scale = lambda v: 0.05 + 0.1 * (v / np.pi) ** 2
    obs, act = x[:, None], np.zeros((2000, 1))  # constant action: its std 0 is floored to 1
    next_obs = obs + (np.sin(x) + noise_scale(x) * rng.normal(size=2000))[:, None]
    reward = np.sin(x) + noise_scale(x) * rng.normal(size=2000)
    cost = np.cos(x) + 0.05 * rng.normal(size=2000)
    state, _ = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), obs, act, reward, cost, next_obs)
    assert float(state.norm_std[1]) == 1.0 and float(state.norm_mean[1]) == 0.0

    grid = np.linspace(-np.pi + 0.2, np.pi - 0.2, 101)
    out = dyn.step(state, jnp.broadcast_to(grid[None, :, None], (5, 101, 1)), jnp.zeros((5, 101, 1)), None,
                   mean_only=True)
    for mean, std in [(np.asarray(out.reward), np.asarray(out.std[..., 1])),
                      (np.asarray(out.next_obs[..., 0]) - grid, np.asarray(out.std[..., 0]))]:
        # noise is 0.05..0.15; 2000 samples pin the ensemble mean to well under that
        assert np.sqrt(np.mean((mean.mean(0) - np.sin(grid)) ** 2)) < 0.03
        assert np.all(np.sqrt(np.mean((mean - np.sin(grid)) ** 2, axis=1)) < 0.06)  # every member
        ratio = std.mean(0) / noise_scale(grid)
        assert np.all((ratio > 0.8) & (ratio < 1.2)), ratio
    assert np.mean(out.std[..., 2]) == pytest.approx(0.05, rel=0.2)


def test_members_differ_after_bootstrap_fit():
    dyn = make_dynamics(small_config(epochs=5), OBS_DIM, ACTION_DIM)
    state = dyn.init(jax.random.key(0))
    same = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf[:1], leaf.shape), state.params)  # all members = member 0
    state = state.replace(params=same, opt_state=state.opt_state)
    obs, act, *_ = transitions(50, seed=3)
    before = dyn.step(state, jnp.broadcast_to(obs, (5, 50, OBS_DIM)), jnp.broadcast_to(act, (5, 50, ACTION_DIM)),
                      None, mean_only=True)
    np.testing.assert_array_equal(before.reward[0], before.reward[3])
    state, _ = dyn.fit(jax.random.key(1), state, *transitions(200))
    after = dyn.step(state, jnp.broadcast_to(obs, (5, 50, OBS_DIM)), jnp.broadcast_to(act, (5, 50, ACTION_DIM)),
                     None, mean_only=True)
    rewards = np.asarray(after.reward)
    for a in range(5):
        for b in range(a + 1, 5):
            assert np.max(np.abs(rewards[a] - rewards[b])) > 1e-3


def test_shapes_of_state_and_predictions(fitted):
    dyn, state, metrics = fitted
    chex.assert_tree_shape_prefix(state.params, (5,))
    chex.assert_shape([state.norm_mean, state.norm_std], (OBS_DIM + ACTION_DIM,))
    chex.assert_shape([state.target_mean, state.target_std], (OBS_DIM + 2,))
    chex.assert_shape(state.elites, (5,))
    obs, act, *_ = transitions(12, seed=5)
    out = dyn.predict(state, obs, act, jax.random.key(0), jnp.arange(12) % 5)
    chex.assert_shape(out.next_obs, (12, OBS_DIM))  # [B, S]
    chex.assert_shape([out.reward, out.cost], (12,))  # [B]
    chex.assert_shape(out.std, (12, OBS_DIM + 2))  # [B, S+2]
    out = dyn.step(state, jnp.zeros((5, 7, OBS_DIM)), jnp.zeros((5, 7, ACTION_DIM)), jax.random.key(0))
    chex.assert_shape(out.next_obs, (5, 7, OBS_DIM))  # [E, M, S]
    chex.assert_shape([out.reward, out.cost], (5, 7))  # [E, M]
    chex.assert_shape(out.std, (5, 7, OBS_DIM + 2))
    assert metrics["epochs"] == 20 and metrics["num_train"] == 300 and np.isfinite(metrics["train_loss"])


def test_train_step_traces_once():
    cfg = small_config()
    dyn = make_dynamics(cfg, OBS_DIM, ACTION_DIM)
    state = dyn.init(jax.random.key(0))
    optimizer = fit_settings(cfg, dyn.layout)["optimizer"]

    def step(params, opt_state, x, y, weight):
        return adam_step(params, opt_state, x, y, weight, optimizer=optimizer, layout=dyn.layout,
                         weight_decays=cfg.weight_decays, logvar_bound_weight=cfg.logvar_bound_weight)

    train_step = jax.jit(chex.assert_max_traces(step, n=1))
    params, opt_state = state.params, state.opt_state
    losses = []
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (5, 32, OBS_DIM + ACTION_DIM))
        y = jax.random.normal(jax.random.key(seed + 10), (5, 32, OBS_DIM + 2))
        params, opt_state, loss = train_step(params, opt_state, x, y, jnp.ones((5, 32)))
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and int(opt_state[0].count) == 3


def test_refits_in_one_bucket_trace_once():
    cfg = small_config(epochs=2)
    dyn = make_dynamics(cfg, OBS_DIM, ACTION_DIM)
    assert [bucket_rows(n, 128) for n in (12, 128, 129, 300, 600)] == [128, 128, 256, 512, 1024]
    settings = fit_settings(cfg, dyn.layout)

    def fit_bucket(key, state, inputs, targets, num_rows):
        return fit_padded(key, state, inputs, targets, num_rows, **settings)

    fit = jax.jit(chex.assert_max_traces(fit_bucket, n=1))
    state = dyn.init(jax.random.key(0))
    for num_rows in (70, 100, 128):  # bucket 128 at batch 32
        inputs, targets, n = pad_transitions(*transitions(num_rows), layout=dyn.layout, batch_size=cfg.batch_size)
        assert inputs.shape == (128, OBS_DIM + ACTION_DIM)
        state, metrics = fit(jax.random.key(num_rows), state, inputs, targets, n)
        assert int(metrics["num_train"]) == num_rows
        np.testing.assert_allclose(state.norm_mean, np.concatenate(transitions(num_rows)[:2], 1).mean(0), atol=1e-5)


def test_step_traces_once(fitted):
    """The planner's hot path: new observations, actions, keys and states of the same shapes reuse one trace."""
    dyn, state, _ = fitted
    def bound_step(state, obs, act, key, matmul_dtype="float32", mean_only=False):
        return dynamics.step(state, obs, act, key, layout=dyn.layout, matmul_dtype=matmul_dtype, mean_only=mean_only)

    step = jax.jit(chex.assert_max_traces(bound_step, n=1), static_argnames=("matmul_dtype", "mean_only"))
    for seed in range(3):
        obs = jax.random.normal(jax.random.key(seed), (5, 7, OBS_DIM))
        act = np.full((5, 7, ACTION_DIM), 0.1 * seed, np.float32)  # numpy arrays share the trace
        moved = state.replace(norm_mean=state.norm_mean + seed)
        out = step(moved, obs, act, jax.random.key(seed + 10), matmul_dtype="bfloat16")
        chex.assert_shape(out.next_obs, (5, 7, OBS_DIM))
    reference = dyn.step(moved, obs, act, jax.random.key(12), matmul_dtype="bfloat16")
    chex.assert_trees_all_close(out, reference)  # the bundle's step is the same function


def test_member_nll_of_a_logistic_cost_head_is_gaussian_nll_plus_hand_computed_bce():
    """A member whose weights are all zero outputs its head bias: means (0.5, -1, logit 0.8), raw log-variances 0.

    S = 1, so the heads are delta (Gaussian), reward (Gaussian) and cost (logistic, label 1 then 0; a padding
    row of weight 0 plays no part). With soft bounds 0.5 and -10 the bounded log-variance is
    lv = -10 + softplus(0.5 - softplus(0.5) + 10).
    """
    cfg = small_config(binary_cost=True)
    layout = layout_of(cfg, obs_dim=1, action_dim=1)
    params = dynamics.init_params(jax.random.key(0), layout=layout, init_truncation=2.0, max_logvar_init=0.5,
                                  min_logvar_init=-10.0)
    member = jax.tree.map(lambda leaf: jnp.zeros_like(leaf[0]), params)
    member["head"]["b"] = jnp.array([0.5, -1.0, 0.8, 0.0, 0.0])  # means (delta, reward, cost logit), 2 raw lv
    member["max_logvar"], member["min_logvar"] = jnp.full(2, 0.5), jnp.full(2, -10.0)
    x = jnp.zeros((3, 2))
    y = jnp.array([[1.0, 0.0, 1.0], [0.0, -1.0, 0.0], [5.0, 5.0, 1.0]])
    weight = jnp.array([1.0, 1.0, 0.0])
    softplus = lambda v: math.log1p(math.exp(v))
    lv = -10.0 + softplus(0.5 - softplus(0.5) + 10.0)
    delta = ((0.5 - 1.0) ** 2 * math.exp(-lv) + lv + (0.5 - 0.0) ** 2 * math.exp(-lv) + lv) / 2
    reward = ((-1.0 - 0.0) ** 2 * math.exp(-lv) + lv + (-1.0 + 1.0) ** 2 * math.exp(-lv) + lv) / 2
    sigmoid = 1.0 / (1.0 + math.exp(-0.8))
    bce = (-math.log(sigmoid) - math.log(1.0 - sigmoid)) / 2
    got = float(member_nll(member, x, y, weight, layout=layout))
    assert got == pytest.approx(delta + reward + bce, rel=1e-5)


def test_masked_moments_hand_values():
    """Rows 0 and 1 count, row 2 is padding: mean (2, 2); std (1, 0), the zero std floored to 1."""
    values = jnp.array([[1.0, 2.0], [3.0, 2.0], [100.0, -100.0]])
    mean, std = masked_moments(values, jnp.array([1.0, 1.0, 0.0]), std_floor=1e-12)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    np.testing.assert_allclose(std, [1.0, 1.0])
    _, std = masked_moments(values, jnp.array([1.0, 0.0, 1.0]), std_floor=1e-12)  # (1, 100) and (2, -100)
    np.testing.assert_allclose(std, [49.5, 51.0])
    _, std = masked_moments(values, jnp.array([1.0, 0.0, 1.0]), std_floor=50.0)
    np.testing.assert_allclose(std, [1.0, 51.0])


def test_same_key_gives_same_params():
    dyn = make_dynamics(small_config(epochs=3), OBS_DIM, ACTION_DIM)
    data = transitions(100)
    results = [dyn.fit(jax.random.key(7), dyn.init(jax.random.key(3)), *data)[0] for _ in range(2)]
    chex.assert_trees_all_equal(results[0].params, results[1].params)
    other = dyn.fit(jax.random.key(8), dyn.init(jax.random.key(3)), *data)[0]
    assert not np.array_equal(other.params["head"]["w"], results[0].params["head"]["w"])


def test_predictions_finite_far_outside_data(fitted):
    dyn, state, _ = fitted
    for scale in (1e6, -1e6):
        obs = jnp.full((5, 4, OBS_DIM), scale)
        act = jnp.full((5, 4, ACTION_DIM), scale)
        for dtype in ("float32", "bfloat16"):
            out = dyn.step(state, obs, act, jax.random.key(0), matmul_dtype=dtype)
            assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in out)
            assert np.all(np.asarray(out.std) <= np.exp(0.5 * 0.6) * np.asarray(state.target_std) * 1.5)


def test_step_equals_predict_with_matching_members(fitted):
    dyn, state, _ = fitted
    obs, act, *_ = transitions(5 * 6, seed=9)
    member = jnp.repeat(jnp.arange(5), 6)  # row e*6 + m uses member e
    for mean_only in (True, False):
        key = jax.random.key(4)
        reference = dyn.predict(state, obs, act, key, member, mean_only=mean_only)
        out = dyn.step(state, obs.reshape(5, 6, OBS_DIM), act.reshape(5, 6, ACTION_DIM), key, mean_only=mean_only)
        for got, want in zip(out, reference):
            np.testing.assert_allclose(np.asarray(got).reshape(np.shape(want)), want, rtol=1e-5, atol=1e-6)
    sampled = dyn.predict(state, obs, act, jax.random.key(4), member)
    mean = dyn.predict(state, obs, act, None, member, mean_only=True)
    assert not np.allclose(sampled.reward, mean.reward)


def test_swish_via_tanh_is_swish_to_float32_rounding():
    """h + h tanh(h), h = x/2, against x / (1 + e^-x) in float64: error within ~2 ulp of max(1, |x|)."""
    x = np.linspace(-30.0, 30.0, 60001, dtype=np.float32)
    want = x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64)))
    got = np.asarray(swish_via_tanh(jnp.asarray(x)), np.float64)
    assert np.all(np.abs(got - want) <= 3e-7 * np.maximum(1.0, np.abs(x)))
    assert float(swish_via_tanh(jnp.float32(1.0))) == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), rel=1e-6)
    assert float(swish_via_tanh(jnp.float32(0.0))) == 0.0


@pytest.mark.parametrize("binary_cost", [False, True])
def test_step_fast_path_matches_predict(fitted, binary_cost):
    """``step`` (tanh swish, log-variances on [E, G, M]) against the reference ``predict`` on 5 x 40 rows.

    Per-dimension target stats and log-variance bounds all differ, so a wrong
    transpose or broadcast of the [G, M] layout shows up as an O(1) error.
    """
    dyn, state, _ = fitted
    if binary_cost:
        dyn = make_dynamics(small_config(binary_cost=True), OBS_DIM, ACTION_DIM)
        fresh = dyn.init(jax.random.key(5))
        keys = iter(jax.random.split(jax.random.key(6), len(jax.tree.leaves(fresh.params))))
        params = jax.tree.map(lambda leaf: leaf + 0.3 * jax.random.normal(next(keys), leaf.shape), fresh.params)
        state = fresh.replace(params=params, target_mean=state.target_mean.at[-1].set(0.0),
                              target_std=state.target_std.at[-1].set(1.0))
    num_gaussian = state.params["max_logvar"].shape[1]
    assert len(set(np.round(np.asarray(state.target_std)[:num_gaussian], 6))) == num_gaussian
    assert len(set(np.round(np.asarray(state.params["max_logvar"]).ravel(), 6))) == 5 * num_gaussian
    obs, act, *_ = transitions(5 * 40, seed=13)
    member = jnp.repeat(jnp.arange(5), 40)
    scale = np.asarray(state.target_std)  # [S+2]
    for dtype in ("float32", "bfloat16"):
        for mean_only in (True, False):
            key = jax.random.key(8)
            want = dyn.predict(state, obs, act, key, member, matmul_dtype=dtype, mean_only=mean_only)
            got = dyn.step(state, obs.reshape(5, 40, OBS_DIM), act.reshape(5, 40, ACTION_DIM), key,
                           matmul_dtype=dtype, mean_only=mean_only)
            for name, g, w, unit in zip(got._fields, got, want, (scale[:OBS_DIM], scale[OBS_DIM], scale[-1], scale)):
                g, w = np.asarray(g).reshape(np.shape(w)), np.asarray(w)
                if dtype == "float32":  # float32 rounding only
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
                else:  # at most a flipped bfloat16 rounding somewhere: far below a target std
                    assert np.max(np.abs(g - w) / unit) < 5e-3, name
    if binary_cost:
        assert np.all(np.asarray(got.std[..., -1]) == 0.0) and np.all((got.cost > 0.0) & (got.cost < 1.0))


def _perturbed_state(dyn, fitted, seed, fan_in_scaled=False):
    """A fresh ensemble with every parameter moved by 0.3 * N(0, 1) (weights: 0.3 / sqrt(fan_in) * N(0, 1) with
    ``fan_in_scaled``, which keeps wide layers' activations of order one), and the fitted model's normalisers
    (identity normalisers with ``fitted`` None)."""
    fresh = dyn.init(jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))

    def perturb(leaf):
        scale = 0.3 / math.sqrt(leaf.shape[1]) if fan_in_scaled and leaf.ndim == 3 else 0.3
        return leaf + scale * jax.random.normal(next(keys), leaf.shape)

    state = fresh.replace(params=jax.tree.map(perturb, fresh.params))
    if fitted is None:
        return state
    _, fitted_state, _ = fitted
    return state.replace(norm_mean=fitted_state.norm_mean, norm_std=fitted_state.norm_std,
                         target_mean=fitted_state.target_mean, target_std=fitted_state.target_std)


@pytest.mark.parametrize("kernel", ["pallas", "pallas_layers"])
@pytest.mark.parametrize("binary_cost", [False, True])
def test_fused_kernel_matches_the_xla_step(fitted, binary_cost, kernel):
    """The Pallas kernels (interpret mode on CPU) give ``step``'s outputs: bfloat16 and float32, padded shapes.

    Hidden widths 24 and 40 and 37 samples per member are no powers of two and
    no multiple of the tile, so the kernel's zero padding is exercised everywhere.
    """
    dyn = make_dynamics(small_config(hidden_sizes=(24, 40), weight_decays=(0.0,) * 3, binary_cost=binary_cost),
                        OBS_DIM, ACTION_DIM)
    state = _perturbed_state(dyn, fitted, 5)
    obs, act, *_ = transitions(5 * 37, seed=17)
    obs, act = obs.reshape(5, 37, OBS_DIM), act.reshape(5, 37, ACTION_DIM)
    scale = np.asarray(state.target_std)  # [S+2]
    for dtype in ("float32", "bfloat16"):
        key = jax.random.key(8)
        want = dyn.step(state, obs, act, key, matmul_dtype=dtype)
        got = dyn.step(state, obs, act, key, matmul_dtype=dtype, kernel=kernel)
        for name, g, w, unit in zip(got._fields, got, want, (scale[:OBS_DIM], scale[OBS_DIM], scale[-1], scale)):
            g, w = np.asarray(g), np.asarray(w)
            if dtype == "float32":
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
            else:  # the same bfloat16 roundings up to accumulation order: far below a target std
                assert np.max(np.abs(g - w) / unit) < 5e-3, name
    with pytest.raises(ValueError, match="kernel"):
        dyn.step(state, obs, act, None, kernel="triton")


@pytest.mark.parametrize("binary_cost", [False, True])
def test_mosaic_kernel_matches_the_xla_step(fitted, binary_cost, monkeypatch):
    """The Mosaic GPU kernel (its interpret mode on CPU: shared memory, copies and barriers simulated) gives
    ``step``'s bfloat16 outputs. 37 samples per member pad the 64-row tile, and 3 hidden layers of 128 units
    stream 5 weight blocks through a ring of 2 slots, so every slot is refilled.

    One warpgroup does everything here (``MOSAIC_SPLIT`` 0); the layouts with a copy warpgroup run in a
    subprocess (``test_mosaic_kernel_with_a_copy_warpgroup_matches_the_xla_step``). (The kernel sums
    each product in blocks of 64, XLA in one pass: with weights of 7 times their initial scale, as in the
    Pallas test, that float32 difference flips a bfloat16 rounding of activations of order 50 and moves an
    output by 2 % of a target std, so the weights are perturbed on their own scale here.)"""
    monkeypatch.setattr(fused_mlp, "MOSAIC_SPLIT", 0)
    monkeypatch.setattr(fused_mlp, "MOSAIC_SLOTS", 2)
    dyn = make_dynamics(small_config(hidden_sizes=(128, 128, 128), weight_decays=(0.0,) * 4,
                                     binary_cost=binary_cost), OBS_DIM, ACTION_DIM)
    state = _perturbed_state(dyn, fitted, 5, fan_in_scaled=True)
    obs, act, *_ = transitions(5 * 37, seed=17)
    obs, act = obs.reshape(5, 37, OBS_DIM), act.reshape(5, 37, ACTION_DIM)
    scale = np.asarray(state.target_std)  # [S+2]
    key = jax.random.key(8)
    want = dyn.step(state, obs, act, key, matmul_dtype="bfloat16")
    got = dyn.step(state, obs, act, key, matmul_dtype="bfloat16", kernel="mosaic")
    for name, g, w, unit in zip(got._fields, got, want, (scale[:OBS_DIM], scale[OBS_DIM], scale[-1], scale)):
        assert np.max(np.abs(np.asarray(g) - np.asarray(w)) / unit) < 5e-3, name
    # the weights laid out beforehand (the planner's per-plan ``prepare``) give the same numbers to the bit
    prepared = dynamics.prepare(state, layout=dyn.layout, kernel="mosaic")
    assert isinstance(prepared, dynamics.PlanningModel)
    assert dynamics.prepare(state, layout=dyn.layout, kernel="xla") is state
    again = dyn.step(prepared, obs, act, key, matmul_dtype="bfloat16", kernel="mosaic")
    for name, a, g in zip(got._fields, again, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(g), err_msg=name)
    with pytest.raises(ValueError, match="matmul_dtype bfloat16"):
        dyn.step(state, obs, act, key, matmul_dtype="float32", kernel="mosaic")
    narrow = make_dynamics(small_config(hidden_sizes=(24, 40), weight_decays=(0.0,) * 3), OBS_DIM, ACTION_DIM)
    with pytest.raises(ValueError, match="hidden layers of one width"):
        narrow.step(narrow.init(jax.random.key(0)), obs, act, key, matmul_dtype="bfloat16", kernel="mosaic")


def mosaic_warpgroups_check(splits=(1, 2)) -> None:
    """The Mosaic kernel with 1 and 2 compute warpgroups + a copy warpgroup against the XLA step (interpret mode).

    Run by the next test in a fresh process with ``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``: the interpreter runs
    each warpgroup as a thread whose barrier waits block inside a CPU computation, and with asynchronous
    dispatch those computations share XLA's small thread pool and deadlocked (3 of 3 runs on 2 cores; 3 of 3
    passed with synchronous dispatch, which a running process cannot switch to).
    """
    dyn = make_dynamics(small_config(hidden_sizes=(128, 128, 128), weight_decays=(0.0,) * 4), OBS_DIM, ACTION_DIM)
    state = _perturbed_state(dyn, None, 5, fan_in_scaled=True)
    obs, act, *_ = transitions(5 * 37, seed=17)
    obs, act = obs.reshape(5, 37, OBS_DIM), act.reshape(5, 37, ACTION_DIM)
    want = dyn.step(state, obs, act, None, matmul_dtype="bfloat16", mean_only=True)
    for split in splits:  # the un-jitted step, so that each setting is traced anew (dyn.step would reuse the first)
        fused_mlp.MOSAIC_SPLIT, fused_mlp.MOSAIC_SLOTS = split, 2
        got = dynamics.step(state, obs, act, None, layout=dyn.layout, matmul_dtype="bfloat16", mean_only=True,
                            kernel="mosaic")
        for name, g, w in zip(got._fields, got, want):  # target std 1: differences in target stds
            assert np.max(np.abs(np.asarray(g) - np.asarray(w))) < 5e-3, (split, name)


def test_mosaic_kernel_with_a_copy_warpgroup_matches_the_xla_step():
    """``mosaic_warpgroups_check`` in a subprocess with synchronous CPU dispatch (see there), under a time limit."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"}
    result = subprocess.run([sys.executable, "-c", "from tests.test_dynamics import mosaic_warpgroups_check as c; c()"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("split, registers", [(0, False), (0, True), (1, False), (2, False)])
def test_mosaic_kernel_lowers_for_a_gpu(split, registers, monkeypatch):
    """Off a GPU the kernel still lowers to a Mosaic GPU custom call: Pallas' layouts, swizzles, copies and
    warpgroup matmuls of the paper-size model (5 x 4 x 256, 500 samples per member) are checked here, only the
    final compilation to GPU code needs the device (benchmarks/gpu_planner.py)."""
    monkeypatch.setattr(fused_mlp, "MOSAIC_SPLIT", split)
    monkeypatch.setattr(fused_mlp, "MOSAIC_A_FROM_REGISTERS", registers)
    cfg = ModelConfig()
    layout = Layout(obs_dim=9, action_dim=3, num_members=cfg.ensemble_size, hidden_sizes=cfg.hidden_sizes,
                    binary_cost=False)
    params = dynamics.init_params(jax.random.key(0), layout=layout, init_truncation=2.0, max_logvar_init=0.5,
                                  min_logvar_init=-10.0)
    x_norm = jnp.zeros((cfg.ensemble_size, 500, layout.input_dim))
    head = functools.partial(fused_mlp.ensemble_head_mosaic, dtype=jnp.bfloat16, layer_names=layout.layer_names,
                             activation=dynamics.swish_via_tanh)
    lowered = jax.jit(head).trace(params, x_norm).lower(lowering_platforms=("cuda",)).as_text()
    assert lowered.count("stablehlo.custom_call @mosaic_gpu") == 1
    assert f"tensor<{cfg.ensemble_size}x512x64xf32>" in lowered  # the kernel's padded head output [E, M, 64]


@pytest.mark.parametrize("tile_rows", [10, 37, 100])
def test_tiled_step_equals_the_untiled_step(fitted, tile_rows):
    """37 samples per member in tiles of 10 rows (4 tiles, 3 padded rows), one tile, and a tile larger than M."""
    dyn, state, _ = fitted
    obs, act, *_ = transitions(5 * 37, seed=19)
    obs, act = obs.reshape(5, 37, OBS_DIM), act.reshape(5, 37, ACTION_DIM)
    for dtype in ("float32", "bfloat16"):
        want = dyn.step(state, obs, act, jax.random.key(3), matmul_dtype=dtype)
        got = dyn.step(state, obs, act, jax.random.key(3), matmul_dtype=dtype, tile_rows=tile_rows)
        for name, g, w in zip(got._fields, got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_fused_kernel_rejects_a_tile_that_is_no_power_of_two():
    from evjax import fused_mlp

    params = {"head": {"w": jnp.ones((1, 4, 2)), "b": jnp.zeros((1, 2))}}
    with pytest.raises(ValueError, match="tile"):
        fused_mlp.ensemble_head(params, jnp.ones((1, 8, 4)), jnp.float32, layer_names=("head",),
                                activation=swish_via_tanh, tile=48, interpret=True)


def test_bfloat16_step_close_to_float32(fitted):
    dyn, state, _ = fitted
    obs, act, *_ = transitions(5 * 40, seed=11)
    obs, act = obs.reshape(5, 40, OBS_DIM), act.reshape(5, 40, ACTION_DIM)
    full = dyn.step(state, obs, act, None, mean_only=True, matmul_dtype="float32")
    half = dyn.step(state, obs, act, None, mean_only=True, matmul_dtype="bfloat16")
    target_scale = np.asarray(state.target_std)
    delta_err = np.abs(np.asarray(half.next_obs) - np.asarray(full.next_obs)) / target_scale[:OBS_DIM]
    reward_err = np.abs(np.asarray(half.reward) - np.asarray(full.reward)) / target_scale[OBS_DIM]
    std_err = np.abs(np.asarray(half.std) / np.asarray(full.std) - 1.0)
    assert delta_err.max() < 0.05 and reward_err.max() < 0.05 and std_err.max() < 0.05  # in target-std units
    assert delta_err.max() > 0.0  # the bfloat16 path really rounds
    stored = dyn.step(state, obs, act, None, mean_only=True, matmul_dtype="bfloat16", hidden_dtype="bfloat16")
    stored_err = np.abs(np.asarray(stored.next_obs) - np.asarray(full.next_obs)) / target_scale[:OBS_DIM]
    # bfloat16 hidden products: one more rounding on a GPU, same tolerance (XLA CPU folds the bfloat16 product
    # and its cast back into a float32 dot, so on CPU this equals ``half``)
    assert 0.0 < stored_err.max() < 0.05
    with pytest.raises(ValueError, match="matmul_dtype"):
        dyn.step(state, obs, act, None, matmul_dtype="float16")


def test_holdout_early_stopping_selects_elites():
    cfg = small_config(holdout_fraction=0.25, num_elites=3, epochs=300, early_stopping_patience=3)
    dyn = make_dynamics(cfg, OBS_DIM, ACTION_DIM)
    state = dyn.init(jax.random.key(0))
    chex.assert_shape(state.elites, (3,))
    _, metrics = dyn.fit(jax.random.key(1), state, *transitions(400))
    assert metrics["num_holdout"] == 100 and metrics["num_train"] == 300
    assert 3 < metrics["epochs"] < 300  # stopped once no member improved for 3 epochs
    assert np.all(np.isfinite(metrics["holdout_nll"]))

    # member 2 starts with its log-variance forced >= 3 (target units); within 40 epochs it stays the worst
    dyn = make_dynamics(dataclasses.replace(cfg, epochs=40), OBS_DIM, ACTION_DIM)
    params = state.params
    params = {**params, "min_logvar": params["min_logvar"].at[2].set(3.0),
              "max_logvar": params["max_logvar"].at[2].set(4.0)}
    state, metrics = dyn.fit(jax.random.key(1), state.replace(params=params), *transitions(400))
    holdout = metrics["holdout_nll"]
    np.testing.assert_array_equal(metrics["elites"], np.argsort(holdout)[:3])
    np.testing.assert_array_equal(state.elites, metrics["elites"])
    assert 2 not in metrics["elites"] and holdout[2] == holdout.max()

    planning = dyn.select_elites(state)
    chex.assert_tree_shape_prefix(planning.params, (3,))
    np.testing.assert_array_equal(planning.elites, np.arange(3))
    obs, act, *_ = transitions(8, seed=2)
    got = dyn.step(planning, jnp.broadcast_to(obs, (3, 8, OBS_DIM)), jnp.broadcast_to(act, (3, 8, ACTION_DIM)),
                   None, mean_only=True)
    for j, member in enumerate(np.asarray(state.elites)):
        want = dyn.predict(state, obs, act, None, jnp.full(8, member), mean_only=True)
        np.testing.assert_allclose(got.reward[j], want.reward, rtol=1e-5, atol=1e-6)


def test_binary_cost_head_gives_probabilities():
    dyn = make_dynamics(small_config(binary_cost=True, epochs=30), OBS_DIM, ACTION_DIM)
    obs, act, reward, _, next_obs = transitions(400)
    cost = (obs[:, 1] > 0.0).astype(float) * 0.7  # violation where obs_1 > 0
    state, metrics = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), obs, act, reward, cost, next_obs)
    assert state.params["max_logvar"].shape == (5, OBS_DIM + 1)  # no log-variance for the cost
    probe = np.zeros((5, 2, OBS_DIM))
    probe[:, 0, 1], probe[:, 1, 1] = -0.8, 0.8
    out = dyn.step(state, jnp.asarray(probe), jnp.zeros((5, 2, ACTION_DIM)), jax.random.key(0))
    assert np.all(np.asarray(out.std[..., -1]) == 0.0)
    assert np.all(np.asarray(out.cost[:, 0]) < 0.1) and np.all(np.asarray(out.cost[:, 1]) > 0.9)


def test_orbax_round_trip_gives_identical_predictions(fitted, tmp_path):
    dyn, state, _ = fitted
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "model", state)
    checkpointer.wait_until_finished()
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, dyn.init(jax.random.key(99)))
    restored = checkpointer.restore(tmp_path / "model", template)
    assert isinstance(restored, ModelState)
    chex.assert_trees_all_equal(restored, state)
    obs, act, *_ = transitions(10, seed=4)
    member = jnp.arange(10) % 5
    np.testing.assert_array_equal(dyn.predict(restored, obs, act, jax.random.key(0), member).next_obs,
                                  dyn.predict(state, obs, act, jax.random.key(0), member).next_obs)


def test_fit_rejects_bad_input():
    dyn = make_dynamics(small_config(), OBS_DIM, ACTION_DIM)
    obs, act, reward, cost, next_obs = transitions(10)
    with pytest.raises(ValueError, match="act"):
        dyn.fit(jax.random.key(0), dyn.init(jax.random.key(0)), obs, act[:, :1], reward, cost, next_obs)
    reward[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dyn.fit(jax.random.key(0), dyn.init(jax.random.key(0)), obs, act, reward, cost, next_obs)


def test_dense_kernel_is_the_layer_by_hand():
    """``fused_mlp.dense`` (interpret mode) is swish(x @ w + b) per member, computed here in numpy; bad blocks fail."""
    from evjax import fused_mlp

    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(2, 32, 128)), rng.normal(size=(2, 128, 16)) / 8.0, rng.normal(size=(2, 16))
    got = fused_mlp.dense(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                          activation=swish_via_tanh, interpret=True)
    z = np.einsum("emk,ekn->emn", x, w) + b[:, None, :]
    np.testing.assert_allclose(np.asarray(got), z / (1.0 + np.exp(-z)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="M = 40"):
        fused_mlp.dense(jnp.ones((1, 40, 16)), jnp.ones((1, 16, 16)), jnp.zeros((1, 16)), activation=swish_via_tanh,
                        interpret=True)


def test_ridge_maps_solve_each_members_weighted_normal_equations_by_hand():
    """Member 0's resample holds rows 0-5 once each, member 1's row 2 three times and rows 0, 4, 5 once; slots 6
    and 7 are past ``num_train`` and unused. Each map solves (Z'CZ + lambda diag(1, .., 1, 0)) [w; b] = Z'CY in
    float64 (C the counts, Z = [x, 1]); the intercept is not penalised."""
    rng = np.random.default_rng(3)
    layout = layout_of(small_config(ensemble_size=2, num_elites=2))
    x, y = rng.normal(size=(8, OBS_DIM + ACTION_DIM)), rng.normal(size=(8, OBS_DIM + 2))
    bootstrap = np.array([[0, 1, 2, 3, 4, 5, 7, 7], [2, 2, 2, 0, 4, 5, 1, 3]])
    counts = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 0, 3, 0, 1, 1, 0, 0]], float)
    maps = dynamics.ridge_maps(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(bootstrap),
                               jnp.int32(6), 0.7, layout=layout)
    design = np.c_[x, np.ones(8)]
    penalty = np.diag(np.r_[np.full(OBS_DIM + ACTION_DIM, 0.7), 0.0])
    for member in range(2):
        gram = design.T @ (counts[member][:, None] * design) + penalty
        want = np.linalg.solve(gram, design.T @ (counts[member][:, None] * y))
        np.testing.assert_allclose(maps["w"][member], want[:-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(maps["b"][member], want[-1], rtol=1e-4, atol=1e-5)


def test_ridge_map_of_a_noise_free_line_is_the_line():
    """y = 2 x0 - x1 + 3 on 40 rows: with a tiny penalty the map is w = (2, -1, 0, ..), b = 3 for every member."""
    rng = np.random.default_rng(4)
    layout = layout_of(small_config())
    x = rng.normal(size=(40, OBS_DIM + ACTION_DIM))
    y = np.repeat((2 * x[:, 0] - x[:, 1] + 3)[:, None], OBS_DIM + 2, axis=1)
    bootstrap = jax.random.randint(jax.random.key(0), (5, 40), 0, 40)
    maps = dynamics.ridge_maps(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), bootstrap, jnp.int32(40),
                               1e-6, layout=layout)
    want_w = np.zeros((OBS_DIM + ACTION_DIM, OBS_DIM + 2))
    want_w[0], want_w[1] = 2.0, -1.0
    np.testing.assert_allclose(maps["w"], np.broadcast_to(want_w, (5,) + want_w.shape), atol=1e-3)
    np.testing.assert_allclose(maps["b"], 3.0, atol=1e-3)


def linear_transitions(num_rows: int, seed: int = 0):
    """A noise-free linear system: next_obs = obs + obs A + act B, reward and cost linear in (obs, act)."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1.0, 1.0, (num_rows, OBS_DIM))
    act = rng.uniform(-1.0, 1.0, (num_rows, ACTION_DIM))
    next_obs = obs + obs @ np.array([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6], [0.0, 0.2, 0.3]]) + act @ np.array(
        [[1.0, -0.5, 0.0], [0.2, 0.0, 0.8]])
    return obs, act, obs[:, 0] - 2 * act[:, 1], 0.5 * obs[:, 2] + act[:, 0], next_obs


def test_linear_ridge_model_learns_a_linear_system_from_twenty_rows():
    """On 20 noise-free rows of a linear system the ridge map carries the response: the members predict 200 new
    rows to a few % of the targets' std, where the network alone (the same fit) misses by far more. The fit's
    gradient steps leave the map as solved (``stop_gradient``: Adam never sees a gradient for it), and the means
    are the network's plus the map's."""
    cfg = small_config(epochs=30, linear_ridge=0.0)
    plain = make_dynamics(cfg, OBS_DIM, ACTION_DIM)
    ridge = make_dynamics(dataclasses.replace(cfg, linear_ridge=1e-3), OBS_DIM, ACTION_DIM)
    assert "linear" not in plain.init(jax.random.key(0)).params
    obs, act, reward, cost, next_obs = linear_transitions(200, seed=1)
    member = jnp.arange(200) % 5
    errors = {}
    for name, dyn in (("plain", plain), ("ridge", ridge)):
        state, _ = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), *linear_transitions(20))
        out = dyn.predict(state, obs, act, None, member, mean_only=True)
        errors[name] = np.sqrt(np.mean((np.asarray(out.next_obs) - next_obs) ** 2)) / np.std(next_obs - obs)
    assert errors["ridge"] < 0.05 and errors["plain"] > 4 * errors["ridge"], errors
    adam = state.opt_state[0]  # the ridge model's: the map's first and second moments stayed zero
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves((adam.mu["linear"], adam.nu["linear"])))
    # a state without the map loses exactly x_norm w + b (in raw units)
    x_norm = (np.c_[obs, act] - np.asarray(state.norm_mean)) / np.asarray(state.norm_std)
    with_map = ridge.predict(state, obs, act, None, member, mean_only=True)
    zeroed = state.replace(params={**state.params, "linear": jax.tree.map(jnp.zeros_like, state.params["linear"])})
    without = ridge.predict(zeroed, obs, act, None, member, mean_only=True)
    w, b = (np.asarray(state.params["linear"][k])[np.asarray(member)] for k in ("w", "b"))
    added = (np.einsum("md,mdo->mo", x_norm, w) + b) * np.asarray(state.target_std)
    np.testing.assert_allclose(np.asarray(with_map.next_obs - without.next_obs), added[:, :OBS_DIM], atol=2e-5)
    np.testing.assert_allclose(np.asarray(with_map.reward - without.reward), added[:, OBS_DIM], atol=2e-5)


def test_step_and_a_fused_kernel_equal_predict_with_the_ridge_map():
    dyn = make_dynamics(small_config(epochs=5, linear_ridge=1.0), OBS_DIM, ACTION_DIM)
    state, _ = dyn.fit(jax.random.key(1), dyn.init(jax.random.key(0)), *transitions(100))
    obs, act, *_ = transitions(5 * 6, seed=9)
    member = jnp.repeat(jnp.arange(5), 6)
    want = dyn.predict(state, obs, act, jax.random.key(4), member)
    for kernel in ("xla", "pallas"):
        got = dyn.step(state, obs.reshape(5, 6, OBS_DIM), act.reshape(5, 6, ACTION_DIM), jax.random.key(4),
                       kernel=kernel)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g).reshape(np.shape(w)), w, rtol=1e-5, atol=1e-5, err_msg=kernel)
