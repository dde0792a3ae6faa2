"""The EV charging-price environment: roads, stations, feeder and carbon composed into a gymnasium.Env (SPEC 2-8).

Host side, not jittable. One step is 15 minutes: the DSO posts three prices,
the EVs that appear choose a station (prices locked in), stations charge FIFO
with a fixed number of chargers, the station power lands on the feeder, the
power flow and carbon intensity are solved, and the step is settled.
"""

from __future__ import annotations

import copy
import dataclasses

import gymnasium as gym
import numpy as np

from evjax import carbon, grid, roads, stations
from evjax.config import Config
from evjax.data.scenarios import Scenario, make_scenario

NOT_ARRIVED, PRESENT, DONE, LEFT_INCOMPLETE, UNSERVED = 0, 1, 2, 3, 4
_CLIP_TOLERANCE = 1e-6  # float32 bounds round to within this of the config's float64 bounds


@dataclasses.dataclass
class EnvState:
    """Everything that belongs to one episode; per-EV arrays are [V] over the scenario's EVs, [K] over stations."""

    scenario: Scenario  # the day's EVs (frozen, shared between copies)
    mean_service_h: float  # mean charger-holding time of the day's EVs (h), for the expected wait
    service_scv: float  # its squared coefficient of variation
    step: int
    posted_price: np.ndarray  # [K] prices of the last step (the reset prices before the first)
    status: np.ndarray  # [V] NOT_ARRIVED, PRESENT, DONE, LEFT_INCOMPLETE or UNSERVED
    station: np.ndarray  # [V] chosen station, -1 before choosing or when unserved
    locked_price: np.ndarray  # [V] price posted when the EV chose (CNY/kWh)
    remaining_kwh: np.ndarray  # [V] energy still to charge (need + travel energy)
    delivered_kwh: np.ndarray  # [V] energy charged so far
    join_step: np.ndarray  # [V] step the EV joined its station's queue
    last_arrivals: np.ndarray  # [K] EVs that chose each station in the previous step
    observation: np.ndarray  # [obs_dim] last observation
    grid_result: grid.GridResult  # last converged power flow
    carbon_intensity: float  # last converged value of the constrained carbon measure (carbon.constraint)

    def copy(self) -> "EnvState":
        """A copy whose arrays can be changed without touching this state (scenario and grid result are shared)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).copy() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), np.ndarray)})


@dataclasses.dataclass(frozen=True)
class Admission:
    """The EVs that appeared in a step and the station each chose; V_t EVs appeared, K stations."""

    new_evs: np.ndarray  # [V_t] indices of the EVs that appeared
    choice: np.ndarray  # [V_t] chosen station, -1 when none is reachable (unserved)
    arrivals: np.ndarray  # [K] EVs that chose each station
    expected_wait_h: np.ndarray  # [K] waiting time the drivers expected
    travel_time_h: float  # driving time to the chosen stations, summed over the EVs that chose
    travel_energy_kwh: float  # energy those trips consumed (bought back at the station)
    generalized_cost: float  # sum of the chosen stations' generalized costs

    @property
    def unserved(self) -> int:
        return int(np.sum(self.choice < 0))


@dataclasses.dataclass(frozen=True)
class Charging:
    """One step of FIFO charging and the departures after it."""

    energy_kwh: np.ndarray  # [V] energy each EV received
    evs_charging: np.ndarray  # [K] EVs holding a charger
    queue_length: np.ndarray  # [K] EVs waiting for a charger
    queue_hours: float  # EV-hours spent waiting for a charger in the step
    departed_at_target: np.ndarray  # [K]
    departed_incomplete: np.ndarray  # [K] deadline passed before the target SOC
    evs_present: np.ndarray  # [K] EVs still at each station after the departures


@dataclasses.dataclass(frozen=True)
class CarbonResult:
    """Carbon intensities (kg CO2/MWh) of one solved power flow and the EV energy it carried."""

    bus_intensity: np.ndarray  # [U]
    station_intensity: np.ndarray  # [K] at the station buses
    system_intensity: float  # load-weighted over all loads
    ev_intensity: float  # energy-weighted over the stations (carbon.ev_charging_intensity)
    ev_co2_kg: float  # CO2 attributed to the EV energy of the step

    def constrained(self, constraint: str) -> float:
        """The measure that ``carbon.constraint`` limits."""
        return {"ev_charging": self.ev_intensity, "system": self.system_intensity}[constraint]


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Constraint cost of a step and its terms (SPEC 8)."""

    line: float
    carbon: float
    voltage: float
    total: float


