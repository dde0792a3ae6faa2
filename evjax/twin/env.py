"""The environment as pure JAX functions, gymnax style (twin of ``evjax/env.py``; SPEC 14).

    params = make_params(cfg)                                   # host side, once
    days = stack_scenarios([make_scenario(cfg, ...), ...], cfg)  # host side: padded [D, V] arrays
    state, obs = reset(key, scenario, params)                    # one day: index days with jax.tree.map
    state, obs, reward, cost, info = step(key, state, action, params)

``reset`` and ``step`` are pure and trace once under ``jit``; ``vmap``
them over days and seeds (``params`` unbatched). They compute in float64
(complex128 in the power flow), so they must be traced, lowered and run with
64-bit types enabled, without flipping the global flag for the rest of the
package (the planner and dynamics stay float32/bfloat16):

- ``twin.jit(fn)`` is ``jax.jit(fn)`` called inside ``jax.enable_x64(True)``:
  ``step = twin.jit(jax.vmap(twin.step, in_axes=(0, 0, 0, None)))``. A bare
  ``jax.jit(twin.step)`` called with x64 off fails at lowering (argmax and the
  Gumbel draw lower with 32-bit constants).
- A larger program that rolls the twin out (an oracle's CEM) must itself be
  jitted and called under ``jax.enable_x64(True)``, with its own arrays typed
  explicitly.
- Eager calls of ``make_params``, ``stack_scenarios``, ``reset``, ``step`` and
  ``rollout`` enter the context themselves.

The observation is float32 like the host's; reward, cost and ``info`` are
float64. Results outside the context stay float64 jax Arrays, but eager
arithmetic on them there runs in float32: convert with ``np.asarray`` first.

One step runs the host's stages, ``admit_arrivals``, ``charge_and_depart``,
settlement, the power flow and carbon, welfare and ``step_cost``, with no
Python loop over EVs, buses or steps (only over the K = 3 stations). A state whose
episode has ended (12 steps, or a diverged power flow) is left as it is by
further steps, with reward and cost 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
from flax import struct

from evjax import env as host_env
from evjax import grid as host_grid
from evjax import roads
from evjax import stations as host_stations
from evjax.config import Config
from evjax.data.scenarios import Scenario
from evjax.twin import carbon, powerflow, stations

NOT_ARRIVED, PRESENT, DONE, LEFT_INCOMPLETE, UNSERVED = 0, 1, 2, 3, 4  # as evjax.env
_CLIP_TOLERANCE = 1e-6  # as evjax.env


def _float64(fn):
    """Run ``fn`` (its tracing, when jitted) with 64-bit types enabled, leaving the global flag alone."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)
    return wrapped


