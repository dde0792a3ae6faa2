"""Carbon intensity of the power drawn at each bus, in JAX (twin of ``evjax/carbon.py``), kg CO2/MWh.

Pure JAX on one solved power flow (vmap over a batch); float64 under the
twin's ``jax.enable_x64`` context. Shapes: U buses, L lines in service, G
sources, K stations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def proportional_sharing(
    from_bus: np.ndarray, to_bus: np.ndarray, p_from_mw: jax.Array, p_to_mw: jax.Array, source_bus: np.ndarray,
    source_p_mw: jax.Array, source_intensity: jax.Array, *, num_buses: int, max_depth: int,
) -> jax.Array:
    """Bus intensities [U] by proportional sharing along the solved branch flows, as ``carbon.proportional_sharing``.

    A branch delivers -p_to to its to bus when p_from > 0 and p_to < 0, -p_from
    to its from bus in the opposite case, nothing otherwise; losses stay with
    the branch. Every bus b satisfies

        (sum_g P_g + sum_{l into b} P_l,recv) CI_b - sum_{l into b} P_l,recv CI_up(l) = sum_g P_g CI_g

    over its sources with positive injection and its delivering branches. The
    flow graph of a radial feeder is acyclic, so the Jacobi iteration
    CI <- (sum_g P_g CI_g + sum_l P_l,recv CI_up(l)) / (sum_g P_g + sum_l P_l,recv)
    started from the local generation is exact once it has run as many times
    as the longest directed path (``max_depth``, at most the tree's diameter),
    whatever the flow directions: no topological sort and no matrix
    factorisation. A bus with neither inflow nor generation gets NaN (0/0), and
    so does everything it feeds, as on the host. ``from_bus``, ``to_bus``,
    ``source_bus`` are static index arrays.
    """
    from_bus, to_bus = np.asarray(from_bus), np.asarray(to_bus)
    forward = (p_from_mw > 0.0) & (p_to_mw < 0.0)  # [L]
    backward = (p_from_mw < 0.0) & (p_to_mw > 0.0)
    into_to = jnp.where(forward, -p_to_mw, 0.0)  # [L] delivered to the to bus
    into_from = jnp.where(backward, -p_from_mw, 0.0)  # [L] delivered to the from bus
    injection = jnp.maximum(source_p_mw, 0.0)  # [G]
    emitted = jnp.zeros(num_buses).at[np.asarray(source_bus)].add(injection * source_intensity)  # [U]
    power = (jnp.zeros(num_buses).at[np.asarray(source_bus)].add(injection)
             .at[to_bus].add(into_to).at[from_bus].add(into_from))  # [U]

    def relax(_, intensity):
        arriving = (jnp.zeros(num_buses).at[to_bus].add(into_to * intensity[from_bus])
                    .at[from_bus].add(into_from * intensity[to_bus]))
        return (emitted + arriving) / power

    return jax.lax.fori_loop(0, max_depth, relax, emitted / power)


def fixed_shares(
    dg_p_mw: jax.Array, grid_p_mw: jax.Array, station_dg_shares: jax.Array, dg_intensity: jax.Array,
    grid_intensity: jax.Array, *, num_buses: int, station_buses: np.ndarray,
) -> jax.Array:
    """Bus intensities [U] of the source's rule (``carbon.fixed_shares``): system mix everywhere, fixed DG shares at stations."""
    dg, grid_p = jnp.maximum(dg_p_mw, 0.0), jnp.maximum(grid_p_mw, 0.0)
    total = dg + grid_p
    share = jnp.where(total > 0.0, dg / jnp.where(total > 0.0, total, 1.0), 0.0)
    shares = jnp.full(num_buses, share).at[np.asarray(station_buses)].set(station_dg_shares)
    return shares * dg_intensity + (1.0 - shares) * grid_intensity


def system_intensity(load_p_mw: jax.Array, bus_intensity: jax.Array) -> jax.Array:
    """Load-weighted feeder intensity over the buses with positive load (``carbon.system_intensity``)."""
    loaded = load_p_mw > 0.0
    weight = jnp.where(loaded, load_p_mw, 0.0)
    return jnp.sum(jnp.where(loaded, weight * bus_intensity, 0.0)) / jnp.sum(weight)


def ev_charging_intensity(station_energy_kwh: jax.Array, station_intensity: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(CI_EV kg/MWh, CO2 kg) of the EV energy [K] (``carbon.ev_charging_intensity``).

    CI_EV = sum_k E_k CI_k / sum_k E_k, CO2 = sum_k E_k CI_k / 1000; without EV
    energy CI_EV is the plain mean of the station intensities and CO2 is 0.
    """
    total = jnp.sum(station_energy_kwh)
    emitted = jnp.sum(station_energy_kwh * station_intensity)
    charged = total > 0.0
    intensity = jnp.where(charged, emitted / jnp.where(charged, total, 1.0), jnp.mean(station_intensity))
    return intensity, jnp.where(charged, emitted / 1000.0, 0.0)
