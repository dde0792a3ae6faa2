import subprocess
import sys

import pytest

from evjax import config as C
from tests.conftest import ROOT


def test_default_yaml_is_the_builtin_defaults():
    assert C.load(ROOT / "configs" / "default.yaml") == C.Config()


def test_round_trip_through_yaml(tmp_path):
    cfg = C.load(None, ["planner.popsize=64", "planner.num_elites=16", "env.price_upper=[1.5, 1.6, 1.5]", "carbon.method=fixed_shares"])
    path = tmp_path / "cfg.yaml"
    C.save(cfg, path)
    again = C.load(path)
    assert again == cfg
    assert again.planner.popsize == 64 and again.planner.num_elites == 16 and again.env.price_upper == (1.5, 1.6, 1.5)


def test_smoke_config_loads_and_shrinks():
    smoke = C.load(ROOT / "configs" / "smoke.yaml")
    default = C.Config()
    assert smoke.training.epochs < default.training.epochs
    assert smoke.planner.popsize * smoke.planner.particles < default.planner.popsize * default.planner.particles


def test_spec_constants_are_defaults():
    cfg = C.Config()
    assert cfg.grid.station_buses == (31, 13, 19) and cfg.grid.monitored_lines == (27, 9, 17)
    assert cfg.grid.line_ratings_ka == (0.156, 0.066, 0.062)
    assert cfg.carbon.grid_intensity == 700.0 and cfg.carbon.dg_intensity == 900.0
    assert cfg.stations.charger_kw * cfg.env.dt_hours == pytest.approx(11.25)
    assert cfg.planner.popsize == 500 and cfg.planner.particles == 30 and cfg.planner.horizon == 12
    assert cfg.obs_dim == 9 and cfg.action_dim == 3


def test_new_definitions_are_the_defaults_and_the_source_preset_restores_the_old_ones():
    cfg = C.Config()
    assert cfg.economics.welfare == "total_surplus" and cfg.carbon.constraint == "ev_charging"
    assert cfg.economics.user_value_cny_per_kwh > max(cfg.env.price_upper)
    assert cfg.economics.carbon_price_cny_per_t == 0.0
    source = C.load(ROOT / "configs" / "source.yaml")
    assert source.economics.welfare == "operator_margin"
    assert (source.carbon.method, source.carbon.constraint, source.carbon.limit) == ("fixed_shares", "system", 785.0)
    assert source.planner == cfg.planner and source.grid == cfg.grid  # one flag away: nothing else changes


@pytest.mark.parametrize("override, key", [
    ("economics.user_value_cny_per_kwh=1.45", "economics.user_value_cny_per_kwh"),
    ("economics.carbon_price_cny_per_t=-1", "economics.carbon_price_cny_per_t"),
    ("economics.welfare=consumer", "economics.welfare"),
    ("carbon.constraint=ev", "carbon.constraint"),
    ("stations.money_weight=0", "stations.money_weight"),
    ("planner.popsiz=3", "planner.popsiz"),
    ("nosection.x=1", "nosection"),
    ("planner.popsize=abc", "planner.popsize"),
    ("planner.popsize=1.5", "planner.popsize"),
    ("planner.learn_kappa=1", "planner.learn_kappa"),
    ("env.price_lower=[1.5, 1.3, 1.2]", "env.price_lower"),
    ("env.price_lower=[1.1, 1.3]", "env.price_lower"),
    ("planner.horizon=0", "planner.horizon"),
    ("planner.popsize=-1", "planner.popsize"),
    ("planner.particles=0", "planner.particles"),
    ("model.ensemble_size=0", "model.ensemble_size"),
    ("planner.num_elites=600", "planner.num_elites"),
    ("planner.particles=31", "planner.particles"),
    ("planner.gamma=1.5", "planner.gamma"),
    ("planner.smoothing=-0.1", "planner.smoothing"),
    ("carbon.station_dg_shares=[0.7, 1.2, 0.5]", "carbon.station_dg_shares"),
    ("carbon.method=average", "carbon.method"),
    ("planner.cost_limit=.nan", "planner.cost_limit"),
    ("planner.scan_unroll=-1", "planner.scan_unroll"),
    ("planner.uncertainty=entropy", "planner.uncertainty"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load(None, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("planner:\n  popsize: 10\n  num_elite: 5\n")
    with pytest.raises(C.ConfigError, match=r"planner\.num_elite"):
        C.load(path)


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(C.ConfigError, match="nope.yaml"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("planner: [1, 2\n")
    with pytest.raises(C.ConfigError, match="bad.yaml"):
        C.load(bad)


@pytest.mark.parametrize("module", ["evjax.train", "evjax.evaluate"])
@pytest.mark.parametrize("args, needle", [
    (["--set", "planner.popsize=-1"], "planner.popsize"),
    (["--config", "/nonexistent/x.yaml"], "/nonexistent/x.yaml"),
    (["--set", "planner.bogus=1"], "planner.bogus"),
])
def test_command_line_errors_are_one_line_exit_2(module, args, needle, subprocess_env, tmp_path):
    extra = ["--run-dir", str(tmp_path)] if module == "evjax.evaluate" else []
    proc = subprocess.run([sys.executable, "-m", module, *extra, *args], capture_output=True, text=True,
                          env=subprocess_env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