def energy_need(scenario: Scenario) -> np.ndarray:
    """E_need = capacity x (target SOC - start SOC) [V] (kWh)."""
    return scenario.capacity_kwh * (scenario.target_soc - scenario.start_soc)


def arriving(state: EnvState) -> np.ndarray:
    """Indices [V_t] of the EVs that appear in the current step."""
    return np.flatnonzero(state.scenario.arrival_step == state.step)


def admit_arrivals(
    state: EnvState, price: np.ndarray, travel: roads.TravelTables, cfg: Config, gumbel_noise: np.ndarray | None = None,
) -> tuple[EnvState, Admission]:
    """The EVs appearing at step t compare the stations at the posted ``price`` [K], choose one and lock its price in.

    The expected wait of each station comes from the queue and the arrivals
    before this step (``stations.expected_wait_hours``); the choice minimises
    the generalized cost (``stations.choose_stations``; ``gumbel_noise`` [V_t, K]
    for the logit choice). An EV that reaches no station is unserved. Returns a
    new state (this one is left alone) and what happened.
    """
    k, dt, t = len(price), cfg.env.dt_hours, state.step
    scenario, chargers = state.scenario, np.asarray(cfg.stations.chargers)
    present = state.status == PRESENT
    holding = stations.charging_slots(state.station, present, state.join_step, chargers)
    waiting = stations.station_totals(present & ~holding, state.station, k)
    wait_h = stations.expected_wait_hours(
        state.last_arrivals / dt, waiting, chargers, state.mean_service_h, state.service_scv,
        cfg.stations.max_wait_hours, cfg.stations.zero_wait_utilisation,
    )
    new = arriving(state)
    origin = scenario.origin_node[new] - 1
    need = energy_need(scenario)[new]
    travel_energy = travel.energy_kwh[t, origin]  # [V_t, K]
    travel_time = travel.time_h[t, origin]  # [V_t, K]
    cost = stations.generalized_cost(
        price, need, scenario.capacity_kwh[new] * scenario.start_soc[new], travel_energy, travel_time, wait_h,
        cfg.stations.money_weight, cfg.stations.value_of_time,
    )
    choice = stations.choose_stations(cost, cfg.stations.choice, cfg.stations.logit_temperature, gumbel_noise)
    served = choice >= 0
    chosen, chooser, rows = choice[served], new[served], np.flatnonzero(served)
    state = state.copy()
    state.status[new[~served]] = UNSERVED
    state.status[chooser] = PRESENT
    state.station[chooser] = chosen
    state.locked_price[chooser] = price[chosen]
    state.remaining_kwh[chooser] = need[served] + travel_energy[rows, chosen]
    state.join_step[chooser] = t
    return state, Admission(
        new_evs=new, choice=choice, arrivals=np.bincount(chosen, minlength=k), expected_wait_h=wait_h,
        travel_time_h=float(travel_time[rows, chosen].sum()), travel_energy_kwh=float(travel_energy[rows, chosen].sum()),
        generalized_cost=float(cost[rows, chosen].sum()),
    )


