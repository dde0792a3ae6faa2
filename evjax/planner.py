"""Constrained cross-entropy method (CEM) planner with the CAP uncertainty penalty (SPEC 10).

``planner = make_planner(cfg.planner, lower, upper, num_members, step_fn)`` returns
a bundle of pure functions; ``planner.plan(key, model, obs, warm_start, kappa)``
runs one whole receding-horizon plan (sampling, model rollouts, penalty,
feasibility filter, elite refit, every CEM iteration) as one compiled XLA program.

The model is reached only through ``step_fn(model, obs[E,M,S], act[E,M,A], key)``
(and optionally its noise-free twin ``mean_step_fn(model, obs, act)``) whose output has ``next_obs [E,M,S]``, ``reward [E,M]``, ``cost [E,M]`` and
``std [E,M,S+2]`` (predicted std of the obs-delta dims, the reward and
the cost); row ``e`` of the member-major batch is advanced by ensemble member
``e``. ``model`` is any pytree (for evjax, a ``dynamics.ModelState``).

Modes (``planner.mode``), all sharing this code:

* ``cap``: cost += kappa * u per step, candidates filtered by the cost limit;
* ``ccem``: the same filter without the penalty (kappa is ignored: 0);
* ``unconstrained``: every candidate counts as feasible, elites by reward only.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from evjax.config import PlannerConfig
from evjax.errors import ConfigError

CPU_TILE_ROWS = 600  # planner.tile_rows 0 (auto) on CPU: 5 tiles of the paper's 3000 samples per member


class CandidateValues(NamedTuple):
    """Predicted value of each candidate action sequence, averaged over its particles."""

    reward: jax.Array  # [N] sum over the horizon of the predicted reward (nan_reward if non-finite)
    cost: jax.Array  # [N] scaled sum of predicted cost + kappa * u (nan_cost if non-finite)
    penalty: jax.Array  # [N] the scaled kappa * sum_t u_t part of ``cost``


class PlanDiagnostics(NamedTuple):
    """What one plan saw, for logging; all scalars of its last CEM iteration."""

    feasible_fraction: jax.Array  # [] fraction of the population within the cost limit
    elite_reward: jax.Array  # [] mean predicted return of the elites
    elite_cost: jax.Array  # [] mean penalised, scaled predicted cost of the elites
    iterations: jax.Array  # [] CEM iterations run (int32; fewer than planner.iterations if the variance collapsed)
    uncertainty_penalty: jax.Array  # [] mean over the population of the scaled kappa * sum_t u_t


class RolloutCarry(NamedTuple):
    """State carried along the horizon by ``rollout``; M = N * P/E samples per member."""

    state: Optional[jax.Array]  # [E, M, S] clipped predicted obs of every particle (None before the first step)
    reward_sum: jax.Array  # [E, M] predicted reward summed so far (weighted by the step weights)
    cost_sum: jax.Array  # [E, M] predicted cost without the CAP penalty summed so far
    uncertainty_sum: jax.Array  # [N] CAP uncertainty u summed so far (``uncertainty`` kinds)
    margin_sum: jax.Array  # [E, M] CAP safety-margin cost summed so far (``cost_fn``)


class CemCarry(NamedTuple):
    """State carried over the CEM iterations of one plan."""

    iteration: jax.Array  # [] int32 iterations run
    mean: jax.Array  # [H, A] sampling mean
    var: jax.Array  # [H, A] sampling variance (before the cap of ``capped_variance``)
    key: jax.Array  # key of the next iteration's samples
    diag: PlanDiagnostics  # of the last iteration run


class Planner(NamedTuple):
    """Pure planning functions with the planner settings bound (built by ``make_planner``)."""

    plan: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # jitted; see ``make_planner``
    plan_fn: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # the same, not jitted (``cem_plan`` bound)
    plan_batch: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # jitted B plans, one model; see ``make_planner``
    plan_batch_fn: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # the same, not jitted (``batch_plans``)
    evaluate: Callable[..., CandidateValues]  # (key, model, obs[S], actions[N,H,A], kappa) -> values, pure
    initial_warm_start: Callable[[], jax.Array]  # () -> [H, A] planner.prior_prices (default mid-range) at every step
    price_lower: jax.Array  # [A]
    price_upper: jax.Array  # [A]
    horizon: int  # H
    mode: str  # cap | ccem | unconstrained


def cost_scale(gamma: float, horizon: int) -> float:
    """Factor (1 - gamma^H) / (1 - gamma) / H on the summed step cost (1 when gamma = 1).

    It is the average discount weight over the horizon, so the scaled cost is a
    per-episode-step-normalised discounted cost of the same order as one step
    cost times H (the source's convention, SPEC 10).
    """
    if gamma == 1.0:
        return 1.0
    return (1.0 - gamma**horizon) / (1.0 - gamma) / horizon


def no_sharding(x: jax.Array, axis: int) -> jax.Array:
    """The ``shard`` of a planner on one device: ``x`` unchanged."""
    return x


def shard_population(x: jax.Array, axis: int, *, mesh: jax.sharding.Mesh) -> jax.Array:
    """Constrain ``x`` to be split along ``axis`` over the first (population) axis of ``mesh``."""
    spec = [None] * x.ndim
    spec[axis] = mesh.axis_names[0]
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


# ------------------------------------------------------------------ sampling and refit

def capped_variance(mean: jax.Array, var: jax.Array, *, lower: jax.Array, upper: jax.Array) -> jax.Array:
    """Sampling variance v = min(sigma^2, ((mu - lb) / 2)^2, ((ub - mu) / 2)^2), elementwise on [H, A].

    Capping by the distance to the bounds keeps samples near a bound from
    piling up on it after clipping.
    """
    return jnp.minimum(jnp.minimum(jnp.square((mean - lower) / 2.0), jnp.square((upper - mean) / 2.0)), var)


def sample_candidates(key: jax.Array, mean: jax.Array, var: jax.Array, *, lower: jax.Array, upper: jax.Array,
                      num_candidates: int, truncation_sigma: float, shard: Callable = no_sharding,
                      variance_cap: bool = True) -> jax.Array:
    """N candidate sequences [N, H, A]: a = clip(mu + sqrt(v) * z, lb, ub), z standard normal cut at +-truncation_sigma.

    mean, var [H, A]; v is ``capped_variance`` (SPEC 10), or var itself with ``variance_cap`` False, which
    lets samples reach a bound from a mean on or near it.
    """
    horizon, action_dim = mean.shape
    draws = jax.random.truncated_normal(key, -truncation_sigma, truncation_sigma,
                                        (num_candidates, horizon, action_dim), jnp.float32)
    std = jnp.sqrt(capped_variance(mean, var, lower=lower, upper=upper) if variance_cap else var)
    return jnp.clip(mean + std * shard(draws, 0), lower, upper)  # [N, H, A]


def constant_grid(levels: int, lower: jax.Array, upper: jax.Array) -> Optional[jax.Array]:
    """The levels^A constant price vectors [G, A] of an even grid over the bounds (None for 0 levels).

    ``planner.constant_candidates``: CEM's Gaussian samples of an H x A sequence stay near their mean, so in
    five iterations it cannot reach a corner of the box such as "CS3 cheapest, CS1 and CS2 dearest"; the
    grid puts every constant policy on such a lattice into each iteration's population.
    """
    if not levels:
        return None
    index = grid_indices(levels, len(lower))
    return (lower + (upper - lower) * index / (levels - 1)).astype(jnp.float32)


def grid_indices(levels: int, num_stations: int) -> np.ndarray:
    """Level indices [levels^A, A] of every price vector of a grid, the first station's varying slowest
    (``constant_grid``'s and the tuned constant search's, ``evaluate.fixed_price_grid``)."""
    return np.array(list(itertools.product(range(levels), repeat=num_stations)), dtype=np.int32)


def with_constant_candidates(candidates: jax.Array, grid: Optional[jax.Array]) -> jax.Array:
    """candidates [N, H, A] with the first G replaced by the constant sequences of grid [G, A]."""
    if grid is None:
        return candidates
    if grid.shape[0] > candidates.shape[0]:
        raise ValueError(f"constant_candidates: {grid.shape[0]} constant sequences exceed the {candidates.shape[0]} "
                         "candidates of an iteration (lower the levels or raise the population)")
    constant = jnp.broadcast_to(grid[:, None, :], (grid.shape[0],) + candidates.shape[1:])
    return candidates.at[:grid.shape[0]].set(constant)


def elite_scores(reward, cost, feasible, *, num_elites: int, xp=jnp):
    """Scores [N] whose J = ``num_elites`` largest mark the elites among N candidates (reward, cost, feasible [N]).

    With at least J feasible candidates, the J highest-reward feasible ones
    (score = reward, -inf when infeasible); otherwise the J lowest-cost ones
    (score = -cost). ``xp`` is ``jax.numpy`` or ``numpy`` (the oracle's CEM on
    the true simulator uses the same rule on the host).
    """
    enough_feasible = xp.sum(feasible) >= num_elites
    return xp.where(enough_feasible, xp.where(feasible, reward, -xp.inf), -cost)


def elite_indices(reward: jax.Array, cost: jax.Array, feasible: jax.Array, *, num_elites: int) -> jax.Array:
    """Indices [J] of the elites of ``elite_scores``, best first; ``lax.top_k`` breaks ties by the lower index."""
    _, index = jax.lax.top_k(elite_scores(reward, cost, feasible, num_elites=num_elites), num_elites)
    return index


def refit(mean: jax.Array, var: jax.Array, elites: jax.Array, *, smoothing: float) -> tuple[jax.Array, jax.Array]:
    """mu <- s mu + (1 - s) mean(elites), sigma^2 <- s sigma^2 + (1 - s) var(elites) with s = ``smoothing``.

    mean, var [H, A]; elites [J, H, A].
    """
    mean = smoothing * mean + (1.0 - smoothing) * elites.mean(axis=0)
    var = smoothing * var + (1.0 - smoothing) * elites.var(axis=0)
    return mean, var


# ------------------------------------------------------------------ rollouts

def candidate_uncertainty(out, *, kind: str, num_members: int, num_candidates: int,
                          particles_per_member: int) -> jax.Array:
    """Per-candidate CAP uncertainty u [N] of one model step ``out`` on the member-major batch [E, N * P/E].

    ``kind``: ``cost_std`` (the largest predicted cost std over the candidate's
    particles), ``max_std_norm`` (the largest norm of the predicted std vector
    over its particles) or ``disagreement`` (the norm over S of the std across
    members of each member's mean next obs over its particles); see ``make_planner``.
    """
    if kind == "cost_std":
        cost_std = out.std[..., -1]  # [E, M]
        return cost_std.reshape(num_members, num_candidates, particles_per_member).max(axis=(0, 2))
    if kind == "max_std_norm":
        squared_norm = jnp.sum(jnp.square(out.std), axis=-1)  # [E, M]
        return jnp.sqrt(squared_norm.reshape(num_members, num_candidates, particles_per_member).max(axis=(0, 2)))
    state_dim = out.next_obs.shape[-1]
    member_means = out.next_obs.reshape(num_members, num_candidates, particles_per_member, state_dim).mean(axis=2)
    return jnp.linalg.norm(member_means.std(axis=0), axis=-1)  # [N]


def expand_particles(x: jax.Array, *, particles_per_member: int) -> jax.Array:
    """[E, N, ...] per (member, candidate) -> [E, M, ...] with each row repeated for the member's P/E particles."""
    num_candidates = x.shape[1]
    expanded = jnp.broadcast_to(x[:, :, None], (x.shape[0], num_candidates, particles_per_member) + x.shape[2:])
    return expanded.reshape((x.shape[0], num_candidates * particles_per_member) + x.shape[2:])


def add_noise(out, noise: jax.Array):
    """Sample = predicted mean + std * eps for the obs-delta, reward and cost outputs (std applied once).

    ``noise`` is eps [E, M, S+2], one draw per particle, or [E, P/E, S+2], the
    same P/E draws for every candidate (``shared_noise``: candidate m's particle
    p gets eps[:, p]).
    """
    state_dim = out.next_obs.shape[-1]
    members, samples, width = out.std.shape
    draws = noise.shape[1]  # M (one per particle) or P/E (shared): eps repeats every ``draws`` particles
    sample = (out.std.reshape(members, samples // draws, draws, width) * noise[:, None]).reshape(out.std.shape)
    return out._replace(next_obs=out.next_obs + sample[..., :state_dim],
                        reward=out.reward + sample[..., state_dim], cost=out.cost + sample[..., state_dim + 1])


def draw_model_noise(key: jax.Array, num_candidates: int, state_dim: int, *, horizon: int, num_members: int,
                     particles_per_member: int, planner_samples: bool, shared: bool = False,
                     shard: Callable = no_sharding):
    """Model noise of one plan, reused by every CEM iteration (common random numbers).

    With ``planner_samples`` (a ``mean_step_fn``): eps [H, E, M, S+2] standard
    normals, or with ``shared`` eps [H, E, P/E, S+2], the same draws for every
    candidate, so that candidates differ only in what their actions do (with
    30 particles per candidate, independent draws leave a sampling error in each
    candidate's score that the elite selection picks up: the elites are the
    lucky draws, not the good actions). Otherwise the H step keys handed to
    ``step_fn``.
    """
    if not planner_samples:
        return jax.random.split(key, horizon)
    if shared:
        return jax.random.normal(key, (horizon, num_members, particles_per_member, state_dim + 2), jnp.float32)
    shape = (horizon, num_members, num_candidates * particles_per_member, state_dim + 2)
    return shard(jax.random.normal(key, shape, jnp.float32), 2)


def split_model_noise(noise: jax.Array, num_first: int, *, particles_per_member: int,
                      shared: bool) -> tuple[jax.Array, jax.Array]:
    """``draw_model_noise``'s draws (planner samples) as (those of the first ``num_first`` candidates, the rest's).

    Per-candidate draws [H, E, N * P/E, S+2] are candidate-major within each member, so they split at
    ``num_first`` * P/E on the particle axis; ``shared`` draws [H, E, P/E, S+2] are every candidate's.
    """
    if shared:
        return noise, noise
    cut = num_first * particles_per_member
    return noise[:, :, :cut], noise[:, :, cut:]


def rollout(model: Any, obs: jax.Array, actions: jax.Array, kappa: jax.Array, noise: jax.Array, *,
            step_fn: Callable, mean_step_fn: Optional[Callable], num_members: int, particles_per_member: int,
            state_clip: float, uncertainty: Optional[str], scale: float, nan_reward: float, nan_cost: float,
            scan_unroll: int, shard: Callable = no_sharding, cost_fn: Optional[Callable] = None,
            penalise: bool = True, step_weights_fn: Optional[Callable] = None,
            margin_std_kind: str = "disagreement", skip_unweighted: bool = True,
            sample_noise: bool = True, reward_pessimism: float = 0.0) -> CandidateValues:
    """Roll N candidate sequences actions [N, H, A] out from obs [S] through the ensemble and score them.

    Step 3 of ``cem_plan``; ``noise`` comes from ``draw_model_noise``.
    ``uncertainty`` None (modes ``ccem`` and ``unconstrained``) skips u
    entirely (kappa is ignored).

    CAP uncertainty u_{n,t} (``planner.uncertainty``), chosen to cost no extra
    forward passes (evaluating all E members at every particle's state would
    multiply the rollout cost by E):

    * ``cost_std`` (default): u_{n,t} = the largest predicted std of the step cost
      over the candidate's P particles (so across members, each on its own
      particles), in cost units. kappa is then dimensionless and kappa * u is an
      upper confidence margin on the predicted cost, of the same scale as the
      cost limit; the norms below mix EV counts and prices into a cost and make
      kappa0 = 19 dwarf any cost limit (README, "Planner");
    * ``max_std_norm``: u_{n,t} = max over the candidate's P particles
      (so across members, each on its own particles) of the Euclidean norm of the
      predicted std vector ``std`` [S+2] (obs-delta, reward and cost dims, in the
      model's output units). This is the CAP paper's "largest predicted-std norm
      across members", with each member evaluated on its own particles' states;
    * ``disagreement``: u_{n,t} = Euclidean norm over S of the standard deviation
      across members of each member's mean sampled next observation over its
      P/E particles of the candidate (member disagreement on their own
      particles; includes sampling noise shrunk by sqrt(P/E)).

    With ``cost_fn(next_obs[E,M,S], obs_std[E,M,S] or None, kappa) -> [E,M]`` (planner
    ``cost_model: observation``) the step cost is not the model's cost output
    but the environment's cost formula applied to each particle's predicted
    next observation, and the CAP penalty is a safety margin in standard
    deviations: the particle's step cost with every constrained quantity moved
    ``kappa`` stds towards its limit, minus its cost without
    (``penalise`` False, modes ``ccem`` and ``unconstrained``: no margin).
    ``uncertainty`` is then not used. The std (``margin_std_kind``):
    ``disagreement`` (this function's default), the std across members of each
    member's mean prediction over the candidate's particles (epistemic: it
    shrinks where the data cover the state and action; computed on the
    noise-free means when ``mean_step_fn`` is given), or ``predicted``, each
    particle's own predicted std (aleatoric: the arrival noise the model
    predicts; ``planner.margin_std``'s default, README "Safety"), or ``total``, the root of
    the sum of both squares (the ensemble's predictive std by the law of total variance).

    ``reward_pessimism`` lambda > 0 scores a candidate's reward as the mean over
    members of each member's predicted return (its particles' mean) minus
    lambda times their std across members: a return the members agree on beats
    one only some of them predict (MOPO-style pessimism, no extra forward passes).

    ``sample_noise`` False (with a ``mean_step_fn``): every particle follows its
    member's predicted means, no aleatoric samples (``planner.particle_noise``).

    ``step_weights_fn(obs) -> [H]`` weights each horizon step's reward and cost
    (0 for the steps after the episode's end; None: all 1). With
    ``skip_unweighted`` the horizon steps of weight 0 are not computed
    (``step_weights_fn`` must give weights that stay 0 once they reach it).
    """
    num_cand, horizon, action_dim = actions.shape
    chex.assert_shape(actions, (num_cand, horizon, action_dim))  # [N, H, A]
    state_dim = obs.shape[-1]
    chex.assert_shape(obs, (state_dim,))  # [S]
    samples_per_member = num_cand * particles_per_member  # M
    expand = functools.partial(expand_particles, particles_per_member=particles_per_member)

    def advance(state, action, step_noise):
        """One model step of every particle: state [E, M, S], action [N, A] -> (sampled step output [E, M], the
        next-obs means [E, M, S] it was sampled around: the samples themselves without a ``mean_step_fn``)."""
        action = shard(expand(jnp.broadcast_to(action, (num_members,) + action.shape)), 1)  # [E, M, A]
        if mean_step_fn is None:
            out = step_fn(model, state, action, step_noise)
            return out, out.next_obs
        mean = mean_step_fn(model, state, action)
        return (add_noise(mean, step_noise) if sample_noise else mean), mean.next_obs

    if mean_step_fn is None:
        state = shard(jnp.broadcast_to(obs, (num_members, samples_per_member, state_dim)), 1)  # [E, M, S]
        first, first_means = advance(state, actions[:, 0], noise[0])
    else:
        # every particle of a candidate starts at obs with the same action: one forward pass per
        # (member, candidate), then P/E noisy samples from it
        first_mean = mean_step_fn(model, jnp.broadcast_to(obs, (num_members, num_cand, state_dim)),
                                  jnp.broadcast_to(actions[:, 0], (num_members, num_cand, action_dim)))
        first = jax.tree.map(expand, first_mean)
        first = add_noise(first, noise[0]) if sample_noise else first
        first_means = expand(first_mean.next_obs)

    weights = (jnp.ones((horizon,), jnp.float32) if step_weights_fn is None
               else step_weights_fn(obs).astype(jnp.float32))  # [H]

    def margin_std(out, means: jax.Array) -> jax.Array:
        """Std [E, M, S] that the CAP margin moves each quantity by (``margin_std``)."""
        predicted = out.std[..., :state_dim]
        if margin_std_kind == "predicted":
            return predicted
        member_means = means.reshape(num_members, num_cand, particles_per_member, state_dim).mean(axis=2)
        spread = member_means.std(axis=0)  # [N, S] member disagreement
        disagreement = expand(jnp.broadcast_to(spread, (num_members,) + spread.shape))
        if margin_std_kind == "total":  # law of total variance: aleatoric + epistemic
            return jnp.sqrt(jnp.square(predicted) + jnp.square(disagreement))
        return disagreement

    def accumulate(carry: RolloutCarry, out, means: jax.Array, weight: jax.Array) -> RolloutCarry:
        next_state = shard(jnp.clip(out.next_obs, -state_clip, state_clip), 1)  # [E, M, S]
        uncertainty_sum, margin_sum = carry.uncertainty_sum, carry.margin_sum
        if cost_fn is not None:
            step_cost = cost_fn(out.next_obs, None, 0.0)  # [E, M], no margin
            if penalise:
                margin_sum = margin_sum + weight * (
                    cost_fn(out.next_obs, margin_std(out, means), kappa) - step_cost)
        else:
            step_cost = out.cost
            if uncertainty is not None:
                uncertainty_sum = uncertainty_sum + weight * candidate_uncertainty(
                    out, kind=uncertainty, num_members=num_members, num_candidates=num_cand,
                    particles_per_member=particles_per_member)
        return RolloutCarry(next_state, carry.reward_sum + weight * out.reward, carry.cost_sum + weight * step_cost,
                            uncertainty_sum, margin_sum)

    def one_step(carry: RolloutCarry, inputs) -> tuple[RolloutCarry, None]:
        action, step_noise, weight = inputs  # [N, A], noise, []

        def live(carry: RolloutCarry) -> RolloutCarry:
            return accumulate(carry, *advance(carry.state, action, step_noise), weight)

        if step_weights_fn is None or not skip_unweighted:
            return live(carry), None
        # a step of weight 0 (after the episode's end) adds nothing: skip its forward passes (lax.cond runs one
        # branch; under vmap it becomes a select of both). Over an episode this halves the planner's work.
        return jax.lax.cond(weight > 0, live, lambda carry: carry, carry), None

    zeros_em = jnp.zeros((num_members, samples_per_member), jnp.float32)
    carry = accumulate(RolloutCarry(None, zeros_em, zeros_em, jnp.zeros((num_cand,), jnp.float32), zeros_em),
                       first, first_means, weights[0])
    later_actions = jnp.swapaxes(actions[:, 1:], 0, 1)  # [H-1, N, A]
    carry, _ = jax.lax.scan(one_step, carry, (later_actions, noise[1:], weights[1:]), unroll=scan_unroll)

    def particle_mean(x):  # [E, M] -> [N]
        return x.reshape(num_members, num_cand, particles_per_member).mean(axis=(0, 2))

    reward = particle_mean(carry.reward_sum)
    if reward_pessimism:
        member_returns = carry.reward_sum.reshape(num_members, num_cand, particles_per_member).mean(axis=2)  # [E, N]
        reward = reward - reward_pessimism * member_returns.std(axis=0)
    if cost_fn is not None:
        penalty = particle_mean(carry.margin_sum) * scale
    elif uncertainty is not None:
        penalty = kappa * carry.uncertainty_sum * scale
    else:
        penalty = jnp.zeros((num_cand,), jnp.float32)
    cost = particle_mean(carry.cost_sum) * scale + penalty
    reward = jnp.where(jnp.isfinite(reward), reward, nan_reward)
    cost = jnp.where(jnp.isfinite(cost), cost, nan_cost)
    return CandidateValues(reward=reward, cost=cost, penalty=penalty)


# ------------------------------------------------------------------ the plan

def prior_action(prior_prices: Sequence[float], lower: jax.Array, upper: jax.Array) -> jax.Array:
    """CEM's prior mean [A]: ``planner.prior_prices``, or the mid-range price when it is empty."""
    if len(prior_prices):
        return jnp.asarray(prior_prices, jnp.float32)
    return ((jnp.asarray(lower) + jnp.asarray(upper)) / 2.0).astype(jnp.float32)


def cem_plan(key: jax.Array, model: Any, obs: jax.Array, warm_start: jax.Array, kappa: jax.Array, *,
             rollout_fn: Callable, noise_fn: Callable, lower: jax.Array, upper: jax.Array, num_candidates: int,
             num_elites: int, iterations: int, min_variance: float, truncation_sigma: float, smoothing: float,
             cost_limit: Optional[float], shard: Callable = no_sharding, prior: Optional[jax.Array] = None,
             variance_cap: bool = True, constant_candidates: Optional[jax.Array] = None,
             split_noise: Optional[Callable] = None):
    """One constrained CEM plan; pure, jit-compatible. Returns (action [A], next warm start [H, A], PlanDiagnostics).

    1. mean mu = warm start (clipped into the bounds), variance
       sigma^2 = (ub - lb)^2 / 16 per dimension;
    2. per iteration (at most ``iterations``; stop once max sigma^2 < ``min_variance``):
       capped variance v = min(sigma^2, ((mu - lb) / 2)^2, ((ub - mu) / 2)^2) (v = sigma^2 with
       ``variance_cap`` False);
       N candidates a = clip(mu + sqrt(v) * z, lb, ub) with z a standard normal
       truncated at +-``truncation_sigma``, the first G of them replaced by the constant
       sequences of ``constant_candidates`` [G, A] when given (``constant_grid``);
    3. ``rollout_fn(model, obs, candidates, kappa, noise)`` (``rollout``) rolls each candidate
       out with P particles through the ensemble (trajectory sampling: P/E of a candidate's particles follow each member,
       every particle the same member at every step; the batch is member-major,
       row e of [E, N * P/E] holds member e's particles, candidate-major within),
       states clipped to +-``state_clip``:
       R_n = mean_p sum_t r_{n,p,t},
       C_n = (mean_p sum_t c_{n,p,t} + kappa * sum_t u_{n,t}) * (1 - gamma^H) / (1 - gamma) / H;
       a non-finite R_n becomes ``nan_reward``, a non-finite C_n ``nan_cost``;
    4. feasible = C_n <= ``cost_limit``. With at least J = ``num_elites`` feasible
       candidates the elites are the J highest-reward feasible ones, otherwise the
       J lowest-cost ones (``elite_indices``);
    5. mu <- s * mu + (1 - s) * mean(elites), sigma^2 <- s * sigma^2 + (1 - s) * var(elites)
       with s = ``smoothing``.

    The action is the first step of the final mean; the next warm start is the
    final mean shifted one step along time, ``roll(mu, -1, axis=0)``, with the
    ``prior`` action appended (default the mid-range action). The model noise ``noise_fn(key, num_candidates,
    state_dim)`` is drawn once per plan; ``cost_limit`` None counts every
    candidate as feasible (mode ``unconstrained``).

    The G constant candidates are the same sequences in every iteration and, on noise drawn once per plan,
    get the same values. With ``split_noise(noise, G) -> (their noise, the other candidates' noise)``
    (``split_model_noise``) they are rolled out once, before the loop, and each iteration rolls out only
    the N - G samples: the same values (each candidate's rollout does not depend on the others in its
    batch; tested bit for bit) at (G + iterations * (N - G)) / (iterations * N) of the work, 0.8 at the
    defaults. Without it (step keys, whose draws depend on the batch shape) all N every iteration.
    """
    horizon, action_dim = warm_start.shape
    chex.assert_shape(warm_start, (horizon, action_dim))  # [H, A]
    mean = jnp.clip(warm_start.astype(jnp.float32), lower, upper)  # [H, A]
    var = jnp.broadcast_to(jnp.square(upper - lower) / 16.0, (horizon, action_dim))  # [H, A]
    key, noise_key = jax.random.split(key)
    model_noise = noise_fn(noise_key, num_candidates, obs.shape[-1])
    zero = jnp.zeros((), jnp.float32)
    diag0 = PlanDiagnostics(zero, zero, zero, jnp.zeros((), jnp.int32), zero)
    num_constant = 0 if constant_candidates is None else constant_candidates.shape[0]
    hoist = split_noise is not None and 0 < num_constant < num_candidates
    if hoist:  # the constant candidates' values, the same in every iteration
        constant_noise, sampled_noise = split_noise(model_noise, num_constant)
        constant_actions = jnp.broadcast_to(constant_candidates[:, None, :], (num_constant, horizon, action_dim))
        constant_values = rollout_fn(model, obs, constant_actions, kappa, constant_noise)

    def keep_going(carry: CemCarry) -> jax.Array:
        return (carry.iteration < iterations) & (jnp.max(carry.var) >= min_variance)

    def cem_iteration(carry: CemCarry) -> CemCarry:
        key, sample_key = jax.random.split(carry.key)
        candidates = sample_candidates(sample_key, carry.mean, carry.var, lower=lower, upper=upper,
                                       num_candidates=num_candidates, truncation_sigma=truncation_sigma,
                                       shard=shard, variance_cap=variance_cap)  # [N, H, A]
        candidates = with_constant_candidates(candidates, constant_candidates)
        if hoist:
            sampled = rollout_fn(model, obs, candidates[num_constant:], kappa, sampled_noise)
            values = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), constant_values, sampled)
        else:
            values = rollout_fn(model, obs, candidates, kappa, model_noise)
        if cost_limit is not None:
            feasible = values.cost <= cost_limit  # [N]
        else:
            feasible = jnp.ones((num_candidates,), bool)
        elite_index = elite_indices(values.reward, values.cost, feasible, num_elites=num_elites)  # [J]
        mean, var = refit(carry.mean, carry.var, candidates[elite_index], smoothing=smoothing)
        diag = PlanDiagnostics(
            feasible_fraction=jnp.mean(feasible.astype(jnp.float32)),
            elite_reward=jnp.mean(values.reward[elite_index]),
            elite_cost=jnp.mean(values.cost[elite_index]),
            iterations=carry.iteration + 1,
            uncertainty_penalty=jnp.mean(values.penalty),
        )
        return CemCarry(carry.iteration + 1, mean, var, key, diag)

    init = CemCarry(jnp.zeros((), jnp.int32), mean, var, key, diag0)
    final = jax.lax.while_loop(keep_going, cem_iteration, init)
    action = jnp.clip(final.mean[0], lower, upper)  # [A]
    appended = prior_action((), lower, upper) if prior is None else prior  # [A]
    next_warm_start = jnp.roll(final.mean, -1, axis=0).at[-1].set(appended)  # [H, A]
    return action, next_warm_start, final.diag


def batch_plans(keys: jax.Array, model: Any, obs: jax.Array, warm_starts: jax.Array, kappa: jax.Array, *,
                plan_fn: Callable, sequential: bool):
    """B plans of ``plan_fn`` sharing ``model``: keys [B], obs [B, S], warm_starts [B, H, A], kappa [B]; pure.

    ``sequential``: one plan after another (``lax.map``), else all at once
    (``vmap``: the batched ``while_loop`` runs until every plan has stopped and
    leaves the stopped ones unchanged). Either way row b equals plan b alone.
    """
    if not sequential:
        return jax.vmap(plan_fn, in_axes=(0, None, 0, 0, 0))(keys, model, obs, warm_starts, kappa)
    return jax.lax.map(lambda inputs: plan_fn(inputs[0], model, *inputs[1:]), (keys, obs, warm_starts, kappa))


def _check_arguments(particles: int, lower: np.ndarray, upper: np.ndarray, num_members: int) -> None:
    """Raise ``ValueError`` naming the first impossible factory argument.

    The ``PlannerConfig`` has checked its own fields; what is left are the
    arguments that do not come from it, and how they fit the config.
    """
    if isinstance(num_members, bool) or not isinstance(num_members, (int, np.integer)) or num_members <= 0:
        raise ValueError(f"num_members must be a positive integer, got {num_members!r}")
    if particles % num_members:
        raise ValueError(f"planner.particles ({particles}) must be divisible by the number of "
                         f"ensemble members ({num_members}): particles are split evenly across members")
    if lower.ndim != 1 or lower.shape != upper.shape or lower.size == 0:
        raise ValueError(f"price_lower and price_upper must be equal-length vectors, got shapes "
                         f"{lower.shape} and {upper.shape}")
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)) and np.all(lower < upper)):
        raise ValueError(f"price_lower {lower.tolist()} must be finite and below price_upper {upper.tolist()}")


