"""Constrained cross-entropy method (CEM) planner with the CAP uncertainty penalty (SPEC 10).

``planner = make_planner(cfg.planner, lower, upper, num_members, step_fn)`` returns
a bundle of pure functions; ``planner.plan(key, model, obs, warm_start, kappa)``
runs one whole receding-horizon plan (sampling, model rollouts, penalty,
feasibility filter, elite refit, every CEM iteration) as one compiled XLA program.

The model is reached only through ``step_fn(model, obs[E,M,S], act[E,M,A], key)``
(and optionally its noise-free twin ``mean_step_fn(model, obs, act)``) whose output has ``next_obs [E,M,S]``, ``reward [E,M]``, ``cost [E,M]`` and
``std [E,M,D]`` (D = S + 2: predicted std of the obs-delta dims, the reward and
the cost); row ``e`` of the member-major batch is advanced by ensemble member
``e``. ``model`` is any pytree (for evjax, a ``dynamics.ModelState``).

Modes (``planner.mode``), all sharing this code:

* ``cap``: cost += kappa * u per step, candidates filtered by the cost limit;
* ``ccem``: the same filter without the penalty (kappa is ignored: 0);
* ``unconstrained``: every candidate counts as feasible, elites by reward only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from evjax.config import PlannerConfig


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


class Planner(NamedTuple):
    """Pure planning functions with the planner settings bound (built by ``make_planner``)."""

    plan: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # jitted; see ``make_planner``
    plan_fn: Callable[..., tuple[jax.Array, jax.Array, PlanDiagnostics]]  # the same, not jitted
    plan_jit: Any  # the jax.jit object behind ``plan`` (for lowering / compile timing)
    evaluate: Callable[..., CandidateValues]  # (key, model, obs[S], actions[N,H,A], kappa) -> values, pure
    initial_warm_start: Callable[[], jax.Array]  # () -> [H, A] mid-range prices
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


def make_planner(
    planner_cfg: PlannerConfig,
    price_lower: Sequence[float],
    price_upper: Sequence[float],
    num_members: int,
    step_fn: Callable,
    *,
    mean_step_fn: Optional[Callable] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Planner:
    """Build the constrained CEM planner of SPEC 10 for an E-member ensemble.

    ``plan(key, model, obs[S], warm_start[H,A], kappa)`` returns
    ``(action[A], next_warm_start[H,A], PlanDiagnostics)``:

    1. mean mu = warm start (clipped into the bounds), variance
       sigma^2 = (ub - lb)^2 / 16 per dimension;
    2. per iteration (at most ``iterations``; stop once max sigma^2 < ``min_variance``):
       capped variance v = min(sigma^2, ((mu - lb) / 2)^2, ((ub - mu) / 2)^2);
       N candidates a = clip(mu + sqrt(v) * z, lb, ub) with z a standard normal
       truncated at +-``truncation_sigma``;
    3. each candidate is rolled out with P particles through the ensemble
       (trajectory sampling: P/E of a candidate's particles follow each member,
       every particle the same member at every step; the batch is member-major,
       row e of [E, N * P/E] holds member e's particles, candidate-major within),
       states clipped to +-``state_clip``:
       R_n = mean_p sum_t r_{n,p,t},
       C_n = (mean_p sum_t c_{n,p,t} + kappa * sum_t u_{n,t}) * (1 - gamma^H) / (1 - gamma) / H;
       a non-finite R_n becomes ``nan_reward``, a non-finite C_n ``nan_cost``;
    4. feasible = C_n <= ``cost_limit``. With at least K = ``num_elites`` feasible
       candidates the elites are the K highest-reward feasible ones, otherwise the
       K lowest-cost ones (``lax.top_k``);
    5. mu <- s * mu + (1 - s) * mean(elites), sigma^2 <- s * sigma^2 + (1 - s) * var(elites)
       with s = ``smoothing``.

    The action is the first step of the final mean; the next warm start is the
    final mean shifted one step along time, ``roll(mu, -1, axis=0)``, with the
    mid-range action appended.

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
      predicted std vector ``std`` [D] (obs-delta, reward and cost dims, in the
      model's output units). This is the CAP paper's "largest predicted-std norm
      across members", with each member evaluated on its own particles' states;
    * ``disagreement``: u_{n,t} = Euclidean norm over S of the standard deviation
      across members of each member's mean sampled next observation over its
      P/E particles of the candidate (member disagreement on their own
      particles; includes sampling noise shrunk by sqrt(P/E)).

    ``mode == "ccem"`` or ``"unconstrained"`` skips u entirely (kappa is ignored);
    ``"unconstrained"`` also treats every candidate as feasible.

    Model noise: ``step_fn(model, obs, act, key)`` samples internally; the planner
    passes it the same H step keys in every CEM iteration of a plan. With
    ``mean_step_fn(model, obs[E,M,S], act[E,M,A])`` (the same output, noise-free:
    predicted means and their std) the planner samples itself,
    ``sample = mean + std * eps`` with eps [H, E, M, D] drawn once per plan, and
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

    The config section has checked its own settings; the factory checks the
    arguments that do not come from it (``num_members``, the price bounds, the
    mesh) and raises ``ValueError`` naming the first impossible one.
    """
    lower_np = np.asarray(price_lower, dtype=np.float64)
    upper_np = np.asarray(price_upper, dtype=np.float64)
    _check_arguments(planner_cfg.particles, lower_np, upper_np, num_members)
    cfg = planner_cfg
    num_candidates, horizon, num_elites = cfg.popsize, cfg.horizon, cfg.num_elites
    particles_per_member = cfg.particles // num_members
    action_dim = lower_np.size
    scale = cost_scale(cfg.gamma, horizon)
    use_penalty = cfg.mode == "cap"
    # 0 = auto: unrolled on accelerators (fewer kernel launches: 5.7 -> 4.9 ms per plan on an H100), rolled on CPU
    scan_unroll = cfg.scan_unroll or (horizon if jax.default_backend() != "cpu" else 1)
    constrained = cfg.mode != "unconstrained"

    population_axis = None
    if mesh is not None:
        population_axis = mesh.axis_names[0]
        # sharding constraints need Auto axes (jax.make_mesh makes Explicit ones by default)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
        devices_on_axis = mesh.shape[population_axis]
        if num_candidates % devices_on_axis:
            raise ValueError(f"planner.popsize ({num_candidates}) must be divisible by the {devices_on_axis} "
                             f"devices of mesh axis '{population_axis}'")

    def shard(x: jax.Array, axis: int) -> jax.Array:
        """Constrain ``x`` to be split along ``axis`` over the population mesh axis (no-op without a mesh)."""
        if mesh is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = population_axis
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))

    lower = jnp.asarray(lower_np, dtype=jnp.float32)  # [A]
    upper = jnp.asarray(upper_np, dtype=jnp.float32)  # [A]
    mid = (lower + upper) / 2.0  # [A]

    def uncertainty(out, num_cand: int) -> jax.Array:
        """Per-candidate uncertainty u [N] of one model step (see ``make_planner``)."""
        if cfg.uncertainty == "cost_std":
            cost_std = out.std[..., -1]  # [E, M]
            return cost_std.reshape(num_members, num_cand, particles_per_member).max(axis=(0, 2))
        if cfg.uncertainty == "max_std_norm":
            squared_norm = jnp.sum(jnp.square(out.std), axis=-1)  # [E, M]
            return jnp.sqrt(squared_norm.reshape(num_members, num_cand, particles_per_member).max(axis=(0, 2)))
        state_dim = out.next_obs.shape[-1]
        member_means = out.next_obs.reshape(num_members, num_cand, particles_per_member, state_dim).mean(axis=2)
        return jnp.linalg.norm(member_means.std(axis=0), axis=-1)  # [N]

    def expand(x: jax.Array, num_cand: int) -> jax.Array:
        """[E, N, ...] per (member, candidate) -> [E, M, ...] with each row repeated for the member's P/E particles."""
        expanded = jnp.broadcast_to(x[:, :, None], (x.shape[0], num_cand, particles_per_member) + x.shape[2:])
        return expanded.reshape((x.shape[0], num_cand * particles_per_member) + x.shape[2:])

    def add_noise(out, noise: jax.Array):
        """Sample = predicted mean + std * eps for the obs-delta, reward and cost outputs (std applied once)."""
        state_dim = out.next_obs.shape[-1]
        sample = out.std * noise  # [E, M, D]
        return out._replace(next_obs=out.next_obs + sample[..., :state_dim],
                            reward=out.reward + sample[..., state_dim], cost=out.cost + sample[..., state_dim + 1])

    def draw_noise(key: jax.Array, num_cand: int, state_dim: int):
        """Model noise of one plan, reused by every CEM iteration (common random numbers).

        With ``mean_step_fn``: eps [H, E, M, D] standard normals; otherwise the H step keys of ``step_fn``.
        """
        if mean_step_fn is None:
            return jax.random.split(key, horizon)
        shape = (horizon, num_members, num_cand * particles_per_member, state_dim + 2)
        return shard(jax.random.normal(key, shape, jnp.float32), 2)

    def rollout(model: Any, obs: jax.Array, actions: jax.Array, kappa: jax.Array, noise: jax.Array) -> CandidateValues:
        """Roll N candidate sequences out through the ensemble and score them (step 3 of ``make_planner``)."""
        num_cand = actions.shape[0]
        chex.assert_shape(actions, (num_cand, horizon, action_dim))  # [N, H, A]
        state_dim = obs.shape[-1]
        chex.assert_shape(obs, (state_dim,))  # [S]
        samples_per_member = num_cand * particles_per_member  # M

        def advance(state, action, step_noise):
            """One model step of every particle: state [E, M, S], action [N, A] -> step output [E, M]."""
            action = shard(expand(jnp.broadcast_to(action, (num_members,) + action.shape), num_cand), 1)  # [E, M, A]
            if mean_step_fn is None:
                return step_fn(model, state, action, step_noise)
            return add_noise(mean_step_fn(model, state, action), step_noise)

        if mean_step_fn is None:
            state = shard(jnp.broadcast_to(obs, (num_members, samples_per_member, state_dim)), 1)  # [E, M, S]
            first = advance(state, actions[:, 0], noise[0])
        else:
            # every particle of a candidate starts at obs with the same action: one forward pass per
            # (member, candidate), then P/E noisy samples from it
            first_mean = mean_step_fn(model, jnp.broadcast_to(obs, (num_members, num_cand, state_dim)),
                                      jnp.broadcast_to(actions[:, 0], (num_members, num_cand, action_dim)))
            first = add_noise(jax.tree.map(lambda x: expand(x, num_cand), first_mean), noise[0])

        def accumulate(carry, out):
            _, reward_sum, cost_sum, uncertainty_sum = carry
            next_state = shard(jnp.clip(out.next_obs, -cfg.state_clip, cfg.state_clip), 1)  # [E, M, S]
            if use_penalty:
                uncertainty_sum = uncertainty_sum + uncertainty(out, num_cand)
            return next_state, reward_sum + out.reward, cost_sum + out.cost, uncertainty_sum

        def one_step(carry, inputs):
            action, step_noise = inputs  # [N, A]
            return accumulate(carry, advance(carry[0], action, step_noise)), None

        zeros_em = jnp.zeros((num_members, samples_per_member), jnp.float32)
        carry = accumulate((None, zeros_em, zeros_em, jnp.zeros((num_cand,), jnp.float32)), first)
        later_actions = jnp.swapaxes(actions[:, 1:], 0, 1)  # [H-1, N, A]
        (_, reward_sum, cost_sum, uncertainty_sum), _ = jax.lax.scan(one_step, carry, (later_actions, noise[1:]),
                                                                   unroll=scan_unroll)

        def particle_mean(x):  # [E, M] -> [N]
            return x.reshape(num_members, num_cand, particles_per_member).mean(axis=(0, 2))

        reward = particle_mean(reward_sum)
        penalty = kappa * uncertainty_sum * scale if use_penalty else jnp.zeros((num_cand,), jnp.float32)
        cost = particle_mean(cost_sum) * scale + penalty
        reward = jnp.where(jnp.isfinite(reward), reward, cfg.nan_reward)
        cost = jnp.where(jnp.isfinite(cost), cost, cfg.nan_cost)
        return CandidateValues(reward=reward, cost=cost, penalty=penalty)

    def evaluate(key: jax.Array, model: Any, obs: jax.Array, actions: jax.Array, kappa: jax.Array) -> CandidateValues:
        """Predicted reward, penalised cost and penalty of candidates actions [N, H, A] (pure)."""
        return rollout(model, obs, actions, kappa, draw_noise(key, actions.shape[0], obs.shape[-1]))

    def plan_fn(key: jax.Array, model: Any, obs: jax.Array, warm_start: jax.Array, kappa: jax.Array):
        """One constrained CEM plan (see ``make_planner``); pure, jit-compatible."""
        chex.assert_shape(warm_start, (horizon, action_dim))  # [H, A]
        mean = jnp.clip(warm_start.astype(jnp.float32), lower, upper)  # [H, A]
        var = jnp.broadcast_to(jnp.square(upper - lower) / 16.0, (horizon, action_dim))  # [H, A]
        key, noise_key = jax.random.split(key)
        model_noise = draw_noise(noise_key, num_candidates, obs.shape[-1])
        zero = jnp.zeros((), jnp.float32)
        diag0 = PlanDiagnostics(zero, zero, zero, jnp.zeros((), jnp.int32), zero)

        def keep_going(carry):
            iteration, _, var, _, _ = carry
            return (iteration < cfg.iterations) & (jnp.max(var) >= cfg.min_variance)

        def cem_iteration(carry):
            iteration, mean, var, key, _ = carry
            key, sample_key = jax.random.split(key)
            capped_var = jnp.minimum(jnp.minimum(jnp.square((mean - lower) / 2.0),
                                                 jnp.square((upper - mean) / 2.0)), var)  # [H, A]
            draws = jax.random.truncated_normal(sample_key, -cfg.truncation_sigma, cfg.truncation_sigma,
                                                (num_candidates, horizon, action_dim), jnp.float32)
            candidates = jnp.clip(mean + jnp.sqrt(capped_var) * shard(draws, 0), lower, upper)  # [N, H, A]
            values = rollout(model, obs, candidates, kappa, model_noise)
            if constrained:
                feasible = values.cost <= cfg.cost_limit  # [N]
            else:
                feasible = jnp.ones((num_candidates,), bool)
            enough_feasible = jnp.sum(feasible) >= num_elites
            score = jnp.where(enough_feasible, jnp.where(feasible, values.reward, -jnp.inf), -values.cost)
            _, elite_index = jax.lax.top_k(score, num_elites)  # [K]
            elites = candidates[elite_index]  # [K, H, A]
            mean = cfg.smoothing * mean + (1.0 - cfg.smoothing) * elites.mean(axis=0)
            var = cfg.smoothing * var + (1.0 - cfg.smoothing) * elites.var(axis=0)
            diag = PlanDiagnostics(
                feasible_fraction=jnp.mean(feasible.astype(jnp.float32)),
                elite_reward=jnp.mean(values.reward[elite_index]),
                elite_cost=jnp.mean(values.cost[elite_index]),
                iterations=iteration + 1,
                uncertainty_penalty=jnp.mean(values.penalty),
            )
            return iteration + 1, mean, var, key, diag

        init = (jnp.zeros((), jnp.int32), mean, var, key, diag0)
        _, mean, _, _, diag = jax.lax.while_loop(keep_going, cem_iteration, init)
        action = jnp.clip(mean[0], lower, upper)  # [A]
        next_warm_start = jnp.roll(mean, -1, axis=0).at[-1].set(mid)  # [H, A]
        return action, next_warm_start, diag

    plan_jit = jax.jit(plan_fn)

    def plan(key, model, obs, warm_start, kappa):
        """Jitted ``plan_fn``; arrays are cast to float32 first so the program traces once."""
        return plan_jit(key, model, jnp.asarray(obs, jnp.float32), jnp.asarray(warm_start, jnp.float32),
                        jnp.asarray(kappa, jnp.float32))

    def initial_warm_start() -> jax.Array:
        """Mid-range prices at every step of the horizon, [H, A]."""
        return jnp.broadcast_to(mid, (horizon, action_dim))

    return Planner(plan=plan, plan_fn=plan_fn, plan_jit=plan_jit, evaluate=evaluate,
                   initial_warm_start=initial_warm_start, price_lower=lower, price_upper=upper,
                   horizon=horizon, mode=cfg.mode)


def make_model_planner(cfg, dyn, mesh: Optional[jax.sharding.Mesh] = None) -> Planner:
    """The planner of ``cfg`` (an ``evjax.config.Config``) over the ensemble ``dyn`` (``make_dynamics``).

    Binds ``dyn.step`` with ``planner.matmul_dtype`` both as ``step_fn`` and, with
    ``mean_only=True``, as ``mean_step_fn``; plans over ``dyn.num_planning_members``
    members, so pass ``dyn.select_elites(model)`` when the model has a holdout.
    """
    matmul_dtype = cfg.planner.matmul_dtype
    step_fn = functools.partial(dyn.step, matmul_dtype=matmul_dtype)
    mean_step_fn = functools.partial(dyn.step, key=None, matmul_dtype=matmul_dtype, mean_only=True)
    return make_planner(cfg.planner, cfg.env.price_lower, cfg.env.price_upper, dyn.num_planning_members,
                        step_fn, mean_step_fn=mean_step_fn, mesh=mesh)
