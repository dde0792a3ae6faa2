"""Queueing, choice, FIFO charging and settlement against textbook and hand-computed values (SPEC 7)."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

from evjax import stations
from evjax.config import Config

CFG = Config()


def exact_erlang_c(c: int, a: Fraction) -> Fraction:
    """Textbook Erlang C with exact rationals: (a^c / c!) (c / (c - a)) / (sum_{n<c} a^n / n! + a^c / c! c / (c - a))."""
    top = a**c / math.factorial(c) * Fraction(c) / (c - a)
    return top / (sum(a**n / math.factorial(n) for n in range(c)) + top)


def test_erlang_c_textbook_mm2():
    # M/M/2 with lambda = 1 /h, mu = 0.75 /h: a = 4/3, rho = 2/3.
    # P0 = 1 / (1 + 4/3 + (16/9) / (2 (1 - 2/3))) = 1 / (1 + 4/3 + 8/3) = 1/5,
    # C = (a^2 / 2!) / (1 - rho) * P0 = (8/9) * 3 * (1/5) = 8/15,
    # Wq = C / (c mu - lambda) = (8/15) / (1.5 - 1) = 16/15 h.
    # Via the recursion: B1 = a / (1 + a) = 4/7, B2 = a B1 / (2 + a B1) = 8/29, C = 2 B2 / (2 - a (1 - B2)) = 8/15.
    assert stations.erlang_b(2, 4 / 3) == pytest.approx(8 / 29, rel=1e-14)
    assert stations.erlang_c(2, 4 / 3) == pytest.approx(8 / 15, rel=1e-14)
    assert stations.mgc_wait_hours(1.0, 1 / 0.75, 1.0, 2, 10.0) == pytest.approx(16 / 15, rel=1e-14)


def test_erlang_c_mm1_is_rho_and_allen_cunneen_halves_md():
    assert stations.erlang_c(1, 0.6) == pytest.approx(0.6, rel=1e-14)
    # M/M/1: Wq = rho / (mu - lambda); deterministic service (SCV 0) halves it.
    mm1 = stations.mgc_wait_hours(0.6, 1.0, 1.0, 1, 10.0)
    assert mm1 == pytest.approx(0.6 / 0.4, rel=1e-14)
    assert stations.mgc_wait_hours(0.6, 1.0, 0.0, 1, 10.0) == pytest.approx(mm1 / 2, rel=1e-14)


@pytest.mark.parametrize("c, a", [(20, Fraction(15)), (30, Fraction(57, 2)), (5, Fraction(1, 3))])
def test_erlang_c_recursion_matches_exact_factorial_formula(c, a):
    assert stations.erlang_c(c, float(a)) == pytest.approx(float(exact_erlang_c(c, a)), rel=1e-12)


def test_erlang_c_is_stable_for_a_thousand_chargers():
    value = stations.erlang_c(1000, 990.0)
    assert 0.0 < value < 1.0 and math.isfinite(value)
    assert value == pytest.approx(float(exact_erlang_c(1000, Fraction(990))), rel=1e-9)


def test_saturated_and_idle_stations():
    assert stations.mgc_wait_hours(10.0, 1.0, 0.3, 10, 7.5) == 7.5  # rho = 1
    assert stations.mgc_wait_hours(50.0, 1.0, 0.3, 10, 7.5) == 7.5  # rho = 5
    assert stations.mgc_wait_hours(0.0, 1.0, 0.3, 10, 7.5) == 0.0
    assert stations.mgc_wait_hours(9.999, 1.0, 0.3, 10, 7.5) <= 7.5


def test_expected_wait_zero_rule_and_backlog():
    chargers = np.array([4, 4, 4])
    wait = stations.expected_wait_hours(
        arrival_rate_per_h=np.array([0.4, 3.6, 0.4]), waiting=np.array([0, 0, 3]), chargers=chargers,
        mean_service_h=0.5, service_scv=0.5, max_wait_hours=10.0, zero_wait_utilisation=0.5,
    )
    assert wait[0] == 0.0  # rho = 0.4 * 0.5 / 4 = 0.05, nobody waiting
    assert wait[1] == 0.0  # rho = 3.6 * 0.5 / 4 = 0.45 < 0.5, nobody waiting
    # 3 waiting, all 4 chargers busy: (3 + 1) * 0.5 / 4 = 0.5 h from the backlog
    assert wait[2] == pytest.approx(0.5)
    busy = stations.expected_wait_hours(np.array([7.2]), np.array([0]), np.array([4]), 0.5, 0.5, 10.0, 0.5)
    # rho = 0.9: Allen-Cunneen M/G/4 delay
    expected = stations.erlang_c(4, 3.6) / (4 / 0.5 - 7.2) * 0.75
    assert busy[0] == pytest.approx(expected, rel=1e-12)


def test_service_time_stats_in_whole_steps():
    # 11.25 kWh per step: 10 kWh -> 1 step, 20 kWh -> 2 steps, 40 kWh -> 4 steps but stay limit 0.6 h -> 3 steps
    mean, scv = stations.service_time_stats(np.array([10.0, 20.0, 40.0]), np.array([2.0, 2.0, 0.6]), 45.0, 0.25)
    hours = np.array([0.25, 0.5, 0.75])
    assert mean == pytest.approx(0.5)
    assert scv == pytest.approx(hours.var() / 0.25)


def test_generalized_cost_and_reachability():
    price = np.array([1.2, 1.4, 1.3])
    need = np.array([20.0, 30.0])
    battery = np.array([50.0, 1.0])
    travel_energy = np.array([[1.0, 2.0, 0.5], [0.5, 2.0, 3.0]])
    travel_time = np.array([[0.1, 0.2, 0.3], [0.05, 0.1, 0.2]])
    wait = np.array([0.0, 0.5, 0.0])
    cost = stations.generalized_cost(price, need, battery, travel_energy, travel_time, wait, 0.5, 60.0)
    # EV 0 at CS2: 0.5 * 1.4 * 22 + 0.5 * 60 * (0.2 + 0.5) = 15.4 + 21 = 36.4
    assert cost[0, 1] == pytest.approx(36.4)
    assert cost[0, 0] == pytest.approx(0.5 * 1.2 * 21.0 + 30.0 * 0.1)
    # EV 1 has 1 kWh in its battery: only CS1 (0.5 kWh away) is reachable
    assert np.isfinite(cost[1, 0]) and np.isinf(cost[1, 1]) and np.isinf(cost[1, 2])
    choice = stations.choose_stations(cost, "argmin", 1.0)
    assert choice.tolist() == [int(np.argmin(cost[0])), 0]
    nowhere = stations.choose_stations(np.full((2, 3), np.inf), "argmin", 1.0)
    assert nowhere.tolist() == [-1, -1]


def test_choice_is_monotone_in_own_price_for_argmin_and_logit():
    rng = np.random.default_rng(0)
    n = 400
    need = rng.uniform(5.0, 50.0, n)
    travel_energy = rng.uniform(0.0, 3.0, (n, 3))
    travel_time = rng.uniform(0.0, 0.4, (n, 3))
    battery = rng.uniform(1.0, 60.0, n)
    noise = stations.gumbel(np.random.default_rng(1), (n, 3))
    for mode in ("argmin", "logit"):
        for k in range(3):
            counts = []
            for own in np.linspace(1.0, 1.6, 13):
                price = np.array([1.25, 1.4, 1.3])
                price[k] = own
                cost = stations.generalized_cost(price, need, battery, travel_energy, travel_time, np.zeros(3), 0.5, 60.0)
                counts.append(int(np.sum(stations.choose_stations(cost, mode, 2.0, noise) == k)))
            assert all(b <= a for a, b in zip(counts, counts[1:])), (mode, k, counts)
            assert counts[0] > counts[-1]


def test_logit_frequencies_follow_the_softmax():
    cost = np.tile(np.array([[10.0, 11.0, 13.0]]), (200_000, 1))
    noise = stations.gumbel(np.random.default_rng(3), cost.shape)
    choice = stations.choose_stations(cost, "logit", 2.0, noise)
    probs = np.exp(-cost[0] / 2.0) / np.exp(-cost[0] / 2.0).sum()
    assert np.bincount(choice, minlength=3) / len(choice) == pytest.approx(probs, abs=5e-3)


def test_fifo_slots_and_charging():
    station = np.array([0, 0, 0, 1, 0, -1])
    present = np.array([True, True, True, True, False, False])
    join = np.array([2, 0, 1, 0, 0, 0])
    holding = stations.charging_slots(station, present, join, np.array([2, 1, 1]))
    # station 0 has 2 chargers: the EVs that joined at steps 0 and 1 (indices 1, 2), not the step-2 one
    assert holding.tolist() == [False, True, True, True, False, False]
    remaining = np.array([30.0, 5.0, 11.25, 50.0, 30.0, 0.0])
    energy = stations.charge(remaining, holding, 45.0, 0.25)
    assert energy.tolist() == [0.0, 5.0, 11.25, 11.25, 0.0, 0.0]


def test_settlement_hand_values():
    econ = CFG.economics
    energy = np.array([100.0, 50.0, 80.0, 70.0])
    locked = np.array([1.2, 1.3, 1.4, 1.25])
    station = np.array([0, 0, 1, 2])
    s = stations.settle(energy, locked, station, 3, econ, 0.25)
    assert s.energy_kwh.tolist() == [150.0, 80.0, 70.0]
    assert s.revenue == pytest.approx([120.0 + 65.0, 112.0, 87.5])
    assert s.locked_price[0] == pytest.approx(185.0 / 150.0)
    assert s.cs_profit == pytest.approx(s.revenue - 0.7 * s.energy_kwh)
    # 300 kWh: the DG covers 900 kW * 0.25 h = 225 kWh at 0.3, the grid 75 kWh at 0.5 -> 67.5 + 37.5 = 105 CNY
    assert s.dg_energy_kwh == pytest.approx(225.0) and s.grid_energy_kwh == pytest.approx(75.0)
    assert s.dso_supply_cost == pytest.approx(105.0)
    assert s.dso_profit == pytest.approx(0.7 * 300.0 - 105.0)
    assert s.operator_margin == pytest.approx(120.0 + 65.0 + 112.0 + 87.5 - 105.0)
    small = stations.settle(np.array([100.0]), np.array([1.2]), np.array([1]), 3, econ, 0.25)
    assert small.dso_supply_cost == pytest.approx(30.0) and np.isnan(small.locked_price[0])


def test_value_of_time_in_money_follows_the_choice_weights():
    assert stations.money_value_of_time(0.5, 60.0) == pytest.approx(60.0)
    # w = 0.8: the choice trades 0.8 CNY against 0.2 x 60 CNY-equivalent per hour -> 15 CNY/h
    assert stations.money_value_of_time(0.8, 60.0) == pytest.approx(15.0)


def test_social_welfare_terms_by_hand():
    econ = CFG.economics
    # 100 kWh at CS1 locked at 1.2 and 50 kWh at CS2 locked at 1.4; the DG covers all 150 kWh
    s = stations.settle(np.array([100.0, 50.0]), np.array([1.2, 1.4]), np.array([0, 1]), 3, econ, 0.25)
    # 4 kWh of it replaced energy spent driving; 0.5 h driving + 0.25 h queueing at 60 CNY/h; 120 kg CO2
    total = stations.social_welfare(s, 150.0 - 4.0, 0.75, 120.0, econ, 0.5, 60.0)
    assert total.cs_profit == pytest.approx(100 * 0.5 + 50 * 0.7)
    assert total.dso_profit == pytest.approx(150 * 0.7 - 150 * 0.3)
    assert total.users_payment == pytest.approx(190.0)
    assert total.users_energy_value == pytest.approx(2.0 * 146.0)
    assert total.users_time_cost == pytest.approx(45.0)
    assert total.users_surplus == pytest.approx(292.0 - 190.0 - 45.0)
    assert total.carbon_cost == 0.0
    assert total.welfare == pytest.approx(292.0 - 45.0 - 150 * 0.3)  # payments and the purchase price cancel
    margin = stations.social_welfare(s, 146.0, 0.75, 120.0, dataclasses.replace(econ, welfare="operator_margin"),
                                     0.5, 60.0)
    assert margin.welfare == pytest.approx(190.0 - 45.0)  # revenue - supply cost
    priced = stations.social_welfare(s, 146.0, 0.75, 120.0, dataclasses.replace(econ, carbon_price_cny_per_t=100.0),
                                     0.5, 60.0)
    assert priced.carbon_cost == pytest.approx(12.0)  # 0.12 t x 100 CNY/t
    assert priced.welfare == pytest.approx(total.welfare - 12.0)
