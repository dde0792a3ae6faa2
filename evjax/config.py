"""Frozen, strictly checked configuration loaded from YAML.

Every constant of the model lives here (defaults follow ``SPEC.md``);
``configs/default.yaml`` spells out the same values.

Each rule about a value has one home. A section checks its own fields when it
is constructed (``dataclasses.replace(PlannerConfig(), horizon=0)`` fails):
first each field's type (lists become tuples, ints become floats where a float
is declared), then the field rules of ``FIELD_RULES``, then the rules spanning
several fields of the section (``SECTION_CHECKS``). ``Config`` checks the rules
that span sections (``validate``). ``load(path, overrides)`` adds the file and
key checks (unknown keys, malformed overrides). Every failure is a
``ConfigError`` naming the key or the file; factories built from a config
therefore never see an impossible value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence

import yaml

from evjax.data import FIGURE_FILES
from evjax.errors import ConfigError
from evjax.methods import DEFAULT_METHODS, EVALUATION_METHODS

FEEDER_BUSES = 33  # case33bw: buses 0..32, bus 0 the slack
FEEDER_LINES = 32  # its in-service lines 0..31 (the five tie lines 32..36 are open)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 5e-5, 1E+3: floats PyYAML leaves as text


def _tuple(*values):
    return dataclasses.field(default_factory=lambda: tuple(values))


def _dict(**values):
    return dataclasses.field(default_factory=lambda: dict(values))


class Section:
    """Base of the config sections: each checks and normalises its own fields when constructed."""

    def __post_init__(self):
        check_section(self)


@dataclasses.dataclass(frozen=True)
class GridConfig(Section):
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
class CarbonConfig(Section):
    """Carbon intensity of the supplied power (SPEC 4), in kg CO2/MWh."""

    method: Literal["proportional_sharing", "fixed_shares"] = "proportional_sharing"  # attribution method
    grid_intensity: float = 700.0  # external grid (slack) intensity
    dg_intensity: float = 900.0  # DG intensity
    station_dg_shares: tuple[float, ...] = _tuple(0.7, 0.2, 0.5)  # fixed DG share at CS1..CS3 buses (fixed_shares only)
    constraint: Literal["ev_charging", "system"] = "ev_charging"  # what the limit applies to: the energy EVs draw, or all load
    limit: float = 850.0  # CI_max (kg/MWh) of the constrained measure (calibrated, README "Calibration")
    cost_divisor: float = 850.0  # cost term is max(0, CI - limit) / cost_divisor (= limit: the relative exceedance)


@dataclasses.dataclass(frozen=True)
class RoadsConfig(Section):
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
class DemandConfig(Section):
    """EV arrivals and attributes drawn from the real Shenzhen data (SPEC 6)."""

    figures_dir: Optional[str] = None  # calibrated figures; None = the ones shipped in evjax/data/figures
    mean_arrivals_per_step: float = 14.0  # mean EV arrivals per step over the window, averaged over days (calibrated, benchmarks/calibrate_env.py)
    origin_weights: Optional[tuple[float, ...]] = None  # weight of each road node as an origin; None = uniform
    test_every: int = 5  # every test_every-th day (by date order) is a held-out test day


@dataclasses.dataclass(frozen=True)
class StationsConfig(Section):
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
class EconomicsConfig(Section):
    """Settlement and welfare (SPEC 7)."""

    cs_purchase_price: float = 0.7  # CNY/kWh paid by a station for energy
    dg_supply_kw: float = 900.0  # EV power served by the DG before the main grid (kW)
    dg_price: float = 0.3  # DSO supply cost from the DG (CNY/kWh)
    grid_price: float = 0.5  # DSO supply cost from the main grid (CNY/kWh)
    welfare: Literal["total_surplus", "operator_margin"] = "total_surplus"  # SW definition (SPEC 7, README "Welfare")
    user_value_cny_per_kwh: float = 2.0  # drivers' value of a kWh in the battery; above every price bound
    carbon_price_cny_per_t: float = 0.0  # priced EV CO2 subtracted from welfare (CNY per tonne)


EXTRA_OBSERVATIONS = {  # env.extra_observations: name -> what it adds per station (the host env computes them)
    "prices": "the prices posted for the last step (CNY/kWh)",
    "queues": "EVs waiting for a charger at the end of the last step",
    "backlog": "energy still to deliver to the EVs present (kWh)",
    "arrivals": "EVs that chose the station in the last step",
}


@dataclasses.dataclass(frozen=True)
class EnvConfig(Section):
    """Episode, prices, observation and reward scaling (SPEC 2 and 8)."""

    dt_hours: float = 0.25  # step length (h)
    episode_steps: int = 12  # steps per episode
    start_hour: float = 17.0  # clock time of the first step
    price_lower: tuple[float, ...] = _tuple(1.1, 1.3, 1.2)  # lower price bound per station (CNY/kWh)
    price_upper: tuple[float, ...] = _tuple(1.4, 1.5, 1.4)  # upper price bound per station (CNY/kWh)
    initial_prices: tuple[float, ...] = _tuple(1.25, 1.4, 1.25)  # posted prices at reset
    time_features: bool = True  # append the step fraction t / episode_steps to the observation
    extra_observations: tuple[str, ...] = ()  # per-station features appended before the time feature, of EXTRA_OBSERVATIONS (README, "Model")
    welfare_obs_scale: float = 300.0  # observation holds SW / this
    carbon_obs_scale: float = 300.0  # observation holds CI / this
    reward_scale: float = 600.0  # reward = SW / this


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Probabilistic ensemble dynamics model (SPEC 9)."""

    ensemble_size: int = 5  # E, number of members
    hidden_sizes: tuple[int, ...] = _tuple(256, 256, 256, 256)  # hidden layer widths (swish)
    weight_decays: tuple[float, ...] = _tuple(2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)  # per hidden layer, then the heads
    learning_rate: float = 1e-3  # Adam step size
    batch_size: int = 128  # minibatch size
    epochs: int = 30  # passes over the data per training round (SPEC: 5; 30 learns the price response, README "Results")
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
    min_gradient_steps: int = 0  # a fit runs at least this many minibatch steps (more epochs on little data); 0 = epochs only
    linear_ridge: float = 1.0  # > 0: each member's means add a ridge regression (this penalty) of the standardised targets on the standardised inputs, refitted on its resample every round, the network learning the rest; 0 = off


