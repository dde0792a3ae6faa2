import json

import numpy as np
import pytest

from evjax.config import Config, ConfigError, load
from evjax.data import calibrate, scenarios


def test_calibration_reproduces_the_shipped_figures(paper_data, tmp_path):
    summary = calibrate.calibrate(paper_data, tmp_path)
    shipped = json.loads((calibrate.FIGURES_DIR / "summary.json").read_text())
    assert summary["cleaned_sessions"] == shipped["cleaned_sessions"] == 3354
    assert summary["dropped_rows"]["capacity_over_200_kwh"] == 3
    shipped_table = np.load(calibrate.FIGURES_DIR / "ev_attributes.npz")["attributes"]
    assert shipped_table[:, 0].mean() == pytest.approx(summary["cleaned_mean"]["capacity_kwh"], rel=0.01)
    fresh = np.load(tmp_path / "profiles.npz")
    np.testing.assert_array_equal(fresh["power_kw"], np.load(calibrate.FIGURES_DIR / "profiles.npz")["power_kw"])


def test_shipped_figures_are_small_and_physical():
    total = sum(p.stat().st_size for p in calibrate.FIGURES_DIR.iterdir())
    assert total < 2_000_000
    table = scenarios.load_figures().attributes
    capacity, start, target, duration, laxity = table.T
    assert np.all((capacity > 0) & (capacity <= 200))
    assert np.all((start > 0) & (start <= 1) & (target > start) & (target <= 1))
    assert np.all(duration > 0) and np.all(laxity >= 0)


def test_missing_column_is_named(tmp_path):
    import pandas as pd

    pd.DataFrame({"Start-SOC（%）": [10.0], "End-SOC（%）": [80.0]}).to_excel(tmp_path / "usable_data.xlsx", index=False)
    with pytest.raises(calibrate.UserError, match=r"usable_data\.xlsx.*energy_kwh"):
        calibrate.clean_sessions(tmp_path / "usable_data.xlsx")


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "usable_data.xlsx").write_text("not a spreadsheet")
    with pytest.raises(calibrate.UserError, match="usable_data.xlsx"):
        calibrate.clean_sessions(tmp_path / "usable_data.xlsx")


def test_calibrate_cli_missing_folder_exits_2(tmp_path, capsys):
    assert calibrate.main(["--source", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err


def test_train_and_test_days_are_disjoint_and_cover_all():
    cfg = Config()
    n = len(scenarios.load_figures().dates)
    train = scenarios.split_days(n, cfg.demand.test_every, "train")
    test = scenarios.split_days(n, cfg.demand.test_every, "test")
    assert not set(train) & set(test)
    assert len(train) + len(test) == n
    assert len(test) == n // cfg.demand.test_every


def test_scenario_is_deterministic_per_seed():
    cfg = Config()
    a = scenarios.make_scenario(cfg, "test", day=2, seed=11)
    b = scenarios.make_scenario(cfg, "test", day=2, seed=11)
    c = scenarios.make_scenario(cfg, "test", day=2, seed=12)
    for field in ("arrival_step", "origin_node", "capacity_kwh", "start_soc", "target_soc", "laxity_h"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.date == c.date
    assert not np.array_equal(a.origin_node, c.origin_node) or a.num_evs != c.num_evs


def test_arrivals_follow_the_calibrated_mean():
    cfg = load(None, ["demand.mean_arrivals_per_step=10"])
    figures = scenarios.load_figures()
    rates = scenarios.arrival_rates(cfg, figures)
    assert rates.mean() == pytest.approx(10.0)
    train = scenarios.split_days(len(figures.dates), cfg.demand.test_every, "train")
    expected = rates[train].mean()  # days are drawn uniformly from the train split
    counts = np.array([scenarios.make_scenario(cfg, "train", day=None, seed=s).num_evs for s in range(300)])
    per_step = counts / cfg.env.episode_steps
    assert abs(per_step.mean() - expected) < 4 * per_step.std() / np.sqrt(len(counts))


def test_origin_weights_restrict_origins():
    weights = [0.0] * 13
    weights[6] = 1.0
    cfg = load(None, [f"demand.origin_weights={weights}"])
    sc = scenarios.make_scenario(cfg, "train", day=0, seed=0)
    assert sc.num_evs > 0 and np.all(sc.origin_node == 7)


def test_bad_day_and_split_are_errors():
    cfg = Config()
    with pytest.raises(ValueError, match="out of range"):
        scenarios.make_scenario(cfg, "test", day=10_000)
    with pytest.raises(ValueError, match="split"):
        scenarios.make_scenario(cfg, "validation", day=0)


def test_missing_figures_dir_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="demand.figures_dir"):
        load(None, [f"demand.figures_dir={tmp_path}"])  # the folder lacks the figure files


def test_unreadable_figures_name_the_key(tmp_path):
    for name in ("profiles.npz", "ev_attributes.npz", "summary.json"):
        (tmp_path / name).write_text("garbage")
    cfg = load(None, [f"demand.figures_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="demand.figures_dir"):
        scenarios.make_scenario(cfg)
