"""Charging stations: expected waiting time, station choice, FIFO charging, settlement (SPEC 7).

Pure functions on explicit numpy arrays (host side, not jittable). EVs are
rows of per-vehicle arrays ([V]); stations are columns ([K]). Energy in kWh,
power in kW, time in hours, money in CNY.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from evjax.config import EconomicsConfig


def erlang_b(chargers: int, offered_load: float) -> float:
    """Erlang B blocking probability B(c, a) by the stable recursion B(n) = a B(n-1) / (n + a B(n-1)), B(0) = 1.

    No factorials: every intermediate lies in [0, 1], so it is exact to
    rounding for any number of chargers.
    """
    blocking = 1.0
    for n in range(1, chargers + 1):
        blocking = offered_load * blocking / (n + offered_load * blocking)
    return blocking


def erlang_c(chargers: int, offered_load: float) -> float:
    """Erlang C probability of waiting C(c, a) = c B / (c - a (1 - B)) for offered load a = lambda E[S] < c."""
    if offered_load >= chargers:
        return 1.0
    blocking = erlang_b(chargers, offered_load)
    return chargers * blocking / (chargers - offered_load * (1.0 - blocking))


def mgc_wait_hours(
    arrival_rate_per_h: float, mean_service_h: float, service_scv: float, chargers: int, max_wait_hours: float
) -> float:
    """Mean M/G/c queueing delay by the Allen-Cunneen approximation (hours).

    W_q = C(c, a) / (c mu - lambda) * (1 + SCV_S) / 2, with mu = 1 / E[S],
    a = lambda E[S] and SCV_S = Var[S] / E[S]^2 (E[S^2] = Var + E[S]^2). It is
    exact for M/M/c (SCV = 1). A saturated station (rho = a / c >= 1) has no
    stationary delay; it gets the finite ``max_wait_hours`` instead, and no
    result exceeds it.
    """
    if arrival_rate_per_h <= 0.0:
        return 0.0
    offered_load = arrival_rate_per_h * mean_service_h
    if offered_load >= chargers:
        return max_wait_hours
    service_rate = 1.0 / mean_service_h
    wait = erlang_c(chargers, offered_load) / (chargers * service_rate - arrival_rate_per_h) * (1.0 + service_scv) / 2.0
    return min(wait, max_wait_hours)


def expected_wait_hours(
    arrival_rate_per_h: np.ndarray,
    waiting: np.ndarray,
    chargers: np.ndarray,
    mean_service_h: float,
    service_scv: float,
    max_wait_hours: float,
    zero_wait_utilisation: float,
) -> np.ndarray:
    """Waiting time [K] a driver expects at each station when choosing (hours).

    W_k = min(max(W_q(M/G/c), W_backlog), max_wait) with the M/G/c delay of
    ``mgc_wait_hours`` at the recent arrival rate and the FIFO backlog of the
    EVs already waiting, W_backlog = (n_waiting + 1) E[S] / c (all c chargers
    busy, one frees every E[S] / c on average). W = 0 when nobody waits and the
    utilisation rho = lambda E[S] / c is below ``zero_wait_utilisation``.
    """
    arrival_rate_per_h = np.asarray(arrival_rate_per_h, dtype=float)
    waiting = np.asarray(waiting)
    chargers = np.asarray(chargers)
    wait = np.zeros(len(chargers))
    for k, c in enumerate(chargers):
        utilisation = arrival_rate_per_h[k] * mean_service_h / c
        if waiting[k] == 0 and utilisation < zero_wait_utilisation:
            continue
        stationary = mgc_wait_hours(arrival_rate_per_h[k], mean_service_h, service_scv, int(c), max_wait_hours)
        backlog = (waiting[k] + 1) * mean_service_h / c if waiting[k] > 0 else 0.0
        wait[k] = min(max(stationary, backlog), max_wait_hours)
    return wait


def service_time_stats(energy_need_kwh: np.ndarray, stay_limit_h: np.ndarray, charger_kw: float, dt_hours: float):
    """Mean (h) and squared coefficient of variation of the time an EV holds a charger in the simulation.

    An EV charging E kWh at P kW holds a charger for ceil(E / (P dt)) steps,
    cut at its stay limit (duration + laxity, rounded up to whole steps).
    Returns (dt, 0) for an empty fleet.
    """
    energy_need_kwh = np.asarray(energy_need_kwh, dtype=float)
    if energy_need_kwh.size == 0:
        return dt_hours, 0.0
    steps = np.minimum(np.ceil(energy_need_kwh / (charger_kw * dt_hours) - 1e-9),
                       np.ceil(np.asarray(stay_limit_h) / dt_hours - 1e-9))
    hours = np.maximum(steps, 1.0) * dt_hours
    mean = float(hours.mean())
    return mean, float(hours.var() / mean**2)


def generalized_cost(
    posted_price: np.ndarray,
    energy_need_kwh: np.ndarray,
    battery_kwh: np.ndarray,
    travel_energy_kwh: np.ndarray,
    travel_time_h: np.ndarray,
    wait_h: np.ndarray,
    money_weight: float,
    value_of_time: float,
) -> np.ndarray:
    """Generalized cost [V, K] of each station for each EV; inf where the EV cannot reach it.

    C_k = w p_k (E_need + E_travel,k) + (1 - w) VOT (T_travel,k + W_k): the EV
    buys back its travel energy at the station. Station k is unreachable when
    the battery energy (capacity x start SOC) is below E_travel,k.
    Shapes: V EVs, K stations; posted_price, wait_h [K]; energy_need, battery [V];
    travel_energy, travel_time [V, K].
    """
    energy = np.asarray(energy_need_kwh, dtype=float)[:, None] + travel_energy_kwh  # [V, K]
    cost = money_weight * np.asarray(posted_price)[None, :] * energy + (1.0 - money_weight) * value_of_time * (
        travel_time_h + np.asarray(wait_h)[None, :]
    )
    reachable = np.asarray(battery_kwh, dtype=float)[:, None] >= travel_energy_kwh
    return np.where(reachable, cost, np.inf)


def choose_stations(cost: np.ndarray, choice: str, temperature: float, gumbel_noise: np.ndarray | None = None) -> np.ndarray:
    """Station index [V] each EV picks, -1 when no station is reachable (all costs inf).

    ``argmin``: the cheapest station. ``logit``: P(k) proportional to
    exp(-C_k / temperature) over reachable stations, sampled by the Gumbel-max
    trick argmax(-C_k / temperature + g_k) with the given standard Gumbel
    noise [V, K]. With the noise held fixed, raising one station's cost can
    only move EVs away from it (monotone response in both modes).
    """
    cost = np.asarray(cost, dtype=float)
    reachable = np.isfinite(cost).any(axis=1)
    if choice == "argmin":
        score = -cost
    elif choice == "logit":
        if gumbel_noise is None:
            raise ValueError("logit choice needs Gumbel noise")
        score = np.where(np.isfinite(cost), -cost / temperature + gumbel_noise, -np.inf)
    else:
        raise ValueError(f"unknown stations.choice {choice!r}")
    picked = np.argmax(np.where(np.isfinite(cost), score, -np.inf), axis=1)
    return np.where(reachable, picked, -1)


def charging_slots(station: np.ndarray, present: np.ndarray, join_step: np.ndarray, chargers: np.ndarray) -> np.ndarray:
    """Boolean [V]: which present EVs hold a charger this step (first c per station in FIFO order).

    FIFO order is the step an EV joined its station, ties broken by EV index;
    EVs keep their charger until they leave, so the first c in this order are
    exactly those already charging plus the next in line.
    """
    holding = np.zeros(len(station), dtype=bool)
    for k, c in enumerate(chargers):
        at_station = np.flatnonzero(present & (station == k))
        order = at_station[np.argsort(join_step[at_station], kind="stable")]
        holding[order[:c]] = True
    return holding


def charge(remaining_kwh: np.ndarray, holding: np.ndarray, charger_kw: float, dt_hours: float) -> np.ndarray:
    """Energy [V] delivered this step: min(P dt, remaining) to EVs holding a charger, 0 to the others."""
    return np.where(holding, np.minimum(charger_kw * dt_hours, remaining_kwh), 0.0)


def station_totals(values: np.ndarray, station: np.ndarray, num_stations: int) -> np.ndarray:
    """Sum a per-EV quantity [V] per station [K] (EVs with station < 0 are ignored)."""
    at = station >= 0
    return np.bincount(station[at], np.asarray(values, dtype=float)[at], minlength=num_stations)


@dataclasses.dataclass(frozen=True)
class Settlement:
    """Money of one step (CNY); [K] arrays are per station."""

    energy_kwh: np.ndarray  # [K] EV energy sold
    revenue: np.ndarray  # [K] sum of energy x locked price: the drivers' payments
    purchase_cost: np.ndarray  # [K] energy x CS purchase price, paid by the stations to the DSO
    cs_profit: np.ndarray  # [K] revenue - purchase cost
    locked_price: np.ndarray  # [K] energy-weighted mean locked price (NaN where nothing was sold)
    dg_energy_kwh: float  # EV energy supplied by the DG
    grid_energy_kwh: float  # EV energy supplied by the main grid
    dso_supply_cost: float  # what the DSO pays to supply the EV energy
    dso_profit: float  # stations' purchase payments - DSO supply cost

    @property
    def operator_margin(self) -> float:
        """CS profit + DSO profit = revenue - DSO supply cost (the purchase price is a transfer between them)."""
        return float(self.cs_profit.sum()) + self.dso_profit


def settle(
    energy_kwh: np.ndarray, locked_price: np.ndarray, station: np.ndarray, num_stations: int,
    economics: EconomicsConfig, dt_hours: float,
) -> Settlement:
    """Settle a step: revenue at locked prices, station purchase cost, DSO supply cost and profit.

    R_k = sum_i E_i p_i over EVs i at station k (p_i locked when EV i chose);
    the stations buy the energy from the DSO at the CS purchase price; the DSO
    supplies the total EV energy E with the first P_DG dt kWh (``dg_supply_kw``
    x dt, energy, not power) at the DG price and the rest at the main-grid price.
    """
    energy = station_totals(energy_kwh, station, num_stations)
    revenue = station_totals(np.asarray(energy_kwh) * np.asarray(locked_price), station, num_stations)
    purchase = energy * economics.cs_purchase_price
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_locked = np.where(energy > 0.0, revenue / np.where(energy > 0.0, energy, 1.0), np.nan)
    total = float(energy.sum())
    dg_energy = min(total, economics.dg_supply_kw * dt_hours)
    grid_energy = total - dg_energy
    supply = dg_energy * economics.dg_price + grid_energy * economics.grid_price
    return Settlement(
        energy_kwh=energy, revenue=revenue, purchase_cost=purchase, cs_profit=revenue - purchase,
        locked_price=mean_locked, dg_energy_kwh=dg_energy, grid_energy_kwh=grid_energy,
        dso_supply_cost=supply, dso_profit=float(purchase.sum()) - supply,
    )


def money_value_of_time(money_weight: float, value_of_time: float) -> float:
    """CNY a driver gives up for an hour, on the choice model's own scale: (1 - w) VOT / w.

    The choice minimises w p E + (1 - w) VOT T; dividing by w puts it in CNY,
    so an hour is worth (1 - w) VOT / w CNY (60 CNY/h at w = 0.5, VOT = 60).
    """
    return (1.0 - money_weight) * value_of_time / money_weight


@dataclasses.dataclass(frozen=True)
class Welfare:
    """Each party's term of one step's social welfare (CNY)."""

    cs_profit: float  # all stations: revenue - purchase cost
    dso_profit: float  # purchase payments - supply cost
    users_energy_value: float  # value of the net energy the EVs gained (delivered - consumed on the way)
    users_payment: float  # what the drivers paid (= station revenue)
    users_time_cost: float  # value of the time spent driving to and queueing at the stations
    users_surplus: float  # energy value - payment - time cost
    carbon_cost: float  # priced EV CO2 (0 unless economics.carbon_price_cny_per_t > 0)
    welfare: float  # the configured definition (economics.welfare)


def social_welfare(
    settlement: Settlement, net_energy_kwh: float, time_hours: float, ev_co2_kg: float,
    economics: EconomicsConfig, money_weight: float, value_of_time: float,
) -> Welfare:
    """Social welfare of a step by ``economics.welfare`` (SPEC 7).

    ``total_surplus``: SW = CS profit + DSO profit + users' surplus - carbon cost, with
    users' surplus = v E_net - payments - VOT_money T, v the drivers' value of
    energy, E_net the energy delivered minus the energy the trips to the stations
    consumed (so a detour is a loss, not extra energy bought), T the hours spent
    driving to the station (counted when an EV chooses) and waiting for a charger,
    VOT_money = (1 - w) VOT / w. Payments cancel: SW = v E_net - supply cost -
    VOT_money T - carbon cost. ``operator_margin`` (the source's code):
    SW = revenue - supply cost - carbon cost. Carbon cost = carbon price x EV CO2.
    """
    payment = float(settlement.revenue.sum())
    cs_profit = float(settlement.cs_profit.sum())
    energy_value = economics.user_value_cny_per_kwh * net_energy_kwh
    time_cost = money_value_of_time(money_weight, value_of_time) * time_hours if money_weight > 0 else 0.0
    users = energy_value - payment - time_cost
    carbon_cost = economics.carbon_price_cny_per_t * ev_co2_kg / 1000.0
    if economics.welfare == "total_surplus":
        welfare = cs_profit + settlement.dso_profit + users - carbon_cost
    elif economics.welfare == "operator_margin":
        welfare = cs_profit + settlement.dso_profit - carbon_cost
    else:
        raise ValueError(f"unknown economics.welfare {economics.welfare!r}")
    return Welfare(
        cs_profit=cs_profit, dso_profit=settlement.dso_profit, users_energy_value=energy_value,
        users_payment=payment, users_time_cost=time_cost, users_surplus=users, carbon_cost=carbon_cost,
        welfare=welfare,
    )


def gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard Gumbel noise -log(-log U) for the logit choice."""
    uniform = rng.uniform(np.finfo(float).tiny, 1.0, size=shape)
    return -np.log(-np.log(uniform))