@dataclasses.dataclass(frozen=True)
class PlannerConfig(Section):
    """Constrained CEM with the CAP uncertainty penalty (SPEC 10)."""

    horizon: int = 12  # H, planning horizon in steps
    popsize: int = 500  # N, candidates per iteration
    num_elites: int = 5  # elites refitted per iteration (README "Planner": 5 with the constant candidates; the source's 80)
    particles: int = 30  # P, model rollouts per candidate
    iterations: int = 5  # maximum CEM iterations
    min_variance: float = 1e-8  # stop when the largest variance falls below this
    truncation_sigma: float = 3.0  # normal samples are truncated at +-this many sigma
    variance_cap: bool = True  # SPEC 10: sampling variance capped by the squared half-distance to the nearer bound
    smoothing: float = 0.1  # new = smoothing * old + (1 - smoothing) * elite statistic
    gamma: float = 0.99  # discount for the predicted cost
    cost_limit: float = 0.0  # feasible if the scaled predicted cost + CAP margin over the horizon <= this (README, "Safety")
    uncertainty: Literal["cost_std", "max_std_norm", "disagreement"] = "cost_std"  # CAP uncertainty u (planner.py)
    kappa_init: float = 0.5  # kappa0, initial CAP multiplier (stds of margin with cost_model observation; the source's 19 was for its norm u)
    kappa_lr: float = 0.05  # Adam step size of kappa (kappa moves about this much per episode)
    learn_kappa: bool = True  # adapt kappa after every episode
    permissible_episode_cost: float = 0.1  # C_perm in the kappa update (README, "Calibration")
    state_clip: float = 2500.0  # predicted states are clipped to +-this
    nan_reward: float = -1e6  # reward given to a non-finite rollout
    nan_cost: float = 1e6  # cost given to a non-finite rollout
    matmul_dtype: Literal["bfloat16", "float32"] = "bfloat16"  # input dtype of the ensemble matmuls (f32 accumulation)
    hidden_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # storage of the hidden matmul products in planning (XLA path); auto: bfloat16 on GPU/TPU with bfloat16 matmuls, float32 on CPU
    scan_unroll: int = 0  # horizon-scan unroll factor; 0 = auto (full on GPU/TPU, none on CPU)
    kernel: Literal["auto", "xla", "pallas", "pallas_layers", "mosaic"] = "auto"  # ensemble forward in planning: auto (mosaic on a Hopper GPU, else xla), XLA ops, one fused Pallas (Triton) kernel, one Pallas matmul + epilogue per hidden layer, or one Mosaic GPU kernel per model step (Hopper; the Pallas kernels GPU only)
    tile_rows: int = 0  # XLA forward on CPU: samples per member per tile, run one tile after another; 0 = auto (600), >= N*P/E untiled; unused on GPU/TPU
    mode: Literal["cap", "ccem", "unconstrained"] = "cap"  # cap: cost + kappa*u; ccem: cost limit, no penalty; unconstrained: rewards only
    cost_model: Literal["learned", "observation"] = "observation"  # step cost: the model's cost output, or the env's formula on the predicted obs (kappa then counts predicted stds of margin)
    margin_std: Literal["disagreement", "predicted", "total"] = "predicted"  # std of the CAP margin with cost_model observation: member disagreement, each particle's predicted std, or both (root of the sum of squares)
    particle_noise: bool = False  # true: particles sample the model's predicted std (trajectory sampling, SPEC 10); false: each follows its member's means, one particle per member computed (needs the mean-step path)
    shared_noise: bool = True  # every candidate's particles get the same model noise draws (common random numbers across candidates, not only across CEM iterations)
    stop_at_episode_end: bool = True  # horizon steps after the episode's end count nothing (read from the time feature; without env.time_features it has no effect)
    prior_prices: tuple[float, ...] = ()  # CEM's prior mean: the first plan's warm start and the price appended to each shifted warm start, per station (CNY/kWh); empty = mid-range
    kappa_per_constraint: bool = False  # one kappa for the line and one for the carbon margin (needs cost_model observation)
    permissible_constraint_costs: tuple[float, ...] = _tuple(0.05, 0.05)  # C_perm of the line and carbon kappa (kappa_per_constraint)
    reward_pessimism: float = 0.0  # candidates ranked by the members' mean predicted return minus this many stds of it across members (a pessimistic return against model exploitation); 0 = the mean
    constraint_backoff: tuple[float, ...] = _tuple(0.0, 20.0)  # the planner's cost counts a line loading above loading_limit - this[0] and a carbon measure above carbon.limit - this[1] (kg/MWh): a tightened constraint (cost_model observation)
    constant_candidates: int = 5  # L > 0: the first L^A candidates of every CEM iteration are the constant price sequences of an L-level grid over the bounds (README "Planner"); 0 = off


