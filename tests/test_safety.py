"""The constraint side of the agent (SPEC 10 options): cost from the predicted observation, margins, kappa per
constraint, horizon ending with the episode, model diagnostics and the paired checkpoint score."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evjax.agent import Agent
from evjax.config import Config, ConfigError, PlannerConfig, load
from evjax.planner import episode_step_weights, make_cost_fn, make_planner, observation_cost

COST_KW = dict(num_stations=3, loading_limit=0.9, carbon_index=7, carbon_scale=300.0, carbon_limit=850.0,
               carbon_divisor=850.0)


def obs_vector(loading, carbon_kg_per_mwh, step_fraction=0.0):
    """An observation in the env's layout: loadings [3], EVs [3], welfare, carbon / 300, t / T."""
    return np.array([*loading, 5.0, 3.0, 4.0, 1.0, carbon_kg_per_mwh / 300.0, step_fraction], np.float32)


def test_observation_cost_is_the_env_formula_by_hand():
    obs = obs_vector([0.95, 0.80, 0.92], 901.0)
    # lines: 0.05 + 0 + 0.02; carbon: 51 / 850
    expected = 0.05 + 0.02 + 51.0 / 850.0
    assert float(observation_cost(obs, np.zeros(9, np.float32), 0.0, **COST_KW)) == pytest.approx(expected, abs=1e-5)
    inside = obs_vector([0.5, 0.6, 0.7], 800.0)
    assert float(observation_cost(inside, np.zeros(9, np.float32), 0.0, **COST_KW)) == 0.0