def rollout_particles_per_member(cfg, num_members: int, mean_step: bool = True) -> int:
    """Particles per member that the rollout steps: P/E, or 1 without particle noise on the mean-step path.

    Without particle noise every particle of a (member, candidate) follows the member's means from the same
    observation with the same actions, so its P/E particles are identical: one per member gives the same values
    (means over identical copies) at 1/(P/E) of the forward passes.
    """
    return cfg.particles // num_members if cfg.particle_noise or not mean_step else 1


def make_planner(
    planner_cfg: PlannerConfig,
    price_lower: Sequence[float],
    price_upper: Sequence[float],
    num_members: int,
    step_fn: Callable,
    *,
    mean_step_fn: Optional[Callable] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    cost_fn: Optional[Callable] = None,
    step_weights_fn: Optional[Callable] = None,
    prepare_fn: Optional[Callable] = None,
    hoist_constants: bool = True,
) -> Planner:
    """Build the constrained CEM planner of SPEC 10 for an E-member ensemble: validate, bind, return the bundle.

    ``plan(key, model, obs[S], warm_start[H,A], kappa)`` returns
    ``(action[A], next_warm_start[H,A], PlanDiagnostics)``; the algorithm is
    ``cem_plan``'s, the rollouts and the CAP uncertainty ``rollout``'s.
    ``plan_batch(keys[B], model, obs[B,S], warm_starts[B,H,A], kappa[B])`` runs B
    such plans (B environments, one shared model) as one compiled program
    (``batch_plans``: vmapped on accelerators, one after another on CPU) and returns
    ``(action[B,A], next_warm_start[B,H,A], PlanDiagnostics[B])``, each row equal to
    its single plan. It compiles once per B.

    Model noise: ``step_fn(model, obs, act, key)`` samples internally; the planner
    passes it the same H step keys in every CEM iteration of a plan. With
    ``mean_step_fn(model, obs[E,M,S], act[E,M,A])`` (the same output, noise-free:
    predicted means and their std) the planner samples itself,
    ``sample = mean + std * eps`` with eps [H, E, M, S+2] drawn once per plan, and
    evaluates the first step once per (member, candidate) instead of once per
    particle, since all particles of a candidate start at ``obs`` with the same
    action. Either way the model noise is common to the CEM iterations of a plan
    (common random numbers: candidates of different iterations are compared on
    the same model draws, and the noise is generated once, not ``iterations`` times).

    ``mesh``: optional ``jax.sharding.Mesh`` whose first axis shards the
    population (candidates, and with them the member-major particle axis) across
    devices; ``popsize`` must be divisible by that axis' size. Random draws are
    the same as on one device (JAX's partitionable threefry), so the sharded
    plan equals the single-device plan up to float reassociation.

    ``cost_fn`` and ``step_weights_fn``: see ``rollout`` (the environment's cost
    formula on the predicted observation, and the weights that end the horizon
    with the episode); ``make_model_planner`` binds them from the config.

    ``prepare_fn(model) -> model``: work on the model that every step of a plan would repeat (the Mosaic
    kernel's weight layout, ``dynamics.prepare``), done once per plan before the CEM loop; the steps
    then get its result as their model. None: the model as given.

    ``hoist_constants``: roll the constant-price candidates out once per plan rather than in every CEM
    iteration (``cem_plan``'s ``split_noise``; the same plans at 0.8 of the rollouts at the defaults). It
    applies with a ``mean_step_fn`` and no ``mesh``; False is the reference the tests and
    ``benchmarks/planner.py`` compare with.

    The config section has checked its own settings; the factory checks the
    arguments that do not come from it (``num_members``, the price bounds, the
    mesh) and raises ``ValueError`` naming the first impossible one.
    """
    cfg = planner_cfg
    lower_np = np.asarray(price_lower, dtype=np.float64)
    upper_np = np.asarray(price_upper, dtype=np.float64)
    _check_arguments(cfg.particles, lower_np, upper_np, num_members)
    shard = no_sharding
    if mesh is not None:
        # sharding constraints need Auto axes (jax.make_mesh makes Explicit ones by default)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
        devices_on_axis = mesh.shape[mesh.axis_names[0]]
        if cfg.popsize % devices_on_axis:
            raise ValueError(f"planner.popsize ({cfg.popsize}) must be divisible by the {devices_on_axis} "
                             f"devices of mesh axis '{mesh.axis_names[0]}'")
        shard = functools.partial(shard_population, mesh=mesh)
    lower = jnp.asarray(lower_np, dtype=jnp.float32)  # [A]
    upper = jnp.asarray(upper_np, dtype=jnp.float32)  # [A]
    particles_per_member = rollout_particles_per_member(cfg, num_members, mean_step=mean_step_fn is not None)
    # the warm start of an episode's first plan and the action appended to a shifted warm start
    prior = prior_action(cfg.prior_prices, lower, upper)  # [A]
    # 0 = auto: unrolled on accelerators (fewer kernel launches: 5.7 -> 4.9 ms per plan on an H100), rolled on CPU
    scan_unroll = cfg.scan_unroll or (cfg.horizon if jax.default_backend() != "cpu" else 1)
    rollout_fn = functools.partial(
        rollout, step_fn=step_fn, mean_step_fn=mean_step_fn, num_members=num_members,
        particles_per_member=particles_per_member, state_clip=cfg.state_clip,
        uncertainty=cfg.uncertainty if cfg.mode == "cap" else None, scale=cost_scale(cfg.gamma, cfg.horizon),
        nan_reward=cfg.nan_reward, nan_cost=cfg.nan_cost, scan_unroll=scan_unroll, shard=shard, cost_fn=cost_fn,
        penalise=cfg.mode == "cap", step_weights_fn=step_weights_fn, margin_std_kind=cfg.margin_std,
        # on CPU the skip saves the skipped steps' work; on a GPU a conditional inside the unrolled horizon
        # costs a predicate read per step, and a plan with it took 6.6 ms on an H200 (README, "Benchmarks")
        skip_unweighted=jax.default_backend() == "cpu", sample_noise=cfg.particle_noise,
        reward_pessimism=cfg.reward_pessimism)
    noise_fn = functools.partial(draw_model_noise, horizon=cfg.horizon, num_members=num_members,
                                 particles_per_member=particles_per_member, planner_samples=mean_step_fn is not None,
                                 shared=cfg.shared_noise, shard=shard)
    plan_settings = dict(
        rollout_fn=rollout_fn, noise_fn=noise_fn, lower=lower, upper=upper, num_candidates=cfg.popsize,
        num_elites=cfg.num_elites, iterations=cfg.iterations, min_variance=cfg.min_variance,
        truncation_sigma=cfg.truncation_sigma, smoothing=cfg.smoothing,
        cost_limit=cfg.cost_limit if cfg.mode != "unconstrained" else None, shard=shard, prior=prior,
        variance_cap=cfg.variance_cap, constant_candidates=constant_grid(cfg.constant_candidates, lower, upper),
        # step keys draw by batch shape, and a sharded population needs N - G and G divisible by the mesh
        split_noise=(functools.partial(split_model_noise, particles_per_member=particles_per_member,
                                       shared=cfg.shared_noise)
                     if hoist_constants and mean_step_fn is not None and mesh is None else None))

    prepare = prepare_fn or (lambda model: model)

    def plan_fn(key: jax.Array, model: Any, obs: jax.Array, warm_start: jax.Array, kappa: jax.Array):
        """One constrained CEM plan with this planner's settings (``cem_plan``); pure, jit-compatible."""
        return cem_plan(key, prepare(model), obs, warm_start, kappa, **plan_settings)

    plan_jit = jax.jit(plan_fn)

    def plan(key, model, obs, warm_start, kappa):
        """Jitted ``plan_fn``; arrays are cast to float32 first so the program traces once."""
        return plan_jit(key, model, jnp.asarray(obs, jnp.float32), jnp.asarray(warm_start, jnp.float32),
                        jnp.asarray(kappa, jnp.float32))

    # vmapped plans multiply the activations by B and spill the CPU forward's cache tiles:
    # at B = 8, 2.76 plans/s vmapped against 3.22 one after another on 2 CPU cores (README, "Benchmarks")
    plan_batch_fn = functools.partial(batch_plans, plan_fn=plan_fn, sequential=jax.default_backend() == "cpu")
    plan_batch_jit = jax.jit(plan_batch_fn)

    def plan_batch(keys, model, obs, warm_starts, kappa):
        """Jitted ``batch_plans`` (vmap, or one after another on CPU) of ``plan_fn`` over keys [B], obs [B, S], warm starts [B, H, A] and kappa [B], [B, 2] or a scalar (model shared)."""
        obs = jnp.asarray(obs, jnp.float32)
        chex.assert_rank(obs, 2)  # [B, S]
        kappa = jnp.asarray(kappa, jnp.float32)
        if kappa.ndim == 0:
            kappa = jnp.broadcast_to(kappa, obs.shape[:1])  # [B]; a batched kappa is [B] or [B, 2] (per constraint)
        return plan_batch_jit(keys, model, obs, jnp.asarray(warm_starts, jnp.float32), kappa)

    def evaluate(key: jax.Array, model: Any, obs: jax.Array, actions: jax.Array, kappa: jax.Array) -> CandidateValues:
        """Predicted reward, penalised cost and penalty of candidates actions [N, H, A] (pure)."""
        return rollout_fn(prepare(model), obs, actions, kappa, noise_fn(key, actions.shape[0], obs.shape[-1]))

    return Planner(plan=plan, plan_fn=plan_fn, plan_batch=plan_batch, plan_batch_fn=plan_batch_fn,
                   evaluate=evaluate,
                   initial_warm_start=lambda: jnp.broadcast_to(prior, (cfg.horizon, lower.size)),
                   price_lower=lower, price_upper=upper, horizon=cfg.horizon, mode=cfg.mode)


