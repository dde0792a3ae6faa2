"""benchmarks/ablations.py report: each ablation paired per day with the default agent of its own training seed."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"


def _steps(path: Path, per_day: dict) -> None:
    """A steps.csv with the agent's rows: day -> (welfare of each of 4 steps, cost of each step)."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / "steps.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "simulator", "day", "step", "welfare", "cost"])
        for day, (welfare, cost) in per_day.items():
            for step, (w, c) in enumerate(zip(welfare, cost)):
                writer.writerow(["cap_adaptive", "host", day, step, w, c])


def _report(out: Path, *args) -> list[dict]:
    subprocess.run([sys.executable, str(SCRIPT), "report", "--out", str(out), "--names", "horizon_6", *args],
                   check=True, capture_output=True)
    with (out / "ablations.csv").open() as f:
        return list(csv.DictReader(f))


def test_pairs_each_seed_with_its_own_default_agent(tmp_path):
    """Seed 0: the ablation earns 10 and 30 CNY more on days 0 and 1 and violates on 1 of 4 steps more on day 1
    (+0 and +25 pp); seed 1: 40 CNY less on both days, the same violations. Days only one run has are ignored."""
    runs = tmp_path / "runs"
    _steps(runs / "cap_adaptive-seed0" / "eval", {0: ([100, 0, 0, 0], [0, 0, 0, 0]), 1: ([50] * 4, [0, 0, 0, 0]),
                                                  7: ([0] * 4, [1] * 4)})
    _steps(runs / "ablation-horizon_6" / "eval", {0: ([110, 0, 0, 0], [0, 0, 0, 0]),
                                                  1: ([50, 50, 50, 80], [0, 0.2, 0, 0])})
    _steps(runs / "cap_adaptive-seed1" / "eval", {0: ([10] * 4, [0.1, 0, 0, 0]), 1: ([10] * 4, [0] * 4)})
    _steps(runs / "ablation-horizon_6-seed1" / "eval", {0: ([0] * 4, [0.3, 0, 0, 0]), 1: ([0] * 4, [0] * 4)})

    one = _report(tmp_path)
    assert len(one) == 1 and one[0]["seed"] == "0" and one[0]["days"] == "2"
    assert float(one[0]["welfare_diff_cny"]) == pytest.approx(20.0)
    assert float(one[0]["violation_diff_pp"]) == pytest.approx(12.5)
    assert float(one[0]["welfare_diff_ci95"]) == pytest.approx(12.706 * 14.142 / 2 ** 0.5, rel=1e-3)  # t(1) sd/sqrt(n)

    rows = {r["seed"]: r for r in _report(tmp_path, "--seeds", "0", "1")}
    assert float(rows["1"]["welfare_diff_cny"]) == pytest.approx(-40.0)
    assert float(rows["1"]["welfare_diff_ci95"]) == 0.0
    assert float(rows["1"]["violation_diff_pp"]) == 0.0
    assert float(rows["all"]["welfare_diff_cny"]) == pytest.approx((10 + 30 - 40 - 40) / 4)
    assert float(rows["all"]["violation_diff_pp"]) == pytest.approx(25.0 / 4)
    table = (tmp_path / "ablations.md").read_text()
    assert "| seed 0 | seed 1 | all days |" in table and "**-10 ±" in table
