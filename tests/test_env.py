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
from evjax import env as env_module
from evjax.env import PRESENT, UNSERVED, CarbonResult, EVPricingEnv
from tests.conftest import hand_scenario, with_config

CFG = Config()
MID = (np.array(CFG.env.price_lower) + np.array(CFG.env.price_upper)) / 2.0


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
    extra = EVPricingEnv(with_config(env={"extra_observations": ("backlog", "prices")}))
    assert extra.observation_space.shape == (15,) == (extra.cfg.obs_dim,)
    obs, _ = extra.reset(seed=0)
    assert obs[-1] == 0.0 and obs.shape == (15,)  # the time feature stays last (the planner reads it there)
    np.testing.assert_allclose(obs[8:11], 0.0)  # no EV owed energy at reset
    np.testing.assert_allclose(obs[11:14], CFG.env.initial_prices, rtol=1e-6)
    obs, _, _, _, info = extra.step(np.asarray(CFG.env.price_upper))
    np.testing.assert_allclose(obs[11:14], CFG.env.price_upper, rtol=1e-6)
    present = extra.state.status == 1
    owed = [extra.state.remaining_kwh[present & (extra.state.station == k)].sum() for k in range(3)]
    np.testing.assert_allclose(obs[8:11], owed, rtol=1e-6)


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
        np.testing.assert_allclose(info["cs_profit_per_station"], info["revenue"] - 0.7 * info["station_energy_kwh"])
        assert info["cs_profit"] == pytest.approx(info["cs_profit_per_station"].sum())
        assert info["dso_profit"] == pytest.approx(0.7 * total - info["dso_supply_cost"])
        # total surplus: payments cancel, leaving value of net energy - supply cost - time cost
        net_energy = total - info["travel_energy_kwh"]
        time_cost = 60.0 * (info["travel_time_h"] + info["queue_hours"])
        assert info["users_time_cost"] == pytest.approx(time_cost)
        assert info["users_surplus"] == pytest.approx(2.0 * net_energy - info["revenue_total"] - time_cost)
        assert info["welfare"] == pytest.approx(2.0 * net_energy - info["dso_supply_cost"] - time_cost)
        assert info["welfare"] == pytest.approx(info["cs_profit"] + info["dso_profit"] + info["users_surplus"])
        assert info["queue_hours"] == pytest.approx(0.25 * info["queue_length"].sum())
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
    cfg = with_config(grid={"voltage_cost": True}, stations={"chargers": (30, 30, 30)},
                      carbon={"limit": 700.0, "cost_divisor": 10.0})
    env = EVPricingEnv(cfg)
    # 25 EVs appear at CS2's road node and 25 at CS3's: lines 9 and 17 both overload
    env.reset(seed=0, options={"scenario": hand_scenario([0] * 50, [2] * 25 + [3] * 25, 60.0, 0.2, 0.9)})
    _, _, _, _, info = env.step(np.array([1.4, 1.3, 1.2]))
    loading = info["line_loading"]
    assert loading[1] > 0.9 and loading[2] > 0.9
    line = np.sum(np.maximum(0.0, loading - 0.9))
    assert info["carbon_intensity"] == info["ev_carbon_intensity"]  # the default constrained measure
    carbon = max(0.0, info["carbon_intensity"] - 700.0) / 10.0
    voltage = max(0.0, 0.95 - info["min_voltage_pu"])
    assert voltage > 0.0
    assert carbon > 0.0  # CS2's bus draws DG power: the EV energy is dirtier than the grid's 700
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


# ----------------------------------------------------------------- stages