def observation_cost(next_obs: jax.Array, obs_std: Optional[jax.Array], kappa, *, num_stations: int,
                     loading_limit: float, carbon_index: int, carbon_scale: float, carbon_limit: float,
                     carbon_divisor: float) -> jax.Array:
    """The environment's step cost (``env.step_cost``) on predicted observations [..., S], with a safety margin.

    c = sum_k max(0, L_k + kappa_line * sd(L_k) - limit) + max(0, CI + kappa_carbon * sd(CI) - CI_max) / divisor,
    L = next_obs[..., :K] the monitored line loadings, CI = next_obs[..., carbon_index] * carbon_scale the
    constrained carbon measure, sd their predicted stds ``obs_std`` [..., S] (None: no margin, the nominal
    cost; ``kappa`` is then not used). ``kappa`` is a scalar (one
    multiplier for both constraints) or [2] (line, carbon). Not modelled: the voltage term (not observed;
    ``grid.voltage_cost`` must be off) and the zero carbon cost of a step without EV energy (every evening
    step of the data charges EVs).
    """
    loading, intensity = next_obs[..., :num_stations], next_obs[..., carbon_index]
    if obs_std is not None:
        kappa = jnp.reshape(jnp.asarray(kappa, jnp.float32), (-1,))
        loading = loading + kappa[0] * obs_std[..., :num_stations]
        intensity = intensity + kappa[-1] * obs_std[..., carbon_index]
    line = jnp.sum(jnp.maximum(0.0, loading - loading_limit), axis=-1)
    intensity = intensity * carbon_scale
    return line + jnp.maximum(0.0, intensity - carbon_limit) / carbon_divisor


