"""Evaluation tables from hand-made step rows, and the steps.csv round trip."""

import numpy as np
import pytest

from evjax import evaluate
from evjax.config import Config

CFG = Config()


def row(day, step, welfare, cost_line, cost_carbon, energy, co2, cs, dso, users, time_cost, loading=(0.5, 0.5, 0.5)):
    return {
        "day": day, "date": f"d{day}", "step": step, "price": np.array([1.25, 1.4, 1.3]),
        "evs_present": np.array([1.0, 2.0, 3.0]), "line_loading": np.array(loading), "ev_energy_kwh": energy,
        "carbon_intensity": 840.0, "ev_carbon_intensity": 840.0, "system_carbon_intensity": 830.0,
        "ev_co2_kg": co2, "welfare": welfare, "cost": cost_line + cost_carbon, "cost_line": cost_line,
        "cost_carbon": cost_carbon, "cs_profit": cs, "dso_profit": dso, "users_surplus": users,
        "users_time_cost": time_cost, "min_voltage_pu": 0.95, "unserved": 0, "plan_ms": 2.0,
    }


ROWS = [
    row(0, 0, 100.0, 0.05, 0.0, 100.0, 85.0, 50.0, 40.0, 10.0, 20.0, loading=(0.95, 0.5, 0.5)),
    row(0, 1, 200.0, 0.0, 0.02, 200.0, 176.0, 100.0, 80.0, 20.0, 30.0),
    row(1, 0, 300.0, 0.0, 0.0, 100.0, 80.0, 150.0, 120.0, 30.0, 10.0),
    row(1, 1, 400.0, 0.05, 0.01, 100.0, 88.0, 200.0, 160.0, 40.0, 0.0, loading=(0.5, 0.95, 0.5)),
]


def test_summary_by_hand():
    s = evaluate.summarise("fixed_mid", ROWS, CFG)
    assert s["welfare_cny"] == pytest.approx(500.0)  # days: 300 and 700
    # 95 % t-interval of two values: t(0.975, 1) = 12.706 x std 282.84 / sqrt 2
    assert s["welfare_ci95"] == pytest.approx(12.7062 * np.std([300.0, 700.0], ddof=1) / np.sqrt(2), rel=1e-4)
    assert s["total_cost"] == pytest.approx(0.13)
    assert s["steps_line_over_limit_pct"] == 50.0 and s["steps_carbon_over_limit_pct"] == 50.0
    assert s["steps_any_violation_pct"] == 75.0
    assert s["ev_carbon_intensity"] == pytest.approx(1000.0 * 429.0 / 500.0)  # energy-weighted
    assert s["ev_co2_t"] == pytest.approx(0.429 / 2)
    assert s["users_time_cost_cny"] == pytest.approx(30.0)
    assert (s["cs_share_pct"], s["dso_share_pct"], s["users_share_pct"]) == pytest.approx((50.0, 40.0, 10.0))


def test_steps_round_trip(tmp_path):
    evaluate.write_steps(tmp_path, {"fixed_mid": ROWS})
    back = evaluate.read_steps(tmp_path / "steps.csv")["fixed_mid"]
    assert len(back) == len(ROWS)
    for a, b in zip(ROWS, back):
        assert set(b) == set(a) - {"method"}
        for key, value in a.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(b[key], value)
            else:
                assert b[key] == value
