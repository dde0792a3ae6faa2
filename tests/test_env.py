"""The composed environment: gymnasium API, observation, cost, settlement, lock-in, monotone response, copies (SPEC 2-8)."""

import copy
import dataclasses
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import evjax  # noqa: F401  (registers evjax/EVPricing-v0)
from evjax.config import Config
from evjax.data.scenarios import Scenario
from evjax.env import EVPricingEnv

CFG = Config()
MID = (np.array(CFG.env.price_lower) + np.array(CFG.env.price_upper)) / 2.0


def hand_scenario(arrival_step, origin, capacity, start_soc, target_soc, duration_h=2.0, laxity_h=1.0):
    n = len(arrival_step)
    full = lambda x: np.broadcast_to(np.asarray(x, dtype=float), (n,)).copy()  # noqa: E731
    return Scenario(
        split="train", day=0, date="hand", seed=0,
        arrival_step=np.asarray(arrival_step, dtype=np.int64), origin_node=np.asarray(origin, dtype=np.int64),
        capacity_kwh=full(capacity), start_soc=full(start_soc), target_soc=full(target_soc),
        duration_h=full(duration_h), laxity_h=full(laxity_h), load_profile=np.ones(CFG.env.episode_steps),
    )


def with_config(**sections):
    return dataclasses.replace(CFG, **{name: dataclasses.replace(getattr(CFG, name), **fields)
                                       for name, fields in sections.items()})


@pytest.fixture(scope="module")
def env():
    return EVPricingEnv(CFG)


