"""benchmarks/model_constant.py: the grid of constant prices it scores and its ranking rule, by hand."""

import dataclasses
import sys
from pathlib import Path

import numpy as np

from evjax import evaluate
from evjax.config import Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_constant  # noqa: E402


def test_grid_holds_every_vector_with_the_bounds():
    cfg = Config()  # price bounds [1.1, 1.3, 1.2] to [1.4, 1.5, 1.4]
    grid = np.asarray(evaluate.fixed_price_grid(
        dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, tuned_levels=3))))
    assert grid.shape == (27, 3)
    np.testing.assert_allclose(grid[0], [1.1, 1.3, 1.2], rtol=1e-6)
    np.testing.assert_allclose(grid[-1], [1.4, 1.5, 1.4], rtol=1e-6)
    np.testing.assert_allclose(np.unique(grid[:, 1]), [1.3, 1.4, 1.5], rtol=1e-6)
    assert len({tuple(row) for row in grid.round(6)}) == 27


def test_rank_goes_by_cost_then_by_reward_among_near_ties():
    cost = np.array([0.2, 0.00001, 0.00003, 0.05])
    reward = np.array([9.0, 1.0, 2.0, 5.0])
    # 0.00001 and 0.00003 round to the same 1e-4 cost: the higher reward of the two first; the dear 0.2 last
    assert model_constant.rank(cost, reward).tolist() == [2, 1, 3, 0]
