"""The JAX twin against the host environment, pandapower and hand values (SPEC 14)."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evjax import carbon as host_carbon
from evjax import roads
from evjax import stations as host_stations
from evjax import twin
from evjax.config import Config
from evjax.data.scenarios import make_scenario
from evjax.env import EVPricingEnv
from evjax.grid import FeederGrid
from evjax.twin import agreement, powerflow
from evjax.twin import carbon as twin_carbon
from evjax.twin import stations as twin_stations
from tests.conftest import hand_scenario, with_config

CFG = Config()
MID = (np.array(CFG.env.price_lower) + np.array(CFG.env.price_upper)) / 2.0
logging.getLogger("pandapower").setLevel(logging.ERROR)


def assert_agrees(episodes):
    result = agreement.deviations(episodes)
    assert agreement.failures(result) == [], result
    return result


@pytest.fixture(scope="module")
def feeder():
    return FeederGrid(CFG.grid)


@pytest.fixture(scope="module")
def params():
    return twin.make_params(CFG)


LOAD_CASES = [((0.225, 0.225, 0.225), 1.0), ((1.35, 0.72, 1.08), 1.1), ((0.0, 0.0, 0.0), 0.85), ((2.9, 2.9, 2.9), 1.1)]


@pytest.mark.parametrize("method", ["sweep", "newton"])
def test_power_flow_matches_pandapower(feeder, method):
    with jax.enable_x64(True):
        network = powerflow.network_from_feeder(feeder)
        solve = jax.jit(lambda ev, m: powerflow.solve(network, ev, m, method=method,
                                                      max_iterations=100 if method == "sweep" else 20))
        in_service = feeder.network_arrays().line_in_service
        for station_mw, multiplier in LOAD_CASES:
            flow = jax.tree.map(np.asarray, solve(jnp.asarray(station_mw), multiplier))
            host = feeder.solve(np.asarray(station_mw), multiplier)
            net = feeder.reference_runpp(np.asarray(station_mw), multiplier)
            assert host.converged and flow.converged
            np.testing.assert_allclose(flow.vm_pu, net.res_bus["vm_pu"].to_numpy(), atol=1e-7)
            np.testing.assert_allclose(flow.vm_pu, host.vm_pu, atol=1e-7)
            np.testing.assert_allclose(flow.line_loading, host.line_loading, atol=1e-6)
            np.testing.assert_allclose(flow.line_current_ka, net.res_line["i_ka"].to_numpy()[in_service], atol=1e-7)
            np.testing.assert_allclose(flow.p_from_mw, net.res_line["p_from_mw"].to_numpy()[in_service], atol=1e-6)
            np.testing.assert_allclose(flow.p_to_mw, host.p_to_mw[in_service], atol=1e-6)
            assert flow.ext_grid_p_mw == pytest.approx(float(net.res_ext_grid["p_mw"].iloc[0]), abs=1e-6)
            assert flow.min_voltage_pu == pytest.approx(host.min_voltage_pu, abs=1e-7)
        for station_mw in [(3.5, 3.5, 3.5), (40.0, 40.0, 40.0)]:  # beyond the nose: the host's Newton-Raphson fails
            assert not feeder.solve(np.asarray(station_mw), 1.1).converged
            flow = solve(jnp.asarray(station_mw), 1.1)
            assert not bool(flow.converged) and np.all(np.isnan(np.asarray(flow.line_loading)))


def test_carbon_matches_host_on_solved_flows(feeder, params):
    net = params.network
    with jax.enable_x64(True):
        for station_mw, multiplier in LOAD_CASES + [((0.0, 0.0, 0.0), 0.3)]:  # 0.3: the DG pushes power upstream
            host = feeder.solve(np.asarray(station_mw), multiplier)
            in_service = feeder.network_arrays().line_in_service
            expected = host_carbon.proportional_sharing(
                feeder.num_buses, feeder.line_from_bus, feeder.line_to_bus, host.p_from_mw, host.p_to_mw,
                np.array([0, 5]), np.array([host.ext_grid_p_mw, 3.0]), np.array([700.0, 900.0]))
            got = twin_carbon.proportional_sharing(
                np.asarray(net.lines_pp_from), np.asarray(net.lines_pp_to), jnp.asarray(host.p_from_mw[in_service]),
                jnp.asarray(host.p_to_mw[in_service]), np.array([0, 5]), jnp.array([host.ext_grid_p_mw, 3.0]),
                jnp.array([700.0, 900.0]), num_buses=feeder.num_buses, max_depth=params.settings.carbon_depth)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)
            exporting = host.ext_grid_p_mw < 0.0  # the DG's surplus flows into the slack bus
            assert float(got[0]) == (900.0 if exporting else 700.0) or exporting and got[0] == pytest.approx(900.0)
        assert host.ext_grid_p_mw < 0.0 and host.p_from_mw[0] < 0.0  # the last case reverses the flow near the slack
        shares = twin_carbon.fixed_shares(jnp.float64(3.0), jnp.float64(1.0), jnp.array([0.7, 0.2, 0.5]),
                                          jnp.float64(900.0), jnp.float64(700.0), num_buses=33,
                                          station_buses=np.array([31, 13, 19]))
        np.testing.assert_allclose(np.asarray(shares), host_carbon.fixed_shares(
            33, 3.0, 1.0, np.array([31, 13, 19]), np.array([0.7, 0.2, 0.5]), 900.0, 700.0), rtol=1e-14)
        ci, co2 = twin_carbon.ev_charging_intensity(jnp.array([10.0, 0.0, 30.0]), jnp.array([890.0, 880.0, 700.0]))
        assert (float(ci), float(co2)) == pytest.approx(host_carbon.ev_charging_intensity(
            np.array([10.0, 0.0, 30.0]), np.array([890.0, 880.0, 700.0])), rel=1e-14)
        ci, co2 = twin_carbon.ev_charging_intensity(jnp.zeros(3), jnp.array([890.0, 880.0, 700.0]))
        assert float(ci) == pytest.approx((890 + 880 + 700) / 3) and float(co2) == 0.0


def test_expected_wait_matches_host_including_saturation_and_idle():
    rng = np.random.default_rng(0)
    chargers = np.array([30, 16, 24])
    with jax.enable_x64(True):
        wait = jax.jit(lambda rate, waiting, es, scv: twin_stations.expected_wait_hours(
            rate, waiting, jnp.asarray(chargers), es, scv, jnp.float64(10.0), jnp.float64(0.5), max_chargers=30))
        cases = [(np.zeros(3), np.zeros(3)), (np.array([200.0, 100.0, 10.0]), np.zeros(3)),
                 (np.array([50.0, 60.0, 0.0]), np.array([0.0, 3.0, 2.0]))]
        cases += [(rng.uniform(0, 120, 3), rng.integers(0, 5, 3).astype(float)) for _ in range(40)]
        saturated = idle = 0
        for rate, waiting in cases:
            es, scv = rng.uniform(0.25, 1.0), rng.uniform(0.0, 1.5)
            expected = host_stations.expected_wait_hours(rate, waiting, chargers, es, scv, 10.0, 0.5)
            np.testing.assert_allclose(np.asarray(wait(rate, waiting, es, scv)), expected, rtol=1e-12, atol=1e-15)
            saturated += int(np.sum(expected == 10.0))
            idle += int(np.sum(expected == 0.0))
        assert saturated > 0 and idle > 0


def test_queue_places_are_fifo_per_station():
    station = jnp.array([0, 1, 0, -1, 0, 2, 1, 0])
    present = jnp.array([True, True, False, False, True, True, True, True])
    with jax.enable_x64(True):
        places = twin_stations.queue_places(station, present, 3)
        holding = twin_stations.charging_slots(station, present, jnp.array([2, 1, 1]))
    np.testing.assert_array_equal(np.asarray(places), [1, 1, 0, 0, 2, 1, 2, 3])
    expected = host_stations.charging_slots(np.asarray(station), np.asarray(present), np.zeros(8, int), [2, 1, 1])
    np.testing.assert_array_equal(np.asarray(holding), expected)


def test_agreement_with_the_host_environment_on_random_days_and_prices():
    """8 (day, seed) pairs, 3 of them among the busiest days, random prices (some out of bounds); 50+ in the script."""
    result = assert_agrees(agreement.run_episodes(CFG, pairs=8, seed=3, high_demand=3))
    assert result["steps_compared"] == 8 * CFG.env.episode_steps
    assert result["host_queued_ev_steps"] > 0 and result["host_clipped_prices"] > 0  # queues and clipping exercised
    assert result["max_evs_per_day"] > 300


def test_agreement_with_the_source_definitions_and_the_newton_solver():
    """fixed_shares carbon on the system measure, operator-margin welfare, priced CO2, voltage cost, Newton-Raphson."""
    cfg = with_config(carbon={"method": "fixed_shares", "constraint": "system", "limit": 785.0},
                      economics={"welfare": "operator_margin", "carbon_price_cny_per_t": 50.0},
                      grid={"voltage_cost": True, "multiplier_from_day_profile": True})
    result = assert_agrees(agreement.run_episodes(cfg, pairs=3, seed=5, high_demand=1, power_flow="newton"))
    assert result["vm_pu_abs"] < 1e-12 and result["line_loading_abs"] < 1e-10


def _hand_day():
    """Seven EVs arriving out of order, one (10 kWh, nearly empty) unserved, short deadlines; for one charger each."""
    return hand_scenario(
        arrival_step=[1, 0, 0, 0, 0, 1, 3], origin=[3, 1, 1, 1, 8, 1, 2],
        capacity=[100.0, 60.0, 60.0, 60.0, 10.0, 50.0, 40.0], start_soc=[0.1, 0.2, 0.2, 0.2, 0.001, 0.3, 0.5],
        target_soc=[0.9] * 7, duration_h=[0.25, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0], laxity_h=[0.25, 1, 1, 1, 1, 0.5, 0.5])


def test_agreement_on_a_hand_day_with_unsorted_arrivals_queues_unserved_and_deadlines():
    cfg = with_config(stations={"chargers": (1, 1, 1)})
    scenario = _hand_day()
    prices = np.tile(MID, (1, CFG.env.episode_steps, 1))
    episodes = agreement.paired_episodes(cfg, [scenario], prices)
    result = assert_agrees(episodes)
    assert result["host_unserved_evs"] == 1 and result["host_queued_ev_steps"] > 0
    np.testing.assert_array_equal(episodes.twin["station"][0, -1, :7], episodes.host["station"][0, -1, :7])


def test_extra_observations_agree_with_the_host_and_hold_the_queue_and_backlog():
    """Every ``env.extra_observations`` feature on the hand day (queues, an unserved EV, deadlines), twin = host."""
    names = ("prices", "queues", "backlog", "arrivals")
    cfg = with_config(stations={"chargers": (1, 1, 1)}, env={"extra_observations": names})
    scenario = _hand_day()
    prices = np.tile(MID, (1, cfg.env.episode_steps, 1))
    episodes = agreement.paired_episodes(cfg, [scenario], prices)
    assert_agrees(episodes)
    obs = episodes.host["observation"][0]  # [T, S]
    k = cfg.num_stations
    assert obs.shape[-1] == cfg.obs_dim == 2 * k + 2 + 4 * k + 1
    extra = obs[:, 2 * k + 2:-1].reshape(-1, 4, k)
    posted, queues, backlog, arrivals = (extra[:, i] for i in range(4))
    np.testing.assert_allclose(posted, prices[0], rtol=1e-6)
    present = obs[:, k:2 * k]
    assert queues.max() > 0  # one charger each: the others wait
    assert np.all((backlog > 0) == (present > 0))  # energy is owed exactly where EVs are present
    assert arrivals.sum() == 6  # seven EVs, one unserved


def test_nonconvergence_ends_the_episode_like_the_host():
    multiplier = list(CFG.grid.load_multiplier)
    multiplier[2] = 50.0
    cfg = with_config(grid={"load_multiplier": tuple(multiplier)})
    scenario = make_scenario(cfg, "train", 3, seed=1)
    prices = np.tile(MID, (1, CFG.env.episode_steps, 1))
    episodes = agreement.paired_episodes(cfg, [scenario], prices)
    assert_agrees(episodes)
    assert episodes.host_steps[0] == 3
    converged, cost, reward = (episodes.twin[name][0] for name in ("power_flow_converged", "cost", "reward"))
    assert converged[:3].tolist() == [1.0, 1.0, 0.0] and cost[2] == cfg.grid.nonconvergence_cost
    assert np.all(cost[3:] == 0.0) and np.all(reward[3:] == 0.0)  # ended: later steps change nothing
    np.testing.assert_array_equal(episodes.twin["station"][0, 3:], np.broadcast_to(
        episodes.twin["station"][0, 2], episodes.twin["station"][0, 3:].shape))


@pytest.fixture(scope="module")
def days():
    return twin.stack_scenarios([make_scenario(CFG, "test", d, seed=d) for d in range(3)], CFG)


def test_stack_scenarios_pads_masks_and_orders(days):
    scenarios = [make_scenario(CFG, "test", d, seed=d) for d in range(3)]
    counts = [s.num_evs for s in scenarios]
    travel = roads.travel_tables(CFG.roads, CFG.env.episode_steps)
    assert days.valid.shape[1] % 64 == 0 and days.valid.shape[1] >= max(counts)
    np.testing.assert_array_equal(np.asarray(days.valid).sum(axis=1), counts)
    for d, scenario in enumerate(scenarios):
        n = counts[d]
        np.testing.assert_array_equal(np.asarray(days.arrival_step[d, :n]), scenario.arrival_step)
        np.testing.assert_array_equal(np.asarray(days.ev_index[d, :n]), np.arange(n))
        assert np.all(np.asarray(days.arrival_step[d, n:]) == -1) and np.all(np.asarray(days.ev_index[d, n:]) == -1)
        np.testing.assert_array_equal(np.asarray(days.travel_energy_kwh[d, :, :n]).T,
                                      travel.energy_kwh[scenario.arrival_step, scenario.origin_node - 1])
        mean, scv = host_stations.service_time_stats(
            scenario.capacity_kwh * (scenario.target_soc - scenario.start_soc), scenario.duration_h + scenario.laxity_h,
            CFG.stations.charger_kw, CFG.env.dt_hours)
        assert float(days.mean_service_h[d]) == mean and float(days.service_scv[d]) == scv
    with pytest.raises(ValueError, match="max_evs"):
        twin.stack_scenarios(scenarios, CFG, max_evs=max(counts) - 1)


def _day(days, d):
    return jax.tree.map(lambda leaf: leaf[d], days)


def test_step_traces_once_and_jit_equals_eager(params, days):
    step = twin.jit(chex.assert_max_traces(twin.step, n=1))
    state, obs = twin.reset(jax.random.key(0), _day(days, 0), params)
    np.testing.assert_array_equal(np.asarray(obs), EVPricingEnv(CFG).reset(
        options={"scenario": make_scenario(CFG, "test", 0, seed=0)})[0])
    for t, price in enumerate([MID, np.array(CFG.env.price_upper)]):
        state, *_ = step(jax.random.key(t), state, price, params)
    key, price = jax.random.key(2), MID + 0.01
    jitted = step(key, state, price, params)
    eager = twin.step(key, state, price, params)
    for got, expected in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-9, atol=1e-12)
    assert int(jitted[0].step) == 3 and np.asarray(jitted[4]["station_energy_kwh"]).sum() > 0.0


def test_vmap_over_days_and_seeds_equals_a_loop(params, days):
    num_days = days.valid.shape[0]
    rng = np.random.default_rng(0)
    prices = rng.uniform(CFG.env.price_lower, CFG.env.price_upper, (num_days, CFG.env.episode_steps, 3))
    keys = jax.random.split(jax.random.key(1), num_days)

    def episode(key, scenario, actions):
        state, _ = twin.reset(key, scenario, params)
        final, (obs, reward, cost, info) = twin.rollout(key, state, actions, params)
        return final.status, obs, reward, cost, info["line_loading"]

    batched = twin.jit(jax.vmap(episode))(keys, days, prices)
    single = twin.jit(episode)
    for d in range(num_days):
        looped = single(keys[d], _day(days, d), prices[d])
        for got, expected in zip(batched, looped):
            np.testing.assert_allclose(np.asarray(got[d]), np.asarray(expected), rtol=1e-12, atol=1e-12)


def test_logit_choice_shares_match_the_host_in_distribution():
    """Step 0 (no queue, so the costs are fixed): twin and host choice shares against the exact logit probabilities."""
    cfg = with_config(stations={"choice": "logit", "logit_temperature": 5.0})
    scenario = make_scenario(cfg, "train", 7, seed=2)
    first = np.flatnonzero(scenario.arrival_step == 0)
    env = EVPricingEnv(cfg)
    env.reset(options={"scenario": scenario})
    origin = scenario.origin_node[first] - 1
    need = scenario.capacity_kwh[first] * (scenario.target_soc[first] - scenario.start_soc[first])
    cost = host_stations.generalized_cost(MID, need, scenario.capacity_kwh[first] * scenario.start_soc[first],
                                          env.travel.energy_kwh[0, origin], env.travel.time_h[0, origin], np.zeros(3),
                                          cfg.stations.money_weight, cfg.stations.value_of_time)
    weights = np.exp(-(cost - cost.min(axis=1, keepdims=True)) / 5.0)
    expected = (weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)  # [K] expected EVs per station
    assert np.all(expected > 1.0)

    params = twin.make_params(cfg, feeder=env.grid, travel=env.travel)
    day = twin.stack_scenarios([scenario], cfg, travel=env.travel)
    draws = 2000
    state, _ = twin.reset(jax.random.key(0), _day(day, 0), params)
    step = twin.jit(jax.vmap(twin.step, in_axes=(0, None, None, None)))
    twin_arrivals = np.asarray(step(jax.random.split(jax.random.key(3), draws), state, MID, params)[4]["arrivals"])
    host_arrivals = []
    for seed in range(200):
        env.reset(seed=seed, options={"scenario": scenario})
        host_arrivals.append(env.step(MID)[4]["arrivals"])
    for arrivals in (twin_arrivals, np.asarray(host_arrivals)):
        mean, sem = arrivals.mean(axis=0), arrivals.std(axis=0) / np.sqrt(len(arrivals))
        assert np.all(np.abs(mean - expected) < 4.0 * sem + 1e-9), (mean, expected, sem)
    assert twin_arrivals.std(axis=0).min() > 0.3  # the choice is random, not an argmin
