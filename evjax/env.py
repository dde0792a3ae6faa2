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
    """Everything that changes during an episode; per-EV arrays are [V] over the scenario's EVs."""

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
    carbon_intensity: float  # last converged feeder intensity

    def copy(self) -> "EnvState":
        return EnvState(**{f.name: copy.copy(getattr(self, f.name)) if isinstance(getattr(self, f.name), np.ndarray)
                           else getattr(self, f.name) for f in dataclasses.fields(self)})


class EVPricingEnv(gym.Env):
    """Dynamic charging prices at three stations on an IEEE 33-bus feeder (constrained MDP).

    Action: posted prices [K] (CNY/kWh) within the config bounds (clipped and
    counted in ``info["clipped_actions"]``; non-finite values raise ValueError).
    Observation: loading (fraction) of the lines feeding CS1..CSK, EVs present
    at CS1..CSK (charging + queued, at the end of the step), SW / welfare scale,
    CI / carbon scale, and the step fraction t / episode_steps if configured.
    Reward: SW / reward_scale. ``info["cost"]``: sum over monitored lines of
    max(0, loading - limit) + max(0, CI - CI_max) / divisor (+ voltage term),
    or ``grid.nonconvergence_cost`` when the power flow diverges (the episode
    then terminates). ``copy.deepcopy(env)`` and ``snapshot()``/``restore()``
    copy only the episode state; the feeder, road tables and config are shared
    (they never change).
    """

    metadata = {"render_modes": []}
    _SHARED = ("cfg", "grid", "travel", "action_space", "observation_space", "scenario", "spec")

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
        low = np.concatenate([np.zeros(2 * k), [-np.inf, 0.0], [0.0] * self.cfg.env.time_features])
        high = np.concatenate([np.full(2 * k, np.inf), [np.inf, np.inf], [1.0] * self.cfg.env.time_features])
        self.observation_space = gym.spaces.Box(low=low.astype(np.float32), high=high.astype(np.float32), dtype=np.float32)
        self.scenario: Scenario | None = None
        self._state: EnvState | None = None
        self._mean_service_h = self.cfg.env.dt_hours
        self._service_scv = 0.0

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
        self._start(scenario)
        return self._state.observation.copy(), self._reset_info()

    def _start(self, scenario: Scenario) -> None:
        self.scenario = scenario
        num_evs = scenario.num_evs
        need = self._energy_need(scenario)
        stay = scenario.duration_h + scenario.laxity_h
        self._mean_service_h, self._service_scv = stations.service_time_stats(
            need, stay, self.cfg.stations.charger_kw, self.cfg.env.dt_hours
        )
        result = self.grid.reset_result
        intensity = self._carbon(result)[1]
        observation = self._observation(result.line_loading, np.zeros(self.num_stations), 0.0, intensity, 0)
        self._state = EnvState(
            step=0,
            posted_price=np.asarray(self.cfg.env.initial_prices, dtype=float),
            status=np.full(num_evs, NOT_ARRIVED, dtype=np.int8),
            station=np.full(num_evs, -1, dtype=np.int64),
            locked_price=np.zeros(num_evs),
            remaining_kwh=np.zeros(num_evs),
            delivered_kwh=np.zeros(num_evs),
            join_step=np.zeros(num_evs, dtype=np.int64),
            last_arrivals=np.zeros(self.num_stations, dtype=np.int64),
            observation=observation,
            grid_result=result,
            carbon_intensity=intensity,
        )

    @staticmethod
    def _energy_need(scenario: Scenario) -> np.ndarray:
        """E_need = capacity x (target SOC - start SOC) [V] (kWh)."""
        return scenario.capacity_kwh * (scenario.target_soc - scenario.start_soc)

    def _reset_info(self) -> dict:
        result = self._state.grid_result
        return {
            "line_loading": result.line_loading.copy(),
            "carbon_intensity": self._state.carbon_intensity,
            "min_voltage_pu": result.min_voltage_pu,
            "posted_price": self._state.posted_price.copy(),
            "day": self.scenario.day,
            "split": self.scenario.split,
            "date": self.scenario.date,
            "num_evs": self.scenario.num_evs,
        }

    # ------------------------------------------------------------------- step

    def step(self, action):
        """Advance 15 minutes at the posted prices ``action`` [K]; returns (obs, reward, terminated, truncated, info)."""
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        state = self._state
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

        scenario, dt = self.scenario, cfg.env.dt_hours
        chargers = np.asarray(cfg.stations.chargers)
        present = state.status == PRESENT
        holding_before = stations.charging_slots(state.station, present, state.join_step, chargers)
        waiting_before = stations.station_totals(present & ~holding_before, state.station, k)
        wait_h = stations.expected_wait_hours(
            state.last_arrivals / dt, waiting_before, chargers, self._mean_service_h, self._service_scv,
            cfg.stations.max_wait_hours, cfg.stations.zero_wait_utilisation,
        )

        new = np.flatnonzero(scenario.arrival_step == t)
        origin = scenario.origin_node[new] - 1
        need = self._energy_need(scenario)[new]
        travel_energy = self.travel.energy_kwh[t, origin]  # [V, K]
        cost = stations.generalized_cost(
            price, need, scenario.capacity_kwh[new] * scenario.start_soc[new], travel_energy,
            self.travel.time_h[t, origin], wait_h, cfg.stations.money_weight, cfg.stations.value_of_time,
        )
        noise = stations.gumbel(self.np_random, cost.shape) if cfg.stations.choice == "logit" else None
        choice = stations.choose_stations(cost, cfg.stations.choice, cfg.stations.logit_temperature, noise)
        served = choice >= 0
        chosen, chooser = choice[served], new[served]
        state.status[new[~served]] = UNSERVED
        state.status[chooser] = PRESENT
        state.station[chooser] = chosen
        state.locked_price[chooser] = price[chosen]
        state.remaining_kwh[chooser] = need[served] + travel_energy[served, chosen]
        state.join_step[chooser] = t
        arrivals = np.bincount(chosen, minlength=k)
        users_cost = float(cost[served, chosen].sum())

        present = state.status == PRESENT
        holding = stations.charging_slots(state.station, present, state.join_step, chargers)
        energy = stations.charge(state.remaining_kwh, holding, cfg.stations.charger_kw, dt)
        state.remaining_kwh -= energy
        state.delivered_kwh += energy
        charging = stations.station_totals(holding, state.station, k).astype(np.int64)
        queue = stations.station_totals(present & ~holding, state.station, k).astype(np.int64)
        deadline_h = scenario.arrival_step * dt + scenario.duration_h + scenario.laxity_h
        reached = present & (state.remaining_kwh <= 1e-9)
        expired = present & ~reached & ((t + 1) * dt >= deadline_h - 1e-9)
        state.status[reached] = DONE
        state.status[expired] = LEFT_INCOMPLETE
        evs_present = stations.station_totals(state.status == PRESENT, state.station, k).astype(np.int64)

        settlement = stations.settle(energy, state.locked_price, state.station, k, cfg.economics, dt)
        station_kw = settlement.energy_kwh / dt
        multiplier = grid.multiplier_for_step(cfg.grid, t, scenario.load_profile)
        result = self.grid.solve(station_kw / 1000.0, multiplier)

        if result.converged:
            bus_ci, intensity = self._carbon(result)
            line_cost = float(np.sum(np.maximum(0.0, result.line_loading - cfg.grid.loading_limit)))
            carbon_cost = max(0.0, intensity - cfg.carbon.limit) / cfg.carbon.cost_divisor
            voltage_cost = max(0.0, cfg.grid.voltage_min_pu - result.min_voltage_pu) if cfg.grid.voltage_cost else 0.0
            step_cost = line_cost + carbon_cost + voltage_cost
            observed = result
        else:
            bus_ci, intensity = np.full(self.grid.num_buses, np.nan), float("nan")
            line_cost = carbon_cost = voltage_cost = float("nan")
            step_cost = cfg.grid.nonconvergence_cost
            observed = state.grid_result

        state.step = t + 1
        state.posted_price = price
        state.last_arrivals = arrivals
        if result.converged:
            state.grid_result, state.carbon_intensity = result, intensity
        state.observation = self._observation(
            observed.line_loading, evs_present, settlement.welfare, state.carbon_intensity, state.step
        )
        terminated = state.step >= cfg.env.episode_steps or not result.converged
        reward = settlement.welfare / cfg.env.reward_scale
        info = {
            "cost": float(step_cost),
            "cost_line": line_cost,
            "cost_carbon": carbon_cost,
            "cost_voltage": voltage_cost,
            "power_flow_converged": result.converged,
            "step": t,
            "load_multiplier": multiplier,
            "line_loading": result.line_loading.copy(),
            "line_current_ka": result.line_current_ka[self.grid.monitored_lines].copy(),
            "min_voltage_pu": result.min_voltage_pu,
            "ext_grid_p_mw": result.ext_grid_p_mw,
            "carbon_intensity": intensity,
            "bus_carbon_intensity": bus_ci,
            "station_load_kw": station_kw,
            "station_energy_kwh": settlement.energy_kwh,
            "evs_charging": charging,
            "queue_length": queue,
            "evs_present": evs_present,
            "arrivals": arrivals,
            "new_evs": int(new.size),
            "unserved": int(np.sum(~served)),
            "departed_at_target": stations.station_totals(reached, state.station, k).astype(np.int64),
            "departed_incomplete": stations.station_totals(expired, state.station, k).astype(np.int64),
            "expected_wait_h": wait_h,
            "posted_price": price.copy(),
            "locked_price": settlement.locked_price,
            "clipped_actions": clipped,
            "revenue": settlement.revenue,
            "revenue_total": float(settlement.revenue.sum()),
            "cs_purchase_cost": settlement.purchase_cost,
            "cs_profit": settlement.cs_profit,
            "dso_supply_cost": settlement.dso_supply_cost,
            "dg_energy_kwh": settlement.dg_energy_kwh,
            "grid_energy_kwh": settlement.grid_energy_kwh,
            "welfare": settlement.welfare,
            "users_generalized_cost": users_cost,
        }
        return state.observation.copy(), float(reward), bool(terminated), False, info

    # ---------------------------------------------------------------- helpers

    def _carbon(self, result: grid.GridResult) -> tuple[np.ndarray, float]:
        bus_ci = carbon.bus_intensities(
            self.cfg.carbon, self.grid.num_buses, self.grid.line_from_bus, self.grid.line_to_bus,
            result.p_from_mw, result.p_to_mw, self.grid.ext_grid_bus, result.ext_grid_p_mw,
            self.grid.sgen_bus, result.sgen_p_mw, self.grid.station_buses,
        )
        return bus_ci, carbon.system_intensity(result.load_p_mw, bus_ci)

    def _observation(self, loading, evs_present, welfare, intensity, step) -> np.ndarray:
        env = self.cfg.env
        parts = [loading, evs_present, [welfare / env.welfare_obs_scale, intensity / env.carbon_obs_scale]]
        if env.time_features:
            parts.append([step / env.episode_steps])
        return np.concatenate(parts).astype(np.float32)

    def snapshot(self) -> tuple:
        """Copy of the episode state (and RNG) that ``restore`` brings back; cheap (arrays of a few hundred EVs)."""
        if self._state is None:
            raise RuntimeError("call reset() before snapshot()")
        return (self.scenario, self._state.copy(), copy.deepcopy(self.np_random.bit_generator.state),
                self._mean_service_h, self._service_scv)

    def restore(self, snapshot: tuple) -> None:
        """Return to a state saved by ``snapshot``; the same actions then give the same transitions."""
        scenario, state, rng_state, self._mean_service_h, self._service_scv = snapshot
        self.scenario = scenario
        self._state = state.copy()
        self.np_random.bit_generator.state = copy.deepcopy(rng_state)

    @property
    def state(self) -> EnvState | None:
        """The current episode state (read-only use; mutate through step/restore)."""
        return self._state