def jit(fn, **jit_kwargs):
    """``jax.jit(fn)`` that traces, compiles and runs with 64-bit types enabled (the twin's functions need them)."""
    compiled = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.enable_x64(True):
            return compiled(*args, **kwargs)
    return call


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static settings of the twin (Python values, part of the compiled program)."""

    num_stations: int  # K
    episode_steps: int  # T
    max_chargers: int  # length of the Erlang-B recursion
    choice: str  # stations.choice: argmin or logit
    welfare: str  # economics.welfare
    carbon_method: str  # carbon.method
    carbon_constraint: str  # carbon.constraint
    voltage_cost: bool  # grid.voltage_cost
    multiplier_from_day_profile: bool  # grid.multiplier_from_day_profile
    time_features: bool  # env.time_features
    extra_observations: tuple  # env.extra_observations
    power_flow: str  # "sweep" or "newton" (twin.powerflow)
    max_power_flow_iterations: int  # iteration cap of the power flow
    tolerance_mva: float  # grid.tolerance_mva
    carbon_depth: int  # longest path of the feeder tree (iterations of proportional sharing)


@struct.dataclass
class EnvParams:
    """Constant arrays of the environment (feeder, road tables, prices, economics) and its static ``settings``."""

    network: powerflow.Network
    travel_time_h: jax.Array  # [T, O, K] road tables (ScenarioArrays holds each EV's row of them)
    travel_energy_kwh: jax.Array  # [T, O, K]
    load_multiplier: jax.Array  # [T] non-EV load multiplier (unless taken from the day's profile)
    price_lower: jax.Array  # [K]
    price_upper: jax.Array  # [K]
    initial_prices: jax.Array  # [K]
    chargers: jax.Array  # [K] int
    charger_kw: jax.Array
    dt_hours: jax.Array
    logit_temperature: jax.Array
    money_weight: jax.Array
    value_of_time: jax.Array
    max_wait_hours: jax.Array
    zero_wait_utilisation: jax.Array
    cs_purchase_price: jax.Array
    dg_supply_kw: jax.Array
    dg_price: jax.Array
    grid_price: jax.Array
    user_value_cny_per_kwh: jax.Array
    carbon_price_cny_per_t: jax.Array
    grid_intensity: jax.Array
    dg_intensity: jax.Array
    station_dg_shares: jax.Array  # [K]
    carbon_limit: jax.Array
    carbon_cost_divisor: jax.Array
    loading_limit: jax.Array
    voltage_min_pu: jax.Array
    nonconvergence_cost: jax.Array
    welfare_obs_scale: jax.Array
    carbon_obs_scale: jax.Array
    reward_scale: jax.Array
    reset_line_loading: jax.Array  # [K] loading of the reset power flow
    reset_carbon_intensity: jax.Array  # constrained carbon measure of the reset power flow
    settings: Settings = struct.field(pytree_node=False)


@struct.dataclass
class ScenarioArrays:
    """One day's EVs as padded arrays [V] (or a stack of days [D, V]); rows with ``valid`` False are padding.

    EVs are sorted stably by arrival step; ``ev_index`` is each row's index in
    the host ``Scenario`` (-1 for padding). Travel time and energy to each
    station are looked up once, at the EV's arrival step and origin (the road
    tables of the config the arrays were built with).
    """

    arrival_step: jax.Array  # [V] int32; -1 for padding (never arrives)
    origin: jax.Array  # [V] int32 road node - 1
    capacity_kwh: jax.Array  # [V]
    start_soc: jax.Array  # [V]
    target_soc: jax.Array  # [V]
    deadline_h: jax.Array  # [V] arrival x dt + duration + laxity
    valid: jax.Array  # [V] bool
    ev_index: jax.Array  # [V] int32
    load_profile: jax.Array  # [T] the day's window power / mean
    mean_service_h: jax.Array  # [] mean charger-holding time (stations.service_time_stats)
    service_scv: jax.Array  # [] its squared coefficient of variation
    need_kwh: jax.Array  # [V] capacity x (target - start SOC)
    battery_kwh: jax.Array  # [V] capacity x start SOC
    travel_time_h: jax.Array  # [K, V] to each station at the EV's arrival step (station-major)
    travel_energy_kwh: jax.Array  # [K, V]


@struct.dataclass
class EnvState:
    """Everything that changes in an episode (twin of ``evjax.env.EnvState``); [V] per EV, [K] per station."""

    scenario: ScenarioArrays
    step: jax.Array  # [] int32
    posted_price: jax.Array  # [K]
    status: jax.Array  # [V] int32 NOT_ARRIVED, PRESENT, DONE, LEFT_INCOMPLETE or UNSERVED
    station: jax.Array  # [V] int32, -1 before choosing or when unserved
    locked_price: jax.Array  # [V]
    remaining_kwh: jax.Array  # [V]
    delivered_kwh: jax.Array  # [V]
    join_step: jax.Array  # [V] int32
    last_arrivals: jax.Array  # [K] int32
    evs_present: jax.Array  # [K] int32 EVs at each station (charging + queued) at the end of the last step
    line_loading: jax.Array  # [K] of the last converged power flow
    carbon_intensity: jax.Array  # [] constrained measure of the last converged power flow
    observation: jax.Array  # [obs_dim] float32
    done: jax.Array  # [] bool: the episode has ended


# ---------------------------------------------------------------------------------------------- host side

@_float64
def make_params(cfg: Config, *, power_flow: str = "sweep", max_power_flow_iterations: int | None = None,
                feeder: host_grid.FeederGrid | None = None, travel: roads.TravelTables | None = None) -> EnvParams:
    """Static arrays and settings of the twin for ``cfg``. Host side, not jittable (builds the feeder with pandapower).

    ``power_flow``: "sweep" (default, fastest) or "newton" (the host's own
    algorithm); the cap defaults to 100 sweeps or ``grid.max_iteration``
    Newton steps. The reset observation is solved here with the twin's own
    power flow. ``feeder`` and ``travel`` may pass a host environment's own
    (``env.grid``, ``env.travel``, built from the same ``cfg``) to skip
    rebuilding them.
    """
    if power_flow not in ("sweep", "newton"):
        raise ValueError(f"power_flow must be 'sweep' or 'newton', got {power_flow!r}")
    feeder = feeder if feeder is not None else host_grid.FeederGrid(cfg.grid)
    network = powerflow.network_from_feeder(feeder)
    travel = travel if travel is not None else roads.travel_tables(cfg.roads, cfg.env.episode_steps)
    tree = nx.Graph(list(zip(network.lines_pp_from, network.lines_pp_to)))
    k = cfg.num_stations
    settings = Settings(
        num_stations=k, episode_steps=cfg.env.episode_steps, max_chargers=int(max(cfg.stations.chargers)),
        choice=cfg.stations.choice, welfare=cfg.economics.welfare, carbon_method=cfg.carbon.method,
        carbon_constraint=cfg.carbon.constraint, voltage_cost=cfg.grid.voltage_cost,
        multiplier_from_day_profile=cfg.grid.multiplier_from_day_profile, time_features=cfg.env.time_features,
        extra_observations=tuple(cfg.env.extra_observations), power_flow=power_flow,
        max_power_flow_iterations=(max_power_flow_iterations if max_power_flow_iterations is not None
                                   else 100 if power_flow == "sweep" else cfg.grid.max_iteration),
        tolerance_mva=cfg.grid.tolerance_mva, carbon_depth=int(nx.diameter(tree)),
    )
    f64 = lambda value: jnp.asarray(value, jnp.float64)  # noqa: E731
    params = EnvParams(
        network=network,
        travel_time_h=f64(travel.time_h), travel_energy_kwh=f64(travel.energy_kwh),
        load_multiplier=f64(cfg.grid.load_multiplier),
        price_lower=f64(cfg.env.price_lower), price_upper=f64(cfg.env.price_upper),
        initial_prices=f64(cfg.env.initial_prices),
        chargers=jnp.asarray(cfg.stations.chargers, jnp.int32), charger_kw=f64(cfg.stations.charger_kw),
        dt_hours=f64(cfg.env.dt_hours), logit_temperature=f64(cfg.stations.logit_temperature),
        money_weight=f64(cfg.stations.money_weight), value_of_time=f64(cfg.stations.value_of_time),
        max_wait_hours=f64(cfg.stations.max_wait_hours),
        zero_wait_utilisation=f64(cfg.stations.zero_wait_utilisation),
        cs_purchase_price=f64(cfg.economics.cs_purchase_price), dg_supply_kw=f64(cfg.economics.dg_supply_kw),
        dg_price=f64(cfg.economics.dg_price), grid_price=f64(cfg.economics.grid_price),
        user_value_cny_per_kwh=f64(cfg.economics.user_value_cny_per_kwh),
        carbon_price_cny_per_t=f64(cfg.economics.carbon_price_cny_per_t),
        grid_intensity=f64(cfg.carbon.grid_intensity), dg_intensity=f64(cfg.carbon.dg_intensity),
        station_dg_shares=f64(cfg.carbon.station_dg_shares), carbon_limit=f64(cfg.carbon.limit),
        carbon_cost_divisor=f64(cfg.carbon.cost_divisor), loading_limit=f64(cfg.grid.loading_limit),
        voltage_min_pu=f64(cfg.grid.voltage_min_pu), nonconvergence_cost=f64(cfg.grid.nonconvergence_cost),
        welfare_obs_scale=f64(cfg.env.welfare_obs_scale), carbon_obs_scale=f64(cfg.env.carbon_obs_scale),
        reward_scale=f64(cfg.env.reward_scale),
        reset_line_loading=jnp.zeros(k), reset_carbon_intensity=f64(0.0),
        settings=settings,
    )
    initial_kw = jnp.full(k, 1000.0 * cfg.grid.initial_ev_load_mw)
    flow = solve_grid(params, initial_kw / 1000.0, f64(1.0))
    if not bool(flow.converged):
        raise RuntimeError("the twin's reset power flow does not converge")
    intensity = carbon_of(params, flow, initial_kw * cfg.env.dt_hours)
    return params.replace(reset_line_loading=flow.line_loading,
                          reset_carbon_intensity=_constrained(settings, intensity))


@_float64
def scenario_arrays(scenario: Scenario, cfg: Config, max_evs: int,
                    travel: roads.TravelTables | None = None) -> ScenarioArrays:
    """One host ``Scenario`` as padded arrays [max_evs]. Host side, not jittable.

    EVs are sorted stably by arrival step (``make_scenario`` already orders
    them so; the host's FIFO order (join step, EV index) is kept). Service-time
    statistics come from ``stations.service_time_stats`` on the day's EVs, as
    the host's reset computes them; ``travel`` defaults to the config's road
    tables. Raises ``ValueError`` if the day has more than ``max_evs`` EVs.
    """
    num, num_steps = scenario.num_evs, cfg.env.episode_steps
    if num > max_evs:
        raise ValueError(f"scenario has {num} EVs, more than max_evs={max_evs}")
    if num >= 2 ** stations.QUEUE_PLACE_BITS:
        raise ValueError(f"scenario has {num} EVs; the twin's packed FIFO count holds at most "
                         f"{2 ** stations.QUEUE_PLACE_BITS - 1}")
    if np.any((scenario.arrival_step < 0) | (scenario.arrival_step >= num_steps)):
        raise ValueError("scenario has arrivals outside the episode")
    travel = travel if travel is not None else roads.travel_tables(cfg.roads, num_steps)
    order = np.argsort(scenario.arrival_step, kind="stable")
    dt = cfg.env.dt_hours
    need = host_env.energy_need(scenario)
    mean_service_h, service_scv = host_stations.service_time_stats(
        need, scenario.duration_h + scenario.laxity_h, cfg.stations.charger_kw, dt)
    deadline = scenario.arrival_step * dt + scenario.duration_h + scenario.laxity_h
    at = (scenario.arrival_step, scenario.origin_node - 1)

    def pad(values, fill, dtype):
        values = np.asarray(values)
        out = np.full((max_evs,) + values.shape[1:], fill, dtype=dtype)
        out[:num] = values[order]
        return jnp.asarray(out)

    return ScenarioArrays(
        arrival_step=pad(scenario.arrival_step, -1, np.int32),
        origin=pad(scenario.origin_node - 1, 0, np.int32),
        capacity_kwh=pad(scenario.capacity_kwh, 0.0, np.float64),
        start_soc=pad(scenario.start_soc, 0.0, np.float64),
        target_soc=pad(scenario.target_soc, 0.0, np.float64),
        deadline_h=pad(deadline, 0.0, np.float64),
        valid=pad(np.ones(num, bool), False, bool),
        ev_index=pad(np.arange(num), -1, np.int32),
        load_profile=jnp.asarray(scenario.load_profile, jnp.float64),
        mean_service_h=jnp.asarray(mean_service_h, jnp.float64),
        service_scv=jnp.asarray(service_scv, jnp.float64),
        need_kwh=pad(need, 0.0, np.float64),
        battery_kwh=pad(scenario.capacity_kwh * scenario.start_soc, 0.0, np.float64),
        travel_time_h=pad(travel.time_h[at], 0.0, np.float64).T,
        travel_energy_kwh=pad(travel.energy_kwh[at], 0.0, np.float64).T,
    )


@_float64
def stack_scenarios(scenarios: Sequence[Scenario], cfg: Config, max_evs: int | None = None,
                    travel: roads.TravelTables | None = None) -> ScenarioArrays:
    """Stack host scenarios into padded arrays [D, max_evs] with a validity mask. Host side, not jittable.

    ``max_evs`` defaults to the largest day rounded up to a multiple of 64;
    pass a fixed value to keep the shapes (and the compiled step) the same
    across calls. ``travel`` defaults to the config's road tables.
    """
    if max_evs is None:
        max_evs = max(64, -(-max(s.num_evs for s in scenarios) // 64) * 64)
    travel = travel if travel is not None else roads.travel_tables(cfg.roads, cfg.env.episode_steps)
    days = [scenario_arrays(s, cfg, max_evs, travel) for s in scenarios]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *days)


# ---------------------------------------------------------------------------------------------- pure side

def solve_grid(params: EnvParams, station_ev_mw: jax.Array, multiplier: jax.Array) -> powerflow.PowerFlow:
    """The feeder's AC power flow with the configured solver (``twin.powerflow.solve``)."""
    s = params.settings
    return powerflow.solve(params.network, station_ev_mw, multiplier, method=s.power_flow,
                           max_iterations=s.max_power_flow_iterations, tolerance_mva=s.tolerance_mva)


class CarbonResult(struct.PyTreeNode):
    """Carbon intensities (kg CO2/MWh) of one power flow and its EV energy (twin of ``evjax.env.CarbonResult``)."""

    bus_intensity: jax.Array  # [U]
    station_intensity: jax.Array  # [K]
    system_intensity: jax.Array
    ev_intensity: jax.Array
    ev_co2_kg: jax.Array


def _constrained(settings: Settings, result: CarbonResult) -> jax.Array:
    return {"ev_charging": result.ev_intensity, "system": result.system_intensity}[settings.carbon_constraint]


def carbon_of(params: EnvParams, flow: powerflow.PowerFlow, station_energy_kwh: jax.Array) -> CarbonResult:
    """Bus, station, system and EV-charging intensities of a solved power flow (``evjax.env.carbon_of``)."""
    net, s = params.network, params.settings
    num_buses = net.base_p_mw.shape[0]
    if s.carbon_method == "proportional_sharing":
        source_bus = np.asarray((net.ext_grid_bus,) + net.sgen_bus)
        source_p = jnp.concatenate([flow.ext_grid_p_mw[None], flow.sgen_p_mw])
        source_ci = jnp.concatenate([params.grid_intensity[None],
                                     jnp.full(flow.sgen_p_mw.shape, params.dg_intensity)])
        bus_ci = carbon.proportional_sharing(
            np.asarray(net.lines_pp_from), np.asarray(net.lines_pp_to), flow.p_from_mw, flow.p_to_mw, source_bus,
            source_p, source_ci, num_buses=num_buses, max_depth=s.carbon_depth)
    elif s.carbon_method == "fixed_shares":
        bus_ci = carbon.fixed_shares(jnp.sum(flow.sgen_p_mw), flow.ext_grid_p_mw, params.station_dg_shares,
                                     params.dg_intensity, params.grid_intensity, num_buses=num_buses,
                                     station_buses=np.asarray(net.station_bus))
    else:
        raise ValueError(f"unknown carbon.method {s.carbon_method!r}")
    station_ci = bus_ci[np.asarray(net.station_bus)]
    ev_ci, ev_co2 = carbon.ev_charging_intensity(station_energy_kwh, station_ci)
    return CarbonResult(bus_ci, station_ci, carbon.system_intensity(flow.load_p_mw, bus_ci), ev_ci, ev_co2)


def _observation(params: EnvParams, line_loading, evs_present, welfare, intensity, step, extras: dict) -> jax.Array:
    """[loadings K, EVs present K, SW / scale, CI / scale, extra features K each, (t / T)] in float32, as the host's.

    ``extras``: each ``env.extra_observations`` feature [K] by name (``config.EXTRA_OBSERVATIONS``).
    """
    s = params.settings
    parts = [line_loading, evs_present.astype(jnp.float64),
             jnp.stack([welfare / params.welfare_obs_scale, intensity / params.carbon_obs_scale])]
    parts += [jnp.asarray(extras[name], jnp.float64) for name in s.extra_observations]
    if s.time_features:
        parts.append((step / s.episode_steps)[None].astype(jnp.float64))
    return jnp.concatenate(parts).astype(jnp.float32)


@_float64
def reset(key: chex.PRNGKey, scenario: ScenarioArrays, params: EnvParams) -> tuple[EnvState, jax.Array]:
    """Start the day ``scenario`` (one day's arrays [V]); returns (state, observation).

    The grid starts in the host's reset state (base loads plus the initial EV
    load, multiplier 1), no EV present yet. ``key`` is unused (the day's EVs are
    given); it keeps gymnax's signature.
    """
    del key
    s = params.settings
    num_evs = scenario.valid.shape[0]
    zeros_v = jnp.zeros(num_evs, jnp.float64)
    step0 = jnp.asarray(0, jnp.int32)
    zeros_k = jnp.zeros(s.num_stations)
    observation = _observation(params, params.reset_line_loading, zeros_k, jnp.float64(0.0),
                               params.reset_carbon_intensity, step0,
                               {"prices": params.initial_prices, "queues": zeros_k, "backlog": zeros_k,
                                "arrivals": zeros_k})
    state = EnvState(
        scenario=scenario, step=step0, posted_price=params.initial_prices,
        status=jnp.full(num_evs, NOT_ARRIVED, jnp.int32), station=jnp.full(num_evs, -1, jnp.int32),
        locked_price=zeros_v, remaining_kwh=zeros_v, delivered_kwh=zeros_v,
        join_step=jnp.zeros(num_evs, jnp.int32), last_arrivals=jnp.zeros(s.num_stations, jnp.int32),
        evs_present=jnp.zeros(s.num_stations, jnp.int32),
        line_loading=params.reset_line_loading, carbon_intensity=params.reset_carbon_intensity,
        observation=observation, done=jnp.asarray(False),
    )
    return state, observation


class Admission(struct.PyTreeNode):
    """The EVs that appeared in a step and what they chose (twin of ``evjax.env.Admission``)."""

    new: jax.Array  # [V] bool: the EV appeared this step
    choice: jax.Array  # [V] chosen station, -1 when none is reachable or not new
    arrivals: jax.Array  # [K] EVs that chose each station
    unserved: jax.Array  # [] new EVs that reach no station
    expected_wait_h: jax.Array  # [K]
    travel_time_h: jax.Array  # [] summed over the EVs that chose
    travel_energy_kwh: jax.Array  # []
    generalized_cost: jax.Array  # []


def admit_arrivals(key: chex.PRNGKey, state: EnvState, price: jax.Array, params: EnvParams) -> tuple[EnvState, Admission]:
    """The EVs appearing at step t pick a station at the posted ``price`` [K] and lock it in (``evjax.env.admit_arrivals``).

    Every row is computed elementwise and masked to the step's arrivals: on
    XLA CPU, scattering a window of rows back into [V] costs more than
    recomputing [V, K] costs (travel is precomputed per EV). The expected
    wait uses the EVs present at the end of the last step (``state.evs_present``),
    the first c of which hold a charger. Nobody arrives once the episode has ended.
    """
    s, sc, t = params.settings, state.scenario, state.step
    k = s.num_stations
    waiting = jnp.maximum(state.evs_present - params.chargers, 0)
    wait_h = stations.expected_wait_hours(
        state.last_arrivals / params.dt_hours, waiting, params.chargers, sc.mean_service_h, sc.service_scv,
        params.max_wait_hours, params.zero_wait_utilisation, max_chargers=s.max_chargers)
    new = sc.valid & (sc.arrival_step == t) & ~state.done  # [V]
    cost = stations.generalized_cost(price, sc.need_kwh, sc.battery_kwh, sc.travel_energy_kwh, sc.travel_time_h,
                                     wait_h, params.money_weight, params.value_of_time)  # [K, V]
    noise = jax.random.gumbel(key, cost.shape, jnp.float64) if s.choice == "logit" else None
    choice = jnp.where(new, stations.choose_stations(cost, noise, params.logit_temperature, choice=s.choice), -1)
    chooses = choice >= 0
    pick = lambda table: stations.pick(table, choice)  # noqa: E731  [V], 0 where nothing was chosen
    chosen_energy = pick(sc.travel_energy_kwh)
    state = state.replace(
        status=jnp.where(new, jnp.where(chooses, PRESENT, UNSERVED), state.status),
        station=jnp.where(chooses, choice, state.station),
        locked_price=jnp.where(chooses, pick(jnp.broadcast_to(price[:, None], cost.shape)), state.locked_price),
        remaining_kwh=jnp.where(chooses, sc.need_kwh + chosen_energy, state.remaining_kwh),
        join_step=jnp.where(chooses, t, state.join_step),
    )
    return state, Admission(
        new=new, choice=choice, arrivals=stations.station_counts(chooses, choice, k),
        unserved=jnp.sum(new & ~chooses).astype(jnp.int32), expected_wait_h=wait_h,
        travel_time_h=jnp.sum(pick(sc.travel_time_h)), travel_energy_kwh=jnp.sum(chosen_energy),
        generalized_cost=jnp.sum(pick(cost)),
    )


class Charging(struct.PyTreeNode):
    """One step of FIFO charging and the departures after it (twin of ``evjax.env.Charging``)."""

    energy_kwh: jax.Array  # [V]
    station_energy_kwh: jax.Array  # [K]
    station_revenue: jax.Array  # [K] sum of energy x locked price
    evs_charging: jax.Array  # [K]
    queue_length: jax.Array  # [K]
    queue_hours: jax.Array  # []
    departed_at_target: jax.Array  # [K]
    departed_incomplete: jax.Array  # [K]
    evs_present: jax.Array  # [K]


def charge_and_depart(state: EnvState, params: EnvParams, place: jax.Array,
                      at_station: jax.Array) -> tuple[EnvState, Charging]:
    """The first c EVs of each station charge min(P dt, remaining); EVs at target or past deadline leave (``evjax.env.charge_and_depart``).

    ``place`` [V]: FIFO places of the present EVs (after admission);
    ``at_station`` [K]: how many there are. The charging and queued counts
    follow from them (the first c hold a charger), so only the departures,
    energy and revenue are summed over EVs. Nothing happens once the episode
    has ended.
    """
    k, dt, t = params.settings.num_stations, params.dt_hours, state.step
    present = (state.status == PRESENT) & ~state.done
    holding = present & (place <= params.chargers[jnp.maximum(state.station, 0)])
    energy = jnp.where(holding, jnp.minimum(params.charger_kw * dt, state.remaining_kwh), 0.0)
    remaining = state.remaining_kwh - energy
    reached = present & (remaining <= 1e-9)
    expired = present & ~reached & ((t + 1) * dt >= state.scenario.deadline_h - 1e-9)
    status = jnp.where(reached, DONE, jnp.where(expired, LEFT_INCOMPLETE, state.status))
    station_energy = stations.station_totals(energy, state.station, k)
    station_revenue = stations.station_totals(energy * state.locked_price, state.station, k)
    at_station = jnp.where(state.done, 0, at_station)
    charging = jnp.minimum(at_station, params.chargers)
    queued = at_station - charging
    reached_k = stations.station_counts(reached, state.station, k)
    expired_k = stations.station_counts(expired, state.station, k)
    evs_present = at_station - reached_k - expired_k
    state = state.replace(remaining_kwh=remaining, delivered_kwh=state.delivered_kwh + energy, status=status,
                          evs_present=jnp.where(state.done, state.evs_present, evs_present))
    return state, Charging(
        energy_kwh=energy, station_energy_kwh=station_energy, station_revenue=station_revenue, evs_charging=charging,
        queue_length=queued, queue_hours=jnp.sum(queued) * dt, departed_at_target=reached_k,
        departed_incomplete=expired_k, evs_present=evs_present,
    )


def step_cost(params: EnvParams, flow: powerflow.PowerFlow, intensity: jax.Array, station_energy_kwh: jax.Array) -> dict:
    """c = sum_lines max(0, loading - limit) + max(0, CI - CI_max) / divisor (+ voltage term) (``evjax.env.step_cost``).

    The EV-charging measure costs nothing without EV energy; a diverged power
    flow costs ``nonconvergence_cost`` with NaN terms.
    """
    s = params.settings
    line = jnp.sum(jnp.maximum(0.0, flow.line_loading - params.loading_limit))
    charged = (s.carbon_constraint != "ev_charging") | (jnp.sum(station_energy_kwh) > 0.0)
    carbon_term = jnp.where(charged, jnp.maximum(0.0, intensity - params.carbon_limit) / params.carbon_cost_divisor,
                            0.0)
    voltage = (jnp.maximum(0.0, params.voltage_min_pu - flow.min_voltage_pu) if s.voltage_cost
               else jnp.zeros_like(line))
    nan = jnp.float64(jnp.nan)
    ok = flow.converged
    return {
        "line": jnp.where(ok, line, nan), "carbon": jnp.where(ok, carbon_term, nan),
        "voltage": jnp.where(ok, voltage, nan),
        "total": jnp.where(ok, line + carbon_term + voltage, params.nonconvergence_cost),
    }


@_float64
def step(key: chex.PRNGKey, state: EnvState, action: jax.Array, params: EnvParams):
    """Advance 15 minutes at the posted prices ``action`` [K]; returns (state, obs, reward, cost, info).

    Prices are clipped into the bounds (``info["clipped_actions"]`` counts
    those more than 1e-6 outside); a non-finite price cannot raise inside jit,
    so it is flagged in ``info["invalid_action"]`` and the step's results are
    meaningless. ``key`` draws the logit choice's Gumbel noise (unused with
    argmin). ``info`` holds the host's physical quantities (every key of the
    host's ``info`` except the calendar fields) plus ``station_choice`` [V]
    (the station each EV chose this step, -1 otherwise) and ``vm_pu`` [U].
    On an ended episode the state is returned unchanged with reward and cost 0.
    """
    s = params.settings
    k, t, dt = s.num_stations, state.step, params.dt_hours
    price = jnp.asarray(action, jnp.float64).reshape(k)
    invalid = ~jnp.all(jnp.isfinite(price))
    clipped = jnp.sum((price < params.price_lower - _CLIP_TOLERANCE) | (price > params.price_upper + _CLIP_TOLERANCE))
    price = jnp.clip(price, params.price_lower, params.price_upper)
    t_index = jnp.minimum(t, s.episode_steps - 1)  # an ended episode still indexes the tables safely

    moved = state.replace(step=t_index)
    moved, admission = admit_arrivals(key, moved, price, params)
    place = stations.queue_places(moved.station, moved.status == PRESENT, k)  # new EVs join the back
    moved, charging = charge_and_depart(moved, params, place, state.evs_present + admission.arrivals)
    settlement = stations.settle(charging.station_energy_kwh, charging.station_revenue, params.cs_purchase_price,
                                 params.dg_supply_kw, params.dg_price, params.grid_price, dt)
    station_kw = settlement.energy_kwh / dt
    multiplier = (state.scenario.load_profile[t_index] if s.multiplier_from_day_profile
                  else params.load_multiplier[t_index])
    flow = solve_grid(params, station_kw / 1000.0, multiplier)
    converged = flow.converged
    carbon_result = carbon_of(params, flow, settlement.energy_kwh)
    intensity = _constrained(s, carbon_result)
    cost = step_cost(params, flow, intensity, settlement.energy_kwh)
    co2 = jnp.where(converged, carbon_result.ev_co2_kg, 0.0)
    welfare = stations.social_welfare(
        settlement, jnp.sum(charging.energy_kwh) - admission.travel_energy_kwh,
        admission.travel_time_h + charging.queue_hours, co2, params.user_value_cny_per_kwh,
        params.carbon_price_cny_per_t, params.money_weight, params.value_of_time, welfare=s.welfare)

    next_step = t + 1
    line_loading = jnp.where(converged, flow.line_loading, state.line_loading)
    last_intensity = jnp.where(converged, intensity, state.carbon_intensity)
    extras = {"prices": price, "queues": charging.queue_length, "arrivals": admission.arrivals}
    if "backlog" in s.extra_observations:  # the only extra that costs a pass over the EVs
        extras["backlog"] = stations.station_totals(jnp.where(moved.status == PRESENT, moved.remaining_kwh, 0.0),
                                                    moved.station, k)
    observation = _observation(params, line_loading, charging.evs_present, welfare.welfare, last_intensity, next_step,
                               extras)
    moved = moved.replace(
        step=next_step, posted_price=price, last_arrivals=admission.arrivals, line_loading=line_loading,
        carbon_intensity=last_intensity, observation=observation,
        done=(next_step >= s.episode_steps) | ~converged,
    )
    ended = state.done  # the per-EV arrays did not move (admission and charging are gated); keep the rest
    kept = ("step", "posted_price", "last_arrivals", "line_loading", "carbon_intensity", "observation", "done")
    new_state = moved.replace(**{name: jnp.where(ended, getattr(state, name), getattr(moved, name)) for name in kept})
    reward = jnp.where(ended, 0.0, welfare.welfare / params.reward_scale)
    total_cost = jnp.where(ended, 0.0, cost["total"])
    nan = jnp.float64(jnp.nan)
    nan_if_failed = lambda value: jnp.where(converged, value, nan)  # noqa: E731
    info = {
        "cost": total_cost, "cost_line": cost["line"], "cost_carbon": cost["carbon"], "cost_voltage": cost["voltage"],
        "power_flow_converged": converged, "power_flow_iterations": flow.iterations, "step": t,
        "terminated": new_state.done, "load_multiplier": multiplier,
        "line_loading": flow.line_loading,
        "line_current_ka": flow.line_current_ka[np.asarray(params.network.monitored)],
        "min_voltage_pu": flow.min_voltage_pu, "vm_pu": flow.vm_pu, "ext_grid_p_mw": flow.ext_grid_p_mw,
        "carbon_intensity": nan_if_failed(intensity),
        "system_carbon_intensity": nan_if_failed(carbon_result.system_intensity),
        "ev_carbon_intensity": nan_if_failed(carbon_result.ev_intensity),
        "station_carbon_intensity": jnp.where(converged, carbon_result.station_intensity, nan),
        "bus_carbon_intensity": jnp.where(converged, carbon_result.bus_intensity, nan),
        "ev_co2_kg": co2, "station_load_kw": station_kw, "station_energy_kwh": settlement.energy_kwh,
        "evs_charging": charging.evs_charging, "queue_length": charging.queue_length,
        "queue_hours": charging.queue_hours, "evs_present": charging.evs_present, "arrivals": admission.arrivals,
        "new_evs": jnp.sum(admission.new).astype(jnp.int32), "unserved": admission.unserved,
        "departed_at_target": charging.departed_at_target, "departed_incomplete": charging.departed_incomplete,
        "expected_wait_h": admission.expected_wait_h, "travel_time_h": admission.travel_time_h,
        "travel_energy_kwh": admission.travel_energy_kwh, "posted_price": price,
        "locked_price": settlement.locked_price, "clipped_actions": clipped.astype(jnp.int32),
        "invalid_action": invalid, "revenue": settlement.revenue, "revenue_total": jnp.sum(settlement.revenue),
        "cs_purchase_cost": settlement.purchase_cost, "cs_profit_per_station": settlement.cs_profit,
        "dso_supply_cost": settlement.dso_supply_cost, "dg_energy_kwh": settlement.dg_energy_kwh,
        "grid_energy_kwh": settlement.grid_energy_kwh, "cs_profit": welfare.cs_profit,
        "dso_profit": welfare.dso_profit, "users_energy_value": welfare.users_energy_value,
        "users_payment": welfare.users_payment, "users_time_cost": welfare.users_time_cost,
        "users_surplus": welfare.users_surplus, "carbon_cost_cny": welfare.carbon_cost, "welfare": welfare.welfare,
        "users_generalized_cost": admission.generalized_cost,
        "station_choice": admission.choice,
    }
    return new_state, new_state.observation, reward, total_cost, info


@_float64
def rollout(key: chex.PRNGKey, state: EnvState, actions: jax.Array, params: EnvParams):
    """``step`` over a price sequence [H, K] by ``lax.scan``; returns (final state, stacked (obs, reward, cost, info)).

    Each step gets its own key (split from ``key``). vmap it over days, seeds or
    candidate sequences.
    """
    keys = jax.random.split(key, actions.shape[0])

    def one(state, inputs):
        step_key, action = inputs
        state, obs, reward, cost, info = step(step_key, state, action, params)
        return state, (obs, reward, cost, info)

    return jax.lax.scan(one, state, (keys, actions))
