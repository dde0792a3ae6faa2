"""benchmarks/paired_steps.py: paired differences of two runs' steps by hand, and its one-line errors."""

import sys

import numpy as np
import pytest

from evjax import evaluate
from evjax.errors import UserError
from tests.conftest import ROOT
from tests.test_evaluate import ROWS

sys.path.insert(0, str(ROOT / "benchmarks"))

import paired_steps  # noqa: E402


def reference_rows():
    """ROWS with 100 CNY less welfare and no constraint cost on every step (2 days x 2 steps)."""
    return [{**r, "welfare": r["welfare"] - 100.0, "cost": 0.0, "cost_line": 0.0, "cost_carbon": 0.0} for r in ROWS]


def test_differences_by_hand(tmp_path):
    # ROWS violate on both steps of day 0 and one of day 1: 100 % and 50 %; the reference on none
    evaluate.write_steps(tmp_path, {"cap_adaptive": ROWS})
    (tmp_path / "steps.csv").rename(tmp_path / "a.csv")
    evaluate.write_steps(tmp_path, {"fixed_tuned": reference_rows()})
    result = paired_steps.compare(paired_steps.load_run(f"{tmp_path / 'a.csv'}:cap_adaptive")[1],
                                  paired_steps.load_run(f"{tmp_path / 'steps.csv'}:fixed_tuned")[1])
    assert result["days"] == 2
    assert result["welfare_diff_cny"] == pytest.approx(200.0) and result["welfare_diff_ci95"] == pytest.approx(0.0)
    assert result["violation_diff_pct"] == pytest.approx(75.0)
    assert result["violation_diff_ci95"] == pytest.approx(12.7062 * np.std([100.0, 50.0], ddof=1) / np.sqrt(2),
                                                          rel=1e-4)
    assert (result["welfare_a_cny"], result["welfare_b_cny"]) == pytest.approx((500.0, 300.0))
    assert (result["violation_a_pct"], result["violation_b_pct"]) == pytest.approx((75.0, 0.0))


def test_other_days_are_refused():
    shifted = [{**r, "date": "d9"} if r["day"] == 1 else r for r in reference_rows()]
    with pytest.raises(UserError, match="day 1 is d1 in one run and d9"):
        paired_steps.compare(ROWS, shifted)
    with pytest.raises(UserError, match="different days"):
        paired_steps.compare(ROWS, [r for r in reference_rows() if r["day"] == 0])


def test_bad_arguments_are_one_line_and_status_2(tmp_path, capsys):
    evaluate.write_steps(tmp_path, {"cap_adaptive": ROWS})
    steps = tmp_path / "steps.csv"
    for argv, message in (([f"{steps}:cap_adaptive", f"{steps}:oracle"], "no method 'oracle'"),
                          ([f"{steps}:cap_adaptive", f"{tmp_path / 'none.csv'}:oracle"], "no such steps file"),
                          ([f"{steps}:cap_adaptive", "oracle"], "expected PATH:METHOD")):
        assert paired_steps.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert paired_steps.main([f"{steps}:cap_adaptive", f"{steps}:cap_adaptive"]) == 0
    assert "+0 ± 0" in capsys.readouterr().out


def test_violations_by_step_by_hand():
    """ROWS: step 0 violates on day 0 only (50 % of days), step 1 on both days (100 %); the reference never."""
    np.testing.assert_allclose(paired_steps.violations_by_step(ROWS), [50.0, 100.0])
    np.testing.assert_allclose(paired_steps.violations_by_step(reference_rows()), [0.0, 0.0])


def test_pairs_pool_over_every_pair_and_day(tmp_path, capsys):
    """Pair 1 is ROWS - reference (welfare +200 on both days, violations +100 and +50 pp), pair 2 the reference
    against itself (0, 0): pooled over the 4 (pair, day) differences, welfare 100 ± t(3) 200 / sqrt(3) / 2 and
    violations 37.5 ± t(3) std(100, 50, 0, 0) / 2."""
    evaluate.write_steps(tmp_path, {"cap_adaptive": ROWS, "fixed_tuned": reference_rows()})
    steps = tmp_path / "steps.csv"
    result = paired_steps.pooled([(ROWS, reference_rows()), (reference_rows(), reference_rows())])
    t3 = 3.18245
    assert (result["pairs"], result["days"]) == (2, 4)
    assert result["welfare_diff_cny"] == pytest.approx(100.0)
    assert result["welfare_diff_ci95"] == pytest.approx(t3 * np.std([200, 200, 0, 0], ddof=1) / 2, rel=1e-4)
    assert result["violation_diff_pct"] == pytest.approx(37.5)
    assert result["violation_diff_ci95"] == pytest.approx(t3 * np.std([100, 50, 0, 0], ddof=1) / 2, rel=1e-4)
    # over the two pairs' means (200 and 0; 75 and 0): t(1) = 12.7062 times std / sqrt(2)
    assert result["welfare_pairs_ci95"] == pytest.approx(12.7062 * np.std([200, 0], ddof=1) / np.sqrt(2), rel=1e-4)
    assert result["violation_pairs_ci95"] == pytest.approx(12.7062 * np.std([75, 0], ddof=1) / np.sqrt(2), rel=1e-4)
    assert np.isnan(paired_steps.pooled([(ROWS, reference_rows())])["welfare_pairs_ci95"])
    assert paired_steps.main([f"{steps}:cap_adaptive", f"{steps}:fixed_tuned",
                              "--pair", f"{steps}:fixed_tuned", f"{steps}:fixed_tuned"]) == 0
    assert "pooled over 2 pairs, 4 (pair, day): welfare +100 ± 184 CNY per episode, violation +37.5" in \
        capsys.readouterr().out
    shifted = [{**r, "date": "d9"} if r["day"] == 1 else r for r in reference_rows()]
    with pytest.raises(UserError, match="day 1 is d1 in one run and d9"):
        paired_steps.pooled([(ROWS, reference_rows()), (ROWS, shifted)])