def test_admit_arrivals_chooses_locks_and_leaves_the_old_state_alone(env):
    # EVs at the road nodes of CS1 and CS2 (no travel) and one with 0.01 kWh that reaches nothing
    scenario = hand_scenario([0, 0, 0, 1], [1, 2, 8, 3], [60.0, 60.0, 10.0, 60.0], [0.2, 0.2, 0.001, 0.2], 0.9)
    env.reset(seed=0, options={"scenario": scenario})
    before = env.state
    price = np.array([1.2, 1.4, 1.3])
    state, admission = env_module.admit_arrivals(before, price, env.travel, CFG)
    assert admission.new_evs.tolist() == [0, 1, 2]
    assert admission.choice.tolist() == [0, 1, -1] and admission.unserved == 1
    assert admission.arrivals.tolist() == [1, 1, 0]
    assert state.status[:4].tolist() == [PRESENT, PRESENT, UNSERVED, 0]
    assert state.locked_price[:2].tolist() == [1.2, 1.4]
    assert state.remaining_kwh[:2] == pytest.approx([42.0, 42.0])  # 60 x (0.9 - 0.2), no travel energy
    assert admission.travel_time_h == 0.0 and admission.travel_energy_kwh == 0.0
    assert admission.expected_wait_h.tolist() == [0.0, 0.0, 0.0]
    assert (before.status == 0).all() and (before.station == -1).all()  # the input state is unchanged


def test_charge_and_depart_fifo_queue_hours_and_departures(env):
    cfg = with_config(stations={"chargers": (1, 16, 24)})
    env.reset(seed=0, options={"scenario": hand_scenario([0, 0, 0], [1, 1, 2], 60.0, 0.2, 0.9)})
    state = env.state.copy()
    state.status[:] = PRESENT
    state.station[:] = [0, 0, 1]
    state.join_step[:] = 0
    state.remaining_kwh[:] = [5.0, 30.0, 20.0]
    new_state, charging = env_module.charge_and_depart(state, cfg)
    assert charging.energy_kwh.tolist() == [5.0, 0.0, 11.25]  # EV 1 waits behind EV 0 at the single CS1 charger
    assert charging.evs_charging.tolist() == [1, 1, 0] and charging.queue_length.tolist() == [1, 0, 0]
    assert charging.queue_hours == 0.25
    assert charging.departed_at_target.tolist() == [1, 0, 0]  # EV 0 reached its target
    assert charging.evs_present.tolist() == [1, 1, 0]
    assert new_state.remaining_kwh.tolist() == [0.0, 30.0, 8.75] and state.remaining_kwh.tolist() == [5.0, 30.0, 20.0]


def test_step_cost_terms_by_hand(env):
    loading = np.array([0.95, 0.5, 0.92])
    result = dataclasses.replace(env.grid.reset_result, line_loading=loading, min_voltage_pu=0.93)
    measures = CarbonResult(np.zeros(33), np.array([890.0, 880.0, 700.0]), 830.0, 870.0, 10.0)
    charged = np.array([5.0, 0.0, 5.0])
    cost = env_module.step_cost(result, measures, charged, CFG)
    assert cost.line == pytest.approx(0.05 + 0.02)
    assert cost.carbon == pytest.approx((870.0 - 850.0) / 850.0) and cost.voltage == 0.0
    assert cost.total == pytest.approx(0.07 + 20.0 / 850.0)
    assert env_module.step_cost(result, measures, np.zeros(3), CFG).carbon == 0.0  # no EV energy, no carbon cost
    system = with_config(carbon={"constraint": "system", "limit": 820.0}, grid={"voltage_cost": True})
    cost = env_module.step_cost(result, measures, np.zeros(3), system)
    assert cost.carbon == pytest.approx(10.0 / 850.0) and cost.voltage == pytest.approx(0.02)
    diverged = dataclasses.replace(result, converged=False)
    assert env_module.step_cost(diverged, measures, charged, CFG).total == CFG.grid.nonconvergence_cost


