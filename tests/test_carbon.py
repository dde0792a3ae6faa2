"""Carbon intensity by proportional sharing and fixed shares (SPEC 4), on a hand-checkable 3-bus feeder and the 33-bus one."""

import dataclasses

import numpy as np
import pandapower as pp
import pytest

from evjax import carbon
from evjax.config import Config
from evjax.grid import FeederGrid

CFG = Config()


def three_bus_feeder(dg_p_mw: float):
    """Slack at bus 0 -> line -> bus 1 (0.4 MW load) -> line -> bus 2 (0.6 MW load, DG of dg_p_mw)."""
    net = pp.create_empty_network()
    buses = [pp.create_bus(net, vn_kv=12.66) for _ in range(3)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.0)
    for a, b in ((0, 1), (1, 2)):
        pp.create_line_from_parameters(net, buses[a], buses[b], length_km=1.0, r_ohm_per_km=0.4, x_ohm_per_km=0.3,
                                       c_nf_per_km=0.0, max_i_ka=1.0)
    pp.create_load(net, buses[1], p_mw=0.4, q_mvar=0.1)
    pp.create_load(net, buses[2], p_mw=0.6, q_mvar=0.2)
    pp.create_sgen(net, buses[2], p_mw=dg_p_mw)
    pp.runpp(net, numba=False)
    return net


def test_three_bus_dg_smaller_than_local_load():
    net = three_bus_feeder(dg_p_mw=0.25)
    bus_ci, system = carbon.from_pandapower(net, CFG.carbon)
    # bus 1 is fed only by the grid: exactly the grid intensity
    assert bus_ci[0] == 700.0 and bus_ci[1] == pytest.approx(700.0, abs=1e-9)
    # bus 2: power arriving over line 1 (receiving end) at 700 plus 0.25 MW of DG at 900
    inflow = -net.res_line.p_to_mw[1]
    expected = (inflow * 700.0 + 0.25 * 900.0) / (inflow + 0.25)
    assert 700.0 < bus_ci[2] < 900.0
    assert bus_ci[2] == pytest.approx(expected, rel=1e-12)
    assert system == pytest.approx((0.4 * 700.0 + 0.6 * expected) / 1.0, rel=1e-12)


def test_three_bus_dg_exporting_upstream():
    net = three_bus_feeder(dg_p_mw=1.5)
    bus_ci, _ = carbon.from_pandapower(net, CFG.carbon)
    assert net.res_line.p_from_mw[1] < 0.0  # power flows from bus 2 back towards bus 1
    assert bus_ci[2] == pytest.approx(900.0, abs=1e-9)
    inflow_dg = -net.res_line.p_from_mw[1]  # arrives at bus 1 from bus 2
    inflow_grid = -net.res_line.p_to_mw[0]
    if inflow_grid > 0.0:
        expected = (inflow_dg * 900.0 + inflow_grid * 700.0) / (inflow_dg + inflow_grid)
    else:
        expected = 900.0  # the grid absorbs power: bus 1 only sees the DG
    assert bus_ci[1] == pytest.approx(expected, rel=1e-12)


def feeder_intensities(grid: FeederGrid, ev_mw, multiplier, carbon_cfg=CFG.carbon):
    result = grid.solve(np.asarray(ev_mw, dtype=float), multiplier)
    bus_ci = carbon.bus_intensities(carbon_cfg, grid.num_buses, grid.line_from_bus, grid.line_to_bus, result.p_from_mw,
                                    result.p_to_mw, grid.ext_grid_bus, result.ext_grid_p_mw, grid.sgen_bus,
                                    result.sgen_p_mw, grid.station_buses)
    return result, bus_ci


@pytest.fixture(scope="module")
def feeder():
    return FeederGrid(CFG.grid)


def test_33_bus_grid_fed_buses_are_700_and_dg_area_between(feeder):
    # heavy load: the DG (3 MW at bus 5) no longer covers its downstream area, grid power flows through bus 5
    result, bus_ci = feeder_intensities(feeder, [1.0, 1.0, 1.0], 1.1)
    assert result.p_from_mw[4] > 0.0  # line 4 (bus 4 -> 5) carries grid power into the DG bus
    for bus in (0, 1, 2, 3, 4, 18, 19, 20, 21, 22, 23, 24):  # upstream of the DG or on laterals off buses 1 and 2
        assert bus_ci[bus] == pytest.approx(700.0, abs=1e-9)
    for bus in [5, 6, 13, 17, 25, 31, 32]:  # downstream of the DG
        assert 700.0 < bus_ci[bus] < 900.0


def test_33_bus_dg_exporting_at_the_reset_state(feeder):
    result, bus_ci = feeder_intensities(feeder, [0.225] * 3, 1.0)
    assert result.p_from_mw[4] < 0.0  # the DG pushes power upstream
    assert bus_ci[5] == pytest.approx(900.0, abs=1e-9) and bus_ci[31] == pytest.approx(900.0, abs=1e-9)
    assert bus_ci[19] == pytest.approx(700.0, abs=1e-9)  # CS3's lateral hangs off bus 1, fed by the grid
    assert 700.0 < bus_ci[2] < 900.0  # bus 2 mixes grid power from bus 1 and DG power from bus 3


