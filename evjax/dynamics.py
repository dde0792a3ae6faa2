"""Probabilistic ensemble dynamics model (SPEC 9), the model the CEM planner rolls out.

``dyn = make_dynamics(cfg.model, obs_dim, action_dim)`` returns a bundle of pure
functions with the model settings bound. The logic lives in the module-level
functions below, each taking its static settings as keyword arguments and the
shapes as one frozen ``Layout``; they can be called (and tested) on their own.

E members share one architecture; their parameters are stacked on a leading
axis ``E`` and every member-level function is ``vmap``-ped over that axis, so a
forward pass is one batched matmul per layer.

Each member maps the normalised input (obs, action) through the hidden layers
(swish) to one linear head whose outputs are, in order, the means of the
obs delta ``next_obs - obs`` (S), the reward and the cost, then the log-variances
of the Gaussian outputs (W = S + 2, or S + 1 with a logistic cost head).
With ``model.linear_ridge`` > 0 each member's means add a linear map of the
input, a ridge regression solved in closed form at the start of every fit
(``ridge_maps``) and held fixed while the network learns what it leaves.

``step``, the planner's hot path, evaluates the same network through
``member_step_forward``: swish as h + h tanh(h) (h = x/2) and the log-variance
bounds on a [W, M] layout, which XLA CPU runs ~40% faster per plan; training and
``predict`` use ``member_forward``, the reference that ``step`` is tested against.

Targets are standardised by the training data's mean and std when
``model.normalize_targets`` (default): the raw targets differ in scale by orders
of magnitude (line-loading deltas ~1e-2, EV-count deltas ~10, reward ~1), and
standardising lets the soft log-variance bounds (initialised at 0.5 and -10)
mean the same thing for every output and weights the heads evenly. The NLL
``(mu - y)^2 / sigma^2 + log sigma^2`` changes only by the constant
``log std_y^2`` per dimension, so its gradients are those of the raw-unit loss;
``predict`` and ``step`` return means and stds in raw units.

Re-fits do not retrace as the dataset grows: ``fit`` pads the data to a bucket
of ``batch_size * 2^k`` rows (128, 256, 512, 1024 at the defaults, so a whole
training run of up to 600 transitions compiles the fit four times); the true
row count is a traced scalar, padded rows carry zero weight, and minibatches
made only of padding are skipped with ``lax.cond``.

Shape letters (the legend in the README): E members (E' planning members), S obs,
A action, W outputs with a log-variance, B batch rows (of a minibatch too), M
samples per member, R padded rows of a fit; nb counts the minibatches of an epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from evjax import fused_mlp
from evjax.config import ModelConfig

MATMUL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class ModelState:
    """Everything a fitted ensemble needs; a pytree that orbax saves and restores.

    ``target_mean``/``target_std`` hold the target standardisation (zeros and
    ones when ``model.normalize_targets`` is off, and for a logistic cost head's
    cost column).
    """

    params: Any  # stacked member params, leading axis E on every leaf
    norm_mean: jax.Array  # [S+A] input mean
    norm_std: jax.Array  # [S+A] input std (floored)
    opt_state: Any  # optax Adam state over ``params``
    elites: jax.Array  # [E'] int32 member indices used for planning
    target_mean: jax.Array  # [S+2] mean of (obs delta, reward, cost)
    target_std: jax.Array  # [S+2] std of (obs delta, reward, cost)


class Prediction(NamedTuple):
    """One model step in raw units; leading dims [B] (predict) or [E, M] (step)."""

    next_obs: jax.Array  # [..., S] obs + sampled (or mean) delta
    reward: jax.Array  # [...]
    cost: jax.Array  # [...] sampled Gaussian cost, or the probability of a logistic head
    std: jax.Array  # [..., S+2] predicted std of (delta, reward, cost); 0 for a logistic cost


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of an ensemble: sizes, layer names, where each output sits. Hashable, so jit-static."""

    obs_dim: int  # S
    action_dim: int  # A
    num_members: int  # E
    hidden_sizes: tuple[int, ...]  # hidden layer widths
    binary_cost: bool  # logistic cost head (no log-variance for the cost)
    linear: bool = False  # each member's means add a linear map of the input fitted by ridge regression

    @property
    def input_dim(self) -> int:  # S + A
        return self.obs_dim + self.action_dim

    @property
    def output_dim(self) -> int:  # S + 2: obs delta, reward, cost
        return self.obs_dim + 2

    @property
    def cost_col(self) -> int:
        return self.obs_dim + 1

    @property
    def num_gaussian(self) -> int:  # W, outputs with a log-variance
        return self.output_dim - int(self.binary_cost)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(f"hidden_{i}" for i in range(len(self.hidden_sizes))) + ("head",)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.input_dim, *self.hidden_sizes, self.output_dim + self.num_gaussian)


class Dynamics(NamedTuple):
    """Pure functions of the ensemble model with its settings bound (built by ``make_dynamics``)."""

    init: Callable[[jax.Array], ModelState]  # key -> fresh state
    fit: Callable[..., tuple[ModelState, dict]]  # host side; see ``fit``
    predict: Callable[..., Prediction]  # jitted (state, obs[B,S], act[B,A], key, member[B]) -> Prediction [B]
    step: Callable[..., Prediction]  # jitted (state, obs[E,M,S], act[E,M,A], key) -> Prediction [E,M]
    select_elites: Callable[[ModelState], ModelState]  # keep only the elite members (planning)
    layout: Layout  # S, A, E and the layers
    num_planning_members: int  # E' after select_elites

    @property
    def obs_dim(self) -> int:  # S
        return self.layout.obs_dim

    @property
    def action_dim(self) -> int:  # A
        return self.layout.action_dim

    @property
    def ensemble_size(self) -> int:  # E
        return self.layout.num_members


# ------------------------------------------------------------------ network