def test_margin_moves_each_quantity_kappa_stds_towards_its_limit():
    obs = obs_vector([0.85, 0.80, 0.50], 840.0)
    std = np.zeros(9, np.float32)
    std[0], std[1], std[7] = 0.05, 0.01, 20.0 / 300.0  # sd of L1, L2 and of CI (20 kg/MWh)
    # kappa 2: L1 0.95 -> 0.05 over, L2 0.82 -> 0, CI 880 -> 30 / 850
    assert float(observation_cost(obs, std, 2.0, **COST_KW)) == pytest.approx(0.05 + 30.0 / 850.0, abs=1e-5)
    # one kappa per constraint (line 0, carbon 1): only the carbon margin, 860 -> 10 / 850
    assert float(observation_cost(obs, std, jnp.array([0.0, 1.0]), **COST_KW)) == pytest.approx(10.0 / 850.0,
                                                                                               abs=1e-5)
    # the cost never decreases with kappa
    costs = [float(observation_cost(obs, std, k, **COST_KW)) for k in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert costs == sorted(costs)


@pytest.mark.parametrize("steps_done, expected", [(0, [1, 1, 1, 1]), (9, [1, 1, 1, 0]), (11, [1, 0, 0, 0])])
def test_step_weights_end_with_the_episode(steps_done, expected):
    obs = obs_vector([0.5] * 3, 800.0, steps_done / 12)
    np.testing.assert_array_equal(episode_step_weights(jnp.asarray(obs), horizon=4, episode_steps=12), expected)


class StepOut(NamedTuple):
    next_obs: jax.Array
    reward: jax.Array
    cost: jax.Array
    std: jax.Array


def loading_step(model, obs, act, key):
    """L1 rises by 0.1 per step, the step counter (obs[-1]) by 1/12; reward 1; std 0.02 on every obs dim."""
    next_obs = obs.at[..., 0].add(0.1).at[..., -1].add(1.0 / 12.0)
    ones = jnp.ones(obs.shape[:-1], jnp.float32)
    return StepOut(next_obs, ones, 0.0 * ones, jnp.full(obs.shape[:-1] + (obs.shape[-1] + 2,), 0.02))


def make_test_planner(mode, margin_std, step):
    cfg = PlannerConfig(horizon=3, popsize=4, num_elites=2, constant_candidates=0, particles=2, iterations=1, gamma=1.0,
                        mode=mode, cost_model="observation", margin_std=margin_std)
    cost_fn = functools.partial(observation_cost, **COST_KW)
    weights = functools.partial(episode_step_weights, horizon=3, episode_steps=12)
    return make_planner(cfg, (1.1, 1.3, 1.2), (1.4, 1.5, 1.4), 2, step, cost_fn=cost_fn, step_weights_fn=weights)


OBS_TWO_LEFT = obs_vector([0.8, 0.5, 0.5], 800.0, 10 / 12)  # two steps left in the episode


@pytest.mark.parametrize("mode", ["cap", "ccem"])
def test_rollout_prices_the_predicted_observation_with_its_margin(mode):
    planner = make_test_planner(mode, "predicted", loading_step)
    values = planner.evaluate(jax.random.key(0), None, jnp.asarray(OBS_TWO_LEFT), jnp.full((4, 3, 3), 1.3),
                              jnp.asarray(1.5))
    # predicted L1: 0.9, 1.0 (the third step lies after the episode's end: weight 0); nominal cost 0 + 0.1
    np.testing.assert_allclose(values.reward, 2.0, rtol=1e-6)
    margin = 1.5 * 0.02 if mode == "cap" else 0.0  # each counted step's L1 moves 0.03 towards the limit
    np.testing.assert_allclose(values.cost, 0.1 + 2 * margin, atol=1e-6)
    np.testing.assert_allclose(values.penalty, 2 * margin, atol=1e-6)


def nan_after_the_end_step(model, obs, act, key):
    """As ``loading_step`` inside the episode; from a state at or past its end (t / T >= 1) everything is NaN."""
    out = loading_step(model, obs, act, key)
    past = obs[..., -1:] >= 1.0 - 1e-6  # [E, M, 1]
    return out._replace(next_obs=jnp.where(past, jnp.nan, out.next_obs),
                        reward=jnp.where(past[..., 0], jnp.nan, out.reward))


def test_horizon_steps_after_the_episode_are_not_computed():
    """Two steps are left: the third horizon step is skipped, not computed and weighted 0 (0 x NaN would be NaN,
    scored as the NaN reward -1e6)."""
    planner = make_test_planner("cap", "predicted", nan_after_the_end_step)
    values = planner.evaluate(jax.random.key(0), None, jnp.asarray(OBS_TWO_LEFT), jnp.full((4, 3, 3), 1.3),
                              jnp.asarray(1.5))
    np.testing.assert_allclose(values.reward, 2.0, rtol=1e-6)
    np.testing.assert_allclose(values.cost, 0.1 + 2 * 1.5 * 0.02, atol=1e-6)


def disagreeing_step(model, obs, act, key):
    """As ``loading_step``, but member 0 raises L1 by 0.08 and member 1 by 0.12 per step (rows are members)."""
    out = loading_step(model, obs, act, key)
    spread = jnp.array([-0.02, 0.02])[:, None]  # [E, 1]
    return out._replace(next_obs=out.next_obs.at[..., 0].add(spread))


def test_disagreement_margin_is_the_member_spread_by_hand():
    planner = make_test_planner("cap", "disagreement", disagreeing_step)
    values = planner.evaluate(jax.random.key(0), None, jnp.asarray(OBS_TWO_LEFT), jnp.full((4, 3, 3), 1.3),
                              jnp.asarray(1.5))
    # members' L1: step 1 0.88 / 0.92 (spread 0.02), step 2 0.96 / 1.04 (spread 0.04); particles split evenly
    # nominal cost: (0 + 0.02) / 2 + (0.06 + 0.14) / 2 = 0.11; margins +0.03, +0.06: (0.01 + 0.05) / 2 + (0.12 + 0.20) / 2
    np.testing.assert_allclose(values.cost, 0.19, atol=1e-5)
    np.testing.assert_allclose(values.penalty, 0.08, atol=1e-5)
    agreeing = make_test_planner("cap", "disagreement", loading_step)
    np.testing.assert_allclose(agreeing.evaluate(jax.random.key(0), None, jnp.asarray(OBS_TWO_LEFT),
                                                 jnp.full((4, 3, 3), 1.3), jnp.asarray(1.5)).penalty, 0.0, atol=1e-7)


def test_total_margin_is_the_root_sum_of_squares_of_predicted_std_and_disagreement_by_hand():
    """``margin_std: total``: predicted std 0.02 and member spread 0.02 / 0.04 give sds sqrt(0.0008) and
    sqrt(0.002), so kappa 1.5 moves L1 by 0.042426 and 0.067082 (more than either part alone)."""
    planner = make_test_planner("cap", "total", disagreeing_step)
    values = planner.evaluate(jax.random.key(0), None, jnp.asarray(OBS_TWO_LEFT), jnp.full((4, 3, 3), 1.3),
                              jnp.asarray(1.5))
    first, second = 1.5 * np.sqrt(0.02 ** 2 + 0.02 ** 2), 1.5 * np.sqrt(0.02 ** 2 + 0.04 ** 2)
    # members' L1 0.88 / 0.92, then 0.96 / 1.04: each moved value is above the 0.9 limit
    cost = ((0.88 + first - 0.9) + (0.92 + first - 0.9)) / 2 + ((0.96 + second - 0.9) + (1.04 + second - 0.9)) / 2
    np.testing.assert_allclose(values.cost, cost, atol=1e-5)  # 0.209532
    np.testing.assert_allclose(values.penalty, cost - 0.11, atol=1e-5)


def test_kappa_per_constraint_follows_each_constraints_own_cost():
    cfg = PlannerConfig(horizon=2, popsize=4, num_elites=2, constant_candidates=0, particles=2, iterations=1,
                        cost_model="observation",
                        kappa_per_constraint=True, kappa_init=1.0, kappa_lr=0.1,
                        permissible_constraint_costs=(0.05, 0.05))
    planner = make_planner(cfg, (1.1, 1.3, 1.2), (1.4, 1.5, 1.4), 2, loading_step)
    agent = Agent(cfg, planner)
    np.testing.assert_array_equal(agent.kappa, [1.0, 1.0])
    agent.end_episode(0.30, (0.0, 0.30))  # line under its permissible cost, carbon over
    kappa = agent.kappa
    assert kappa[0] < 1.0 < kappa[1]
    np.testing.assert_allclose(kappa, [0.9, 1.1], atol=1e-5)  # Adam's first step is lr in the gradient's sign
    with pytest.raises(ValueError, match="line, carbon"):
        agent.end_episode(0.3)


@pytest.mark.parametrize("change, key", [
    (dict(planner={"kappa_per_constraint": True, "cost_model": "learned", "constraint_backoff": [0.0, 0.0]}),
     "planner.kappa_per_constraint"),
    (dict(planner={"permissible_constraint_costs": [0.1]}), "planner.permissible_constraint_costs"),
    (dict(planner={"constraint_backoff": [0.02]}), "planner.constraint_backoff"),
    (dict(planner={"constraint_backoff": [0.02, -5.0]}), "planner.constraint_backoff"),
    (dict(planner={"constraint_backoff": [0.0, 20.0], "cost_model": "learned"}), "planner.constraint_backoff"),
])
def test_inconsistent_safety_settings_name_their_key(change, key, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(path)


def test_cost_fn_follows_the_config_layout():
    learned = dataclasses.replace(Config(), planner=dataclasses.replace(Config().planner, cost_model="learned",
                                                                        constraint_backoff=(0.0, 0.0)),
                                  evaluation=dataclasses.replace(Config().evaluation, constraint_backoff=None))
    assert make_cost_fn(learned) is None
    cfg = Config()
    obs = obs_vector([0.95, 0.8, 0.8], 850.0 + 85.0)
    zero_std = np.zeros(9, np.float32)
    assert float(make_cost_fn(cfg, backoff=False)(obs, zero_std, 0.0)) == pytest.approx(0.05 + 0.1, abs=1e-5)
    # the default plans against 850 - 20 kg/MWh: (935 - 830) / 850
    assert float(make_cost_fn(cfg)(obs, zero_std, 0.0)) == pytest.approx(0.05 + 105.0 / 850.0, abs=1e-5)


def test_constraint_backoff_tightens_the_planners_limits_not_the_diagnostics():
    cfg = dataclasses.replace(Config(), planner=dataclasses.replace(Config().planner, constraint_backoff=(0.05, 20.0)))
    # line 1 at 0.87 is over 0.9 - 0.05 by 0.02, the others at 0.8 are under; CI 840 is over 850 - 20 by 10 kg/MWh
    obs = obs_vector([0.87, 0.8, 0.8], 840.0)
    assert float(make_cost_fn(cfg)(obs, None, 0.0)) == pytest.approx(0.02 + 10.0 / 850.0, abs=1e-5)
    assert float(make_cost_fn(cfg, backoff=False)(obs, None, 0.0)) == pytest.approx(0.0, abs=1e-7)
    untightened = dataclasses.replace(Config(), planner=dataclasses.replace(Config().planner,
                                                                            constraint_backoff=(0.0, 0.0)))
    assert float(make_cost_fn(untightened)(obs, None, 0.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(make_cost_fn(Config())(obs, None, 0.0)) == pytest.approx(10.0 / 850.0, abs=1e-5)  # default [0, 20]


def test_horizon_prediction_of_each_member_is_its_own_mean_rollout():
    from evjax.diagnostics import predict_horizon, predict_one_step
    from evjax.dynamics import make_dynamics

    cfg = Config().model
    dyn = make_dynamics(dataclasses.replace(cfg, ensemble_size=2, num_elites=2, hidden_sizes=(8,),
                                            weight_decays=(0.0, 0.0)), 9, 3)
    model = dyn.init(jax.random.key(1))
    step = functools.partial(dyn.step, key=None, matmul_dtype="float32", mean_only=True)
    obs0 = jnp.asarray(obs_vector([0.5, 0.6, 0.7], 800.0))
    actions = jnp.asarray(np.random.default_rng(0).uniform(1.1, 1.5, (4, 3)), jnp.float32)
    next_obs, reward = predict_horizon(step, model, obs0, actions)
    for member in range(2):
        obs = obs0
        for t in range(4):
            out = dyn.predict(model, obs[None], actions[t][None], None, jnp.array([member]), mean_only=True)
            np.testing.assert_allclose(next_obs[member, t], out.next_obs[0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(reward[member, t], out.reward[0], rtol=1e-4, atol=1e-5)
            obs = out.next_obs[0]
    one = predict_one_step(step, model, jnp.stack([obs0, obs0]), actions[:2])
    np.testing.assert_allclose(one.next_obs[:, 0], next_obs[:, 0], rtol=1e-5, atol=1e-6)


def test_episode_diagnostics_compile_the_horizon_rollout_once_and_match_the_eager_one():
    from evjax.diagnostics import _mean_horizon, predict_horizon
    from evjax.dynamics import make_dynamics

    cfg = Config().model
    dyn = make_dynamics(dataclasses.replace(cfg, ensemble_size=2, num_elites=2, hidden_sizes=(8,),
                                            weight_decays=(0.0, 0.0)), 9, 3)
    step = functools.partial(dyn.step, key=None, matmul_dtype="float32", mean_only=True)
    obs0 = jnp.asarray(obs_vector([0.5, 0.6, 0.7], 800.0))
    actions = jnp.asarray(np.random.default_rng(0).uniform(1.1, 1.5, (4, 3)), jnp.float32)
    before = _mean_horizon._cache_size()
    for seed in (1, 2, 3):  # a new model after every episode, as in training
        model = dyn.init(jax.random.key(seed))
        compiled = _mean_horizon(dyn.step, model, obs0, actions)
        eager = predict_horizon(step, model, obs0, actions)
        for a, b in zip(compiled, eager):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _mean_horizon._cache_size() == before + 1


def test_paired_score_subtracts_fixed_mid_prices_on_the_same_day(tmp_path):
    from evjax.env import EVPricingEnv
    from evjax.train import Trainer, episode_seed

    cfg = load(None, ["model.ensemble_size=2", "model.num_elites=2", "model.hidden_sizes=[8]",
                      "model.weight_decays=[0.0, 0.0]", "planner.particles=2", "planner.popsize=8",
                      "planner.constant_candidates=0", "planner.num_elites=2", "planner.horizon=2",
                      "planner.iterations=1", "training.epochs=2"])
    trainer = Trainer(cfg, tmp_path, metrics=False)
    env = EVPricingEnv(cfg)
    env.reset(seed=episode_seed(cfg, 1), options={"split": "train"})
    mid = (np.asarray(cfg.env.price_lower) + np.asarray(cfg.env.price_upper)) / 2
    by_hand = sum(env.step(mid)[1] for _ in range(cfg.env.episode_steps))
    assert trainer.reference_reward(1) == pytest.approx(by_hand, rel=1e-12)
    assert trainer.reference_reward(0) != pytest.approx(by_hand, rel=1e-3)  # another day


def test_validation_score_ranks_checkpoints_like_the_planners_elites():
    from evjax.train import validation_score

    # permissible cost 0.1: the feasible by welfare, then the infeasible by cost, whatever their welfare
    ranked = [validation_score(w, c, 0.1) for w, c in [(3000.0, 0.1), (2900.0, 0.0), (9000.0, 0.11), (9500.0, 0.3)]]
    assert ranked[0] == 3000.0 and ranked[1] == 2900.0
    assert ranked == sorted(ranked, reverse=True)
    assert validation_score(9000.0, 0.11, 0.1) - validation_score(9500.0, 0.3, 0.1) == pytest.approx(0.19, abs=1e-6)


def test_validation_selects_the_best_validated_checkpoint_and_leaves_training_unchanged(tmp_path):
    from evjax import checkpoint
    from evjax.train import Trainer, validation_score

    tiny = ["model.ensemble_size=2", "model.num_elites=2", "model.hidden_sizes=[8]", "model.weight_decays=[0.0, 0.0]",
            "planner.particles=2", "planner.popsize=8", "planner.constant_candidates=0", "planner.num_elites=2",
            "planner.horizon=2", "planner.iterations=1", "training.epochs=4", "training.random_episodes=1"]
    validated = load(None, tiny + ["training.best_selection=validation", "training.validation_every=2",
                                   "training.validation_days=2"])
    rows = {}
    for name, cfg in (("paired", load(None, tiny + ["training.best_selection=paired"])), ("validation", validated)):
        trainer = Trainer(cfg, tmp_path / name)
        rows[name] = trainer.train(progress=False)
    for paired, checked in zip(rows["paired"], rows["validation"]):  # validating draws no key of the run's stream
        assert checked["reward"] == paired["reward"] and checked["cost"] == paired["cost"]
        assert checked["kappa_next"] == paired["kappa_next"]
    # epoch 0 posts random prices; epochs 1 and 3 are validated ((e + 1) % 2 == 0), epoch 2 is not
    assert [np.isfinite(r["val_welfare"]) for r in rows["validation"]] == [False, True, False, True]
    scores = {r["epoch"]: validation_score(r["val_welfare"], r["val_cost"], validated.planner.permissible_episode_cost)
              for r in rows["validation"] if np.isfinite(r["val_welfare"])}
    meta, _ = checkpoint.restore_meta(tmp_path / "validation", "best")
    assert int(meta["epoch"]) == max(scores, key=scores.get)
    # the latest checkpoint holds the model and kappa epoch 3 was validated with: validating it again agrees
    again = Trainer(validated, tmp_path / "validation", metrics=False)
    again.state = checkpoint.restore(tmp_path / "validation", "latest", again.state)
    again.parts.agent.restore(again.state["agent"])
    again.parts.agent.mark_fitted()
    repeat = again.validate(again.parts.dynamics.select_elites(again.state["model"]))
    last = rows["validation"][-1]
    assert repeat["val_welfare"] == pytest.approx(last["val_welfare"], rel=1e-9)
    assert repeat["val_cost"] == pytest.approx(last["val_cost"], rel=1e-9, abs=1e-12)
    assert 0.0 <= repeat["val_violation_pct"] <= 100.0
    from evjax.plots import training_curves  # the validation costs go into the cost panel

    assert training_curves(tmp_path / "validation" / "metrics.csv", tmp_path / "curves.png", validated).is_file()
