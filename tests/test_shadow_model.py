"""benchmarks/shadow_model.py: another model fitted on a run's own data, deployable like the run itself."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evjax import evaluate, replay
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import shadow_model  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run without the ridge map: 3 epochs of 12 steps, so 36 transitions and 3 fits."""
    run_dir = tmp_path_factory.mktemp("shadow") / "run"
    cmd = [sys.executable, "-m", "evjax.train", "--config", str(ROOT / "configs" / "smoke.yaml"), "--run-dir",
           str(run_dir), "--no-progress", "--set", "model.linear_ridge=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _mean_error(trainer) -> float:
    """Mean squared error of the elites' mean next observation on the run's own transitions."""
    dynamics = trainer.parts.dynamics
    model = dynamics.select_elites(trainer.state["model"])
    obs, action, _, _, next_obs = replay.contents(trainer.state["buffer"])
    member = jnp.zeros(len(obs), jnp.int32)
    pred = dynamics.predict(model, jnp.asarray(obs), jnp.asarray(action), None, member, mean_only=True)
    return float(np.mean((np.asarray(pred.next_obs) - next_obs) ** 2))


def test_shadow_is_the_run_with_another_model_fitted_on_its_buffer(trained, tmp_path):
    out = tmp_path / "shadow"
    info = shadow_model.shadow_fit(trained, out, ["model.linear_ridge=0.5"])
    assert info["fits"] == 3 and info["transitions"] == 36  # one fit per 12-step episode, as in training

    cfg, run, _, epoch, _ = evaluate._load_trained(trained)
    shadow_cfg, shadow, kind, shadow_epoch, _ = evaluate._load_trained(out)  # restores like any trained run
    assert kind == "best" and shadow_epoch == epoch
    assert shadow_cfg.model.linear_ridge == 0.5 and cfg.model.linear_ridge == 0.0
    assert shadow_cfg.planner == cfg.planner and shadow_cfg.training == cfg.training
    assert "linear" in shadow.state["model"].params and "linear" not in run.state["model"].params
    assert shadow.parts.agent.kappa == pytest.approx(run.parts.agent.kappa)
    for name in replay.FIELDS + ("size",):
        np.testing.assert_array_equal(shadow.state["buffer"][name], run.state["buffer"][name])

    fresh = type(shadow)(shadow_cfg, tmp_path / "unused", metrics=False)
    fresh.state["buffer"] = shadow.state["buffer"]
    # the fits (map and network) learned the data; unfitted, the same model did not
    assert _mean_error(shadow) < 0.5 * _mean_error(fresh)

    again = tmp_path / "again"
    shadow_model.shadow_fit(trained, again, ["model.linear_ridge=0.5"])
    same = evaluate._load_trained(again)[1]
    jax.tree.map(np.testing.assert_array_equal, same.state["model"].params, shadow.state["model"].params)


def test_other_sections_and_the_run_itself_are_one_line_errors(trained, capsys):
    assert shadow_model.main(["--run-dir", str(trained), "--out", str(trained), "--set", "model.linear_ridge=1"]) == 2
    assert "--out must differ from --run-dir" in capsys.readouterr().err
    out = str(trained.parent / "x")
    assert shadow_model.main(["--run-dir", str(trained), "--out", out, "--set", "planner.horizon=3"]) == 2
    err = capsys.readouterr().err
    assert "planner.horizon" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