def charge_and_depart(state: EnvState, cfg: Config) -> tuple[EnvState, Charging]:
    """The first c EVs of each station (FIFO) charge min(P dt, remaining); then EVs at target or past deadline leave.

    An EV that waits for a charger spends the whole step waiting (dt hours of
    queueing). Deadline = arrival + duration + laxity; an EV leaves once the
    end of the step reaches it. Returns a new state and what happened.
    """
    k, dt, t = cfg.num_stations, cfg.env.dt_hours, state.step
    scenario = state.scenario
    present = state.status == PRESENT
    holding = stations.charging_slots(state.station, present, state.join_step, np.asarray(cfg.stations.chargers))
    energy = stations.charge(state.remaining_kwh, holding, cfg.stations.charger_kw, dt)
    state = state.copy()
    state.remaining_kwh -= energy
    state.delivered_kwh += energy
    deadline_h = scenario.arrival_step * dt + scenario.duration_h + scenario.laxity_h
    reached = present & (state.remaining_kwh <= 1e-9)
    expired = present & ~reached & ((t + 1) * dt >= deadline_h - 1e-9)
    state.status[reached] = DONE
    state.status[expired] = LEFT_INCOMPLETE
    waiting = present & ~holding
    totals = lambda mask: stations.station_totals(mask, state.station, k).astype(np.int64)  # noqa: E731
    return state, Charging(
        energy_kwh=energy, evs_charging=totals(holding), queue_length=totals(waiting),
        queue_hours=float(waiting.sum()) * dt, departed_at_target=totals(reached), departed_incomplete=totals(expired),
        evs_present=totals(state.status == PRESENT),
    )


def carbon_of(feeder: grid.FeederGrid, carbon_cfg, result: grid.GridResult, station_energy_kwh: np.ndarray) -> CarbonResult:
    """Bus, station, system and EV-charging carbon intensities of a solved power flow (SPEC 4)."""
    bus_ci = carbon.bus_intensities(
        carbon_cfg, feeder.num_buses, feeder.line_from_bus, feeder.line_to_bus, result.p_from_mw, result.p_to_mw,
        feeder.ext_grid_bus, result.ext_grid_p_mw, feeder.sgen_bus, result.sgen_p_mw, feeder.station_buses,
    )
    station_ci = bus_ci[np.asarray(feeder.station_buses)]
    ev_ci, ev_co2 = carbon.ev_charging_intensity(station_energy_kwh, station_ci)
    return CarbonResult(bus_intensity=bus_ci, station_intensity=station_ci,
                        system_intensity=carbon.system_intensity(result.load_p_mw, bus_ci), ev_intensity=ev_ci,
                        ev_co2_kg=ev_co2)


def step_cost(result: grid.GridResult, carbon_result: CarbonResult, station_energy_kwh: np.ndarray,
              cfg: Config) -> StepCost:
    """c = sum_lines max(0, loading - limit) + max(0, CI - CI_max) / divisor (+ voltage term).

    CI is the measure of ``carbon.constraint``; the EV-charging measure costs
    nothing in a step without EV energy. A diverged power flow costs
    ``grid.nonconvergence_cost`` and its terms are NaN.
    """
    if not result.converged:
        nan = float("nan")
        return StepCost(line=nan, carbon=nan, voltage=nan, total=cfg.grid.nonconvergence_cost)
    line = float(np.sum(np.maximum(0.0, result.line_loading - cfg.grid.loading_limit)))
    charged = cfg.carbon.constraint != "ev_charging" or float(np.sum(station_energy_kwh)) > 0.0
    intensity = carbon_result.constrained(cfg.carbon.constraint)
    carbon_term = max(0.0, intensity - cfg.carbon.limit) / cfg.carbon.cost_divisor if charged else 0.0
    voltage = max(0.0, cfg.grid.voltage_min_pu - result.min_voltage_pu) if cfg.grid.voltage_cost else 0.0
    return StepCost(line=line, carbon=carbon_term, voltage=voltage, total=line + carbon_term + voltage)


