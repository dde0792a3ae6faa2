import os
import subprocess
from pathlib import Path

import dataclasses

import numpy as np
import pytest

from evjax.config import Config
from evjax.data.scenarios import Scenario

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = Config()


def hand_scenario(arrival_step, origin, capacity, start_soc, target_soc, duration_h=2.0, laxity_h=1.0) -> Scenario:
    """A hand-made day: EV attributes given as scalars (broadcast) or per-EV sequences."""
    n = len(arrival_step)
    full = lambda x: np.broadcast_to(np.asarray(x, dtype=float), (n,)).copy()  # noqa: E731
    return Scenario(
        split="train", day=0, date="hand", seed=0,
        arrival_step=np.asarray(arrival_step, dtype=np.int64), origin_node=np.asarray(origin, dtype=np.int64),
        capacity_kwh=full(capacity), start_soc=full(start_soc), target_soc=full(target_soc),
        duration_h=full(duration_h), laxity_h=full(laxity_h), load_profile=np.ones(DEFAULT.env.episode_steps),
    )


def with_config(**sections) -> Config:
    """The default config with some fields of some sections replaced: ``with_config(stations={"chargers": ...})``."""
    return dataclasses.replace(DEFAULT, **{name: dataclasses.replace(getattr(DEFAULT, name), **fields)
                                           for name, fields in sections.items()})


def _paper_data_candidates() -> list[Path]:
    """$EVJAX_PAPER_DATA, ../shared/paper_data beside this checkout, or beside the repository it was cloned from."""
    candidates = [Path(os.environ["EVJAX_PAPER_DATA"])] if os.environ.get("EVJAX_PAPER_DATA") else []
    candidates.append(ROOT.parent / "shared" / "paper_data")
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and "://" not in origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "paper_data")
    return candidates


@pytest.fixture
def paper_data():
    """The original spreadsheets (never committed); skipped where none of the candidate folders holds them."""
    candidates = _paper_data_candidates()
    for folder in candidates:
        if (folder / "usable_data.xlsx").is_file():
            return folder
    pytest.skip(f"original spreadsheets not found in {[str(c) for c in candidates]}")


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


TWIN_EVAL_DAYS = (0, 81, 162)  # test days of the twin-evaluation fixture: an odd count, so 2 devices pad one


def small_oracle_config() -> Config:
    """The default config with a tiny twin-oracle budget for fast tests: 16 candidates x 2 iterations, 3 elites
    (the oracle keeps the planner's elite fraction, here 80 of 500), no constant candidates."""
    return with_config(evaluation={"oracle_popsize": 16, "oracle_iterations": 2},
                       planner={"constant_candidates": 0, "num_elites": 80})


@pytest.fixture(scope="session")
def twin_evaluation():
    """(cfg, day ids, seeds, rows per method, timings) of fixed_mid, random and the oracle on the twin, 3 test days."""
    from evjax import evaluate

    cfg = small_oracle_config()
    seeds = [cfg.evaluation.seed + i for i in range(len(TWIN_EVAL_DAYS))]
    runs, timings = evaluate.run_on_twin(cfg, ["fixed_mid", "random", "oracle"], TWIN_EVAL_DAYS, seeds)
    return cfg, list(TWIN_EVAL_DAYS), seeds, runs, timings
