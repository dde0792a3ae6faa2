"""Road speeds, fastest paths, travel time and energy against hand computations (SPEC 5)."""

import math

import networkx as nx
import numpy as np
import pytest

from evjax import roads
from evjax.config import Config

CFG = Config()


def hand_speed(v0, x, base, cubic):
    beta = base + cubic * x**3
    return v0 / (1.0 + x**beta)


def hand_energy_per_km(v):
    return 0.004 * v + 5.492 / v - 0.179


def test_class_speeds_at_step_zero_match_the_bpr_formula():
    # u at step 0: x = 0.515, beta = 1.726 + 3.15 * 0.515^3 = 2.15626..., v = 70 / (1 + 0.515^2.15626) = 56.49 km/h
    speeds = roads.road_speeds(CFG.roads, 0)
    assert speeds["u"] == pytest.approx(70.0 / (1.0 + 0.515 ** (1.726 + 3.15 * 0.515**3)), rel=1e-12)
    assert speeds["u"] == pytest.approx(56.49, abs=0.01)
    assert speeds["m"] == pytest.approx(hand_speed(50.0, 0.6, 1.726, 3.15), rel=1e-12)
    assert speeds["s"] == pytest.approx(hand_speed(40.0, 0.715, 2.076, 2.87), rel=1e-12)


def test_energy_per_km_hand_value():
    # e(50) = 0.2 + 0.10984 - 0.179 = 0.13084 kWh/km
    assert roads.energy_per_km(50.0, CFG.roads.energy_coefficients) == pytest.approx(0.13084, abs=1e-12)


def test_direct_edge_paths_hand_computed():
    tables = roads.travel_tables(CFG.roads, CFG.env.episode_steps)
    for step in (0, 7):
        v_u = hand_speed(70.0, CFG.roads.saturation["u"][step], 1.726, 3.15)
        # node 4 -> CS1 (node 1): the direct 4.5 km urban road
        assert tables.time_h[step, 3, 0] == pytest.approx(4.5 / v_u, rel=1e-12)
        assert tables.energy_kwh[step, 3, 0] == pytest.approx(4.5 * hand_energy_per_km(v_u), rel=1e-12)
        # a station's own node: zero time and energy
        assert tables.time_h[step, 0, 0] == 0.0 and tables.energy_kwh[step, 1, 1] == 0.0


def test_two_edge_path_beats_the_alternative_by_time():
    # node 12 -> CS2 (node 2) at step 0: 12-13-2 (2.6 km m + 3.2 km u) = 2.6/38.68 + 3.2/56.49 = 0.1239 h
    # against 12-10-2 (4.4 + 2.4 km s) = 6.8/29.62 = 0.2296 h
    tables = roads.travel_tables(CFG.roads, 1)
    v = {c: hand_speed(CFG.roads.free_speed_kmh[c], CFG.roads.saturation[c][0], CFG.roads.beta_base[c],
                       CFG.roads.beta_cubic[c]) for c in "ums"}
    via_13 = 2.6 / v["m"] + 3.2 / v["u"]
    via_10 = 4.4 / v["s"] + 2.4 / v["s"]
    assert via_13 < via_10
    assert tables.time_h[0, 11, 1] == pytest.approx(via_13, rel=1e-12)
    assert tables.energy_kwh[0, 11, 1] == pytest.approx(2.6 * hand_energy_per_km(v["m"]) + 3.2 * hand_energy_per_km(v["u"]),
                                                        rel=1e-12)


def test_fastest_path_is_not_the_shortest_one():
    # node 8 -> CS3 (node 3) at step 0: by km 8-9-11-3 (2.7 + 2.8 + 6.2 = 11.7 km, all m),
    # by time 8-7-3 (6.4 km m + 7.5 km u = 13.9 km) because the urban road is faster.
    tables = roads.travel_tables(CFG.roads, 1)
    v = roads.road_speeds(CFG.roads, 0)
    fastest = 6.4 / v["m"] + 7.5 / v["u"]
    shortest_km = 11.7 / v["m"]
    assert fastest < shortest_km
    assert tables.time_h[0, 7, 2] == pytest.approx(fastest, rel=1e-12)
    energy = 6.4 * hand_energy_per_km(v["m"]) + 7.5 * hand_energy_per_km(v["u"])
    assert tables.energy_kwh[0, 7, 2] == pytest.approx(energy, rel=1e-12)
    # travel energy is km * e(v) per edge, not time times a per-km rate
    assert tables.energy_kwh[0, 7, 2] != pytest.approx(fastest * hand_energy_per_km(v["m"]), rel=1e-3)


def test_tables_match_brute_force_over_all_simple_paths():
    step = 4
    graph = roads.build_road_graph(CFG.roads, step)
    tables = roads.travel_tables(CFG.roads, step + 1)
    for k, station in enumerate(CFG.roads.station_nodes):
        for origin in range(1, CFG.roads.num_nodes + 1):
            if origin == station:
                continue
            best = min(
                (sum(graph.edges[a, b]["time_h"] for a, b in zip(p[:-1], p[1:])), p)
                for p in nx.all_simple_paths(graph, origin, station)
            )
            energy = sum(graph.edges[a, b]["energy_kwh"] for a, b in zip(best[1][:-1], best[1][1:]))
            assert tables.time_h[step, origin - 1, k] == pytest.approx(best[0], rel=1e-12)
            assert tables.energy_kwh[step, origin - 1, k] == pytest.approx(energy, rel=1e-12)


def test_heavier_saturation_slows_every_class():
    for cls in "ums":
        slow = roads.class_speed_kmh(CFG.roads.free_speed_kmh[cls], 0.8, CFG.roads.beta_base[cls], CFG.roads.beta_cubic[cls])
        fast = roads.class_speed_kmh(CFG.roads.free_speed_kmh[cls], 0.4, CFG.roads.beta_base[cls], CFG.roads.beta_cubic[cls])
        assert slow < fast < CFG.roads.free_speed_kmh[cls]
    assert math.isfinite(roads.travel_tables(CFG.roads, 12).time_h.max())
    assert np.all(roads.travel_tables(CFG.roads, 12).energy_kwh >= 0.0)