@dataclasses.dataclass(frozen=True)
class TrainingConfig(Section):
    """The training loop (SPEC 11)."""

    seed: int = 0  # seeds the environment, model and planner
    epochs: int = 50  # episodes of training
    model_train_freq: int = 12  # refit the model on all data every this many steps
    random_episodes: int = 5  # the first episodes post uniform random prices (exploration; the planner takes over after them, and never before the first model fit)
    random_hold: Literal["step", "episode"] = "step"  # random-price episodes draw new prices every step, or once per episode and hold them
    best_cost_threshold: float = 0.2  # best_selection "paired"/"reward": "best" only among episodes with cost <= this (SPEC: 3.6, README)
    best_selection: Literal["paired", "reward", "validation"] = "validation"  # rank episodes for "best" by reward minus a fixed-price episode's on the same day and seed, by raw reward, or rank checkpoints by the deployed planner on fixed validation days
    validation_days: int = 8  # best_selection "validation": training-split days the deployed planner is scored on (spread evenly over the split)
    validation_every: int = 5  # best_selection "validation": validate the planned epochs e with (e + 1) % this == 0, and the last
    validation_seed: int = 2000  # best_selection "validation": validation day i runs with episode seed validation_seed + i
    run_root: str = "runs"  # parent of timestamped run directories