class EVPricingEnv(gym.Env):
    """Dynamic charging prices at three stations on an IEEE 33-bus feeder (constrained MDP).

    Action: posted prices [K] (CNY/kWh) within the config bounds (clipped and
    counted in ``info["clipped_actions"]``; non-finite values raise ValueError).
    Observation: loading (fraction) of the lines feeding CS1..CSK, EVs present
    at CS1..CSK (charging + queued, at the end of the step), SW / welfare scale,
    the constrained carbon measure / carbon scale, and the step fraction
    t / episode_steps if configured. Reward: SW / reward_scale.
    ``info["cost"]``: ``step_cost``, or ``grid.nonconvergence_cost`` when the
    power flow diverges (the episode then terminates). A step runs the stages
    ``admit_arrivals``, ``charge_and_depart``, the power flow and carbon
    (``carbon_of``), ``stations.settle`` and ``stations.social_welfare``, and
    ``step_cost``. ``copy.deepcopy(env)`` and ``snapshot()``/``restore()`` copy
    only the episode state and the RNG; the feeder, road tables and config are
    shared (they never change).
    """

    metadata = {"render_modes": []}
    _SHARED = ("cfg", "grid", "travel", "action_space", "observation_space", "spec")

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg if cfg is not None else Config()
        self.num_stations = self.cfg.num_stations
        self.grid = grid.FeederGrid(self.cfg.grid)
        self.travel = roads.travel_tables(self.cfg.roads, self.cfg.env.episode_steps)
        self._price_lower = np.asarray(self.cfg.env.price_lower, dtype=float)
        self._price_upper = np.asarray(self.cfg.env.price_upper, dtype=float)
        self.action_space = gym.spaces.Box(
            low=self._price_lower.astype(np.float32), high=self._price_upper.astype(np.float32), dtype=np.float32
        )
        k = self.num_stations
        extra = len(self.cfg.env.extra_observations) * k
        low = np.concatenate([np.zeros(2 * k), [-np.inf, 0.0], np.zeros(extra), [0.0] * self.cfg.env.time_features])
        high = np.concatenate([np.full(2 * k, np.inf), [np.inf, np.inf], np.full(extra, np.inf),
                               [1.0] * self.cfg.env.time_features])
        self.observation_space = gym.spaces.Box(low=low.astype(np.float32), high=high.astype(np.float32), dtype=np.float32)
        self._state: EnvState | None = None

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = value if name in self._SHARED else copy.deepcopy(value, memo)
        return clone

    # ------------------------------------------------------------------ reset

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a day: ``options`` may hold ``split`` ("train"/"test"), ``day`` (index in the split) or a ``scenario``.

        Without ``day`` the day is drawn from the seed. The grid starts in the
        reset state of SPEC 3 (base loads plus the initial EV load at each
        station, multiplier 1), with no EV of the scenario present yet.
        """
        super().reset(seed=seed)
        options = dict(options or {})
        if "scenario" in options:
            scenario = options["scenario"]
        else:
            scenario_seed = int(self.np_random.integers(2**31 - 1))
            scenario = make_scenario(self.cfg, split=options.get("split", "train"), day=options.get("day"),
                                     seed=scenario_seed)
        self._state = self._initial_state(scenario)
        return self._state.observation.copy(), self._reset_info()

    def _initial_state(self, scenario: Scenario) -> EnvState:
        num_evs = scenario.num_evs
        mean_service_h, service_scv = stations.service_time_stats(
            energy_need(scenario), scenario.duration_h + scenario.laxity_h, self.cfg.stations.charger_kw,
            self.cfg.env.dt_hours,
        )
        result = self.grid.reset_result
        initial_kw = np.full(self.num_stations, 1000.0 * self.cfg.grid.initial_ev_load_mw)
        carbon_result = carbon_of(self.grid, self.cfg.carbon, result, initial_kw * self.cfg.env.dt_hours)
        intensity = carbon_result.constrained(self.cfg.carbon.constraint)
        state = EnvState(
            scenario=scenario,
            mean_service_h=mean_service_h,
            service_scv=service_scv,
            step=0,
            posted_price=np.asarray(self.cfg.env.initial_prices, dtype=float),
            status=np.full(num_evs, NOT_ARRIVED, dtype=np.int8),
            station=np.full(num_evs, -1, dtype=np.int64),
            locked_price=np.zeros(num_evs),
            remaining_kwh=np.zeros(num_evs),
            delivered_kwh=np.zeros(num_evs),
            join_step=np.zeros(num_evs, dtype=np.int64),
            last_arrivals=np.zeros(self.num_stations, dtype=np.int64),
            observation=np.zeros(0, np.float32),  # set below: the extra features read the state
            grid_result=result,
            carbon_intensity=intensity,
        )
        zeros = np.zeros(self.num_stations)
        state.observation = self._observation(state, result.line_loading, zeros, 0.0, intensity, 0, zeros)
        return state

    def _reset_info(self) -> dict:
        result, scenario = self._state.grid_result, self._state.scenario
        return {
            "line_loading": result.line_loading.copy(),
            "carbon_intensity": self._state.carbon_intensity,
            "min_voltage_pu": result.min_voltage_pu,
            "posted_price": self._state.posted_price.copy(),
            "day": scenario.day,
            "split": scenario.split,
            "date": scenario.date,
            "num_evs": scenario.num_evs,
        }

    # ------------------------------------------------------------------- step

    def step(self, action):
        """Advance 15 minutes at the posted prices ``action`` [K]; returns (obs, reward, terminated, truncated, info)."""
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        cfg, t, k = self.cfg, self._state.step, self.num_stations
        if t >= cfg.env.episode_steps:
            raise RuntimeError("episode is over; call reset()")
        price = np.asarray(action, dtype=float).reshape(-1)
        if price.shape != (k,):
            raise ValueError(f"action must hold {k} prices, got shape {np.shape(action)}")
        if not np.all(np.isfinite(price)):
            raise ValueError(f"action must be finite, got {price}")
        clipped = int(np.sum((price < self._price_lower - _CLIP_TOLERANCE) | (price > self._price_upper + _CLIP_TOLERANCE)))
        price = np.clip(price, self._price_lower, self._price_upper)
        dt = cfg.env.dt_hours

        noise = (stations.gumbel(self.np_random, (arriving(self._state).size, k))
                 if cfg.stations.choice == "logit" else None)
        state, admission = admit_arrivals(self._state, price, self.travel, cfg, noise)
        state, charging = charge_and_depart(state, cfg)
        settlement = stations.settle(charging.energy_kwh, state.locked_price, state.station, k, cfg.economics, dt)
        station_kw = settlement.energy_kwh / dt
        multiplier = grid.multiplier_for_step(cfg.grid, t, state.scenario.load_profile)
        result = self.grid.solve(station_kw / 1000.0, multiplier)
        if result.converged:
            carbon_result = carbon_of(self.grid, cfg.carbon, result, settlement.energy_kwh)
        else:
            nan_k = np.full(k, np.nan)
            carbon_result = CarbonResult(np.full(self.grid.num_buses, np.nan), nan_k, float("nan"), float("nan"),
                                         float("nan"))
        cost = step_cost(result, carbon_result, settlement.energy_kwh, cfg)
        co2 = carbon_result.ev_co2_kg if result.converged else 0.0
        welfare = stations.social_welfare(
            settlement, float(charging.energy_kwh.sum()) - admission.travel_energy_kwh,
            admission.travel_time_h + charging.queue_hours, co2, cfg.economics, cfg.stations.money_weight,
            cfg.stations.value_of_time,
        )

        state.step = t + 1
        state.posted_price = price
        state.last_arrivals = admission.arrivals
        if result.converged:
            state.grid_result = result
            state.carbon_intensity = carbon_result.constrained(cfg.carbon.constraint)
        state.observation = self._observation(
            state, state.grid_result.line_loading, charging.evs_present, welfare.welfare, state.carbon_intensity,
            state.step, charging.queue_length,
        )
        self._state = state
        terminated = state.step >= cfg.env.episode_steps or not result.converged
        info = {
            "cost": float(cost.total),
            "cost_line": cost.line,
            "cost_carbon": cost.carbon,
            "cost_voltage": cost.voltage,
            "power_flow_converged": result.converged,
            "step": t,
            "load_multiplier": multiplier,
            "line_loading": result.line_loading.copy(),
            "line_current_ka": result.line_current_ka[self.grid.monitored_lines].copy(),
            "min_voltage_pu": result.min_voltage_pu,
            "ext_grid_p_mw": result.ext_grid_p_mw,
            "carbon_intensity": carbon_result.constrained(cfg.carbon.constraint),
            "system_carbon_intensity": carbon_result.system_intensity,
            "ev_carbon_intensity": carbon_result.ev_intensity,
            "station_carbon_intensity": carbon_result.station_intensity,
            "bus_carbon_intensity": carbon_result.bus_intensity,
            "ev_co2_kg": co2,
            "station_load_kw": station_kw,
            "station_energy_kwh": settlement.energy_kwh,
            "evs_charging": charging.evs_charging,
            "queue_length": charging.queue_length,
            "queue_hours": charging.queue_hours,
            "evs_present": charging.evs_present,
            "arrivals": admission.arrivals,
            "new_evs": int(admission.new_evs.size),
            "unserved": admission.unserved,
            "departed_at_target": charging.departed_at_target,
            "departed_incomplete": charging.departed_incomplete,
            "expected_wait_h": admission.expected_wait_h,
            "travel_time_h": admission.travel_time_h,
            "travel_energy_kwh": admission.travel_energy_kwh,
            "posted_price": price.copy(),
            "locked_price": settlement.locked_price,
            "clipped_actions": clipped,
            "revenue": settlement.revenue,
            "revenue_total": float(settlement.revenue.sum()),
            "cs_purchase_cost": settlement.purchase_cost,
            "cs_profit_per_station": settlement.cs_profit,
            "dso_supply_cost": settlement.dso_supply_cost,
            "dg_energy_kwh": settlement.dg_energy_kwh,
            "grid_energy_kwh": settlement.grid_energy_kwh,
            "cs_profit": welfare.cs_profit,
            "dso_profit": welfare.dso_profit,
            "users_energy_value": welfare.users_energy_value,
            "users_payment": welfare.users_payment,
            "users_time_cost": welfare.users_time_cost,
            "users_surplus": welfare.users_surplus,
            "carbon_cost_cny": welfare.carbon_cost,
            "welfare": welfare.welfare,
            "users_generalized_cost": admission.generalized_cost,
        }
        return state.observation.copy(), float(welfare.welfare / cfg.env.reward_scale), bool(terminated), False, info

    # ---------------------------------------------------------------- helpers

    def _observation(self, state: EnvState, loading, evs_present, welfare, intensity, step, queue_length) -> np.ndarray:
        """[loadings K, EVs present K, SW / scale, CI / scale, extra features K each, (t / T)]; extras from ``state``."""
        env = self.cfg.env
        parts = [loading, evs_present, [welfare / env.welfare_obs_scale, intensity / env.carbon_obs_scale]]
        for name in env.extra_observations:
            parts.append(self._extra_observation(state, name, queue_length))
        if env.time_features:
            parts.append([step / env.episode_steps])
        return np.concatenate(parts).astype(np.float32)

    def _extra_observation(self, state: EnvState, name: str, queue_length) -> np.ndarray:
        """One ``env.extra_observations`` feature [K] of ``state`` (``config.EXTRA_OBSERVATIONS``)."""
        k = self.num_stations
        if name == "prices":
            return state.posted_price
        if name == "queues":
            return np.asarray(queue_length, dtype=float)
        if name == "arrivals":
            return state.last_arrivals.astype(float)
        if name == "backlog":
            present = state.status == PRESENT
            return np.bincount(state.station[present], weights=state.remaining_kwh[present], minlength=k)[:k]
        raise ValueError(f"unknown extra observation {name!r}")

    def snapshot(self) -> tuple[EnvState, dict]:
        """Copy of the episode state and the RNG that ``restore`` brings back; cheap (arrays of a few hundred EVs)."""
        if self._state is None:
            raise RuntimeError("call reset() before snapshot()")
        return self._state.copy(), copy.deepcopy(self.np_random.bit_generator.state)

    def restore(self, snapshot: tuple[EnvState, dict]) -> None:
        """Return to a state saved by ``snapshot``; the same actions then give the same transitions."""
        state, rng_state = snapshot
        self._state = state.copy()
        self.np_random.bit_generator.state = copy.deepcopy(rng_state)

    @property
    def state(self) -> EnvState | None:
        """The current episode state (read-only use; mutate through step/restore)."""
        return self._state

    @property
    def scenario(self) -> Scenario | None:
        """The current episode's day (None before the first reset)."""
        return None if self._state is None else self._state.scenario
