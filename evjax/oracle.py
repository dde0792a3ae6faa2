"""The strong oracle: the planner's own constrained CEM rolling out the JAX twin (SPEC 12, 14).

At every step of a day the oracle runs ``planner.cem_plan`` with a rollout
function that copies the current twin state into each of N candidate price
sequences and simulates them to the end of the episode (``twin.rollout``): it
knows the day's future arrivals, so it is an upper reference, not a deployable
policy. Same sampling, elite rule, refit and warm start as the agent's planner;
only the model differs:

- horizon H = ``env.episode_steps``, fixed so that one program serves every
  decision; steps past the episode's end are no-ops of the twin (reward and
  cost 0), so a candidate's value is its welfare-reward and true cost summed
  over the rest of the episode;
- R_n = sum_t r_{n,t} (welfare / ``env.reward_scale``), C_n = sum_t c_{n,t}
  (no discount, no penalty), feasible C_n <= ``evaluation.oracle_cost_limit``;
- N = ``evaluation.oracle_popsize``, ``evaluation.oracle_iterations``
  iterations, the elite fraction, truncation, smoothing and minimum variance
  of the ``planner`` section; the twin's own step keys are common to all
  candidates of a plan (they only matter for the logit choice).

The **forecast oracle** (``alternatives`` given) is the same CEM without the
foresight: what the operator knows at step t (the twin state: EVs present,
queues, locked prices, the grid) plus S other draws of the day's demand
(``evaluate.forecast_scenarios``: the same day's arrival rates, other Poisson
counts, origins and EVs) in place of the day's future arrivals
(``splice_future``); a candidate's value is its mean reward and mean cost over
the S scenarios. It approximates (better with more draws) the best a planner
with a perfect model of the grid, roads and drivers can do without knowing who
arrives next: about what the learned agent can at most reach.

``episodes`` runs whole days: a ``lax.scan`` over the T steps, each one plan
per day (vmapped over days) and one twin step of every day. The twin computes
in float64, so everything is jitted with ``twin.jit`` (x64 on while tracing and
running); the CEM arrays are float32 as in the planner.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evjax import planner as planner_lib
from evjax import twin
from evjax.config import Config
from evjax.twin.env import NOT_ARRIVED


class TwinModel(NamedTuple):
    """What the oracle's rollouts start from: one day's twin state and the (unbatched) twin parameters."""

    state: twin.EnvState
    params: twin.EnvParams


class OracleSettings(NamedTuple):
    """Static CEM settings of the twin oracle (``settings(cfg)``)."""

    num_candidates: int  # N
    num_elites: int  # J
    iterations: int
    min_variance: float
    truncation_sigma: float
    smoothing: float
    cost_limit: float
    prior: tuple[float, ...] = ()  # planner.prior_prices: first warm start and appended action; () = mid-range
    variance_cap: bool = True  # planner.variance_cap
    constant_candidates: int = 0  # planner.constant_candidates (grid levels; 0 = off)


def settings(cfg: Config) -> OracleSettings:
    """The oracle's CEM settings: its own budget from ``evaluation``, the rest from ``planner``.

    The number of elites keeps the planner's elite fraction (5 of 500 by
    default), at least 2 and at most N.
    """
    ev, pl = cfg.evaluation, cfg.planner
    num_elites = min(ev.oracle_popsize, max(2, round(ev.oracle_popsize * pl.num_elites / pl.popsize)))
    return OracleSettings(ev.oracle_popsize, num_elites, ev.oracle_iterations, pl.min_variance,
                          pl.truncation_sigma, pl.smoothing, ev.oracle_cost_limit, tuple(pl.prior_prices),
                          pl.variance_cap, pl.constant_candidates)


def twin_rollout(model: TwinModel, obs: jax.Array, candidates: jax.Array, kappa: jax.Array,
                 step_key: jax.Array) -> planner_lib.CandidateValues:
    """Values of candidates [N, H, A] rolled out on the twin from ``model.state``: summed reward and cost [N].

    The ``rollout_fn`` of ``cem_plan`` for the oracle; ``obs`` and ``kappa`` are
    unused (the state is exact, there is no uncertainty penalty); ``step_key``
    (its "noise") is the same for every candidate.
    """
    del obs, kappa
    one = lambda actions: _summed(step_key, model.state, actions, model.params)  # noqa: E731  [H, A] -> sums
    return _candidate_values(*jax.vmap(one)(candidates))  # [N] float64 sums


def _summed(step_key: jax.Array, state: twin.EnvState, actions: jax.Array, params: twin.EnvParams):
    """Reward and true cost of one price sequence [H, A] from ``state``, summed over the horizon (float64)."""
    _, (_, reward, cost, _) = twin.rollout(step_key, state, actions, params)
    return jnp.sum(reward), jnp.sum(cost)


# ScenarioArrays fields [..., V] besides arrival_step and valid
PER_EV_SCENARIO = ("origin", "capacity_kwh", "start_soc", "target_soc", "deadline_h", "ev_index",
                   "need_kwh", "battery_kwh", "travel_time_h", "travel_energy_kwh")
PER_EV_STATE = {"status": NOT_ARRIVED, "station": -1, "locked_price": 0.0, "remaining_kwh": 0.0,
                "delivered_kwh": 0.0, "join_step": 0}  # EnvState [V] and their values before arrival


def splice_future(state: twin.EnvState, alternative: twin.ScenarioArrays) -> twin.EnvState:
    """``state`` with the day's future replaced by ``alternative``'s (another draw of the same day's demand); pure.

    The EVs that arrived before ``state.step`` keep their rows and status; the
    rows after them are ``alternative``'s EVs arriving at ``state.step`` or
    later, not yet arrived. Rows stay sorted by arrival step (FIFO order kept).
    The day-level fields (load profile, service-time statistics) stay the
    real day's. The row count V is kept: the arrivals so far plus the
    alternative's remaining ones must fit (``forecast_max_evs`` sizes V); rows
    beyond V would be dropped.
    """
    t, real = state.step, state.scenario
    num_evs = real.valid.shape[0]
    row = jnp.arange(num_evs)
    arrived = jnp.sum(real.valid & (real.arrival_step < t))  # real rows [0, arrived) stay
    alt_row = row - arrived + jnp.sum(alternative.valid & (alternative.arrival_step < t))  # the draw's row
    from_real = row < arrived
    in_range = alt_row < num_evs
    alt_row = jnp.clip(alt_row, 0, num_evs - 1)
    alt_valid = in_range & alternative.valid[alt_row]

    def take(real_rows, alt_rows, fill=None):  # [..., V]
        alt_rows = alt_rows[..., alt_row]
        if fill is not None:
            alt_rows = jnp.where(alt_valid, alt_rows, fill)
        return jnp.where(from_real, real_rows, alt_rows)

    scenario = real.replace(
        **{name: take(getattr(real, name), getattr(alternative, name)) for name in PER_EV_SCENARIO},
        arrival_step=take(real.arrival_step, alternative.arrival_step, -1),
        valid=take(real.valid, alternative.valid, False))
    return state.replace(scenario=scenario, **{name: jnp.where(from_real, getattr(state, name), fill).astype(
        getattr(state, name).dtype) for name, fill in PER_EV_STATE.items()})


def forecast_max_evs(days: Sequence, alternatives: Sequence[Sequence], num_steps: int) -> int:
    """Rows V that hold every day, every alternative and every splice of one into the other (multiple of 64).

    ``days`` are host ``Scenario``s, ``alternatives[d]`` the scenarios of day d's forecast. Host side.
    """
    rows = 64
    for day, alts in zip(days, alternatives):
        arrived = np.searchsorted(np.sort(day.arrival_step), np.arange(num_steps))  # real EVs before t
        for alt in alts:
            future = len(alt.arrival_step) - np.searchsorted(np.sort(alt.arrival_step), np.arange(num_steps))
            rows = max(rows, day.num_evs, alt.num_evs, int(np.max(arrived + future)))
    return -(-rows // 64) * 64


def _candidate_values(reward: jax.Array, cost: jax.Array) -> planner_lib.CandidateValues:
    """Rollout sums [N] (float64) as planner values: non-finite reward -inf, cost +inf; float32."""
    reward = jnp.where(jnp.isfinite(reward), reward, -jnp.inf).astype(jnp.float32)
    cost = jnp.where(jnp.isfinite(cost), cost, jnp.inf).astype(jnp.float32)
    return planner_lib.CandidateValues(reward=reward, cost=cost, penalty=jnp.zeros_like(cost))


def forecast_rollout(model: TwinModel, obs: jax.Array, candidates: jax.Array, kappa: jax.Array,
                     step_key: jax.Array) -> planner_lib.CandidateValues:
    """Like ``twin_rollout`` from S spliced states ``model.state`` [S]: reward and cost summed, averaged over S."""
    del obs, kappa

    def one(actions):  # [H, A] -> mean over scenarios of the summed reward, cost
        reward, cost = jax.vmap(lambda state: _summed(step_key, state, actions, model.params))(model.state)
        return jnp.mean(reward), jnp.mean(cost)

    return _candidate_values(*jax.vmap(one)(candidates))


def plan(key: jax.Array, state: twin.EnvState, warm_start: jax.Array, params: twin.EnvParams, *,
         oracle: OracleSettings, alternatives: twin.ScenarioArrays | None = None, hoist_constants: bool = True):
    """One oracle decision for one day: ``cem_plan`` on the twin. Returns (prices [A], next warm start [H, A]).

    With ``alternatives`` (S scenarios [S, V] of the same day) it is the forecast oracle's decision. The step
    key is every candidate's "noise", so the constant candidates are rolled out once per decision
    (``cem_plan``'s ``split_noise``; the same decision, tested); ``hoist_constants`` False, in every CEM
    iteration (the reference).
    """
    lower = params.price_lower.astype(jnp.float32)
    upper = params.price_upper.astype(jnp.float32)
    if alternatives is None:
        model, rollout_fn = TwinModel(state, params), twin_rollout
    else:
        spliced = jax.vmap(splice_future, in_axes=(None, 0))(state, alternatives)
        model, rollout_fn = TwinModel(spliced, params), forecast_rollout
    action, next_warm_start, _ = planner_lib.cem_plan(
        key, model, state.observation, warm_start, jnp.zeros((), jnp.float32),
        rollout_fn=rollout_fn, noise_fn=lambda noise_key, num_candidates, state_dim: noise_key,
        lower=lower, upper=upper, num_candidates=oracle.num_candidates, num_elites=oracle.num_elites,
        iterations=oracle.iterations, min_variance=oracle.min_variance, truncation_sigma=oracle.truncation_sigma,
        smoothing=oracle.smoothing, cost_limit=oracle.cost_limit,
        prior=planner_lib.prior_action(oracle.prior, lower, upper), variance_cap=oracle.variance_cap,
        constant_candidates=planner_lib.constant_grid(oracle.constant_candidates, lower, upper),
        split_noise=(lambda step_key, num_first: (step_key, step_key)) if hoist_constants else None)
    return action, next_warm_start


class EpisodeCarry(NamedTuple):
    """What the oracle's scan over the steps of a batch of days carries."""

    state: twin.EnvState  # [D] twin states
    warm_start: jax.Array  # [D, H, A] float32
    key: jax.Array  # [D] keys


def episodes(keys: jax.Array, days: twin.ScenarioArrays, params: twin.EnvParams, *, oracle: OracleSettings,
             alternatives: twin.ScenarioArrays | None = None):
    """Whole days [D] under the oracle (forecast oracle: ``alternatives`` [D, S, V]); pure, jit with ``twin.jit``.

    Returns (prices [D, T, A] it posted, per-step ``info`` [D, T, ...] of the
    twin, ``active`` [D, T]: the step ran before the episode ended). The first
    warm start is ``planner.prior_prices`` (default the mid-range price) at every step, as the agent's.
    """
    steps = params.settings.episode_steps
    state, _ = jax.vmap(twin.reset, in_axes=(0, 0, None))(keys, days, params)
    prior = planner_lib.prior_action(oracle.prior, params.price_lower, params.price_upper)  # [A]
    warm_start = jnp.broadcast_to(prior, (keys.shape[0], steps, prior.shape[0]))  # [D, H, A]
    plan_days = jax.vmap(lambda key, state, warm, alts: plan(key, state, warm, params, oracle=oracle,
                                                             alternatives=alts))
    step_days = jax.vmap(twin.step, in_axes=(0, 0, 0, None))

    def one_step(carry: EpisodeCarry, _):
        split = jax.vmap(lambda key: jax.random.split(key, 3))(carry.key)  # [D, 3]
        prices, warm_start = plan_days(split[:, 1], carry.state, carry.warm_start, alternatives)  # [D, A], [D, H, A]
        active = ~carry.state.done
        state, _, _, _, info = step_days(split[:, 2], carry.state, prices, params)
        return EpisodeCarry(state, warm_start, split[:, 0]), (prices, info, active)

    _, (prices, info, active) = jax.lax.scan(one_step, EpisodeCarry(state, warm_start, keys), None, length=steps)
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [T, D, ...] -> [D, T, ...]
    return swap(prices), jax.tree.map(swap, info), swap(active)


def open_loop_episodes(keys: jax.Array, days: twin.ScenarioArrays, prices: jax.Array, params: twin.EnvParams):
    """Whole days [D] at given prices [D, T, A] (fixed or pre-drawn random prices); pure, jit with ``twin.jit``.

    Returns (prices, info [D, T, ...], active [D, T]) like ``episodes``.
    """
    def one_day(key, day, day_prices):
        state, _ = twin.reset(key, day, params)
        _, (_, _, _, info) = twin.rollout(key, state, day_prices, params)
        return info

    info = jax.vmap(one_day)(keys, days, prices)
    # the twin's ``terminated`` stays True once the episode has ended: a step is active if the previous was not
    active = jnp.concatenate([jnp.ones_like(info["terminated"][:, :1]), ~info["terminated"][:, :-1]], axis=1)
    return prices, info, active