@dataclasses.dataclass(frozen=True)
class EvaluationConfig(Section):
    """Held-out evaluation and baselines (SPEC 11 and 12)."""

    DEPLOYED = ("cost_limit", "prior_prices", "constraint_backoff", "reward_pessimism", "particle_noise",
                "variance_cap", "constant_candidates", "num_elites")  # planner.* fields the learned planners deploy with where set (not None)

    split: Literal["train", "test"] = "test"  # days to evaluate on
    days: int = 30  # number of days, spread evenly over the split; 0 = every day of the split
    seed: int = 1000  # seed of the evaluation episodes (day i gets seed + i)
    fixed_kappa: float = 0.5  # kappa of the "CAP with fixed kappa" baseline (planner.kappa_init's scale)
    cost_limit: Optional[float] = 0.0  # cost limit the planner methods with one (CCEM, CAP) deploy with; 0: feasible only without a predicted violation; null: the run's planner.cost_limit
    prior_prices: Optional[tuple[float, ...]] = None  # CEM prior the learned planners deploy with (planner.prior_prices' meaning); null: the run's own
    constraint_backoff: Optional[tuple[float, ...]] = _tuple(0.0, 20.0)  # limit back-off the learned planners deploy with (planner.constraint_backoff's meaning; README "Safety": 20 kg/MWh, about one std of the model's one-step carbon error); null: the run's own
    reward_pessimism: Optional[float] = None  # planner.reward_pessimism the learned planners deploy with; null: the run's own
    particle_noise: Optional[bool] = None  # planner.particle_noise the learned planners deploy with; null: the run's own
    variance_cap: Optional[bool] = None  # planner.variance_cap the learned planners deploy with; null: the run's own
    constant_candidates: Optional[int] = None  # planner.constant_candidates the learned planners deploy with; null: the run's own
    num_elites: Optional[int] = None  # planner.num_elites the learned planners deploy with; null: the run's own
    batch_days: bool = True  # the planner methods plan all days of a step in one planner.plan_batch call (equal plans)
    reference: str = "oracle"  # method the paired per-day differences of the table are taken against
    baseline_simulator: Literal["twin", "host"] = "twin"  # where fixed_mid, fixed_upper and random run (twin: all days in one vmapped call)
    oracle: Literal["twin", "host"] = "twin"  # twin: the planner's CEM on the JAX twin, jitted; host: snapshot CEM on the host env
    oracle_popsize: int = 500  # candidates per CEM iteration of the twin oracle (horizon: the rest of the episode)
    oracle_iterations: int = 5  # CEM iterations of the twin oracle
    oracle_cost_limit: float = 1e-12  # an oracle candidate is feasible if its summed true step cost is at most this
    host_oracle_popsize: int = 24  # candidates per iteration of the host snapshot oracle
    host_oracle_iterations: int = 2  # its CEM iterations
    host_oracle_horizon: int = 3  # its planning horizon (steps)
    tuned_levels: int = 5  # fixed_tuned: prices per station in the grid searched (evenly from price_lower to price_upper)
    tuned_days: int = 40  # fixed_tuned: training days the grid is scored on (spread over the train split; seeds 0..)
    forecast_scenarios: int = 4  # demand draws of the day the forecast oracle plans on in place of the future arrivals
    methods: tuple[str, ...] = _tuple(*DEFAULT_METHODS)  # methods to compare (SPEC 12); forecast_oracle also exists


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
        """Line loadings, EVs present per station, welfare, carbon (+ extra per-station features) (+ time)."""
        extra = len(self.env.extra_observations) * self.num_stations
        return 2 * self.num_stations + 2 + extra + int(self.env.time_features)

    @property
    def action_dim(self) -> int:
        return self.num_stations


# ---------------------------------------------------------------- validation

def _fail(key: str, message: str):
    raise ConfigError(f"config key '{key}': {message}")


class Rule(NamedTuple):
    """A condition on one field's value, or with ``elementwise`` on each of its elements (list items, mapping values).

    The error says the value must ``needs``; ``examples`` are values (elements)
    that break it, for the tests.
    """

    holds: Callable[[Any], bool]
    needs: str
    examples: tuple
    elementwise: bool = False


def at_least(bound: float) -> Rule:
    return Rule(lambda v: v >= bound, f"be at least {bound}", (bound - 1,))


def between(lower: float, upper: float) -> Rule:
    """Closed interval [lower, upper]."""
    return Rule(lambda v: lower <= v <= upper, f"lie in [{lower}, {upper}]", (lower - 1, upper + 1))


def each(rule: Rule) -> Rule:
    return rule._replace(elementwise=True)


POSITIVE = Rule(lambda v: v > 0, "be positive", (0, -1))
LEVELS = Rule(lambda v: v == 0 or v >= 2, "be 0 (off) or at least 2 levels", (1, -1))
NON_NEGATIVE = Rule(lambda v: v >= 0, "be non-negative", (-1,))
FRACTION = Rule(lambda v: 0.0 <= v <= 1.0, "lie in [0, 1]", (-0.1, 1.5))
NON_EMPTY = Rule(lambda v: len(v) > 0, "not be empty", ((),))
SEED = between(0, 2**32 - 1)
FEEDER_BUS = between(0, FEEDER_BUSES - 1)