def episode_step_weights(obs: jax.Array, *, horizon: int, episode_steps: int) -> jax.Array:
    """Weights [H]: 1 for the horizon steps inside the episode, 0 after its end (from the time feature obs[-1] = t / T)."""
    steps_done = jnp.round(obs[-1] * episode_steps)
    return (jnp.arange(horizon) < episode_steps - steps_done).astype(jnp.float32)


def make_cost_fn(cfg, backoff: bool = True) -> Optional[Callable]:
    """``observation_cost`` bound to the observation layout of ``cfg``, or None with ``planner.cost_model: learned``.

    With ``backoff`` the limits are tightened by ``planner.constraint_backoff`` (the planner's cost); without,
    it is the environment's own cost (model diagnostics).
    """
    if cfg.planner.cost_model != "observation":
        return None
    k = cfg.num_stations
    line_backoff, carbon_backoff = cfg.planner.constraint_backoff if backoff else (0.0, 0.0)
    return functools.partial(
        observation_cost, num_stations=k, loading_limit=cfg.grid.loading_limit - line_backoff,
        carbon_index=2 * k + 1, carbon_scale=cfg.env.carbon_obs_scale, carbon_limit=cfg.carbon.limit - carbon_backoff,
        carbon_divisor=cfg.carbon.cost_divisor)