def test_registration_make_and_check_env():
    made = gym.make("evjax/EVPricing-v0")
    assert made.spec.max_episode_steps == CFG.env.episode_steps
    assert isinstance(made.unwrapped, EVPricingEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unbounded observation entries and a non-normalised action box are intended
        check_env(made.unwrapped)
    obs, _ = made.reset(seed=0)
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = made.step(MID)
        steps += 1
        if terminated or truncated:
            break
    assert steps == CFG.env.episode_steps and terminated


def test_spaces_follow_the_config(env):
    np.testing.assert_allclose(env.action_space.low, CFG.env.price_lower, rtol=1e-6)
    np.testing.assert_allclose(env.action_space.high, CFG.env.price_upper, rtol=1e-6)
    assert env.observation_space.shape == (9,)
    assert EVPricingEnv(with_config(env={"time_features": False})).observation_space.shape == (8,)


def test_reset_observation_layout(env):
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (9,)
    np.testing.assert_allclose(obs[:3], [0.383, 0.561, 0.424], atol=0.002)  # lines 27, 9, 17 as fractions
    np.testing.assert_array_equal(obs[3:6], 0.0)
    assert obs[6] == 0.0
    assert obs[7] == pytest.approx(info["carbon_intensity"] / 300.0, rel=1e-6)
    assert obs[8] == 0.0
    assert env.observation_space.contains(obs)


def test_reset_selects_split_and_day(env):
    env.reset(seed=4, options={"split": "test", "day": 3})
    test_day = env.scenario
    assert (test_day.split, test_day.day) == ("test", 3)
    env.reset(seed=4, options={"split": "test", "day": 3})
    np.testing.assert_array_equal(env.scenario.arrival_step, test_day.arrival_step)
    np.testing.assert_array_equal(env.scenario.capacity_kwh, test_day.capacity_kwh)
    env.reset(seed=11)
    drawn = env.scenario
    assert drawn.split == "train"
    env.reset(seed=11)
    assert env.scenario.day == drawn.day and env.scenario.date == drawn.date


def test_observation_tracks_the_step(env):
    env.reset(seed=1)
    for t in range(CFG.env.episode_steps):
        obs, reward, terminated, _, info = env.step(MID)
        assert obs[-1] == pytest.approx((t + 1) / CFG.env.episode_steps)
        np.testing.assert_allclose(obs[:3], info["line_loading"], rtol=1e-6)
        np.testing.assert_array_equal(obs[3:6], info["evs_present"])
        assert obs[6] == pytest.approx(info["welfare"] / 300.0, rel=1e-6, abs=1e-7)
        assert reward == pytest.approx(info["welfare"] / 600.0)
        assert terminated == (t == CFG.env.episode_steps - 1)


def test_nan_action_raises_and_out_of_bounds_is_clipped(env):
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(np.array([np.nan, 1.4, 1.3]))
    with pytest.raises(ValueError):
        env.step(np.array([1.2, 1.4]))
    _, _, _, _, info = env.step(np.array([2.0, 1.4, 0.5]))
    assert info["clipped_actions"] == 2
    np.testing.assert_allclose(info["posted_price"], [1.4, 1.4, 1.2])
    _, _, _, _, info = env.step(env.action_space.low)  # float32 bounds are not "out of bounds"
    assert info["clipped_actions"] == 0


def test_price_lock_in():
    # one EV at road node 1 (CS1, no travel) needing 100 * (0.5 - 0.2) = 30 kWh: 11.25 + 11.25 + 7.5 kWh
    env = EVPricingEnv(CFG)
    env.reset(seed=0, options={"scenario": hand_scenario([0], [1], 100.0, 0.2, 0.5)})
    energies, revenues = [], []
    for price in (1.2, 1.4, 1.1, 1.3):
        _, _, _, _, info = env.step(np.array([price, 1.4, 1.3]))
        energies.append(info["station_energy_kwh"][0])
        revenues.append(info["revenue"][0])
        if info["station_energy_kwh"][0] > 0:
            assert info["locked_price"][0] == pytest.approx(1.2)
    assert energies == pytest.approx([11.25, 11.25, 7.5, 0.0])
    assert revenues == pytest.approx([11.25 * 1.2, 11.25 * 1.2, 7.5 * 1.2, 0.0])
    assert info["departed_at_target"].sum() == 0 and info["evs_present"].sum() == 0


def test_energy_balance_and_settlement_over_a_real_day():
    env = EVPricingEnv(CFG)
    env.reset(seed=3, options={"split": "train", "day": 400})
    rng = np.random.default_rng(0)
    station_energy = np.zeros(3)
    revenue = 0.0
    for _ in range(CFG.env.episode_steps):
        action = rng.uniform(CFG.env.price_lower, CFG.env.price_upper)
        _, reward, _, _, info = env.step(action)
        # station power over the step is exactly the energy delivered to its EVs
        np.testing.assert_allclose(info["station_load_kw"] * CFG.env.dt_hours, info["station_energy_kwh"])
        station_energy += info["station_energy_kwh"]
        revenue += info["revenue_total"]
        total = info["station_energy_kwh"].sum()
        dg = min(total, 900.0 * 0.25)
        assert info["dso_supply_cost"] == pytest.approx(0.3 * dg + 0.5 * (total - dg))
        assert info["welfare"] == pytest.approx(info["revenue_total"] - info["dso_supply_cost"])
        np.testing.assert_allclose(info["cs_profit"], info["revenue"] - 0.7 * info["station_energy_kwh"])
        assert np.all(info["evs_charging"] <= np.array(CFG.stations.chargers))
        assert np.all(info["station_load_kw"] <= 45.0 * np.array(CFG.stations.chargers) + 1e-9)
    state = env.state
    served = state.station >= 0
    per_station = np.bincount(state.station[served], state.delivered_kwh[served], minlength=3)
    np.testing.assert_allclose(station_energy, per_station)
    assert revenue == pytest.approx(float(np.sum(state.delivered_kwh[served] * state.locked_price[served])))
    assert station_energy.sum() > 0.0


def test_monotone_response_to_own_price():
    for choice in ("argmin", "logit"):
        env = EVPricingEnv(with_config(stations={"choice": choice}))
        env.reset(seed=5, options={"split": "train", "day": 500})
        for _ in range(2):
            env.step(MID)
        saved = env.snapshot()
        assert env.scenario.arrival_step.tolist().count(2) >= 5
        for k in range(3):
            arrivals = []
            for own in np.linspace(CFG.env.price_lower[k], CFG.env.price_upper[k], 5):
                env.restore(saved)
                price = MID.copy()
                price[k] = own
                arrivals.append(int(env.step(price)[4]["arrivals"][k]))
            assert all(b <= a for a, b in zip(arrivals, arrivals[1:])), (choice, k, arrivals)


def test_cost_sums_all_lines_and_the_carbon_term():
    cfg = with_config(grid={"voltage_cost": True}, stations={"chargers": (30, 30, 30)}, carbon={"limit": 785.0})
    env = EVPricingEnv(cfg)
    # 25 EVs appear at CS2's road node and 25 at CS3's: lines 9 and 17 both overload
    env.reset(seed=0, options={"scenario": hand_scenario([0] * 50, [2] * 25 + [3] * 25, 60.0, 0.2, 0.9)})
    _, _, _, _, info = env.step(np.array([1.4, 1.3, 1.2]))
    loading = info["line_loading"]
    assert loading[1] > 0.9 and loading[2] > 0.9
    line = np.sum(np.maximum(0.0, loading - 0.9))
    carbon = max(0.0, info["carbon_intensity"] - 785.0) / 10.0
    voltage = max(0.0, 0.95 - info["min_voltage_pu"])
    assert voltage > 0.0
    assert carbon > 0.0  # the SPEC limit 785 is exceeded (README, "Carbon")
    assert info["cost"] == pytest.approx(line + carbon + voltage)
    assert info["cost_line"] == pytest.approx(line)


def test_ev_load_raises_its_line_loading():
    env = EVPricingEnv(CFG)
    loadings = []
    for count in (0, 4, 8, 12):
        env.reset(seed=0, options={"scenario": hand_scenario([0] * count, [3] * count, 60.0, 0.2, 0.9)})
        loadings.append(env.step(np.array([1.4, 1.5, 1.2]))[4]["line_loading"][2])
    assert np.all(np.diff(loadings) > 0.0)


def test_nonconvergence_ends_the_episode_with_the_configured_cost():
    multiplier = list(CFG.grid.load_multiplier)
    multiplier[2] = 50.0
    env = EVPricingEnv(with_config(grid={"load_multiplier": tuple(multiplier)}))
    env.reset(seed=0)
    for _ in range(2):
        assert env.step(MID)[4]["power_flow_converged"]
    obs, reward, terminated, truncated, info = env.step(MID)
    assert terminated and not truncated
    assert not info["power_flow_converged"]
    assert info["cost"] == CFG.grid.nonconvergence_cost
    assert np.all(np.isfinite(obs)) and env.observation_space.contains(obs)


def test_queue_unserved_and_deadline():
    env = EVPricingEnv(with_config(stations={"chargers": (1, 1, 1)}))
    scenario = hand_scenario(
        arrival_step=[0, 0, 0, 0, 1], origin=[1, 1, 1, 8, 3],
        capacity=[60.0, 60.0, 60.0, 10.0, 100.0], start_soc=[0.2, 0.2, 0.2, 0.001, 0.1], target_soc=[0.9] * 5,
        duration_h=[2.0, 2.0, 2.0, 2.0, 0.25], laxity_h=[1.0, 1.0, 1.0, 1.0, 0.25],
    )
    env.reset(seed=0, options={"scenario": scenario})
    _, _, _, _, info = env.step(MID)
    assert info["unserved"] == 1  # 0.01 kWh in the battery reaches no station
    assert info["arrivals"][0] == 3 and info["evs_charging"][0] == 1 and info["queue_length"][0] == 2
    assert info["station_energy_kwh"][0] == pytest.approx(11.25)
    _, _, _, _, info = env.step(MID)
    # the 80 kWh EV at CS3 arrived at step 1 (0.25 h) with deadline 0.25 + 0.25 + 0.25 h = end of step 2
    assert info["departed_incomplete"][2] == 0
    _, _, _, _, info = env.step(MID)
    assert info["departed_incomplete"][2] == 1
    assert env.state.delivered_kwh[4] == pytest.approx(2 * 11.25)


def test_deepcopy_and_snapshot_replay_identically():
    env = EVPricingEnv(CFG)
    env.reset(seed=7)
    for _ in range(3):
        env.step(MID)
    clone = copy.deepcopy(env)
    saved = env.snapshot()
    actions = np.random.default_rng(1).uniform(CFG.env.price_lower, CFG.env.price_upper, (9, 3))
    original = [env.step(a) for a in actions]
    assert clone.state.step == 3  # stepping the original left the copy alone
    copied = [clone.step(a) for a in actions]
    env.restore(saved)
    replayed = [env.step(a) for a in actions]
    for a, b, c in zip(original, copied, replayed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], c[0])
        assert a[1] == b[1] == c[1] and a[4]["cost"] == b[4]["cost"] == c[4]["cost"]
