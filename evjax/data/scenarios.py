"""Daily EV-demand scenarios from the shipped figures (SPEC 6).

Host side, not jittable. A scenario is one real day: arrivals per step follow
that day's station power over the episode window, scaled so that the mean day
has ``demand.mean_arrivals_per_step``; counts are Poisson. Each EV is a whole
row of the empirical attribute table (capacity, start/target SOC, duration,
laxity), so the attributes keep their correlation. Days are split by date
order: day i is a test day when ``i % test_every == test_every - 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from evjax.config import Config
from evjax.data import ATTRIBUTE_COLUMNS, FIGURES_DIR
from evjax.errors import ConfigError

QUARTERS_PER_DAY = 96
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One day of EV demand; V is the number of EVs that appear in the episode."""

    split: str
    day: int  # index within the split
    date: str  # ISO date of the real day
    seed: int
    arrival_step: np.ndarray  # [V] int in [0, episode_steps): the step each EV appears
    origin_node: np.ndarray  # [V] int road node in 1..num_nodes
    capacity_kwh: np.ndarray  # [V] battery capacity
    start_soc: np.ndarray  # [V] fraction in (0, 1]
    target_soc: np.ndarray  # [V] fraction, above start_soc
    duration_h: np.ndarray  # [V] charging duration of the real session (h)
    laxity_h: np.ndarray  # [V] laxity (h); deadline = arrival + duration + laxity
    load_profile: np.ndarray  # [episode_steps] the day's window power / mean window power over all days

    @property
    def num_evs(self) -> int:
        return int(self.arrival_step.size)


@dataclasses.dataclass(frozen=True)
class Figures:
    """The calibrated data: dates [D], quarter-hour power [D, 96] (kW), attribute table [Q, 5], summary."""

    dates: np.ndarray
    power_kw: np.ndarray
    attributes: np.ndarray
    summary: dict


@functools.lru_cache(maxsize=4)
def load_figures(figures_dir: str | None = None) -> Figures:
    """Read the figure files written by ``evjax.data.calibrate``."""
    folder = Path(figures_dir) if figures_dir is not None else FIGURES_DIR
    try:
        profiles = np.load(folder / "profiles.npz")
        attrs = np.load(folder / "ev_attributes.npz")
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"config key 'demand.figures_dir': cannot read calibrated figures in '{folder}' "
                          f"({exc.__class__.__name__}); run python -m evjax.data.calibrate") from None
    columns = tuple(str(c) for c in attrs["columns"])
    if columns != ATTRIBUTE_COLUMNS:
        raise ConfigError(f"'{folder / 'ev_attributes.npz'}': columns {columns}, expected {ATTRIBUTE_COLUMNS}")
    return Figures(profiles["dates"], profiles["power_kw"].astype(np.float64), attrs["attributes"].astype(np.float64),
                   summary)


def split_days(num_days: int, test_every: int, split: str) -> np.ndarray:
    """Indices (date order) of the days in ``split``; day i is a test day iff i % test_every == test_every - 1."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_test = np.arange(num_days) % test_every == test_every - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def window_quarters(cfg: Config) -> np.ndarray:
    """Quarter-hour columns [episode_steps, q] covered by each step (wrapping past midnight).

    ``env.dt_hours`` is a multiple of 15 min (checked by the config).
    """
    per_step = int(round(cfg.env.dt_hours * 4.0))
    start = int(round(cfg.env.start_hour * 4.0))
    steps = np.arange(cfg.env.episode_steps)[:, None] * per_step + np.arange(per_step)[None, :]
    return (start + steps) % QUARTERS_PER_DAY


def window_power(cfg: Config, figures: Figures) -> np.ndarray:
    """Station power per day and step [D, episode_steps] (kW, mean over the step's quarter hours)."""
    return figures.power_kw[:, window_quarters(cfg)].mean(axis=2)


def num_days(cfg: Config, split: str) -> int:
    figures = load_figures(cfg.demand.figures_dir)
    return int(split_days(len(figures.dates), cfg.demand.test_every, split).size)


def arrival_rates(cfg: Config, figures: Figures) -> np.ndarray:
    """Expected arrivals [D, episode_steps]: proportional to window power, mean over days and steps = the config mean."""
    power = window_power(cfg, figures)
    return cfg.demand.mean_arrivals_per_step * power / power.mean()


def make_scenario(cfg: Config, split: str = "train", day: int | None = None, seed: int = 0) -> Scenario:
    """Draw a day's EVs; deterministic for a given (split, day, seed); ``day=None`` draws the day from the seed."""
    figures = load_figures(cfg.demand.figures_dir)
    days = split_days(len(figures.dates), cfg.demand.test_every, split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    if day is None:
        day = int(rng.integers(len(days)))
    if not 0 <= day < len(days):
        raise ValueError(f"day {day} out of range: split {split!r} has {len(days)} days")
    row = days[day]
    rates = arrival_rates(cfg, figures)[row]
    counts = rng.poisson(rates)
    arrival_step = np.repeat(np.arange(cfg.env.episode_steps), counts)
    total = int(counts.sum())
    weights = (np.full(cfg.roads.num_nodes, 1.0) if cfg.demand.origin_weights is None
               else np.asarray(cfg.demand.origin_weights, dtype=float))
    origin = rng.choice(np.arange(1, cfg.roads.num_nodes + 1), size=total, p=weights / weights.sum())
    ev = figures.attributes[rng.integers(0, len(figures.attributes), total)]
    window = window_power(cfg, figures)
    return Scenario(
        split=split,
        day=int(day),
        date=str(figures.dates[row]),
        seed=int(seed),
        arrival_step=arrival_step,
        origin_node=origin.astype(np.int64),
        capacity_kwh=ev[:, 0],
        start_soc=ev[:, 1],
        target_soc=ev[:, 2],
        duration_h=ev[:, 3],
        laxity_h=ev[:, 4],
        load_profile=window[row] / window.mean(),
    )