FIELD_RULES: dict[str, dict[str, Rule | tuple[Rule, ...]]] = {
    "grid": {
        "dg_bus": FEEDER_BUS,
        "dg_p_mw": NON_NEGATIVE,
        "load_scale": FRACTION,
        "station_buses": (NON_EMPTY, each(FEEDER_BUS)),
        "initial_ev_load_mw": NON_NEGATIVE,
        "monitored_lines": each(between(0, FEEDER_LINES - 1)),
        "line_ratings_ka": each(POSITIVE),
        "loading_limit": POSITIVE,
        "load_multiplier": each(NON_NEGATIVE),
        "voltage_min_pu": POSITIVE,
        "nonconvergence_cost": NON_NEGATIVE,
        "max_iteration": POSITIVE,
        "tolerance_mva": POSITIVE,
    },
    "carbon": {
        "grid_intensity": NON_NEGATIVE,
        "dg_intensity": NON_NEGATIVE,
        "station_dg_shares": each(FRACTION),
        "limit": NON_NEGATIVE,
        "cost_divisor": POSITIVE,
    },
    "roads": {
        "edges": NON_EMPTY,
        "num_nodes": POSITIVE,
        "free_speed_kmh": each(POSITIVE),
        "beta_base": each(NON_NEGATIVE),
        "beta_cubic": each(NON_NEGATIVE),
        "saturation": each(Rule(lambda v: len(v) > 0 and min(v) >= 0, "be a non-empty list of non-negative numbers",
                                ((-0.5,),))),
        "energy_coefficients": Rule(lambda v: len(v) == 3, "hold 3 numbers (a, b, c)", ((1.0, 2.0),)),
    },
    "demand": {
        "mean_arrivals_per_step": POSITIVE,
        "origin_weights": each(NON_NEGATIVE),
        "test_every": at_least(2),
    },
    "stations": {
        "chargers": each(POSITIVE),
        "charger_kw": POSITIVE,
        "logit_temperature": POSITIVE,
        "money_weight": FRACTION,
        "value_of_time": NON_NEGATIVE,
        "max_wait_hours": POSITIVE,
        "zero_wait_utilisation": POSITIVE,
    },
    "economics": {
        "cs_purchase_price": NON_NEGATIVE,
        "dg_supply_kw": NON_NEGATIVE,
        "dg_price": NON_NEGATIVE,
        "grid_price": NON_NEGATIVE,
        "user_value_cny_per_kwh": POSITIVE,
        "carbon_price_cny_per_t": NON_NEGATIVE,
    },
    "env": {
        "dt_hours": Rule(lambda v: v > 0 and abs(4.0 * v - round(4.0 * v)) <= 1e-9,
                         "be a positive multiple of the data's 15 min (0.25 h)", (0, -0.25, 0.1)),
        "episode_steps": POSITIVE,
        "start_hour": Rule(lambda v: 0.0 <= v < 24.0, "lie in [0, 24)", (-1.0, 24.0)),
        "welfare_obs_scale": POSITIVE,
        "carbon_obs_scale": POSITIVE,
        "reward_scale": POSITIVE,
    },
    "model": {
        "ensemble_size": POSITIVE,
        "hidden_sizes": (NON_EMPTY, each(POSITIVE)),
        "weight_decays": each(NON_NEGATIVE),
        "learning_rate": POSITIVE,
        "batch_size": POSITIVE,
        "epochs": POSITIVE,
        "logvar_bound_weight": FRACTION,
        "holdout_fraction": Rule(lambda v: 0.0 <= v < 1.0, "lie in [0, 1)", (-0.1, 1.0)),
        "early_stopping_patience": POSITIVE,
        "num_elites": POSITIVE,
        "std_floor": NON_NEGATIVE,
        "init_truncation": POSITIVE,
        "early_stopping_min_improvement": FRACTION,
        "min_gradient_steps": NON_NEGATIVE,
        "linear_ridge": NON_NEGATIVE,
    },
    "planner": {
        "horizon": POSITIVE,
        "popsize": POSITIVE,
        "num_elites": POSITIVE,
        "particles": POSITIVE,
        "iterations": POSITIVE,
        "min_variance": NON_NEGATIVE,
        "truncation_sigma": POSITIVE,
        "smoothing": FRACTION,
        "gamma": Rule(lambda v: 0.0 < v <= 1.0, "lie in (0, 1]", (0.0, 1.5)),
        "cost_limit": NON_NEGATIVE,
        "kappa_init": NON_NEGATIVE,
        "kappa_lr": POSITIVE,
        "permissible_episode_cost": NON_NEGATIVE,
        "permissible_constraint_costs": each(NON_NEGATIVE),
        "constraint_backoff": each(NON_NEGATIVE),
        "reward_pessimism": NON_NEGATIVE,
        "state_clip": POSITIVE,
        "scan_unroll": NON_NEGATIVE,
        "tile_rows": NON_NEGATIVE,
        "constant_candidates": LEVELS,
    },
    "training": {
        "seed": SEED,
        "epochs": POSITIVE,
        "model_train_freq": POSITIVE,
        "random_episodes": NON_NEGATIVE,
        "best_cost_threshold": NON_NEGATIVE,
        "validation_days": POSITIVE,
        "validation_every": POSITIVE,
        "validation_seed": SEED,
        "run_root": Rule(lambda v: v != "", "not be empty", ("",)),
    },
    "evaluation": {
        "days": NON_NEGATIVE,
        "seed": SEED,
        "fixed_kappa": NON_NEGATIVE,
        "reference": Rule(lambda v: v in EVALUATION_METHODS, f"be one of {list(EVALUATION_METHODS)}", ("greedy",)),
        "oracle_popsize": at_least(2),
        "oracle_iterations": POSITIVE,
        "oracle_cost_limit": NON_NEGATIVE,
        "cost_limit": NON_NEGATIVE,
        "constraint_backoff": each(NON_NEGATIVE),
        "reward_pessimism": NON_NEGATIVE,
        "constant_candidates": LEVELS,
        "num_elites": POSITIVE,
        "host_oracle_popsize": at_least(2),
        "host_oracle_iterations": POSITIVE,
        "host_oracle_horizon": POSITIVE,
        "forecast_scenarios": POSITIVE,
        "tuned_levels": at_least(2),
        "tuned_days": POSITIVE,
        "methods": (NON_EMPTY, each(Rule(lambda v: v in EVALUATION_METHODS, f"be one of {list(EVALUATION_METHODS)}",
                                         ("greedy",)))),
    },
}


