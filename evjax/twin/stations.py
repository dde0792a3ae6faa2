"""Charging stations in JAX: expected wait, choice, FIFO slots, charging, settlement (twin of ``evjax/stations.py``).

Pure JAX on one day's padded per-EV arrays [V] and per-station arrays [K];
float64 under the twin's ``jax.enable_x64`` context. Energy in kWh, power in
kW, time in hours, money in CNY.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


QUEUE_PLACE_BITS = 10  # bits per station in the packed per-station counts: at most 2^10 - 1 EVs per day


def erlang_b(chargers: jax.Array, offered_load: jax.Array, *, max_chargers: int) -> jax.Array:
    """Erlang B [K] by the recursion B(n) = a B(n-1) / (n + a B(n-1)), B(0) = 1, run to each station's own c.

    One ``fori_loop`` over n = 1..max_chargers; a station stops updating past its c.
    """
    def recurse(n, blocking):
        updated = offered_load * blocking / (n + offered_load * blocking)
        return jnp.where(n <= chargers, updated, blocking)
    return jax.lax.fori_loop(1, max_chargers + 1, recurse, jnp.ones_like(offered_load))


def expected_wait_hours(
    arrival_rate_per_h: jax.Array, waiting: jax.Array, chargers: jax.Array, mean_service_h: jax.Array,
    service_scv: jax.Array, max_wait_hours: jax.Array, zero_wait_utilisation: jax.Array, *, max_chargers: int,
) -> jax.Array:
    """Waiting time [K] a driver expects at each station (hours), as ``stations.expected_wait_hours``.

    W = min(max(W_q, W_backlog), max_wait): W_q is the Allen-Cunneen M/G/c
    delay C(c, a) / (c mu - lambda) (1 + SCV) / 2 with Erlang C from Erlang B,
    ``max_wait`` when a >= c, 0 without arrivals; W_backlog = (waiting + 1) E[S] / c
    when someone waits; W = 0 when nobody waits and rho < ``zero_wait_utilisation``.
    """
    chargers_f = chargers.astype(arrival_rate_per_h.dtype)
    offered = arrival_rate_per_h * mean_service_h
    saturated = offered >= chargers_f
    blocking = erlang_b(chargers, offered, max_chargers=max_chargers)
    erlang_c = jnp.where(saturated, 1.0, chargers_f * blocking / jnp.where(
        saturated, 1.0, chargers_f - offered * (1.0 - blocking)))
    headroom = chargers_f / mean_service_h - arrival_rate_per_h
    delay = erlang_c / jnp.where(saturated, 1.0, headroom) * (1.0 + service_scv) / 2.0
    stationary = jnp.where(arrival_rate_per_h <= 0.0, 0.0,
                           jnp.where(saturated, max_wait_hours, jnp.minimum(delay, max_wait_hours)))
    backlog = jnp.where(waiting > 0, (waiting + 1) * mean_service_h / chargers_f, 0.0)
    wait = jnp.minimum(jnp.maximum(stationary, backlog), max_wait_hours)
    idle = (waiting == 0) & (offered / chargers_f < zero_wait_utilisation)
    return jnp.where(idle, 0.0, wait)


def generalized_cost(
    posted_price: jax.Array, energy_need_kwh: jax.Array, battery_kwh: jax.Array, travel_energy_kwh: jax.Array,
    travel_time_h: jax.Array, wait_h: jax.Array, money_weight: jax.Array, value_of_time: jax.Array,
) -> jax.Array:
    """C [K, V] = w p_k (E_need + E_travel,k) + (1 - w) VOT (T_travel,k + W_k); inf where the battery cannot reach k.

    Station-major: travel tables are [K, V], so each station's row is contiguous.
    """
    energy = energy_need_kwh[None, :] + travel_energy_kwh
    cost = money_weight * posted_price[:, None] * energy + (1.0 - money_weight) * value_of_time * (
        travel_time_h + wait_h[:, None])
    return jnp.where(battery_kwh[None, :] >= travel_energy_kwh, cost, jnp.inf)


def choose_stations(cost: jax.Array, gumbel_noise: jax.Array | None, temperature: jax.Array, *, choice: str) -> jax.Array:
    """Station [V] each EV picks, -1 when none is reachable, as ``stations.choose_stations``.

    ``cost`` is [K, V]. ``argmin``: the cheapest station; ties go to the
    lowest station index, as the host's ``np.argmax`` of -cost (a strict
    comparison over the K rows, elementwise: XLA CPU's variadic argmax
    reduction is slower). ``logit``: argmax(-C / temperature + g) over
    reachable stations with standard Gumbel noise g [K, V] (drawn from a JAX
    key, so it agrees with the host in distribution, not draw by draw).
    """
    reachable = jnp.isfinite(cost)
    if choice == "argmin":
        score = -cost
    elif choice == "logit":
        score = -cost / temperature + gumbel_noise
    else:
        raise ValueError(f"unknown stations.choice {choice!r}")
    score = jnp.where(reachable, score, -jnp.inf)
    best, picked = score[0], jnp.zeros(cost.shape[1], jnp.int32)
    for k in range(1, cost.shape[0]):
        better = score[k] > best
        best, picked = jnp.where(better, score[k], best), jnp.where(better, k, picked)
    return jnp.where(reachable.any(axis=0), picked, -1).astype(jnp.int32)


def pick(table: jax.Array, choice: jax.Array) -> jax.Array:
    """table[choice[i], i] for each EV [V] of a [K, V] table, 0 where choice < 0 (elementwise over the K rows)."""
    picked = jnp.zeros(table.shape[1], table.dtype)
    for k in range(table.shape[0]):
        picked = jnp.where(choice == k, table[k], picked)
    return picked


def station_totals(values: jax.Array, station: jax.Array, num_stations: int) -> jax.Array:
    """Sum a per-EV quantity [V] per station [K] (EVs with station < 0 are ignored); one masked sum per station."""
    return jnp.stack([jnp.sum(jnp.where(station == k, values, 0.0)) for k in range(num_stations)])


def station_counts(mask: jax.Array, station: jax.Array, num_stations: int) -> jax.Array:
    """Count the EVs [V] flagged in ``mask`` per station [K], as one integer sum of per-station bit fields."""
    if num_stations * QUEUE_PLACE_BITS > 31:
        raise ValueError(f"{num_stations} stations do not fit the packed count")
    shift = QUEUE_PLACE_BITS * jnp.maximum(station, 0)
    packed = jnp.sum(jnp.where(mask & (station >= 0), jnp.left_shift(1, shift), 0), dtype=jnp.int32)
    field = (1 << QUEUE_PLACE_BITS) - 1
    return jnp.stack([jnp.right_shift(packed, QUEUE_PLACE_BITS * k) & field for k in range(num_stations)]).astype(
        jnp.int32)


def queue_places(station: jax.Array, present: jax.Array, num_stations: int) -> jax.Array:
    """Place [V] (1-based; 0 when not present) of each present EV in its station's FIFO order of present EVs.

    The twin's EVs are ordered by arrival step (``scenario_arrays`` sorts them
    stably) and an EV joins its station in the step it arrives, so the host's
    FIFO order (join step, EV index) is EV order: an EV's place is the running
    count of present EVs at its station up to it. The K counts are packed into
    one int32 (``QUEUE_PLACE_BITS`` bits each), so this is one cumsum over [V]
    rather than a sort or K cumsums.
    """
    if num_stations * QUEUE_PLACE_BITS > 31:
        raise ValueError(f"{num_stations} stations do not fit the packed queue count")
    shift = QUEUE_PLACE_BITS * jnp.maximum(station, 0)
    code = jnp.where(present & (station >= 0), jnp.left_shift(1, shift), 0).astype(jnp.int32)
    running = jnp.right_shift(jnp.cumsum(code), shift) & ((1 << QUEUE_PLACE_BITS) - 1)
    return jnp.where(present & (station >= 0), running, 0)


def charging_slots(station: jax.Array, present: jax.Array, chargers: jax.Array) -> jax.Array:
    """Bool [V]: the first c present EVs of each station hold a charger (FIFO by join step, then EV index)."""
    place = queue_places(station, present, chargers.shape[0])
    return present & (place >= 1) & (place <= chargers[jnp.maximum(station, 0)])


class Settlement(NamedTuple):
    """Money of one step (CNY), the twin of ``stations.Settlement``; [K] per station."""

    energy_kwh: jax.Array  # [K]
    revenue: jax.Array  # [K]
    purchase_cost: jax.Array  # [K]
    cs_profit: jax.Array  # [K]
    locked_price: jax.Array  # [K] energy-weighted mean locked price (NaN where nothing was sold)
    dg_energy_kwh: jax.Array
    grid_energy_kwh: jax.Array
    dso_supply_cost: jax.Array
    dso_profit: jax.Array


def settle(energy: jax.Array, revenue: jax.Array, cs_purchase_price, dg_supply_kw, dg_price, grid_price,
           dt_hours) -> Settlement:
    """Settle a step from the station energy [K] and revenue [K] (sum of energy x locked price), as ``stations.settle``.

    The stations buy at the CS purchase price; the DSO supplies the first
    P_DG dt kWh from the DG, the rest from the grid.
    """
    purchase = energy * cs_purchase_price
    sold = energy > 0.0
    mean_locked = jnp.where(sold, revenue / jnp.where(sold, energy, 1.0), jnp.nan)
    total = jnp.sum(energy)
    dg_energy = jnp.minimum(total, dg_supply_kw * dt_hours)
    grid_energy = total - dg_energy
    supply = dg_energy * dg_price + grid_energy * grid_price
    return Settlement(energy, revenue, purchase, revenue - purchase, mean_locked, dg_energy, grid_energy, supply,
                      jnp.sum(purchase) - supply)


class Welfare(NamedTuple):
    """Each party's term of one step's social welfare (CNY), the twin of ``stations.Welfare``."""

    cs_profit: jax.Array
    dso_profit: jax.Array
    users_energy_value: jax.Array
    users_payment: jax.Array
    users_time_cost: jax.Array
    users_surplus: jax.Array
    carbon_cost: jax.Array
    welfare: jax.Array


def social_welfare(settlement: Settlement, net_energy_kwh, time_hours, ev_co2_kg, user_value, carbon_price,
                   money_weight, value_of_time, *, welfare: str) -> Welfare:
    """SW by ``economics.welfare`` (``stations.social_welfare``): total surplus or the operator margin, less priced CO2."""
    payment = jnp.sum(settlement.revenue)
    cs_profit = jnp.sum(settlement.cs_profit)
    energy_value = user_value * net_energy_kwh
    money_vot = (1.0 - money_weight) * value_of_time / jnp.where(money_weight > 0, money_weight, 1.0)
    time_cost = jnp.where(money_weight > 0, money_vot * time_hours, 0.0)
    users = energy_value - payment - time_cost
    carbon_cost = carbon_price * ev_co2_kg / 1000.0
    if welfare == "total_surplus":
        total = cs_profit + settlement.dso_profit + users - carbon_cost
    elif welfare == "operator_margin":
        total = cs_profit + settlement.dso_profit - carbon_cost
    else:
        raise ValueError(f"unknown economics.welfare {welfare!r}")
    return Welfare(cs_profit, settlement.dso_profit, energy_value, payment, time_cost, users, carbon_cost, total)
