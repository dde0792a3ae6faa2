"""benchmarks/safety_floor.py: constant prices replayed on a training run's episodes, against the CSV's runs."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import safety_floor  # noqa: E402

from evjax.config import load  # noqa: E402
from evjax.env import EVPricingEnv  # noqa: E402
from evjax.train import episode_seed  # noqa: E402


def _write_csv(path, epochs):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "epoch", "cost", "cumulative_cost", "welfare_cny", "kappa"])
        for variant, cost in (("cem", 0.5), ("cap_adaptive", 0.25)):
            for epoch in range(epochs):
                writer.writerow([variant, 0, epoch, cost, cost * (epoch + 1), 1000.0, 0.0])


def test_replays_the_training_episodes_after_the_random_ones(tmp_path, capsys):
    cfg = load(None, ["training.seed=0"])
    epochs = cfg.training.random_episodes + 2
    _write_csv(tmp_path / "runs.csv", epochs)
    assert safety_floor.main(["--csv", str(tmp_path / "runs.csv"), "--seeds", "0", "--json"]) == 0
    out = capsys.readouterr().out
    summary = __import__("json").loads(out.strip().splitlines()[-1])["policies"]
    # by hand: the upper bounds posted on the two planned episodes' (day, seed), plus the random episodes' CSV cost
    env, upper = EVPricingEnv(cfg), np.asarray(cfg.env.price_upper)
    expected = 0.25 * cfg.training.random_episodes  # cap_adaptive's random episodes, not CEM's
    for epoch in range(cfg.training.random_episodes, epochs):
        env.reset(seed=episode_seed(cfg, epoch), options={"split": "train"})
        for _ in range(cfg.env.episode_steps):
            expected += env.step(upper)[4]["cost"]
    got = summary["random, then fixed_upper"]
    assert got["cumulative_cost"] == [pytest.approx(expected)]
    assert got["x_cem"] == pytest.approx(expected / (0.5 * epochs))
    assert summary["cem"]["x_cem"] == 1.0 and summary["cap_adaptive"]["x_cem"] == pytest.approx(0.5)


def test_a_missing_csv_is_one_line_exit_2(tmp_path, capsys):
    assert safety_floor.main(["--csv", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.csv" in err[0]