def _check_grid(grid: GridConfig) -> None:
    if not grid.load_multiplier:
        _fail("grid.load_multiplier", "needs one value per step of the episode")


def _check_roads(roads: RoadsConfig) -> None:
    for i, edge in enumerate(roads.edges):
        ok = (len(edge) == 4 and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= roads.num_nodes
                                     for x in edge[:2])
              and isinstance(edge[2], (int, float)) and not isinstance(edge[2], bool) and math.isfinite(edge[2])
              and edge[2] > 0 and isinstance(edge[3], str))
        if not ok:
            _fail(f"roads.edges[{i}]", f"expected [node, node, km > 0, class] with nodes in 1..{roads.num_nodes}, "
                  f"got {list(edge)}")
    for i, node in enumerate(roads.station_nodes):
        if not 1 <= node <= roads.num_nodes:
            _fail(f"roads.station_nodes[{i}]", f"road node {node} outside 1..{roads.num_nodes}")
    classes = {edge[3] for edge in roads.edges}
    for key in ("free_speed_kmh", "beta_base", "beta_cubic", "saturation"):
        missing = classes - set(getattr(roads, key))
        if missing:
            _fail(f"roads.{key}", f"missing road class(es) {sorted(missing)}")


def _check_demand(demand: DemandConfig) -> None:
    if demand.origin_weights is not None and sum(demand.origin_weights) <= 0:
        _fail("demand.origin_weights", "needs non-negative weights with a positive sum")
    if demand.figures_dir is not None:
        folder = Path(demand.figures_dir)
        missing = [name for name in FIGURE_FILES if not (folder / name).is_file()]
        if missing:
            _fail("demand.figures_dir", f"'{folder}' does not hold {missing}; write them with "
                  "python -m evjax.data.calibrate")


def _check_env(env: EnvConfig) -> None:
    unknown = [name for name in env.extra_observations if name not in EXTRA_OBSERVATIONS]
    if unknown:
        _fail("env.extra_observations", f"unknown {unknown}; choose from {list(EXTRA_OBSERVATIONS)}")
    if len(set(env.extra_observations)) != len(env.extra_observations):
        _fail("env.extra_observations", f"repeats a feature: {list(env.extra_observations)}")
    for k, (lo, hi) in enumerate(zip(env.price_lower, env.price_upper)):
        if not lo < hi:
            _fail("env.price_lower", f"station {k + 1} lower bound {lo} is not below upper bound {hi}")
    for k, (lo, hi, price) in enumerate(zip(env.price_lower, env.price_upper, env.initial_prices)):
        if not lo <= price <= hi:
            _fail("env.initial_prices", f"station {k + 1} price {price} outside [{lo}, {hi}]")


def _check_model(model: ModelConfig) -> None:
    if len(model.weight_decays) != len(model.hidden_sizes) + 1:
        _fail("model.weight_decays", f"needs one value per hidden layer plus one for the heads "
              f"({len(model.hidden_sizes) + 1}), got {len(model.weight_decays)}")
    if model.num_elites > model.ensemble_size:
        _fail("model.num_elites", f"{model.num_elites} elites exceed ensemble_size {model.ensemble_size}")
    if model.min_logvar_init >= model.max_logvar_init:
        _fail("model.min_logvar_init", "must be below model.max_logvar_init")