def resolve_hidden_dtype(hidden_dtype: str, matmul_dtype: str, backend: str) -> str:
    """``planner.hidden_dtype`` "auto": bfloat16 products on accelerators with bfloat16 matmuls, else float32.

    On a GPU the planner's forward is bound by the bytes of the hidden products written and read back by the
    bias + activation pass, so bfloat16 storage saves time; XLA CPU turns a bfloat16-output dot into a float32
    matmul and a cast, which costs time (README, "Benchmarks").
    """
    if hidden_dtype != "auto":
        return hidden_dtype
    return "bfloat16" if matmul_dtype == "bfloat16" and backend != "cpu" else "float32"


def check_kernel(kernel: str, backend: str, matmul_dtype: str, compute_capability: Optional[str]) -> None:
    """Refuse a ``planner.kernel`` the device cannot run: a ``ConfigError`` (one line, exit status 2 from the CLI).

    The Pallas kernels need a GPU; ``mosaic`` also needs a Hopper one (compute
    capability 9.x: its warpgroup matmuls are sm_90a instructions) and bfloat16 matmuls.
    """
    if kernel != "xla" and backend != "gpu":
        raise ConfigError(f"planner.kernel {kernel!r} needs a GPU backend, this one is {backend!r}: "
                         f"use planner.kernel 'xla'")
    if kernel == "mosaic" and compute_capability is not None and not str(compute_capability).startswith("9."):
        raise ConfigError(f"planner.kernel 'mosaic' needs a Hopper GPU (compute capability 9.x), this one is "
                         f"{compute_capability}: use planner.kernel 'xla'")
    if kernel == "mosaic" and matmul_dtype != "bfloat16":
        raise ConfigError(f"planner.kernel 'mosaic' needs planner.matmul_dtype bfloat16, got {matmul_dtype!r}")


