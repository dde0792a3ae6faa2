"""Frozen, strictly checked configuration loaded from YAML.

Every constant of the model lives here (defaults follow ``SPEC.md``);
``configs/default.yaml`` spells out the same values. ``load(path, overrides)``
rejects unknown keys, wrong types and impossible values with a ``ConfigError``
that names the key or the file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


EVALUATION_METHODS = (  # the baselines of SPEC 12 and the trained agent, in table order
    "fixed_mid", "fixed_upper", "random", "cem_unconstrained", "ccem", "cap_fixed_kappa", "cap_adaptive", "oracle",
)


def _tuple(*values):
    return dataclasses.field(default_factory=lambda: tuple(values))


def _dict(**values):
    return dataclasses.field(default_factory=lambda: dict(values))


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """The IEEE 33-bus feeder (SPEC 3)."""

    dg_bus: int = 5  # bus of the 3 MW coal-fired static generator
    dg_p_mw: float = 3.0  # its active power (MW)
    load_scale: float = 0.9  # factor on every load's p_mw (q_mvar unchanged)
    station_buses: tuple[int, ...] = _tuple(31, 13, 19)  # feeder bus of CS1, CS2, CS3
    initial_ev_load_mw: float = 0.225  # EV load at each station bus at reset (MW)
    monitored_lines: tuple[int, ...] = _tuple(27, 9, 17)  # line feeding CS1, CS2, CS3
    line_ratings_ka: tuple[float, ...] = _tuple(0.156, 0.066, 0.062)  # their ratings (kA)
    loading_limit: float = 0.9  # loading (fraction of rating) above which cost accrues
    load_multiplier: tuple[float, ...] = _tuple(
        0.85, 0.87, 0.90, 0.92, 0.94, 0.98, 1.00, 1.10, 1.05, 1.00, 0.97, 0.95
    )  # per-step factor on all non-EV load
    multiplier_from_day_profile: bool = False  # take the multiplier from the day's station profile instead
    voltage_min_pu: float = 0.95  # lower voltage limit for the optional voltage cost
    voltage_cost: bool = False  # add max(0, v_min_pu - v_min) to the step cost
    nonconvergence_cost: float = 10.0  # cost of a step whose power flow diverges (episode ends)
    max_iteration: int = 20  # Newton-Raphson iteration cap of runpp
    tolerance_mva: float = 1e-8  # runpp convergence tolerance (MVA)


@dataclasses.dataclass(frozen=True)
class CarbonConfig:
    """Carbon intensity of the supplied power (SPEC 4), in kg CO2/MWh."""

    method: Literal["proportional_sharing", "fixed_shares"] = "proportional_sharing"  # attribution method
    grid_intensity: float = 700.0  # external grid (slack) intensity
    dg_intensity: float = 900.0  # DG intensity
    station_dg_shares: tuple[float, ...] = _tuple(0.7, 0.2, 0.5)  # fixed DG share at CS1..CS3 buses (fixed_shares only)
    constraint: Literal["ev_charging", "system"] = "ev_charging"  # what the limit applies to: the energy EVs draw, or all load
    limit: float = 850.0  # CI_max (kg/MWh) of the constrained measure (calibrated, README "Calibration")
    cost_divisor: float = 850.0  # cost term is max(0, CI - limit) / cost_divisor (= limit: the relative exceedance)


@dataclasses.dataclass(frozen=True)
class RoadsConfig:
    """The 13-node road network and its traffic (SPEC 5)."""

    edges: tuple[tuple[Any, ...], ...] = _tuple(
        (1, 4, 4.5, "u"), (1, 5, 3.1, "u"), (2, 6, 3.4, "u"), (2, 10, 2.4, "s"),
        (2, 13, 3.2, "u"), (3, 7, 7.5, "u"), (3, 11, 6.2, "m"), (4, 7, 2.6, "u"),
        (5, 6, 3.2, "u"), (5, 10, 4.3, "s"), (7, 8, 6.4, "m"), (8, 9, 2.7, "m"),
        (9, 10, 2.5, "s"), (9, 11, 2.8, "m"), (10, 12, 4.4, "s"), (11, 12, 3.1, "m"),
        (12, 13, 2.6, "m"),
    )  # undirected roads (node, node, km, class)
    num_nodes: int = 13  # road nodes are numbered 1..num_nodes
    station_nodes: tuple[int, ...] = _tuple(1, 2, 3)  # road node of CS1, CS2, CS3
    free_speed_kmh: dict[str, float] = _dict(u=70.0, m=50.0, s=40.0)  # v0 per road class
    beta_base: dict[str, float] = _dict(u=1.726, m=1.726, s=2.076)  # beta = base + cubic * x^3
    beta_cubic: dict[str, float] = _dict(u=3.15, m=3.15, s=2.87)
    saturation: dict[str, tuple[float, ...]] = _dict(
        u=(0.515, 0.46, 0.625, 0.465, 0.525, 0.425, 0.5, 0.435, 0.48, 0.47, 0.38, 0.465),
        m=(0.6, 0.625, 0.49, 0.6, 0.565, 0.47, 0.59, 0.535, 0.425, 0.515, 0.5, 0.4),
        s=(0.715, 0.66, 0.825, 0.715, 0.675, 0.525, 0.63, 0.57, 0.595, 0.535, 0.48, 0.465),
    )  # road saturation x per class and step
    energy_coefficients: tuple[float, ...] = _tuple(0.004, 5.492, -0.179)  # e(v) = a*v + b/v + c (kWh/km)


@dataclasses.dataclass(frozen=True)
class DemandConfig:
    """EV arrivals and attributes drawn from the real Shenzhen data (SPEC 6)."""

    figures_dir: Optional[str] = None  # calibrated figures; None = the ones shipped in evjax/data/figures
    mean_arrivals_per_step: float = 14.0  # mean EV arrivals per step over the window, averaged over days (calibrated, benchmarks/calibrate_env.py)
    origin_weights: Optional[tuple[float, ...]] = None  # weight of each road node as an origin; None = uniform
    test_every: int = 5  # every test_every-th day (by date order) is a held-out test day


@dataclasses.dataclass(frozen=True)
class StationsConfig:
    """Charging stations: chargers, queue, choice (SPEC 7)."""

    chargers: tuple[int, ...] = _tuple(30, 16, 24)  # chargers at CS1, CS2, CS3 (calibrated, benchmarks/calibrate_env.py)
    charger_kw: float = 45.0  # power of one charger (kW)
    choice: Literal["argmin", "logit"] = "argmin"  # how a driver picks among reachable stations
    logit_temperature: float = 5.0  # CNY; scale of the logit choice
    money_weight: float = 0.5  # w in C = w*money + (1 - w)*VOT*time
    value_of_time: float = 60.0  # VOT (CNY/h)
    max_wait_hours: float = 10.0  # finite wait reported when a station is saturated (rho >= 1)
    zero_wait_utilisation: float = 0.5  # expected wait is 0 when nobody queues and rho is below this


@dataclasses.dataclass(frozen=True)
class EconomicsConfig:
    """Settlement and welfare (SPEC 7)."""

    cs_purchase_price: float = 0.7  # CNY/kWh paid by a station for energy
    dg_supply_kw: float = 900.0  # EV power served by the DG before the main grid (kW)
    dg_price: float = 0.3  # DSO supply cost from the DG (CNY/kWh)
    grid_price: float = 0.5  # DSO supply cost from the main grid (CNY/kWh)
    welfare: Literal["total_surplus", "operator_margin"] = "total_surplus"  # SW definition (SPEC 7, README "Welfare")
    user_value_cny_per_kwh: float = 2.0  # drivers' value of a kWh in the battery; above every price bound
    carbon_price_cny_per_t: float = 0.0  # priced EV CO2 subtracted from welfare (CNY per tonne)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Episode, prices, observation and reward scaling (SPEC 2 and 8)."""

    dt_hours: float = 0.25  # step length (h)
    episode_steps: int = 12  # steps per episode
    start_hour: float = 17.0  # clock time of the first step
    price_lower: tuple[float, ...] = _tuple(1.1, 1.3, 1.2)  # lower price bound per station (CNY/kWh)
    price_upper: tuple[float, ...] = _tuple(1.4, 1.5, 1.4)  # upper price bound per station (CNY/kWh)
    initial_prices: tuple[float, ...] = _tuple(1.25, 1.4, 1.25)  # posted prices at reset
    time_features: bool = True  # append the step fraction t / episode_steps to the observation
    welfare_obs_scale: float = 300.0  # observation holds SW / this
    carbon_obs_scale: float = 300.0  # observation holds CI / this
    reward_scale: float = 600.0  # reward = SW / this


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Probabilistic ensemble dynamics model (SPEC 9)."""

    ensemble_size: int = 5  # E, number of members
    hidden_sizes: tuple[int, ...] = _tuple(256, 256, 256, 256)  # hidden layer widths (swish)
    weight_decays: tuple[float, ...] = _tuple(2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # per hidden layer, then the heads
    learning_rate: float = 1e-3  # Adam step size
    batch_size: int = 128  # minibatch size
    epochs: int = 5  # passes over the data per training round
    max_logvar_init: float = 0.5  # initial soft upper log-variance bound
    min_logvar_init: float = -10.0  # initial soft lower log-variance bound
    logvar_bound_weight: float = 0.01  # weight of sum(max_lv) - sum(min_lv) in the loss
    binary_cost: bool = False  # logistic cost head with BCE loss instead of Gaussian
    holdout_fraction: float = 0.0  # fraction of data held out for early stopping (0 = off)
    early_stopping_patience: int = 5  # epochs without holdout improvement before stopping
    num_elites: int = 5  # members kept for planning when a holdout is used
    std_floor: float = 1e-12  # normaliser std below this is replaced by 1
    normalize_targets: bool = True  # standardise the regression targets by the data's mean and std (see dynamics.py)
    init_truncation: float = 2.0  # truncated-normal weight init is cut at +-this many std
    early_stopping_min_improvement: float = 0.01  # a member improves if its holdout NLL drops by this fraction of |best|


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """Constrained CEM with the CAP uncertainty penalty (SPEC 10)."""

    horizon: int = 12  # H, planning horizon in steps
    popsize: int = 500  # N, candidates per iteration
    num_elites: int = 80  # elites refitted per iteration
    particles: int = 30  # P, model rollouts per candidate
    iterations: int = 5  # maximum CEM iterations
    min_variance: float = 1e-8  # stop when the largest variance falls below this
    truncation_sigma: float = 3.0  # normal samples are truncated at +-this many sigma
    smoothing: float = 0.1  # new = smoothing * old + (1 - smoothing) * elite statistic
    gamma: float = 0.99  # discount for the predicted cost
    cost_limit: float = 6.0  # feasible if scaled predicted cost + kappa * u over the horizon <= this (README, "Calibration")
    uncertainty: Literal["cost_std", "max_std_norm", "disagreement"] = "cost_std"  # CAP uncertainty u (planner.py)
    kappa_init: float = 19.0  # kappa0, initial CAP multiplier
    kappa_lr: float = 0.01  # Adam step size of kappa
    learn_kappa: bool = True  # adapt kappa after every episode
    permissible_episode_cost: float = 0.1  # C_perm in the kappa update (README, "Calibration")
    state_clip: float = 2500.0  # predicted states are clipped to +-this
    nan_reward: float = -1e6  # reward given to a non-finite rollout
    nan_cost: float = 1e6  # cost given to a non-finite rollout
    matmul_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # input dtype of the ensemble matmuls (f32 accumulation)
    scan_unroll: int = 0  # horizon-scan unroll factor; 0 = auto (full on GPU/TPU, none on CPU)
    mode: Literal["cap", "ccem", "unconstrained"] = "cap"  # cap: cost + kappa*u; ccem: cost limit, no penalty; unconstrained: rewards only


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The training loop (SPEC 11)."""

    seed: int = 0  # seeds the environment, model and planner
    epochs: int = 50  # episodes of training
    model_train_freq: int = 12  # refit the model on all data every this many steps
    best_cost_threshold: float = 0.2  # "best" checkpoint only among episodes with cost <= this (SPEC: 3.6, README)
    run_root: str = "runs"  # parent of timestamped run directories


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Held-out evaluation and baselines (SPEC 11 and 12)."""

    split: Literal["train", "test"] = "test"  # days to evaluate on
    days: int = 5  # number of days
    seed: int = 1000  # seed of the evaluation episodes
    fixed_kappa: float = 19.0  # kappa of the "CAP with fixed kappa" baseline
    oracle_popsize: int = 24  # candidates per iteration of the simulator-planning oracle
    oracle_iterations: int = 2  # its CEM iterations
    oracle_horizon: int = 3  # its planning horizon (steps)
    methods: tuple[str, ...] = _tuple(*EVALUATION_METHODS)  # methods to compare (SPEC 12)


@dataclasses.dataclass(frozen=True)
class Config:
    """All sections of an evjax run."""

    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    carbon: CarbonConfig = dataclasses.field(default_factory=CarbonConfig)
    roads: RoadsConfig = dataclasses.field(default_factory=RoadsConfig)
    demand: DemandConfig = dataclasses.field(default_factory=DemandConfig)
    stations: StationsConfig = dataclasses.field(default_factory=StationsConfig)
    economics: EconomicsConfig = dataclasses.field(default_factory=EconomicsConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    planner: PlannerConfig = dataclasses.field(default_factory=PlannerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def __post_init__(self):
        validate(self)

    @property
    def num_stations(self) -> int:
        return len(self.grid.station_buses)

    @property
    def obs_dim(self) -> int:
        """Line loadings, EVs present per station, welfare, carbon (+ time)."""
        return 2 * self.num_stations + 2 + int(self.env.time_features)

    @property
    def action_dim(self) -> int:
        return self.num_stations


# ---------------------------------------------------------------- validation

def _fail(key: str, message: str):
    raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: Config) -> None:
    """Reject impossible values; each error names the offending key."""
    n = len(cfg.grid.station_buses)
    per_station = {
        "grid.monitored_lines": cfg.grid.monitored_lines,
        "grid.line_ratings_ka": cfg.grid.line_ratings_ka,
        "carbon.station_dg_shares": cfg.carbon.station_dg_shares,
        "roads.station_nodes": cfg.roads.station_nodes,
        "stations.chargers": cfg.stations.chargers,
        "env.price_lower": cfg.env.price_lower,
        "env.price_upper": cfg.env.price_upper,
        "env.initial_prices": cfg.env.initial_prices,
    }
    for key, values in per_station.items():
        if len(values) != n:
            _fail(key, f"needs one value per station ({n}), got {len(values)}")
    for k, (lo, hi) in enumerate(zip(cfg.env.price_lower, cfg.env.price_upper)):
        if not lo < hi:
            _fail("env.price_lower", f"station {k + 1} lower bound {lo} is not below upper bound {hi}")
        if not lo <= cfg.env.initial_prices[k] <= hi:
            _fail("env.initial_prices", f"station {k + 1} price {cfg.env.initial_prices[k]} outside [{lo}, {hi}]")
    for key, value in [
        ("grid.line_ratings_ka", min(cfg.grid.line_ratings_ka)),
        ("grid.loading_limit", cfg.grid.loading_limit),
        ("stations.charger_kw", cfg.stations.charger_kw),
        ("stations.chargers", min(cfg.stations.chargers)),
        ("stations.logit_temperature", cfg.stations.logit_temperature),
        ("stations.max_wait_hours", cfg.stations.max_wait_hours),
        ("stations.zero_wait_utilisation", cfg.stations.zero_wait_utilisation),
        ("env.dt_hours", cfg.env.dt_hours),
        ("env.episode_steps", cfg.env.episode_steps),
        ("env.reward_scale", cfg.env.reward_scale),
        ("env.welfare_obs_scale", cfg.env.welfare_obs_scale),
        ("env.carbon_obs_scale", cfg.env.carbon_obs_scale),
        ("carbon.cost_divisor", cfg.carbon.cost_divisor),
        ("demand.mean_arrivals_per_step", cfg.demand.mean_arrivals_per_step),
        ("demand.test_every", cfg.demand.test_every),
        ("model.ensemble_size", cfg.model.ensemble_size),
        ("model.learning_rate", cfg.model.learning_rate),
        ("model.batch_size", cfg.model.batch_size),
        ("model.epochs", cfg.model.epochs),
        ("model.num_elites", cfg.model.num_elites),
        ("model.early_stopping_patience", cfg.model.early_stopping_patience),
        ("model.init_truncation", cfg.model.init_truncation),
        ("planner.horizon", cfg.planner.horizon),
        ("planner.popsize", cfg.planner.popsize),
        ("planner.num_elites", cfg.planner.num_elites),
        ("planner.particles", cfg.planner.particles),
        ("planner.iterations", cfg.planner.iterations),
        ("planner.truncation_sigma", cfg.planner.truncation_sigma),
        ("planner.state_clip", cfg.planner.state_clip),
        ("training.epochs", cfg.training.epochs),
        ("training.model_train_freq", cfg.training.model_train_freq),
        ("evaluation.days", cfg.evaluation.days),
        ("evaluation.oracle_popsize", cfg.evaluation.oracle_popsize),
        ("evaluation.oracle_iterations", cfg.evaluation.oracle_iterations),
        ("evaluation.oracle_horizon", cfg.evaluation.oracle_horizon),
    ]:
        if not value > 0:
            _fail(key, f"must be positive, got {value}")
    if any(w <= 0 for w in cfg.model.hidden_sizes) or not cfg.model.hidden_sizes:
        _fail("model.hidden_sizes", f"needs at least one positive width, got {list(cfg.model.hidden_sizes)}")
    if len(cfg.model.weight_decays) != len(cfg.model.hidden_sizes) + 1:
        _fail("model.weight_decays", f"needs one value per hidden layer plus one for the heads "
              f"({len(cfg.model.hidden_sizes) + 1}), got {len(cfg.model.weight_decays)}")
    if cfg.model.num_elites > cfg.model.ensemble_size:
        _fail("model.num_elites", f"{cfg.model.num_elites} elites exceed ensemble_size {cfg.model.ensemble_size}")
    if cfg.planner.num_elites > cfg.planner.popsize:
        _fail("planner.num_elites", f"{cfg.planner.num_elites} elites exceed popsize {cfg.planner.popsize}")
    if cfg.planner.particles % cfg.model.ensemble_size:
        _fail("planner.particles", f"{cfg.planner.particles} particles are not divisible by "
              f"model.ensemble_size {cfg.model.ensemble_size}")
    if len(cfg.grid.load_multiplier) < cfg.env.episode_steps:
        _fail("grid.load_multiplier", f"needs at least env.episode_steps ({cfg.env.episode_steps}) values")
    for cls, values in cfg.roads.saturation.items():
        if len(values) < cfg.env.episode_steps:
            _fail(f"roads.saturation.{cls}", f"needs at least env.episode_steps ({cfg.env.episode_steps}) values")
    classes = {edge[3] for edge in cfg.roads.edges if len(edge) == 4}
    for key in ("free_speed_kmh", "beta_base", "beta_cubic", "saturation"):
        missing = classes - set(getattr(cfg.roads, key))
        if missing:
            _fail(f"roads.{key}", f"missing road class(es) {sorted(missing)}")
    for i, edge in enumerate(cfg.roads.edges):
        ok = (len(edge) == 4 and all(isinstance(x, int) and 1 <= x <= cfg.roads.num_nodes for x in edge[:2])
              and isinstance(edge[2], (int, float)) and edge[2] > 0 and isinstance(edge[3], str))
        if not ok:
            _fail(f"roads.edges[{i}]", f"expected [node, node, km > 0, class] with nodes in 1..{cfg.roads.num_nodes}, got {list(edge)}")
    if cfg.demand.origin_weights is not None and (
        len(cfg.demand.origin_weights) != cfg.roads.num_nodes or min(cfg.demand.origin_weights) < 0
        or sum(cfg.demand.origin_weights) <= 0
    ):
        _fail("demand.origin_weights", f"needs {cfg.roads.num_nodes} non-negative weights with a positive sum")
    for key, value in [
        ("grid.load_scale", cfg.grid.load_scale),
        ("stations.money_weight", cfg.stations.money_weight),
        ("planner.smoothing", cfg.planner.smoothing),
        ("planner.gamma", cfg.planner.gamma),
        ("model.logvar_bound_weight", cfg.model.logvar_bound_weight),
        ("model.early_stopping_min_improvement", cfg.model.early_stopping_min_improvement),
    ] + [("carbon.station_dg_shares", s) for s in cfg.carbon.station_dg_shares]:
        if not 0.0 <= value <= 1.0:
            _fail(key, f"must lie in [0, 1], got {value}")
    if not 0.0 <= cfg.model.holdout_fraction < 1.0:
        _fail("model.holdout_fraction", f"must lie in [0, 1), got {cfg.model.holdout_fraction}")
    if not 0.0 <= cfg.env.start_hour < 24.0:
        _fail("env.start_hour", f"must lie in [0, 24), got {cfg.env.start_hour}")
    if cfg.model.min_logvar_init >= cfg.model.max_logvar_init:
        _fail("model.min_logvar_init", "must be below model.max_logvar_init")
    if cfg.planner.scan_unroll < 0:
        _fail("planner.scan_unroll", f"must be >= 0, got {cfg.planner.scan_unroll}")
    if cfg.planner.cost_limit < 0 or cfg.planner.permissible_episode_cost < 0 or cfg.planner.kappa_init < 0:
        _fail("planner.cost_limit", "cost_limit, permissible_episode_cost and kappa_init must be non-negative")
    if cfg.economics.carbon_price_cny_per_t < 0:
        _fail("economics.carbon_price_cny_per_t", f"must be non-negative, got {cfg.economics.carbon_price_cny_per_t}")
    if cfg.economics.welfare == "total_surplus":
        if cfg.stations.money_weight <= 0.0:
            _fail("stations.money_weight", "must be positive with economics.welfare total_surplus "
                  "(time is valued in money as (1 - w) / w x value_of_time)")
        if cfg.economics.user_value_cny_per_kwh <= max(cfg.env.price_upper):
            _fail("economics.user_value_cny_per_kwh", f"must exceed every price bound ({max(cfg.env.price_upper)}): "
                  f"drivers charge at any posted price, got {cfg.economics.user_value_cny_per_kwh}")
    if cfg.evaluation.oracle_horizon > cfg.env.episode_steps:
        _fail("evaluation.oracle_horizon", f"exceeds env.episode_steps ({cfg.env.episode_steps})")
    unknown = set(cfg.evaluation.methods) - set(EVALUATION_METHODS)
    if unknown:
        _fail("evaluation.methods", f"unknown method(s) {sorted(unknown)}; choose from {list(EVALUATION_METHODS)}")


# ------------------------------------------------------------- type checking

def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` (lists become tuples) or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            _fail(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is Any:
        return tuple(value) if isinstance(value, list) else value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            _fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build_section(name: str, cls: type, data: Any):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(name, f"expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        _fail(f"{name}.{unknown[0]}", f"unknown key; section '{name}' has {sorted(fields)}")
    kwargs = {k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """Build a validated ``Config`` from nested plain data (as in YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: top level must be a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        _fail(unknown[0], f"unknown section; sections are {sorted(sections)}")
    hints = typing.get_type_hints(Config)
    built = {name: _build_section(name, hints[name], data.get(name)) for name in sections}
    return Config(**built)


def to_dict(cfg: Config) -> dict:
    """Plain nested data (lists, not tuples) that ``from_dict`` turns back into ``cfg``."""

    def plain(x):
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return {f.name: plain(dataclasses.asdict(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)}


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}': expected section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{override}': key must be section.key")
    section, name = parts
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key '{key}': cannot parse value {raw!r} ({exc.__class__.__name__})") from None
    if not isinstance(data.setdefault(section, {}), dict):
        _fail(section, "expected a mapping of keys")
    data[section][name] = value


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; None = built-in defaults) and apply ``section.key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}': not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file '{path}': not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping of sections")
    for override in overrides:
        _apply_override(data, override)
    return from_dict(data)


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
