"""Carbon intensity of the power drawn at each bus and of the whole feeder (SPEC 4), in kg CO2/MWh.

Two attribution methods: ``proportional_sharing`` (carbon emission flow on the
solved power flow) and ``fixed_shares`` (the source project's rule). Both work
on explicit arrays so that any solved radial network (a hand-built 3-bus
pandapower net as well as the 33-bus feeder) can be fed to them.
"""

from __future__ import annotations

import numpy as np

from evjax.config import CarbonConfig


def proportional_sharing(
    num_buses: int,
    from_bus: np.ndarray,
    to_bus: np.ndarray,
    p_from_mw: np.ndarray,
    p_to_mw: np.ndarray,
    source_bus: np.ndarray,
    source_p_mw: np.ndarray,
    source_intensity: np.ndarray,
) -> np.ndarray:
    """Carbon intensity of every bus by proportional sharing along the solved branch flows.

    Host side, not jittable. Shapes: U buses, L branches, G sources.
    A branch delivers power to the bus at its receiving end: -p_to if p_from > 0
    and p_to < 0 (flow from -> to), -p_from in the opposite case; losses stay
    with the branch. A bus's intensity is the power-weighted mean of what flows
    into it,

        CI_b = (sum_g P_g CI_g + sum_{l into b} P_l,recv CI_up(l)) / (sum_g P_g + sum_{l into b} P_l,recv),

    over the sources g at b with positive injection and the branches l that
    deliver power to b from their upstream bus up(l). Buses are visited in
    flow order (Kahn's topological sort of the directed flow graph, starting
    from the slack and the generators), so every upstream intensity is known
    when a bus is reached. A bus with neither inflow nor generation gets NaN.
    Raises ``ValueError`` if the flow directions form a cycle.
    """
    from_bus = np.asarray(from_bus, dtype=np.int64)  # [L]
    to_bus = np.asarray(to_bus, dtype=np.int64)  # [L]
    p_from_mw = np.asarray(p_from_mw, dtype=float)  # [L]
    p_to_mw = np.asarray(p_to_mw, dtype=float)  # [L]
    forward = (p_from_mw > 0.0) & (p_to_mw < 0.0)
    backward = (p_from_mw < 0.0) & (p_to_mw > 0.0)
    upstream = np.concatenate([from_bus[forward], to_bus[backward]])
    downstream = np.concatenate([to_bus[forward], from_bus[backward]])
    delivered = np.concatenate([-p_to_mw[forward], -p_from_mw[backward]])

    injection = np.clip(np.asarray(source_p_mw, dtype=float), 0.0, None)  # [G]
    source_bus = np.asarray(source_bus, dtype=np.int64)
    weighted = np.bincount(source_bus, injection * np.asarray(source_intensity, dtype=float), minlength=num_buses)
    power = np.bincount(source_bus, injection, minlength=num_buses)

    indegree = np.bincount(downstream, minlength=num_buses)
    order = np.argsort(upstream, kind="stable")
    starts = np.searchsorted(upstream[order], np.arange(num_buses + 1))
    intensity = np.full(num_buses, np.nan)
    ready = [b for b in range(num_buses) if indegree[b] == 0]
    visited = 0
    while ready:
        bus = ready.pop()
        visited += 1
        if power[bus] > 0.0:
            intensity[bus] = weighted[bus] / power[bus]
        for edge in order[starts[bus]:starts[bus + 1]]:
            child = downstream[edge]
            weighted[child] += delivered[edge] * intensity[bus]
            power[child] += delivered[edge]
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    if visited != num_buses:
        raise ValueError("branch flows form a directed cycle; proportional sharing needs a radial flow pattern")
    return intensity


def fixed_shares(
    num_buses: int,
    dg_p_mw: float,
    grid_p_mw: float,
    station_buses: np.ndarray,
    station_dg_shares: np.ndarray,
    dg_intensity: float,
    grid_intensity: float,
) -> np.ndarray:
    """Bus intensities of the source project's rule: system-wide mix everywhere, fixed mixes at stations.

    Host side, not jittable. With s = P_DG / (P_DG + P_grid) (negative
    injections count as 0), every bus gets s CI_DG + (1 - s) CI_grid except the
    station buses, which get s_k CI_DG + (1 - s_k) CI_grid with their fixed DG share s_k.
    """
    dg, grid = max(dg_p_mw, 0.0), max(grid_p_mw, 0.0)
    share = dg / (dg + grid) if dg + grid > 0.0 else 0.0
    shares = np.full(num_buses, share)
    shares[np.asarray(station_buses, dtype=np.int64)] = np.asarray(station_dg_shares, dtype=float)
    return shares * dg_intensity + (1.0 - shares) * grid_intensity