def _check_backoff(key: str, backoff: tuple[float, ...], cost_model: str, off: str) -> None:
    """A limit back-off (planner's or deployed): [line loading, carbon], on the observation cost only; ``off`` is
    the value the error suggests for the learned cost."""
    if len(backoff) != 2:
        _fail(key, f"needs two values (line loading, carbon kg/MWh), got {len(backoff)}")
    if any(backoff) and cost_model != "observation":
        _fail(key, f"{list(backoff)} needs planner.cost_model observation (it tightens the limits of that cost); "
              f"set {key}={off} with the learned cost")


def _check_planner(planner: PlannerConfig) -> None:
    if planner.num_elites > planner.popsize:
        _fail("planner.num_elites", f"{planner.num_elites} elites exceed popsize {planner.popsize}")
    if planner.nan_cost <= planner.cost_limit:
        _fail("planner.nan_cost", f"{planner.nan_cost} must exceed planner.cost_limit ({planner.cost_limit}) so "
              "that a non-finite rollout is never feasible")
    if len(planner.permissible_constraint_costs) != 2:
        _fail("planner.permissible_constraint_costs", f"needs two values (line, carbon), got "
              f"{len(planner.permissible_constraint_costs)}")
    _check_backoff("planner.constraint_backoff", planner.constraint_backoff, planner.cost_model, "[0, 0]")
    if planner.kappa_per_constraint and planner.cost_model != "observation":
        _fail("planner.kappa_per_constraint", "needs planner.cost_model observation (the margins are per quantity)")


def _check_evaluation(evaluation: EvaluationConfig) -> None:
    repeated = sorted({m for m in evaluation.methods if evaluation.methods.count(m) > 1})
    if repeated:
        _fail("evaluation.methods", f"method(s) {repeated} listed more than once")
    if evaluation.reference not in evaluation.methods:
        _fail("evaluation.reference", f"method {evaluation.reference!r} is not among evaluation.methods "
              f"{list(evaluation.methods)}: the paired differences need it evaluated on the same days")


SECTION_CHECKS: dict[str, tuple[Callable[[Any], None], ...]] = {  # rules spanning several fields of one section
    "grid": (_check_grid,),
    "roads": (_check_roads,),
    "demand": (_check_demand,),
    "env": (_check_env,),
    "model": (_check_model,),
    "planner": (_check_planner,),
    "evaluation": (_check_evaluation,),
}


@functools.cache
def _section_names() -> dict[type, str]:
    hints = typing.get_type_hints(Config)
    return {hints[field.name]: field.name for field in dataclasses.fields(Config)}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply_rule(key: str, value: Any, rule: Rule) -> None:
    if value is None:
        return
    if not rule.elementwise:
        if not rule.holds(value):
            _fail(key, f"must {rule.needs}, got {value!r}")
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for index, element in items:
        if not rule.holds(element):
            name = f"{key}.{index}" if isinstance(value, dict) else f"{key}[{index}]"
            _fail(name, f"must {rule.needs}, got {element!r}")


def field_rules(section: str, name: str) -> tuple[Rule, ...]:
    """The rules of field ``section.name`` (empty when its type says everything)."""
    rules = FIELD_RULES.get(section, {}).get(name, ())
    return (rules,) if isinstance(rules, Rule) else rules


def check_section(section: Section) -> None:
    """Check and normalise a section's fields in place: types, then field rules, then section rules."""
    name = next(_section_names()[cls] for cls in type(section).__mro__ if cls in _section_names())
    types_ = _field_types(type(section))
    for field in dataclasses.fields(section):
        key = f"{name}.{field.name}"
        value = _check_type(key, getattr(section, field.name), types_[field.name])
        object.__setattr__(section, field.name, value)
        for rule in field_rules(name, field.name):
            _apply_rule(key, value, rule)
    for check in SECTION_CHECKS.get(name, ()):
        check(section)


