"""The 13-node city road network: speeds, fastest paths, travel time and energy (SPEC 5)."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np

from evjax.config import RoadsConfig


def class_speed_kmh(free_speed_kmh: float, saturation: float, beta_base: float, beta_cubic: float) -> float:
    """BPR-like speed v = v0 / (1 + x^beta) with beta = beta_base + beta_cubic * x^3 (km/h)."""
    beta = beta_base + beta_cubic * saturation**3
    return free_speed_kmh / (1.0 + saturation**beta)


def energy_per_km(speed_kmh: float, coefficients: tuple[float, ...]) -> float:
    """Consumption e(v) = a v + b / v + c (kWh/km) at speed v (km/h)."""
    a, b, c = coefficients
    return a * speed_kmh + b / speed_kmh + c


def road_speeds(roads_cfg: RoadsConfig, step: int) -> dict[str, float]:
    """Speed of every road class at a step (km/h)."""
    return {
        cls: class_speed_kmh(
            roads_cfg.free_speed_kmh[cls], roads_cfg.saturation[cls][step], roads_cfg.beta_base[cls], roads_cfg.beta_cubic[cls]
        )
        for cls in roads_cfg.free_speed_kmh
    }


def build_road_graph(roads_cfg: RoadsConfig, step: int) -> nx.Graph:
    """Undirected road graph at a step; each edge carries km, class, speed, time_h and energy_kwh.

    Host side, not jittable. time_h = km / v(class, step); energy_kwh = km * e(v).
    """
    speeds = road_speeds(roads_cfg, step)
    graph = nx.Graph()
    graph.add_nodes_from(range(1, roads_cfg.num_nodes + 1))
    for u, v, km, cls in roads_cfg.edges:
        speed = speeds[cls]
        graph.add_edge(
            u, v, km=float(km), road_class=cls, speed_kmh=speed,
            time_h=km / speed, energy_kwh=km * energy_per_km(speed, roads_cfg.energy_coefficients),
        )
    return graph


@dataclasses.dataclass(frozen=True)
class TravelTables:
    """Fastest-path travel time and energy from every road node to every station, per step.

    Shapes: T steps, O = num_nodes origins (row o is road node o + 1), K stations.
    Unreachable pairs (disconnected graph) hold inf.
    """

    time_h: np.ndarray  # [T, O, K]
    energy_kwh: np.ndarray  # [T, O, K]


def travel_tables(roads_cfg: RoadsConfig, num_steps: int) -> TravelTables:
    """Dijkstra by travel time from each station, for every step; energy summed over the chosen path.

    Host side, not jittable. Roads are undirected, so the fastest path from a
    station to node o is the fastest path from o to the station. Travel energy
    = sum over the path's edges of km * e(v) (not time times a per-km rate).
    """
    num_nodes, num_stations = roads_cfg.num_nodes, len(roads_cfg.station_nodes)
    time_h = np.full((num_steps, num_nodes, num_stations), np.inf)
    energy_kwh = np.full((num_steps, num_nodes, num_stations), np.inf)
    for step in range(num_steps):
        graph = build_road_graph(roads_cfg, step)
        for k, station in enumerate(roads_cfg.station_nodes):
            times, paths = nx.single_source_dijkstra(graph, station, weight="time_h")
            for node, path in paths.items():
                time_h[step, node - 1, k] = times[node]
                energy_kwh[step, node - 1, k] = sum(graph.edges[a, b]["energy_kwh"] for a, b in zip(path[:-1], path[1:]))
    return TravelTables(time_h=time_h, energy_kwh=energy_kwh)