def resolve_kernel(kernel: str, backend: str, matmul_dtype: str, compute_capability: Optional[str],
                   layout) -> str:
    """The concrete ``planner.kernel``: ``auto`` is ``mosaic`` on a Hopper GPU (compute capability 9.x) with
    bfloat16 matmuls and an MLP the kernel takes (``layout``: ``dyn.layout``), ``xla`` everywhere else; the
    others are returned as they are.

    One plan on an H200 took 1.52-1.70 ms with ``mosaic`` against 1.85-2.59 ms on the XLA path, 256 batched
    plans 4 432 against 2 427 per second (README, "Benchmarks").
    """
    if kernel != "auto":
        return kernel
    from evjax.fused_mlp import mosaic_shape_problem

    hopper = backend == "gpu" and str(compute_capability or "").startswith("9.")
    fits = not mosaic_shape_problem(layout.hidden_sizes, layout.input_dim, layout.layer_sizes[-1])
    return "mosaic" if hopper and matmul_dtype == "bfloat16" and fits else "xla"


def make_model_planner(cfg, dyn, mesh: Optional[jax.sharding.Mesh] = None, hoist_constants: bool = True) -> Planner:
    """The planner of ``cfg`` (an ``evjax.config.Config``) over the ensemble ``dyn`` (``make_dynamics``).

    Binds ``dyn.step`` with ``planner.matmul_dtype``, ``planner.hidden_dtype`` (``resolve_hidden_dtype``),
    ``planner.kernel`` (``resolve_kernel``) and, on CPU,
    ``planner.tile_rows`` both as ``step_fn`` and, with ``mean_only=True``, as
    ``mean_step_fn``; plans over ``dyn.num_planning_members`` members, so pass
    ``dyn.select_elites(model)`` when the model has a holdout. A ``planner.kernel`` other than xla needs a GPU
    backend, mosaic a Hopper one (``check_kernel``; on CPU the kernels only run in interpret mode, for tests);
    ``dynamics.prepare`` lays the Mosaic kernel's weights out once per plan (``prepare_fn``). With
    ``planner.cost_model: observation`` the step cost is ``observation_cost`` on the observation layout of
    ``cfg``; with ``planner.stop_at_episode_end`` the horizon steps after the episode's end weigh 0
    (``episode_step_weights``).
    """
    from evjax import dynamics

    matmul_dtype, backend = cfg.planner.matmul_dtype, jax.default_backend()
    compute_capability = getattr(jax.devices()[0], "compute_capability", None)
    kernel = resolve_kernel(cfg.planner.kernel, backend, matmul_dtype, compute_capability, dyn.layout)
    check_kernel(kernel, backend, matmul_dtype, compute_capability)
    # tiles of the population kept in cache across the layers help XLA CPU only (README, "Benchmarks")
    tile_rows = (cfg.planner.tile_rows or CPU_TILE_ROWS) if backend == "cpu" else 0
    settings = dict(matmul_dtype=matmul_dtype, kernel=kernel, tile_rows=tile_rows,
                    hidden_dtype=resolve_hidden_dtype(cfg.planner.hidden_dtype, matmul_dtype, backend))
    step_fn = functools.partial(dyn.step, **settings)
    mean_step_fn = functools.partial(dyn.step, key=None, mean_only=True, **settings)
    cost_fn, step_weights_fn = make_cost_fn(cfg), None
    if cfg.planner.stop_at_episode_end and cfg.env.time_features:
        step_weights_fn = functools.partial(episode_step_weights, horizon=cfg.planner.horizon,
                                            episode_steps=cfg.env.episode_steps)
    return make_planner(cfg.planner, cfg.env.price_lower, cfg.env.price_upper, dyn.num_planning_members,
                        step_fn, mean_step_fn=mean_step_fn, mesh=mesh, cost_fn=cost_fn,
                        step_weights_fn=step_weights_fn,
                        prepare_fn=functools.partial(dynamics.prepare, layout=dyn.layout, kernel=kernel),
                        hoist_constants=hoist_constants)