def system_intensity(load_p_mw: np.ndarray, bus_intensity: np.ndarray) -> float:
    """Load-weighted feeder intensity CI = sum_b P_load,b CI_b / sum_b P_load,b (buses with positive load only)."""
    load_p_mw = np.asarray(load_p_mw, dtype=float)
    loaded = load_p_mw > 0.0
    return float(np.sum(load_p_mw[loaded] * bus_intensity[loaded]) / np.sum(load_p_mw[loaded]))


def ev_charging_intensity(station_energy_kwh: np.ndarray, station_intensity: np.ndarray) -> tuple[float, float]:
    """Intensity of the energy the EVs draw and its CO2: (CI_EV kg/MWh, CO2 kg).

    CI_EV = sum_k E_k CI_k / sum_k E_k over the stations k, with CI_k the
    intensity at the station's bus (the carbon emission flow of Kang et al.,
    2012, when the bus intensities come from proportional sharing); CO2 =
    sum_k E_k CI_k / 1000 (kWh x g/kWh). With no EV energy CI_EV is the plain
    mean of the station intensities (what the next kWh would carry, stations
    weighted alike) and the CO2 is 0.
    """
    energy = np.asarray(station_energy_kwh, dtype=float)  # [K]
    intensity = np.asarray(station_intensity, dtype=float)  # [K]
    total = float(energy.sum())
    if total <= 0.0:
        return float(intensity.mean()), 0.0
    emitted = float(np.sum(energy * intensity))
    return emitted / total, emitted / 1000.0


def bus_intensities(
    carbon_cfg: CarbonConfig,
    num_buses: int,
    from_bus: np.ndarray,
    to_bus: np.ndarray,
    p_from_mw: np.ndarray,
    p_to_mw: np.ndarray,
    slack_bus: int,
    slack_p_mw: float,
    dg_bus: np.ndarray,
    dg_p_mw: np.ndarray,
    station_buses: np.ndarray,
) -> np.ndarray:
    """Bus intensities by the configured method; the slack is the external grid, every static generator a DG."""
    dg_bus = np.asarray(dg_bus, dtype=np.int64)
    dg_p_mw = np.asarray(dg_p_mw, dtype=float)
    if carbon_cfg.method == "proportional_sharing":
        return proportional_sharing(
            num_buses, from_bus, to_bus, p_from_mw, p_to_mw,
            np.concatenate([[slack_bus], dg_bus]),
            np.concatenate([[slack_p_mw], dg_p_mw]),
            np.concatenate([[carbon_cfg.grid_intensity], np.full(len(dg_bus), carbon_cfg.dg_intensity)]),
        )
    if carbon_cfg.method == "fixed_shares":
        return fixed_shares(
            num_buses, float(np.sum(dg_p_mw)), slack_p_mw, station_buses, np.asarray(carbon_cfg.station_dg_shares),
            carbon_cfg.dg_intensity, carbon_cfg.grid_intensity,
        )
    raise ValueError(f"unknown carbon.method {carbon_cfg.method!r}")


def from_pandapower(net, carbon_cfg: CarbonConfig, station_buses=()) -> tuple[np.ndarray, float]:
    """Bus intensities [U] and the load-weighted feeder intensity of a solved pandapower net.

    Host side, not jittable. Reads ``res_line``, ``res_ext_grid`` and
    ``res_sgen``; every static generator is a DG, the (single) external grid the
    grid source. Bus indices must run 0..U-1.
    """
    live = net.line["in_service"].to_numpy()
    bus_ci = bus_intensities(
        carbon_cfg,
        len(net.bus),
        net.line["from_bus"].to_numpy()[live],
        net.line["to_bus"].to_numpy()[live],
        net.res_line["p_from_mw"].to_numpy()[live],
        net.res_line["p_to_mw"].to_numpy()[live],
        int(net.ext_grid["bus"].iloc[0]),
        float(net.res_ext_grid["p_mw"].iloc[0]),
        net.sgen["bus"].to_numpy(),
        net.res_sgen["p_mw"].to_numpy(),
        np.asarray(station_buses, dtype=np.int64),
    )
    load_p = np.bincount(net.load["bus"].to_numpy(), net.res_load["p_mw"].to_numpy(), minlength=len(net.bus))
    return bus_ci, system_intensity(load_p, bus_ci)