def test_33_bus_matches_pandapower_reference_and_conserves_emissions(feeder):
    ev = np.array([0.6, 0.3, 0.4])
    result, bus_ci = feeder_intensities(feeder, ev, 0.95)
    net = feeder.reference_runpp(ev, 0.95)
    ref_ci, ref_system = carbon.from_pandapower(net, CFG.carbon)
    np.testing.assert_allclose(bus_ci, ref_ci, rtol=1e-7)  # two independent Newton solves to 1e-8 MVA
    system = carbon.system_intensity(result.load_p_mw, bus_ci)
    assert system == pytest.approx(ref_system, rel=1e-8)
    # emissions in = emissions carried by the loads + emissions of the line losses (at their upstream intensity)
    live = net.line.in_service.to_numpy()
    p_from, p_to = result.p_from_mw[live], result.p_to_mw[live]
    upstream = np.where(p_from > 0, feeder.line_from_bus[live], feeder.line_to_bus[live])
    loss_emissions = np.sum((p_from + p_to) * bus_ci[upstream])
    sources = 700.0 * result.ext_grid_p_mw + 900.0 * result.sgen_p_mw.sum()
    assert system * result.load_p_mw.sum() + loss_emissions == pytest.approx(sources, rel=1e-9)


def test_fixed_shares_hand_check():
    bus_ci = carbon.fixed_shares(6, dg_p_mw=3.0, grid_p_mw=1.0, station_buses=np.array([4, 2]),
                                 station_dg_shares=np.array([0.7, 0.2]), dg_intensity=900.0, grid_intensity=700.0)
    # system mix 3 / (3 + 1) = 0.75 DG -> 0.75 * 900 + 0.25 * 700 = 850; stations 0.7 -> 840, 0.2 -> 740
    assert bus_ci.tolist() == pytest.approx([850.0, 850.0, 740.0, 850.0, 840.0, 850.0])
    load = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 0.0])
    assert carbon.system_intensity(load, bus_ci) == pytest.approx((850.0 + 2 * 740.0 + 840.0) / 4.0)
    exporting = carbon.fixed_shares(2, 3.0, -0.5, np.array([], dtype=int), np.array([]), 900.0, 700.0)
    assert exporting.tolist() == [900.0, 900.0]


def test_fixed_shares_method_on_the_feeder(feeder):
    cfg = dataclasses.replace(CFG.carbon, method="fixed_shares")
    result, bus_ci = feeder_intensities(feeder, [0.5, 0.5, 0.5], 1.0, cfg)
    share = 3.0 / (3.0 + result.ext_grid_p_mw)
    assert bus_ci[0] == pytest.approx(share * 900 + (1 - share) * 700)
    assert bus_ci[[31, 13, 19]] == pytest.approx([0.7 * 900 + 0.3 * 700, 0.2 * 900 + 0.8 * 700, 800.0])


def test_cycle_is_rejected():
    with pytest.raises(ValueError, match="cycle"):
        carbon.proportional_sharing(3, np.array([0, 1, 2]), np.array([1, 2, 0]), np.ones(3), -np.ones(3),
                                    np.array([0]), np.array([1.0]), np.array([700.0]))


def test_ev_charging_intensity_on_the_three_bus_feeder():
    net = three_bus_feeder(dg_p_mw=0.25)
    bus_ci, _ = carbon.from_pandapower(net, CFG.carbon)
    inflow = -net.res_line.p_to_mw[1]
    bus2 = (inflow * 700.0 + 0.25 * 900.0) / (inflow + 0.25)
    # stations at bus 1 (grid-fed, 700) and bus 2 (grid + DG); 30 and 10 kWh drawn
    ci, co2 = carbon.ev_charging_intensity(np.array([30.0, 10.0]), bus_ci[[1, 2]])
    assert ci == pytest.approx((30.0 * 700.0 + 10.0 * bus2) / 40.0, rel=1e-12)
    assert co2 == pytest.approx((30.0 * 700.0 + 10.0 * bus2) / 1000.0, rel=1e-12)  # kWh x g/kWh -> kg
    # only the grid-fed station charges: exactly the grid's intensity
    assert carbon.ev_charging_intensity(np.array([5.0, 0.0]), bus_ci[[1, 2]])[0] == pytest.approx(700.0, abs=1e-9)
    # no EV energy: no CO2, and the measure is the plain mean of the station intensities
    ci, co2 = carbon.ev_charging_intensity(np.zeros(2), bus_ci[[1, 2]])
    assert co2 == 0.0 and ci == pytest.approx((700.0 + bus2) / 2.0)


def test_moving_ev_load_to_cs3_lowers_the_ev_intensity_not_the_system_one(feeder):
    dt = CFG.env.dt_hours
    measures = []
    for ev_mw in ([0.8, 0.1, 0.1], [0.1, 0.1, 0.8]):  # the same 1 MW of EV load, mostly at CS1 or mostly at CS3
        result, bus_ci = feeder_intensities(feeder, ev_mw, 1.0)
        station_ci = bus_ci[list(CFG.grid.station_buses)]
        ev_ci, _ = carbon.ev_charging_intensity(1000.0 * np.asarray(ev_mw) * dt, station_ci)
        measures.append((ev_ci, carbon.system_intensity(result.load_p_mw, bus_ci), station_ci))
    (ev_cs1, system_cs1, station_ci), (ev_cs3, system_cs3, _) = measures
    assert station_ci[2] == pytest.approx(700.0, abs=1e-9)  # CS3's lateral (bus 1 -> 18 -> 19) is grid-fed
    assert station_ci[0] > 850.0  # CS1 sits downstream of the coal-fired DG
    assert ev_cs3 < ev_cs1 - 100.0
    assert abs(system_cs3 - system_cs1) < 0.01 * system_cs1
