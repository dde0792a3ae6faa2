"""How well the learned model predicts what the planner relies on, measured on transitions it was not fitted on.

After each training episode the model the episode planned with (fitted before
the episode) predicts the episode's own transitions:

* one step: from each real obs and action, the members' mean next obs;
* full horizon: from the episode's first obs, each member rolled forward on its
  own mean predictions with the real actions, then the members averaged;

and the errors (RMSE over the episode's steps) of the monitored quantities are
logged: line loadings (fraction, over the K lines), the constrained carbon
measure (kg/MWh) and the reward (welfare, CNY). The predicted step cost of
every executed transition, with and without the CAP margin, goes with its
realised cost into ``calibration.csv`` (``plots.cost_calibration``).

Pure JAX functions (``predict_one_step``, ``predict_horizon``) and a host-side
``episode_diagnostics`` around them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from evjax.config import Config


def predict_one_step(step_fn: Callable, model: Any, obs: jax.Array, act: jax.Array):
    """Members' mean predictions for every transition: obs [T, S], act [T, A] -> Prediction [E, T] (means)."""
    members = jax.tree.leaves(model.params)[0].shape[0]
    return step_fn(model, jnp.broadcast_to(obs, (members,) + obs.shape), jnp.broadcast_to(act, (members,) + act.shape))


def predict_horizon(step_fn: Callable, model: Any, first_obs: jax.Array, actions: jax.Array):
    """Open-loop mean rollout of each member from first_obs [S] under actions [T, A] -> (next_obs [E, T, S], reward [E, T])."""
    members = jax.tree.leaves(model.params)[0].shape[0]

    def one(obs, action):  # obs [E, 1, S]
        out = step_fn(model, obs, jnp.broadcast_to(action, (members, 1, action.shape[-1])))
        return out.next_obs, (out.next_obs[:, 0], out.reward[:, 0])

    _, (next_obs, reward) = jax.lax.scan(one, jnp.broadcast_to(first_obs, (members, 1, first_obs.shape[-1])), actions)
    return jnp.swapaxes(next_obs, 0, 1), jnp.swapaxes(reward, 0, 1)


def _mean_step(step: Callable) -> Callable:
    """``Dynamics.step`` giving the members' means in float32: what the diagnostics compare with the real data."""
    return functools.partial(step, key=None, matmul_dtype="float32", mean_only=True)


@functools.partial(jax.jit, static_argnums=0)
def _mean_horizon(step: Callable, model: Any, first_obs: jax.Array, actions: jax.Array):
    """``predict_horizon`` on ``_mean_step(step)``, compiled once per ``step`` (``Dynamics.step``) and shape.

    Called eagerly, the scan would be traced and compiled again after every episode (a new closure each time).
    """
    return predict_horizon(_mean_step(step), model, first_obs, actions)


def _rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(predicted - actual))))


def episode_diagnostics(cfg: Config, dynamics, model, kappa, obs: np.ndarray, act: np.ndarray, reward: np.ndarray,
                        cost: np.ndarray, next_obs: np.ndarray) -> tuple[dict, list[dict]]:
    """Prediction errors of one episode's T transitions (obs [T,S], act [T,A], reward, cost [T], next_obs [T,S]).

    ``model`` is the planning model of the episode (elite members), ``kappa``
    the agent's kappa ([] or [2]). Returns the metrics row entries and one
    calibration row per step (predicted cost without / with the CAP margin,
    realised cost).
    """
    from evjax.planner import make_cost_fn

    k = cfg.num_stations
    carbon_index = 2 * k + 1
    carbon_scale, reward_scale = cfg.env.carbon_obs_scale, cfg.env.reward_scale
    obs, act = jnp.asarray(obs, jnp.float32), jnp.asarray(act, jnp.float32)
    one = predict_one_step(_mean_step(dynamics.step), model, obs, act)
    horizon_obs, horizon_reward = _mean_horizon(dynamics.step, model, obs[0], act)
    mean_next = np.asarray(one.next_obs).mean(axis=0)  # [T, S]
    mean_reward = np.asarray(one.reward).mean(axis=0)  # [T]
    roll_next = np.asarray(horizon_obs).mean(axis=0)
    roll_reward = np.asarray(horizon_reward).mean(axis=0)
    row = {}
    for name, predicted, predicted_reward in (("1step", mean_next, mean_reward), ("horizon", roll_next, roll_reward)):
        row[f"err_{name}_loading"] = _rmse(predicted[:, :k], next_obs[:, :k])
        row[f"err_{name}_carbon"] = carbon_scale * _rmse(predicted[:, carbon_index], next_obs[:, carbon_index])
        row[f"err_{name}_welfare"] = reward_scale * _rmse(predicted_reward, reward)
    # predicted step cost of each executed transition, with and without the margin, per member then averaged
    cost_fn = make_cost_fn(cfg, backoff=False)
    if cost_fn is not None:
        if cfg.planner.margin_std == "predicted":
            obs_std = one.std[..., :cfg.obs_dim]
        else:  # member disagreement, as the planner's margin
            obs_std = jnp.broadcast_to(one.next_obs.std(axis=0), one.next_obs.shape)
        nominal = np.asarray(cost_fn(one.next_obs, None, 0.0)).mean(axis=0)
        margin = np.asarray(cost_fn(one.next_obs, obs_std, jnp.asarray(kappa, jnp.float32))).mean(axis=0)
    else:  # the model's cost output and the cost_std margin
        nominal = np.asarray(one.cost).mean(axis=0)
        margin = nominal + float(np.mean(kappa)) * np.asarray(one.std[..., -1]).max(axis=0)
    calibration = [{"step": t, "predicted_cost": float(nominal[t]), "predicted_cost_margin": float(margin[t]),
                    "realised_cost": float(cost[t])} for t in range(len(cost))]
    row["err_1step_cost"] = _rmse(nominal, cost)
    return row, calibration
