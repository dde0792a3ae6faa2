import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from evjax import config as C
from tests.conftest import ROOT


def test_default_yaml_is_the_builtin_defaults():
    assert C.load(ROOT / "configs" / "default.yaml") == C.Config()


def test_round_trip_through_yaml(tmp_path):
    cfg = C.load(None, ["planner.popsize=64", "planner.num_elites=16", "planner.constant_candidates=4",
                        "env.price_upper=[1.5, 1.6, 1.5]", "carbon.method=fixed_shares"])
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
    assert cfg.planner.cost_model == "observation" and cfg.planner.stop_at_episode_end and cfg.planner.shared_noise
    assert not cfg.planner.particle_noise
    assert (cfg.planner.constant_candidates, cfg.planner.num_elites) == (5, 5)  # README "Planner"
    old_planner = dict(cost_model="learned", stop_at_episode_end=False, particle_noise=True, shared_noise=False,
                       kappa_init=19.0, kappa_lr=0.01, cost_limit=6.0, num_elites=80, constant_candidates=0,
                       margin_std="disagreement", constraint_backoff=(0.0, 0.0))
    assert source.planner == dataclasses.replace(cfg.planner, **old_planner)  # the source's planner, nothing else
    assert source.grid == cfg.grid and source.training == dataclasses.replace(cfg.training, random_episodes=1)
    assert cfg.model.linear_ridge == 1.0  # README "Dynamics model": the ridge map under the network
    assert source.model == dataclasses.replace(cfg.model, epochs=5, linear_ridge=0.0)  # SPEC 8's fit, no map
    assert source.evaluation == dataclasses.replace(cfg.evaluation, fixed_kappa=19.0, cost_limit=None,
                                                   constraint_backoff=None)


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
    ("planner.constant_candidates=8", "planner.constant_candidates"),  # 8^3 = 512 > 500 candidates
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


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML reads 5e-5 as a string (YAML 1.1 needs 5.0e-5): a float key takes it as the number it spells."""
    cfg = C.load(overrides=["model.learning_rate=2e-3", "model.weight_decays=[1e-5, 2E-5, 3.5e-5, -0e0, 1e+0]"])
    assert cfg.model.learning_rate == 2e-3
    assert cfg.model.weight_decays == (1e-5, 2e-5, 3.5e-5, 0.0, 1.0)
    with pytest.raises(C.ConfigError, match="model.learning_rate"):
        C.load(overrides=["model.learning_rate=5e"])  # not a number: still the one-line error


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


# --------------------------------------------- every bad value of every key, through every entry point

def _type_bad_values(tp):
    """Values of the wrong type (or out of a Literal) for a field declared as ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _type_bad_values(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return ["bogus", 1]
    if origin is tuple:
        return [5, "abc"]
    if origin is dict:
        return [5, [1.0]]
    return {bool: [1, "maybe"], int: ["abc", 1.5, True], float: ["abc", True, math.nan, math.inf, 10**400],
            str: [1, [1]], typing.Any: []}[tp]


def _with_first_element(container, element):
    """``container`` (list or mapping) with its first element replaced."""
    if isinstance(container, dict):
        first = next(iter(container))
        return {**container, first: element}
    return [element, *list(container)[1:]]


BASES = {("demand", "origin_weights"): [1.0] * 13,  # a valid value where the default is None
         ("evaluation", "constraint_backoff"): [0.0, 20.0], ("evaluation", "reward_pessimism"): 1.0}


def _generated_cases():
    """(section, field, bad value) for every field: wrong types, then values breaking each of its rules."""
    cases = []
    defaults = C.Config()
    for section in dataclasses.fields(C.Config):
        cls = typing.get_type_hints(C.Config)[section.name]
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            default = BASES.get((section.name, field.name), getattr(getattr(defaults, section.name), field.name))
            values = list(_type_bad_values(hints[field.name]))
            origin, args = typing.get_origin(hints[field.name]), typing.get_args(hints[field.name])
            if origin in (typing.Union, types.UnionType):
                inner = next(a for a in args if a is not type(None))
                origin, args = typing.get_origin(inner), typing.get_args(inner)
            if origin in (tuple, dict) and default:
                element_type = args[0] if origin is tuple else args[1]
                values += [_with_first_element(default, v) for v in _type_bad_values(element_type)]
            for rule in C.field_rules(section.name, field.name):
                if rule.elementwise:
                    values += [_with_first_element(default, v) for v in rule.examples]
                else:
                    values += list(rule.examples)
            cases += [(section.name, field.name, value) for value in values]
    return cases


# rules spanning fields or sections: (overrides, key the error must name)
CROSS_CASES = [
    (["grid.load_multiplier=[]"], "grid.load_multiplier"),
    (["grid.load_multiplier=[1.0]"], "grid.load_multiplier"),
    (["grid.monitored_lines=[27, 9]"], "grid.monitored_lines"),
    (["grid.station_buses=[31, 13]"], "grid.monitored_lines"),  # the first key that no longer fits
    (["roads.edges=[[1, 99, 1.0, u]]"], "roads.edges[0]"),
    (["roads.edges=[[1, 4, 1.0]]"], "roads.edges[0]"),
    (["roads.station_nodes=[1, 2, 99]"], "roads.station_nodes"),
    (["roads.free_speed_kmh={u: 70.0, m: 50.0}"], "roads.free_speed_kmh"),
    (["roads.num_nodes=2"], "roads.edges"),
    (["demand.origin_weights=[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"], "demand.origin_weights"),
    (["demand.origin_weights=[1.0, 1.0]"], "demand.origin_weights"),
    (["demand.figures_dir=/nonexistent/figures"], "demand.figures_dir"),
    (["env.price_lower=[1.5, 1.3, 1.2]"], "env.price_lower"),
    (["env.initial_prices=[2.0, 1.4, 1.25]"], "env.initial_prices"),
    (["env.price_upper=[1.4, 1.5]"], "env.price_upper"),
    (["env.episode_steps=13"], "grid.load_multiplier"),
    (["env.extra_observations=[queues, backlogs]"], "env.extra_observations"),
    (["env.extra_observations=[queues, queues]"], "env.extra_observations"),
    (["model.weight_decays=[0.1]"], "model.weight_decays"),
    (["model.num_elites=6"], "model.num_elites"),
    (["model.min_logvar_init=1.0"], "model.min_logvar_init"),
    (["planner.num_elites=600"], "planner.num_elites"),
    (["planner.nan_cost=0.0"], "planner.nan_cost"),  # must exceed the cost limit 0
    (["planner.kappa_per_constraint=true", "planner.cost_model=learned", "planner.constraint_backoff=[0, 0]"],
     "planner.kappa_per_constraint"),
    (["planner.particles=31"], "planner.particles"),
    (["planner.constant_candidates=8"], "planner.constant_candidates"),
    (["planner.cost_model=learned"], "planner.constraint_backoff"),  # the default back-offs need the obs. cost
    (["planner.cost_model=learned", "planner.constraint_backoff=[0, 0]"], "evaluation.constraint_backoff"),
    (["planner.prior_prices=[1.4, 1.5]"], "planner.prior_prices"),
    (["planner.prior_prices=[1.4, 1.5, 1.0]"], "planner.prior_prices"),  # below station 3's lower bound
    (["model.holdout_fraction=0.2", "model.num_elites=4"], "planner.particles"),  # plans over the 4 elites
    (["evaluation.methods=[ccem, ccem]"], "evaluation.methods"),
    (["evaluation.host_oracle_horizon=13"], "evaluation.host_oracle_horizon"),
    (["evaluation.methods=[fixed_mid, random]"], "evaluation.reference"),
]


def _as_override(section: str, name: str, value) -> str:
    plain = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(plain, default_flow_style=True).strip()
    text = text[:-3].strip() if text.endswith("...") else text
    assert yaml.safe_dump(yaml.safe_load(text)) == yaml.safe_dump(plain), (text, plain)  # --set reads back the value
    return f"{section}.{name}={text}"


def test_generated_cases_cover_every_key():
    covered = {(s, f) for s, f, _ in _generated_cases()}
    every = {(s.name, f.name) for s in dataclasses.fields(C.Config)
             for f in dataclasses.fields(typing.get_type_hints(C.Config)[s.name])}
    assert covered == every


@pytest.fixture
def no_training(monkeypatch, tmp_path):
    """train.main in a scratch directory, failing the test loudly if a config is accepted."""
    from evjax import train

    def accepted(*args, **kwargs):
        raise AssertionError("config accepted")

    monkeypatch.setattr(train, "Trainer", accepted)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check_one_line_exit_2(main, argv, key, capsys, scratch):
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, (argv, err)
    assert len(lines) == 1 and f"'{key}" in lines[0] and "Traceback" not in err, (argv, err)
    assert list(scratch.iterdir()) == [], (argv, list(scratch.iterdir()))  # no run directory behind


def test_every_bad_value_of_every_key_is_one_line_exit_2(no_training, capsys):
    """Each generated case through ``evjax.train``'s main, in this process: exit 2, one line naming the key."""
    from evjax import evaluate, train

    for section, name, value in _generated_cases():
        override = _as_override(section, name, value)
        _check_one_line_exit_2(train.main, ["--set", override], f"{section}.{name}", capsys, no_training)
        if section == "evaluation":
            _check_one_line_exit_2(evaluate.main, ["--run-dir", "run", "--set", override], f"{section}.{name}",
                                   capsys, no_training)
    for overrides, key in CROSS_CASES:
        argv = [arg for override in overrides for arg in ("--set", override)]
        _check_one_line_exit_2(train.main, argv, key, capsys, no_training)


def test_dataclasses_replace_checks_the_section():
    with pytest.raises(C.ConfigError, match=r"planner\.horizon"):
        dataclasses.replace(C.PlannerConfig(), horizon=0)
    with pytest.raises(C.ConfigError, match=r"model\.num_elites"):
        dataclasses.replace(C.ModelConfig(), num_elites=6)
    with pytest.raises(C.ConfigError, match=r"planner\.particles"):
        dataclasses.replace(C.Config(), model=C.ModelConfig(ensemble_size=4, num_elites=4))
    assert C.PlannerConfig(popsize=100).popsize == 100 and C.ModelConfig(hidden_sizes=[8] * 4).hidden_sizes == (8,) * 4


def _console_script(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        pytest.skip(f"console script {name} not installed beside {sys.executable}")
    return str(path)


@pytest.mark.parametrize("entry, args, key", [
    ("evjax.train", ["--set", "planner.popsize=0"], "planner.popsize"),
    ("evjax.evaluate", ["--run-dir", "run", "--set", "evaluation.days=-1"], "evaluation.days"),
    ("evjax.data.calibrate", ["--source", "absent", "--out", "figures"], "absent"),
])
@pytest.mark.parametrize("how", ["python -m", "console script"])
def test_entry_points_report_one_line_exit_2(entry, args, key, how, subprocess_env, tmp_path):
    script = {"evjax.train": "evjax-train", "evjax.evaluate": "evjax-evaluate",
              "evjax.data.calibrate": "evjax-calibrate"}[entry]
    command = [sys.executable, "-m", entry] if how == "python -m" else [_console_script(script)]
    proc = subprocess.run(command + args, capture_output=True, text=True, env=subprocess_env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