def test_a_two_ev_episode_by_hand():
    """EV A at road node 1 (CS1) needs 30 kWh; EV B drives 4.5 km from node 4, needs 70 kWh, must leave after 1 h."""
    cfg = with_config(stations={"chargers": (1, 16, 24)})
    env = EVPricingEnv(cfg)
    scenario = hand_scenario([0, 0], [1, 4], 100.0, 0.2, [0.5, 0.9], duration_h=[2.0, 0.5], laxity_h=[1.0, 0.5])
    env.reset(seed=0, options={"scenario": scenario})
    # road 4-1 is 4.5 km of class u; SPEC 5 speed and consumption at step 0's saturation 0.515
    x = 0.515
    speed = 70.0 / (1.0 + x ** (1.726 + 3.15 * x**3))
    travel_h = 4.5 / speed
    travel_kwh = 4.5 * (0.004 * speed + 5.492 / speed - 0.179)
    energy = [11.25, 11.25, 7.5, 11.25] + [0.0] * 8  # A charges 3 steps while B queues, B charges once and leaves
    queued_h = [0.25, 0.25, 0.25] + [0.0] * 9
    infos = [env.step(MID)[4] for _ in range(CFG.env.episode_steps)]
    assert env.state.station.tolist() == [0, 0]
    assert env.state.remaining_kwh[1] == pytest.approx(70.0 + travel_kwh - 11.25)
    assert infos[3]["departed_incomplete"].tolist() == [1, 0, 0]
    for t, info in enumerate(infos):
        e, travel = energy[t], (travel_h, travel_kwh) if t == 0 else (0.0, 0.0)
        time_cost = 60.0 * (travel[0] + queued_h[t])
        assert info["station_energy_kwh"].sum() == pytest.approx(e)
        assert info["queue_hours"] == pytest.approx(queued_h[t])
        assert info["cs_profit"] == pytest.approx(e * (1.25 - 0.7))
        assert info["dso_profit"] == pytest.approx(e * (0.7 - 0.3))  # all within the DG's 225 kWh per step
        assert info["users_time_cost"] == pytest.approx(time_cost)
        assert info["users_surplus"] == pytest.approx(2.0 * (e - travel[1]) - 1.25 * e - time_cost)
        assert info["welfare"] == pytest.approx(2.0 * (e - travel[1]) - 0.3 * e - time_cost)
        assert info["ev_co2_kg"] == pytest.approx(e * info["station_carbon_intensity"][0] / 1000.0)
        if e > 0:
            assert info["ev_carbon_intensity"] == pytest.approx(info["station_carbon_intensity"][0])
            assert info["carbon_intensity"] == info["ev_carbon_intensity"]
    total = sum(info["welfare"] for info in infos)
    assert total == pytest.approx(2.0 * (41.25 - travel_kwh) - 0.3 * 41.25 - 60.0 * (travel_h + 0.75))


def test_prices_are_transfers_under_total_surplus_only():
    delta = 1e-6
    results = {}
    for welfare in ("total_surplus", "operator_margin"):
        env = EVPricingEnv(with_config(economics={"welfare": welfare}))
        for shift in (0.0, delta):
            env.reset(seed=2, options={"split": "train", "day": 600})
            infos = [env.step(MID + shift)[4] for _ in range(CFG.env.episode_steps)]
            results[welfare, shift] = (infos, env.state.station.copy(), env.state.delivered_kwh.copy())
    for welfare in ("total_surplus", "operator_margin"):
        (base, station, delivered), (raised, station_raised, delivered_raised) = (
            results[welfare, 0.0], results[welfare, delta])
        np.testing.assert_array_equal(station, station_raised)  # no choice changed
        np.testing.assert_array_equal(delivered, delivered_raised)
        assert (station >= 0).sum() > 50
        for a, b in zip(base, raised):
            energy = a["station_energy_kwh"].sum()
            expected = 0.0 if welfare == "total_surplus" else delta * energy
            assert b["welfare"] - a["welfare"] == pytest.approx(expected, abs=1e-9)
            assert b["cs_profit"] - a["cs_profit"] == pytest.approx(delta * energy, abs=1e-9)
            assert b["users_surplus"] - a["users_surplus"] == pytest.approx(-delta * energy, abs=1e-9)


def test_source_preset_steps_with_the_source_definitions():
    from evjax.config import load
    from tests.conftest import ROOT

    env = EVPricingEnv(load(ROOT / "configs" / "source.yaml"))
    env.reset(seed=1, options={"split": "train", "day": 300})
    for _ in range(4):
        _, reward, _, _, info = env.step(MID)
        assert info["welfare"] == pytest.approx(info["revenue_total"] - info["dso_supply_cost"])
        assert info["carbon_intensity"] == info["system_carbon_intensity"]
        assert info["cost_carbon"] == pytest.approx(max(0.0, info["system_carbon_intensity"] - 785.0) / 10.0)
        # fixed shares: every station bus has its own fixed DG share
        np.testing.assert_allclose(info["station_carbon_intensity"], [0.7 * 900 + 0.3 * 700, 0.2 * 900 + 0.8 * 700,
                                                                      0.5 * 900 + 0.5 * 700])