def gaussian_nll(mean: jax.Array, logvar: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Weighted Gaussian NLL without constants, averaged over the batch and the dims.

    ``mean([(mu - y)^2 exp(-lv) + lv])`` over the dims d and over the rows
    ``B`` weighted by ``weight`` (0 for padding): sum_b w_b * mean_d(...) / sum_b w_b.
    Shapes: mean, logvar, target [B, d]; weight [B].
    """
    per_row = jnp.mean(jnp.square(mean - target) * jnp.exp(-logvar) + logvar, axis=-1)
    return jnp.sum(weight * per_row) / jnp.maximum(jnp.sum(weight), 1.0)


def soft_bound_logvar(logvar: jax.Array, max_logvar: jax.Array, min_logvar: jax.Array) -> jax.Array:
    """Softly clamp log-variances into (min_lv, max_lv).

    lv <- max_lv - softplus(max_lv - lv); lv <- min_lv + softplus(lv - min_lv).
    Smooth, so the bounds themselves are learned through the NLL.
    """
    logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
    return min_logvar + jax.nn.softplus(logvar - min_logvar)


def swish_via_tanh(x: jax.Array) -> jax.Array:
    """swish(x) = x sigmoid(x), evaluated as h + h tanh(h) with h = x / 2 (the planner's fast path).

    Same function as ``jax.nn.swish`` (sigmoid(x) = (1 + tanh(x/2)) / 2), one
    tanh instead of an exp and a divide: 10-15% less time for the fused
    bias + swish + bfloat16 cast on XLA CPU. Rounding differs: the absolute
    error stays below ~2e-7 * max(1, |x|) (f32 tanh rounding, cancelling in
    1 + tanh for x << 0), so outputs below ~1e-3 in magnitude (x < -9) lose
    relative accuracy; far below the bfloat16 rounding of the next matmul's input.
    """
    half = 0.5 * x
    return half * jnp.tanh(half) + half


def _dense(h: jax.Array, layer: dict, dtype, out_dtype=jnp.float32) -> jax.Array:
    """h @ W + b with ``dtype`` matmul inputs and float32 accumulation, the product stored as ``out_dtype``.

    A bfloat16 ``out_dtype`` rounds the accumulated product once before the
    float32 bias add: half the bytes of the [M, width] product written and read
    again by the bias + activation pass (the planner on a GPU, README "Benchmarks").
    """
    out = jnp.dot(h.astype(dtype), layer["w"].astype(dtype), preferred_element_type=out_dtype)
    return out.astype(jnp.float32) + layer["b"]


def init_params(key: jax.Array, *, layout: Layout, init_truncation: float, max_logvar_init: float,
                min_logvar_init: float) -> dict:
    """Truncated-normal weights with std 1/(2 sqrt(fan_in)) (cut at +-init_truncation std), zero biases."""
    num_members = layout.num_members
    layer_keys = jax.random.split(key, len(layout.layer_names))
    params = {}
    for name, layer_key, fan_in, fan_out in zip(layout.layer_names, layer_keys, layout.layer_sizes[:-1],
                                                layout.layer_sizes[1:]):
        weight = jax.random.truncated_normal(layer_key, -init_truncation, init_truncation,
                                             (num_members, fan_in, fan_out))
        params[name] = {"w": weight / (2.0 * math.sqrt(fan_in)), "b": jnp.zeros((num_members, fan_out))}
    if layout.linear:
        params["linear"] = {"w": jnp.zeros((num_members, layout.input_dim, layout.output_dim)),
                            "b": jnp.zeros((num_members, layout.output_dim))}
    params["max_logvar"] = jnp.full((num_members, layout.num_gaussian), max_logvar_init, jnp.float32)
    params["min_logvar"] = jnp.full((num_members, layout.num_gaussian), min_logvar_init, jnp.float32)
    return params


def init_state(key: jax.Array, *, layout: Layout, optimizer: optax.GradientTransformation, num_planning: int,
               **init_settings) -> ModelState:
    """Fresh ensemble: identity normalisers, all members planning (the first E' with a holdout).

    ``init_settings`` are the keyword settings of ``init_params``.
    """
    params = init_params(key, layout=layout, **init_settings)
    return ModelState(
        params=params,
        norm_mean=jnp.zeros(layout.input_dim), norm_std=jnp.ones(layout.input_dim),
        opt_state=optimizer.init(params),
        elites=jnp.arange(num_planning, dtype=jnp.int32),
        target_mean=jnp.zeros(layout.output_dim), target_std=jnp.ones(layout.output_dim),
    )


def member_forward(member_params: dict, x_norm: jax.Array, dtype=jnp.float32, *,
                   layout: Layout) -> tuple[jax.Array, jax.Array]:
    """One member on normalised inputs [B, S+A] -> (mean [B, S+2], bounded logvar [B, W]), target units."""
    h = x_norm
    for name in layout.layer_names[:-1]:
        h = jax.nn.swish(_dense(h, member_params[name], dtype))
    out = _dense(h, member_params["head"], dtype)
    mean, raw_logvar = out[:, :layout.output_dim], out[:, layout.output_dim:]
    logvar = soft_bound_logvar(raw_logvar, member_params["max_logvar"], member_params["min_logvar"])
    return add_linear(member_params, x_norm, mean), logvar


def add_linear(member_params: dict, x_norm: jax.Array, mean: jax.Array) -> jax.Array:
    """``mean`` [M, S+2] plus the member's ridge map of x_norm [M, S+A] where it has one (``model.linear_ridge``).

    The map is fitted in closed form before each fit's gradient steps (``ridge_maps``) and held fixed by
    them (``stop_gradient``), so the network learns the residual. In float32: a [S+A, S+2] matmul.
    """
    if "linear" not in member_params:
        return mean
    linear = lax.stop_gradient(member_params["linear"])
    return mean + x_norm @ linear["w"] + linear["b"]


def member_step_forward(member_params: dict, x_norm: jax.Array, dtype, *, layout: Layout,
                        hidden_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``member_forward`` laid out for the planner's hot path: (mean [M, S+2], bounded logvar^T [W, M]).

    Same maths, two changes for XLA CPU: swish as ``swish_via_tanh``, and
    the log-variances transposed to [W, M] before the soft bound. With W
    (11 at the defaults) as the minor dimension, the fused nested softplus
    (4 transcendental functions per element, 5 with the std's exp) is not
    vectorised and took ~30% of a plan; with M minor it is ~5x faster.
    ``hidden_dtype`` stores the hidden layers' matmul products (``_dense``'s ``out_dtype``).
    """
    h = x_norm
    for name in layout.layer_names[:-1]:
        h = swish_via_tanh(_dense(h, member_params[name], dtype, hidden_dtype))
    out = _dense(h, member_params["head"], dtype)  # [M, S+2+W]: one matmul, head kept row-major
    mean, logvar_t = split_head(out, member_params["max_logvar"], member_params["min_logvar"], layout=layout)
    return add_linear(member_params, x_norm, mean), logvar_t


def tiled_step_forward(params: dict, x_norm: jax.Array, dtype, *, layout: Layout,
                       tile_rows: int, hidden_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``member_step_forward`` of every member, x_norm [E, M, S+A] -> ([E, M, S+2], [E, W, M]), tile by tile.

    The samples are split into ceil(M / ``tile_rows``) equal tiles (M zero-padded
    to a multiple) run one after another with ``lax.map``, so that a tile's
    activations [E, M/tiles, 256] stay in cache across the layers; 0 = one tile.
    """
    forward = jax.vmap(functools.partial(member_step_forward, layout=layout, hidden_dtype=hidden_dtype),
                       in_axes=(0, 0, None))
    members, samples, input_dim = x_norm.shape
    tiles = -(-samples // tile_rows) if tile_rows else 1
    if tiles <= 1:
        return forward(params, x_norm, dtype)
    rows = -(-samples // tiles)
    x = jnp.pad(x_norm, ((0, 0), (0, rows * tiles - samples), (0, 0))).reshape(members, tiles, rows, input_dim)
    mean, logvar_t = lax.map(lambda x_tile: forward(params, x_tile, dtype), jnp.swapaxes(x, 0, 1))
    mean = jnp.swapaxes(mean, 0, 1).reshape(members, tiles * rows, -1)[:, :samples]  # [E, M, S+2]
    logvar_t = jnp.moveaxis(logvar_t, 0, 2).reshape(members, logvar_t.shape[2], tiles * rows)[..., :samples]
    return mean, logvar_t  # [E, W, M]


def split_head(out: jax.Array, max_logvar: jax.Array, min_logvar: jax.Array, *,
               layout: Layout) -> tuple[jax.Array, jax.Array]:
    """One member's raw head outputs [M, S+2+W] -> (mean [M, S+2], soft-bounded logvar^T [W, M])."""
    mean, raw_logvar = out[:, :layout.output_dim], out[:, layout.output_dim:].T
    return mean, soft_bound_logvar(raw_logvar, max_logvar[:, None], min_logvar[:, None])


# ------------------------------------------------------------------ training

def member_nll(member_params: dict, x_norm: jax.Array, y_norm: jax.Array, weight: jax.Array, *,
               layout: Layout) -> jax.Array:
    """Sum over the heads of each head's NLL (delta, reward, cost), each a mean over rows and dims.

    A logistic cost head uses the binary cross-entropy of its logit against
    the label ``cost > 0`` (``y_norm``'s cost column holds that label).
    Shapes: x_norm [B, S+A], y_norm [B, S+2], weight [B].
    """
    obs_dim, cost_col = layout.obs_dim, layout.cost_col
    mean, logvar = member_forward(member_params, x_norm, layout=layout)
    loss = gaussian_nll(mean[:, :obs_dim], logvar[:, :obs_dim], y_norm[:, :obs_dim], weight)
    loss += gaussian_nll(mean[:, obs_dim:cost_col], logvar[:, obs_dim:cost_col], y_norm[:, obs_dim:cost_col], weight)
    if layout.binary_cost:
        bce = optax.sigmoid_binary_cross_entropy(mean[:, cost_col], y_norm[:, cost_col])
        loss += jnp.sum(weight * bce) / jnp.maximum(jnp.sum(weight), 1.0)
    else:
        loss += gaussian_nll(mean[:, cost_col:], logvar[:, cost_col:], y_norm[:, cost_col:], weight)
    return loss


def ensemble_loss(params: dict, x_norm: jax.Array, y_norm: jax.Array, weight: jax.Array, *, layout: Layout,
                  weight_decays: tuple[float, ...], logvar_bound_weight: float) -> tuple[jax.Array, jax.Array]:
    """Training objective of the whole ensemble and each member's NLL.

    L = sum_e NLL_e + sum_l wd_l * 0.5 * ||W_l||^2 (all members)
        + logvar_bound_weight * (sum max_lv - sum min_lv).
    Shapes: x_norm [E, B, S+A], y_norm [E, B, S+2], weight [E, B]; member e sees row e.
    """
    nll = jax.vmap(functools.partial(member_nll, layout=layout))(params, x_norm, y_norm, weight)  # [E]
    decay = sum(wd * 0.5 * jnp.sum(jnp.square(params[name]["w"]))
                for name, wd in zip(layout.layer_names, weight_decays))
    bounds = logvar_bound_weight * (jnp.sum(params["max_logvar"]) - jnp.sum(params["min_logvar"]))
    return jnp.sum(nll) + decay + bounds, nll


def adam_step(params: dict, opt_state: Any, x_norm: jax.Array, y_norm: jax.Array, weight: jax.Array, *,
              optimizer: optax.GradientTransformation, **loss_settings) -> tuple[dict, Any, jax.Array]:
    """One Adam step on ``ensemble_loss`` for a minibatch [E, B, ...]; returns (params, opt_state, loss).

    ``loss_settings`` are the keyword settings of ``ensemble_loss``.
    """
    loss_fn = functools.partial(ensemble_loss, **loss_settings)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x_norm, y_norm, weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def masked_moments(values: jax.Array, valid: jax.Array, *, std_floor: float) -> tuple[jax.Array, jax.Array]:
    """Mean and std (ddof 0) over the valid rows of values [R, d] (valid [R], 1 or 0); std below std_floor -> 1."""
    count = jnp.maximum(jnp.sum(valid), 1.0)
    mean = jnp.sum(values * valid[:, None], axis=0) / count
    var = jnp.sum(jnp.square(values - mean) * valid[:, None], axis=0) / count
    std = jnp.sqrt(var)
    return mean, jnp.where(std < std_floor, 1.0, std)


class FitData(NamedTuple):
    """The arrays one fit trains on; R padded rows, the first ``num_rows`` data."""

    x_norm: jax.Array  # [R, S+A] normalised inputs
    y_norm: jax.Array  # [R, S+2] standardised targets
    bootstrap: jax.Array  # [E, R] data rows of each member's resample (slots >= num_train unused)
    num_train: jax.Array  # [] int32 training rows
    holdout_rows: Optional[jax.Array]  # [R_h] rows of the holdout set (None without a holdout)
    holdout_weight: Optional[jax.Array]  # [R_h] 1 for the first num_holdout of them, else 0


class EpochCarry(NamedTuple):
    """State carried over the minibatches of one epoch."""

    params: Any
    opt_state: Any
    loss_sum: jax.Array  # [] summed objective of the minibatches trained so far
    count: jax.Array  # [] int32 minibatches trained so far


class FitCarry(NamedTuple):
    """State carried over the epochs of one fit (``lax.while_loop``)."""

    epoch: jax.Array  # [] int32 epochs run
    key: jax.Array  # PRNG key of the next epoch
    params: Any  # current params
    opt_state: Any
    best_params: Any  # per-member params at the best holdout NLL (None without a holdout)
    best_nll: jax.Array  # [E] best holdout NLL so far (inf before the first)
    since_improved: jax.Array  # [] int32 epochs since any member improved
    train_loss: jax.Array  # [] mean objective over the last epoch's minibatches


def run_epoch(epoch_key: jax.Array, params: dict, opt_state: Any, data: FitData, *, batch_size: int,
              step_fn: Callable) -> tuple[dict, Any, jax.Array]:
    """One pass of every member over its bootstrap resample, in a fresh random order, in minibatches.

    ``step_fn(params, opt_state, x, y, weight)`` is one optimiser step
    (``adam_step`` with its settings bound). Minibatches holding only padding
    are skipped. Returns (params, opt_state, mean objective of the trained minibatches).
    """
    num_members, padded_rows = data.bootstrap.shape
    num_batches = padded_rows // batch_size
    slot_valid = jnp.arange(padded_rows) < data.num_train  # [R] slots of a resample that hold data
    shuffle = jax.random.uniform(epoch_key, (num_members, padded_rows))
    order = jnp.argsort(jnp.where(slot_valid[None, :], shuffle, 2.0), axis=1)
    rows = jnp.take_along_axis(data.bootstrap, order, axis=1)  # [E, R]
    rows = rows.reshape(num_members, num_batches, batch_size).swapaxes(0, 1)  # [nb, E, B]
    weights = slot_valid.astype(jnp.float32).reshape(num_batches, batch_size)  # [nb, B]
    active = jnp.arange(num_batches) * batch_size < data.num_train  # [nb]

    def train(carry: EpochCarry, batch_rows: jax.Array, batch_weight: jax.Array) -> EpochCarry:
        weight = jnp.broadcast_to(batch_weight, (num_members, batch_size))
        params, opt_state, loss = step_fn(carry.params, carry.opt_state, data.x_norm[batch_rows],
                                          data.y_norm[batch_rows], weight)
        return EpochCarry(params, opt_state, carry.loss_sum + loss, carry.count + 1)

    def minibatch(carry: EpochCarry, batch) -> tuple[EpochCarry, None]:
        batch_rows, batch_weight, batch_active = batch
        return lax.cond(batch_active, lambda c: train(c, batch_rows, batch_weight), lambda c: c, carry), None

    init = EpochCarry(params, opt_state, jnp.float32(0.0), jnp.int32(0))
    carry, _ = lax.scan(minibatch, init, (rows, weights, active))
    return carry.params, carry.opt_state, carry.loss_sum / jnp.maximum(carry.count, 1)


def fit_epoch(carry: FitCarry, data: FitData, *, layout: Layout, early_stopping_min_improvement: float,
              **epoch_settings) -> FitCarry:
    """One epoch (``run_epoch``, whose settings ``epoch_settings`` are), then the holdout bookkeeping.

    With a holdout, a member improves when its holdout NLL drops below
    best - early_stopping_min_improvement * |best|; improved members snapshot
    their params, and ``since_improved`` restarts when any member improved.
    """
    key, epoch_key = jax.random.split(carry.key)
    params, opt_state, train_loss = run_epoch(epoch_key, carry.params, carry.opt_state, data, **epoch_settings)
    best_params, best_nll, since_improved = carry.best_params, carry.best_nll, carry.since_improved
    if data.holdout_rows is not None:
        nll = jax.vmap(functools.partial(member_nll, layout=layout), in_axes=(0, None, None, None))(
            params, data.x_norm[data.holdout_rows], data.y_norm[data.holdout_rows], data.holdout_weight)  # [E]
        threshold = best_nll - early_stopping_min_improvement * jnp.abs(best_nll)
        improved = nll < jnp.where(jnp.isfinite(best_nll), threshold, jnp.inf)  # [E]
        best_params = jax.tree.map(
            lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            params, best_params)
        best_nll = jnp.where(improved, nll, best_nll)
        since_improved = jnp.where(jnp.any(improved), 0, since_improved + 1)
    return FitCarry(carry.epoch + 1, key, params, opt_state, best_params, best_nll, since_improved, train_loss)


def fit_padded(key: jax.Array, state: ModelState, inputs: jax.Array, targets: jax.Array, num_rows: jax.Array, *,
               layout: Layout, optimizer: optax.GradientTransformation, batch_size: int, epochs: int,
               holdout_fraction: float, early_stopping_patience: int, early_stopping_min_improvement: float,
               num_planning: int, normalize_targets: bool, std_floor: float, weight_decays: tuple[float, ...],
               logvar_bound_weight: float, min_gradient_steps: int = 0,
               linear_ridge: float = 0.0) -> tuple[ModelState, dict]:
    """Refit normalisers, split off a holdout, bootstrap per member and train; pure and jittable.

    ``inputs`` [R, S+A] and raw ``targets`` [R, S+2] are padded to R rows
    (a multiple of batch_size); only the first ``num_rows`` are data. The
    first ``holdout`` rows of a random permutation form the holdout set
    (max(1, floor(n * holdout_fraction)) of them, none when off); each member
    draws its own bootstrap resample of the remaining ``n_train`` rows and,
    each epoch, visits it in a fresh random order in minibatches of
    ``batch_size``. With a holdout, training stops once no member improved its
    holdout NLL by ``early_stopping_min_improvement * |best|`` for
    ``early_stopping_patience`` epochs (at most ``epochs``); each member
    ends at its best-holdout parameters and the elites are the ``num_planning``
    members with the lowest holdout NLL. ``min_gradient_steps`` > 0 raises the epoch limit to
    ceil(min_gradient_steps / minibatches per epoch) where that is more than ``epochs``, so a fit on little
    data still takes that many optimiser steps (0: ``epochs`` only). With ``layout.linear`` each member's
    ridge map (``ridge_maps``, penalty ``linear_ridge``) is refitted on its own resample first and held fixed
    while the network trains on what it leaves.
    """
    padded_rows = inputs.shape[0]
    num_members, output_dim, cost_col = layout.num_members, layout.output_dim, layout.cost_col
    has_holdout = holdout_fraction > 0.0
    chex.assert_shape(inputs, (padded_rows, layout.input_dim))  # [R, S+A]
    chex.assert_shape(targets, (padded_rows, output_dim))  # [R, S+2]
    key, split_key, boot_key = jax.random.split(key, 3)
    num_rows = jnp.asarray(num_rows, jnp.int32)
    row = jnp.arange(padded_rows)
    valid = (row < num_rows).astype(jnp.float32)

    norm_mean, norm_std = masked_moments(inputs, valid, std_floor=std_floor)
    if layout.binary_cost:
        targets = targets.at[:, cost_col].set((targets[:, cost_col] > 0).astype(jnp.float32))
    if normalize_targets:
        target_mean, target_std = masked_moments(targets, valid, std_floor=std_floor)
    else:
        target_mean, target_std = jnp.zeros(output_dim), jnp.ones(output_dim)
    if layout.binary_cost:
        target_mean, target_std = target_mean.at[cost_col].set(0.0), target_std.at[cost_col].set(1.0)
    x_norm = (inputs - norm_mean) / norm_std
    y_norm = (targets - target_mean) / target_std

    order_keys = jnp.where(row < num_rows, jax.random.uniform(split_key, (padded_rows,)), 2.0)
    permutation = jnp.argsort(order_keys)  # [R] data rows first, in random order
    holdout_rows = holdout_weight = None
    if has_holdout:
        num_holdout = jnp.clip(jnp.floor(num_rows * holdout_fraction).astype(jnp.int32), 1, num_rows - 1)
        holdout_cap = max(1, math.ceil(padded_rows * holdout_fraction))
        holdout_rows = permutation[:holdout_cap]
        holdout_weight = (jnp.arange(holdout_cap) < num_holdout).astype(jnp.float32)
    else:
        num_holdout = jnp.int32(0)
    num_train = num_rows - num_holdout
    draws = jax.random.randint(boot_key, (num_members, padded_rows), 0, jnp.maximum(num_train, 1))
    bootstrap = permutation[num_holdout + draws]  # [E, R] data rows of each member's resample
    data = FitData(x_norm, y_norm, bootstrap, num_train, holdout_rows, holdout_weight)
    params = state.params
    if layout.linear:
        params = {**params, "linear": ridge_maps(x_norm, y_norm, bootstrap, num_train, linear_ridge, layout=layout)}

    step_fn = functools.partial(adam_step, optimizer=optimizer, layout=layout, weight_decays=weight_decays,
                                logvar_bound_weight=logvar_bound_weight)
    epoch_body = functools.partial(fit_epoch, data=data, layout=layout,
                                   early_stopping_min_improvement=early_stopping_min_improvement,
                                   batch_size=batch_size, step_fn=step_fn)

    batches = jnp.maximum((num_train + batch_size - 1) // batch_size, 1)  # minibatches an epoch trains
    epoch_limit = jnp.maximum(epochs, (min_gradient_steps + batches - 1) // batches)  # min_gradient_steps 0: epochs

    def keep_training(carry: FitCarry) -> jax.Array:
        return (carry.epoch < epoch_limit) & (carry.since_improved < early_stopping_patience)

    init = FitCarry(epoch=jnp.int32(0), key=key, params=params, opt_state=state.opt_state,
                    best_params=params if has_holdout else None,
                    best_nll=jnp.full((num_members,), jnp.inf), since_improved=jnp.int32(0),
                    train_loss=jnp.float32(jnp.nan))
    final = lax.while_loop(keep_training, epoch_body, init)
    if has_holdout:
        params = final.best_params
        elites = jnp.argsort(final.best_nll)[:num_planning].astype(jnp.int32)
    else:
        params = final.params
        elites = jnp.arange(num_planning, dtype=jnp.int32)
    new_state = ModelState(params=params, norm_mean=norm_mean, norm_std=norm_std, opt_state=final.opt_state,
                           elites=elites, target_mean=target_mean, target_std=target_std)
    metrics = {"train_loss": final.train_loss,
               "holdout_nll": final.best_nll if has_holdout else jnp.full(num_members, jnp.nan),
               "epochs": final.epoch, "num_train": num_train, "num_holdout": num_holdout, "elites": elites}
    return new_state, metrics


def ridge_maps(x_norm: jax.Array, y_norm: jax.Array, bootstrap: jax.Array, num_train: jax.Array,
               penalty: float, *, layout: Layout) -> dict:
    """Each member's ridge regression of y_norm [R, S+2] on x_norm [R, S+A] over its bootstrap resample.

    Minimises sum_r c_er ||y_r - x_r w - b||^2 + penalty ||w||^2 (the intercept b is not penalised), with c_er
    the number of times row r is in member e's resample (slots < ``num_train`` of ``bootstrap`` [E, R]): a
    closed-form [S+A+1]-square solve per member. On standardised data the map is the linear part of the
    response that a few hundred transitions identify, such as which way a price moves the EVs between the
    stations, which the network alone learns only from more data (README "Dynamics model"). A logistic cost
    head's column gets no map. Returns {"w": [E, S+A, S+2], "b": [E, S+2]}.
    """
    num_members, padded_rows = bootstrap.shape
    in_slot = (jnp.arange(padded_rows) < num_train).astype(jnp.float32)
    counts = jnp.zeros((num_members, padded_rows)).at[jnp.arange(num_members)[:, None], bootstrap].add(in_slot)
    design = jnp.concatenate([x_norm, jnp.ones((padded_rows, 1))], axis=1)  # [R, S+A+1]
    gram = jnp.einsum("rd,er,rk->edk", design, counts, design, precision=lax.Precision.HIGHEST)
    penalties = jnp.diag(jnp.append(jnp.full(layout.input_dim, penalty), 0.0))
    rhs = jnp.einsum("rd,er,ro->edo", design, counts, y_norm, precision=lax.Precision.HIGHEST)
    solution = jnp.linalg.solve(gram + penalties, rhs)  # [E, S+A+1, S+2]
    if layout.binary_cost:
        solution = solution.at[..., layout.cost_col].set(0.0)
    return {"w": solution[:, :-1], "b": solution[:, -1]}


def bucket_rows(num_rows: int, batch_size: int) -> int:
    """Padded dataset size: batch_size times the next power of two of the batch count."""
    batches = max(1, math.ceil(num_rows / batch_size))
    return batch_size * (1 << (batches - 1).bit_length())


def pad_transitions(obs, act, reward, cost, next_obs, *, layout: Layout,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray, np.int32]:
    """Inputs [R, S+A] and raw targets [R, S+2] (delta, reward, cost), zero-padded to the bucket; and n.

    Host side, not jittable.
    """
    obs, act, next_obs = (np.asarray(a, np.float32) for a in (obs, act, next_obs))
    reward, cost = np.asarray(reward, np.float32).reshape(-1), np.asarray(cost, np.float32).reshape(-1)
    num_rows = obs.shape[0]
    if num_rows == 0:
        raise ValueError("fit needs at least one transition")
    expected = {"obs": (obs, (num_rows, layout.obs_dim)), "act": (act, (num_rows, layout.action_dim)),
                "reward": (reward, (num_rows,)), "cost": (cost, (num_rows,)),
                "next_obs": (next_obs, (num_rows, layout.obs_dim))}
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"fit: {name} has shape {array.shape}, expected {shape}")
    inputs = np.concatenate([obs, act], axis=1)
    targets = np.concatenate([next_obs - obs, reward[:, None], cost[:, None]], axis=1)
    if not (np.all(np.isfinite(inputs)) and np.all(np.isfinite(targets))):
        raise ValueError("fit: transitions contain non-finite values")
    padding = ((0, bucket_rows(num_rows, batch_size) - num_rows), (0, 0))
    return np.pad(inputs, padding), np.pad(targets, padding), np.int32(num_rows)


def fit(key, state: ModelState, obs, act, reward, cost, next_obs, *, layout: Layout, batch_size: int,
        fit_fn: Callable) -> tuple[ModelState, dict]:
    """Fit the ensemble to all transitions: pad to a bucket, run ``fit_fn`` (a jitted, bound ``fit_padded``).

    Host side, not jittable. Metrics: train_loss (mean objective over the last
    epoch's minibatches), holdout_nll [E] (best per member; nan without a
    holdout), epochs, num_train, num_holdout (python numbers), elites [E'].
    """
    inputs, targets, num_rows = pad_transitions(obs, act, reward, cost, next_obs, layout=layout,
                                                batch_size=batch_size)
    state, metrics = fit_fn(key, state, inputs, targets, num_rows)
    metrics = {name: (float(value) if name == "train_loss" else int(value)) if np.ndim(value) == 0
               else np.asarray(value) for name, value in metrics.items()}
    return state, metrics


# ------------------------------------------------------------------ prediction

def _decode(state: ModelState, obs: jax.Array, mean: jax.Array, std: jax.Array, noise: Optional[jax.Array], *,
            layout: Layout) -> Prediction:
    """Raw-unit Prediction from target-unit means [..., S+2] and raw-unit stds [..., W].

    std = exp(logvar / 2) * target_std is computed by the caller (``predict``
    and ``step`` lay it out differently); noise [..., S+2] or None for the mean.
    """
    obs_dim, cost_col = layout.obs_dim, layout.cost_col
    if layout.binary_cost:
        std = jnp.concatenate([std, jnp.zeros(std.shape[:-1] + (1,))], axis=-1)
        mean = mean * state.target_std + state.target_mean
        mean = mean.at[..., cost_col].set(jax.nn.sigmoid(mean[..., cost_col]))
    else:
        mean = mean * state.target_std + state.target_mean
    sample = mean if noise is None else mean + std * noise
    return Prediction(next_obs=obs + sample[..., :obs_dim], reward=sample[..., obs_dim],
                      cost=sample[..., cost_col], std=std)


def _matmul_dtype(matmul_dtype: str):
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {sorted(MATMUL_DTYPES)}, got {matmul_dtype!r}")
    return MATMUL_DTYPES[matmul_dtype]


def predict(state: ModelState, obs: jax.Array, act: jax.Array, key: Optional[jax.Array], member: jax.Array, *,
            layout: Layout, matmul_dtype: str = "float32", mean_only: bool = False) -> Prediction:
    """Trajectory-sampling step: row b advanced by member ``member[b]``.

    Sample = mean + sigma * eps, eps ~ N(0, I) drawn as [B, S+2] from ``key``
    (sigma applied once). Every member is evaluated on every row and the
    requested one is selected (a reference path; the planner uses ``step``).
    """
    dtype = _matmul_dtype(matmul_dtype)
    batch = obs.shape[0]
    chex.assert_shape(obs, (batch, layout.obs_dim))  # [B, S]
    chex.assert_shape(act, (batch, layout.action_dim))  # [B, A]
    chex.assert_shape(member, (batch,))  # [B]
    x_norm = (jnp.concatenate([obs, act], axis=-1) - state.norm_mean) / state.norm_std
    forward = jax.vmap(functools.partial(member_forward, layout=layout), in_axes=(0, None, None))
    mean, logvar = forward(state.params, x_norm, dtype)  # [E, B, .]
    pick = member[None, :, None].astype(jnp.int32)
    mean = jnp.take_along_axis(mean, pick, axis=0)[0]  # [B, S+2]
    logvar = jnp.take_along_axis(logvar, pick, axis=0)[0]  # [B, W]
    std = jnp.exp(0.5 * logvar) * state.target_std[:layout.num_gaussian]
    noise = None if mean_only else jax.random.normal(key, (batch, layout.output_dim))
    return _decode(state, obs, mean, std, noise, layout=layout)


class PlanningModel(NamedTuple):
    """A ``ModelState`` with its kernel's weight layout computed once (``prepare``); ``step`` takes either."""

    state: ModelState
    head_weights: Any  # fused_mlp.MosaicWeights


def prepare(state: ModelState, *, layout: Layout, kernel: str) -> ModelState | PlanningModel:
    """What a plan's CEM loop should read: ``state`` itself, or with ``kernel="mosaic"`` a ``PlanningModel``
    holding ``fused_mlp.mosaic_weights`` too, so that the weights are laid out once per plan rather than once
    per CEM iteration (XLA leaves that work inside the loop). ``step`` gives the same outputs for both."""
    if kernel != "mosaic":
        return state
    return PlanningModel(state, fused_mlp.mosaic_weights(state.params, layer_names=layout.layer_names))


# planner.kernel values that run the layers as Pallas kernels: the raw head outputs [E, M, S+2+W]
PALLAS_HEADS = {"pallas": fused_mlp.ensemble_head, "pallas_layers": fused_mlp.ensemble_head_layers,
                "mosaic": fused_mlp.ensemble_head_mosaic}


def step(state: ModelState | PlanningModel, obs: jax.Array, act: jax.Array, key: Optional[jax.Array], *,
         layout: Layout, matmul_dtype: str = "float32", mean_only: bool = False, kernel: str = "xla",
         tile_rows: int = 0, hidden_dtype: str = "float32") -> Prediction:
    """Member-major step: obs [E, M, S], act [E, M, A]; row e advanced by member e.

    One batched matmul per layer (members vmapped with in_axes 0), matmul
    inputs in ``matmul_dtype`` with float32 accumulation; normalisation,
    activations, log-variance bounds and noise in float32. Noise is drawn as
    [E, M, S+2] from ``key``, the same numbers ``predict`` draws for the
    flattened batch [E*M] with ``member = repeat(arange(E), M)``.

    Evaluated by ``member_step_forward`` (tanh-form swish, log-variance
    bounds and std on [E, W, M], transposed back to [E, M, W]): the same
    outputs as ``predict`` to float32 rounding, ~40% less time per plan.
    ``tile_rows`` > 0 runs the XLA layers tile by tile over the samples
    (``tiled_step_forward``; the planner's setting on CPU). ``hidden_dtype``
    "bfloat16" stores the XLA path's hidden matmul products in bfloat16 before
    the float32 bias and activation (the planner's setting on a GPU).
    ``kernel="pallas"`` runs the layers as one fused Pallas kernel instead
    (``fused_mlp.ensemble_head``; the same maths, on a GPU), ``"pallas_layers"``
    one Pallas matmul per hidden layer with the bias + activation in its
    epilogue (``fused_mlp.ensemble_head_layers``); on other backends both run
    in Pallas interpret mode, a test path far too slow to plan with. ``state`` may be a ``PlanningModel``
    (``prepare``), whose weights the Mosaic kernel then reads as they are.
    """
    head_weights = None
    if isinstance(state, PlanningModel):
        state, head_weights = state.state, state.head_weights
    dtype = _matmul_dtype(matmul_dtype)
    members, samples = obs.shape[:2]
    chex.assert_shape(obs, (members, samples, layout.obs_dim))  # [E, M, S]
    chex.assert_shape(act, (members, samples, layout.action_dim))  # [E, M, A]
    chex.assert_tree_shape_prefix(state.params, (members,))
    x_norm = (jnp.concatenate([obs, act], axis=-1) - state.norm_mean) / state.norm_std
    if kernel == "xla":
        mean, logvar_t = tiled_step_forward(state.params, x_norm, dtype, layout=layout, tile_rows=tile_rows,
                                            hidden_dtype=_matmul_dtype(hidden_dtype))  # [E, M, S+2], [E, W, M]
    elif kernel in PALLAS_HEADS:
        head = PALLAS_HEADS[kernel](state.params, x_norm, dtype, layer_names=layout.layer_names,
                                    activation=swish_via_tanh, interpret=jax.default_backend() != "gpu",
                                    **({"weights": head_weights} if kernel == "mosaic" else {}))
        mean, logvar_t = jax.vmap(functools.partial(split_head, layout=layout))(
            head, state.params["max_logvar"], state.params["min_logvar"])
        mean = jax.vmap(add_linear)(state.params, x_norm, mean)
    else:
        raise ValueError(f"kernel must be 'xla' or one of {sorted(PALLAS_HEADS)}, got {kernel!r}")
    std = jnp.swapaxes(jnp.exp(0.5 * logvar_t) * state.target_std[:layout.num_gaussian, None], 1, 2)  # [E, M, W]
    noise = None if mean_only else jax.random.normal(key, (members, samples, layout.output_dim))
    return _decode(state, obs, mean, std, noise, layout=layout)


def select_elites(state: ModelState, *, optimizer: optax.GradientTransformation, has_holdout: bool) -> ModelState:
    """State holding only the elite members, in elite order (identity without a holdout).

    The Adam moments are gathered with the params so the result stays a
    consistent ModelState.
    """
    if not has_holdout:
        return state

    def take(leaf):
        return jnp.take(leaf, state.elites, axis=0)

    return state.replace(params=jax.tree.map(take, state.params),
                         opt_state=optax.tree_map_params(optimizer, take, state.opt_state),
                         elites=jnp.arange(state.elites.shape[0], dtype=jnp.int32))


# ------------------------------------------------------------------ factory

def fit_settings(model_cfg: ModelConfig, layout: Layout) -> dict:
    """The keyword settings of ``fit_padded`` for ``model_cfg``."""
    has_holdout = model_cfg.holdout_fraction > 0.0
    return dict(layout=layout, optimizer=optax.adam(model_cfg.learning_rate), batch_size=model_cfg.batch_size,
                epochs=model_cfg.epochs, holdout_fraction=model_cfg.holdout_fraction,
                early_stopping_patience=model_cfg.early_stopping_patience,
                early_stopping_min_improvement=model_cfg.early_stopping_min_improvement,
                num_planning=model_cfg.num_elites if has_holdout else model_cfg.ensemble_size,
                normalize_targets=model_cfg.normalize_targets, std_floor=model_cfg.std_floor,
                weight_decays=model_cfg.weight_decays, logvar_bound_weight=model_cfg.logvar_bound_weight,
                min_gradient_steps=model_cfg.min_gradient_steps, linear_ridge=model_cfg.linear_ridge)


def make_dynamics(model_cfg: ModelConfig, obs_dim: int, action_dim: int) -> Dynamics:
    """Build the ensemble model for S = ``obs_dim`` observations and A = ``action_dim`` actions.

    API (shapes: E members, E' planning members, B batch, M samples per member):

    * ``init(key) -> ModelState``
    * ``fit(key, state, obs[B,S], act[B,A], reward[B], cost[B], next_obs[B,S]) -> (state, metrics)``
      host side, not jittable: pads to a bucket and runs the jitted ``fit_padded``.
    * ``predict(state, obs[B,S], act[B,A], key, member[B], *, matmul_dtype, mean_only) -> Prediction[B]``
      trajectory sampling, row b advanced by member ``member[b]``.
    * ``step(state, obs[E,M,S], act[E,M,A], key, *, matmul_dtype, mean_only, kernel) -> Prediction[E,M]``
      member-major: row e advanced by member e (the planner's hot path).
    * ``select_elites(state) -> ModelState`` with the E' elite members only.

    ``model_cfg`` has checked itself; only the dimensions are checked here.
    """
    if obs_dim <= 0 or action_dim <= 0:
        raise ValueError(f"obs_dim and action_dim must be positive, got {obs_dim} and {action_dim}")
    layout = Layout(obs_dim=obs_dim, action_dim=action_dim, num_members=model_cfg.ensemble_size,
                    hidden_sizes=model_cfg.hidden_sizes, binary_cost=model_cfg.binary_cost,
                    linear=model_cfg.linear_ridge > 0.0)
    settings = fit_settings(model_cfg, layout)
    optimizer, num_planning = settings["optimizer"], settings["num_planning"]
    init = functools.partial(init_state, layout=layout, optimizer=optimizer, num_planning=num_planning,
                             init_truncation=model_cfg.init_truncation, max_logvar_init=model_cfg.max_logvar_init,
                             min_logvar_init=model_cfg.min_logvar_init)
    dtype_options = ("matmul_dtype", "mean_only")
    return Dynamics(
        init=jax.jit(init),
        fit=functools.partial(fit, layout=layout, batch_size=model_cfg.batch_size,
                              fit_fn=jax.jit(functools.partial(fit_padded, **settings))),
        predict=jax.jit(functools.partial(predict, layout=layout), static_argnames=dtype_options),
        step=jax.jit(functools.partial(step, layout=layout), static_argnames=dtype_options + ("kernel", "tile_rows", "hidden_dtype")),
        select_elites=functools.partial(select_elites, optimizer=optimizer,
                                        has_holdout=model_cfg.holdout_fraction > 0.0),
        layout=layout,
        num_planning_members=num_planning,
    )