def validate(cfg: Config) -> None:
    """Rules spanning sections (each section has checked its own fields); each error names the offending key."""
    for name, section_type in typing.get_type_hints(Config).items():
        if not isinstance(getattr(cfg, name), section_type):
            _fail(name, f"expected a {section_type.__name__}, got {type(getattr(cfg, name)).__name__}")
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
    priors = {"planner.prior_prices": cfg.planner.prior_prices, "evaluation.prior_prices": cfg.evaluation.prior_prices}
    per_station.update({key: prior for key, prior in priors.items() if prior})
    for key, values in per_station.items():
        if len(values) != n:
            _fail(key, f"needs one value per station ({n}, the length of grid.station_buses), got {len(values)}")
    for key, prior in priors.items():
        for k, (lo, hi, price) in enumerate(zip(cfg.env.price_lower, cfg.env.price_upper, prior or ())):
            if not lo <= price <= hi:
                _fail(key, f"station {k + 1} price {price} outside env's bounds [{lo}, {hi}]")
    steps = cfg.env.episode_steps
    if len(cfg.grid.load_multiplier) < steps:
        _fail("grid.load_multiplier", f"needs at least env.episode_steps ({steps}) values")
    for cls, values in cfg.roads.saturation.items():
        if len(values) < steps:
            _fail(f"roads.saturation.{cls}", f"needs at least env.episode_steps ({steps}) values")
    if cfg.demand.origin_weights is not None and len(cfg.demand.origin_weights) != cfg.roads.num_nodes:
        _fail("demand.origin_weights", f"needs one weight per road node ({cfg.roads.num_nodes}), "
              f"got {len(cfg.demand.origin_weights)}")
    planning_members = cfg.model.num_elites if cfg.model.holdout_fraction > 0 else cfg.model.ensemble_size
    if cfg.planner.particles % planning_members:
        source = "model.num_elites (a holdout is used)" if cfg.model.holdout_fraction > 0 else "model.ensemble_size"
        _fail("planner.particles", f"{cfg.planner.particles} particles are not divisible by the {planning_members} "
              f"planning members ({source}): particles are split evenly across members")
    if cfg.economics.welfare == "total_surplus":
        if cfg.stations.money_weight <= 0.0:
            _fail("stations.money_weight", "must be positive with economics.welfare total_surplus "
                  "(time is valued in money as (1 - w) / w x value_of_time)")
        if cfg.economics.user_value_cny_per_kwh <= max(cfg.env.price_upper):
            _fail("economics.user_value_cny_per_kwh", f"must exceed every price bound ({max(cfg.env.price_upper)}): "
                  f"drivers charge at any posted price, got {cfg.economics.user_value_cny_per_kwh}")
    oracle_and_planner = min(cfg.planner.popsize, cfg.evaluation.oracle_popsize)  # the oracles use the planner's grid
    for section, population, names in (
            ("planner", oracle_and_planner, "planner.popsize / evaluation.oracle_popsize"),
            ("evaluation", cfg.planner.popsize, "planner.popsize")):
        levels = getattr(cfg, section).constant_candidates
        if levels and levels ** cfg.num_stations > population:
            _fail(f"{section}.constant_candidates", f"{levels} levels give {levels ** cfg.num_stations} constant "
                  f"candidates for {cfg.num_stations} stations, more than the {population} candidates of {names}")
    if cfg.evaluation.num_elites is not None and cfg.evaluation.num_elites > cfg.planner.popsize:
        _fail("evaluation.num_elites", f"{cfg.evaluation.num_elites} elites exceed planner.popsize "
              f"({cfg.planner.popsize})")
    if cfg.evaluation.host_oracle_horizon > steps:
        _fail("evaluation.host_oracle_horizon", f"exceeds env.episode_steps ({steps})")
    if cfg.evaluation.constraint_backoff is not None:
        _check_backoff("evaluation.constraint_backoff", cfg.evaluation.constraint_backoff, cfg.planner.cost_model,
                       "null")
    if cfg.evaluation.cost_limit is not None and cfg.planner.nan_cost <= cfg.evaluation.cost_limit:
        _fail("evaluation.cost_limit", f"{cfg.evaluation.cost_limit} must stay below planner.nan_cost "
              f"({cfg.planner.nan_cost}) so that a non-finite rollout is never feasible")


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
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 5e-5, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            _fail(key, f"must be finite, got {value!r}")
        return number
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
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        _fail(f"{name}.{unknown[0]}", f"unknown key; section '{name}' has {sorted(fields)}")
    return cls(**{str(k): v for k, v in data.items()})


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


def load(path: str | Path | None = None, overrides: Sequence[str] = (), base: Config | None = None) -> Config:
    """Load ``path`` (YAML; None = ``base``, else the built-in defaults) and apply ``section.key=value`` overrides."""
    data: dict = to_dict(base) if base is not None and path is None else {}
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
    """Write the resolved config as YAML, atomically (a run killed meanwhile leaves the old file or none)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
