"""The IEEE 33-bus feeder with the DG and the charging stations (SPEC 3).

The network is built once with pandapower and solved every step by
pandapower's own Newton-Raphson routine (``pandapower.pypower.newtonpf``) on
the internal ppc that ``runpp`` produced at construction, with the admittance
matrices kept and only the bus injections changed. This skips the
pandapower-table round trip (build ppc, write ``res_*`` tables) that makes a
bare ``runpp`` cost tens of milliseconds, and never rebuilds the network.
``FeederGrid.reference_runpp`` runs the full ``pandapower.runpp`` on the same
injections; tests check that both agree.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pandapower as pp
import pandapower.networks as pn
from pandapower.pd2ppc import _pd2ppc
from pandapower.pf.ppci_variables import _get_pf_variables_from_ppci
from pandapower.pf.run_newton_raphson_pf import numba_installed
from pandapower.pypower.idx_brch import F_BUS, T_BUS
from pandapower.pypower.idx_bus import BASE_KV
from pandapower.pypower.makeYbus import makeYbus
from pandapower.pypower.newtonpf import newtonpf

from evjax.config import GridConfig
from evjax.errors import ConfigError

EV_LOAD_NAME = "EV CS{}"


@dataclasses.dataclass(frozen=True)
class GridResult:
    """One solved (or failed) power flow; arrays are indexed by pandapower bus / line index.

    Shapes: U buses, L lines, K stations (monitored lines are in station order).
    Power in MW, current in kA, voltage in p.u., loading as a fraction of the rating.
    """

    converged: bool
    line_loading: np.ndarray  # [K] monitored lines, i_ka / rating
    line_current_ka: np.ndarray  # [L] max of from/to end current (0 for lines out of service)
    p_from_mw: np.ndarray  # [L] active power into the line at its from bus
    p_to_mw: np.ndarray  # [L] active power into the line at its to bus (negative when it delivers there)
    vm_pu: np.ndarray  # [U] voltage magnitudes
    min_voltage_pu: float
    ext_grid_p_mw: float  # slack injection (negative when the feeder exports)
    sgen_p_mw: np.ndarray  # [G] static generator injections
    load_p_mw: np.ndarray  # [U] total active load per bus (non-EV and EV)
    iterations: int


@dataclasses.dataclass(frozen=True)
class NetworkArrays:
    """What ``FeederGrid.solve`` works with, in pandapower's internal (ppc) bus order; n ppc buses, L lines in service."""

    base_mva: float
    ybus: np.ndarray  # [n, n] complex bus admittance matrix (p.u.)
    ref: np.ndarray  # slack bus (ppc index)
    pv: np.ndarray  # PV buses (none on this feeder)
    pq: np.ndarray  # PQ buses
    yf: np.ndarray  # [L, n] complex from-end branch admittances of the lines in service
    yt: np.ndarray  # [L, n] complex to-end branch admittances
    line_from: np.ndarray  # [L] ppc from bus of each line in service
    line_to: np.ndarray  # [L] ppc to bus
    line_in_service: np.ndarray  # [num_lines] bool
    base_kv: np.ndarray  # [n] nominal voltage (kV)
    bus_to_ppci: np.ndarray  # [num_buses] ppc index of each pandapower bus
    load_bus: np.ndarray  # [num_loads] pandapower bus of each load element
    base_p_mw: np.ndarray  # [num_loads] non-EV active load at multiplier 1 (0 for the EV loads)
    base_q_mvar: np.ndarray  # [num_loads] non-EV reactive load at multiplier 1
    ev_load_index: np.ndarray  # [K] load element of each station's EV load
    sgen_q_mvar: np.ndarray  # [G] static generator reactive power
    v_start: np.ndarray  # [n] complex start voltage of every Newton-Raphson run (the reset solution)


def build_network(grid_cfg: GridConfig):
    """case33bw with the DG, scaled loads, one EV load element per station and the line ratings.

    Host side, not jittable. Every load's p_mw is scaled by ``load_scale``
    (q_mvar unchanged); EV loads are separate load elements named ``EV CS1``..
    at the station buses, at unity power factor, holding ``initial_ev_load_mw``.
    Only the monitored lines get finite ratings (``max_i_ka``).
    """
    net = pn.case33bw()
    net.load["p_mw"] = net.load["p_mw"] * grid_cfg.load_scale
    pp.create_sgen(net, grid_cfg.dg_bus, p_mw=grid_cfg.dg_p_mw, name="DG")
    for k, bus in enumerate(grid_cfg.station_buses):
        pp.create_load(net, bus, p_mw=grid_cfg.initial_ev_load_mw, q_mvar=0.0, name=EV_LOAD_NAME.format(k + 1))
    net.line["max_i_ka"] = np.inf
    for line, rating in zip(grid_cfg.monitored_lines, grid_cfg.line_ratings_ka):
        net.line.loc[line, "max_i_ka"] = rating
    return net


NOT_CONVERGING = ("config keys 'grid.dg_p_mw', 'grid.load_scale', 'grid.initial_ev_load_mw': the feeder's base "
                  "power flow does not converge with these values")


class FeederGrid:
    """Repeated power flows on one fixed feeder; host side, not jittable.

    ``solve(station_ev_mw, multiplier)`` is a pure function of its inputs:
    every Newton-Raphson run starts from the same base solution (the reset
    state), so a copy of the environment or a replayed step gives identical
    numbers whatever ran before.
    """

    def __init__(self, grid_cfg: GridConfig):
        self.cfg = grid_cfg
        self.net = build_network(grid_cfg)
        self._runpp_kwargs = dict(
            algorithm="nr", init="flat", numba=numba_installed, voltage_depend_loads=False,
            max_iteration=grid_cfg.max_iteration, tolerance_mva=grid_cfg.tolerance_mva,
            calculate_voltage_angles=True,
        )
        try:
            pp.runpp(self.net, **self._runpp_kwargs)
        except pp.LoadflowNotConverged:
            raise ConfigError(NOT_CONVERGING) from None
        self._options = dict(self.net._options)
        _, self._ppci = _pd2ppc(self.net)
        (self._base_mva, bus, _gen, branch, _svc, _tcsc, _ssc, _vsc,
         self._ref, self._pv, self._pq, *_unused) = _get_pf_variables_from_ppci(self._ppci)
        self._ybus, self._yf, self._yt = makeYbus(self._base_mva, bus, branch)
        self._base_kv = bus[:, BASE_KV].real
        self._ybus_ref = self._ybus[self._ref[0]].tocsr()

        lookups = self.net._pd2ppc_lookups
        self.num_buses = len(self.net.bus)
        self.num_lines = len(self.net.line)
        self._bus_to_ppci = np.asarray(lookups["bus"])[self.net.bus.index.to_numpy()]
        line_start, line_end = lookups["branch"]["line"]
        in_service = np.asarray(self.net._ppc["internal"]["branch_is"])
        ppci_row = np.cumsum(in_service) - 1
        rows = np.arange(line_start, line_end)
        self._line_in_service = in_service[rows]
        self._line_ppci_row = ppci_row[rows][self._line_in_service]
        self._line_from = branch[self._line_ppci_row, F_BUS].real.astype(np.int64)
        self._line_to = branch[self._line_ppci_row, T_BUS].real.astype(np.int64)
        self._yf_lines = self._yf[self._line_ppci_row].tocsr()
        self._yt_lines = self._yt[self._line_ppci_row].tocsr()
        self.line_from_bus = self.net.line["from_bus"].to_numpy()
        self.line_to_bus = self.net.line["to_bus"].to_numpy()

        is_ev = self.net.load["name"].isin([EV_LOAD_NAME.format(k + 1) for k in range(len(grid_cfg.station_buses))])
        self._load_bus = self.net.load["bus"].to_numpy()
        self._base_p_mw = np.where(is_ev, 0.0, self.net.load["p_mw"].to_numpy())
        self._base_q_mvar = np.where(is_ev, 0.0, self.net.load["q_mvar"].to_numpy())
        self._ev_load_index = np.array(
            [self.net.load.index.get_loc(self.net.load.index[self.net.load["name"] == EV_LOAD_NAME.format(k + 1)][0])
             for k in range(len(grid_cfg.station_buses))]
        )
        self.station_buses = np.asarray(grid_cfg.station_buses)
        self.sgen_bus = self.net.sgen["bus"].to_numpy()
        self.sgen_p_mw = self.net.sgen["p_mw"].to_numpy().astype(float)
        self._sgen_q_mvar = self.net.sgen["q_mvar"].to_numpy().astype(float)
        self.ext_grid_bus = int(self.net.ext_grid["bus"].iloc[0])
        self.monitored_lines = np.asarray(grid_cfg.monitored_lines)
        self.line_ratings_ka = np.asarray(grid_cfg.line_ratings_ka, dtype=float)

        self._v_start = np.ones(bus.shape[0], dtype=complex)
        initial = np.full(len(grid_cfg.station_buses), grid_cfg.initial_ev_load_mw)
        self.reset_result, base_voltage = self._solve(initial, 1.0)
        if not self.reset_result.converged:
            raise ConfigError(NOT_CONVERGING)
        self._v_start = base_voltage

    def network_arrays(self) -> "NetworkArrays":
        """The solver's own arrays (ppc order) for a re-implementation of ``solve`` elsewhere (the JAX twin).

        Host side, not jittable. Copies; changing them does not touch this grid.
        """
        return NetworkArrays(
            base_mva=float(self._base_mva), ybus=self._ybus.toarray(), ref=self._ref.copy(), pv=self._pv.copy(),
            pq=self._pq.copy(), yf=self._yf_lines.toarray(), yt=self._yt_lines.toarray(),
            line_from=self._line_from.copy(), line_to=self._line_to.copy(),
            line_in_service=self._line_in_service.copy(), base_kv=self._base_kv.copy(),
            bus_to_ppci=self._bus_to_ppci.copy(), load_bus=self._load_bus.copy(), base_p_mw=self._base_p_mw.copy(),
            base_q_mvar=self._base_q_mvar.copy(), ev_load_index=self._ev_load_index.copy(),
            sgen_q_mvar=self._sgen_q_mvar.copy(), v_start=self._v_start.copy(),
        )

    def load_elements_mw(self, station_ev_mw: np.ndarray, multiplier: float) -> tuple[np.ndarray, np.ndarray]:
        """Active and reactive power of every load element: non-EV base x multiplier, EV loads as given.

        The multiplier scales both p and q of the non-EV loads (constant power
        factor); EV charging is at unity power factor.
        """
        p = self._base_p_mw * multiplier
        q = self._base_q_mvar * multiplier
        p[self._ev_load_index] = np.asarray(station_ev_mw, dtype=float)
        return p, q

    def solve(self, station_ev_mw: np.ndarray, multiplier: float) -> GridResult:
        """AC power flow for the given EV power per station (MW) and non-EV load multiplier.

        Host side, not jittable. Solves S_bus(V) = S_gen - S_load with
        pandapower's Newton-Raphson on the stored Ybus, then the branch flows
        S_f = V_f conj(Y_f V) S_base and currents |S| / (sqrt(3) |V| V_n) at
        both ends (kA); a line's current is the larger of the two, its loading
        current / rating. Divergence (or a non-finite solution) gives
        ``converged=False`` with NaN arrays, never an exception.
        """
        return self._solve(station_ev_mw, multiplier)[0]

    def _solve(self, station_ev_mw: np.ndarray, multiplier: float) -> tuple[GridResult, np.ndarray]:
        load_p, load_q = self.load_elements_mw(station_ev_mw, multiplier)
        bus_p = np.bincount(self._load_bus, load_p, minlength=self.num_buses)
        bus_q = np.bincount(self._load_bus, load_q, minlength=self.num_buses)
        gen_p = np.bincount(self.sgen_bus, self.sgen_p_mw, minlength=self.num_buses)
        gen_q = np.bincount(self.sgen_bus, self._sgen_q_mvar, minlength=self.num_buses)
        s_bus = np.zeros(len(self._v_start), dtype=complex)
        np.add.at(s_bus, self._bus_to_ppci, (gen_p - bus_p) + 1j * (gen_q - bus_q))
        s_bus /= self._base_mva
        with np.errstate(all="ignore"):
            voltage, success, iterations, *_ = newtonpf(
                self._ybus, s_bus, self._v_start.copy(), self._ref, self._pv, self._pq, self._ppci, self._options
            )
        converged = bool(success) and bool(np.all(np.isfinite(voltage)))
        if not converged:
            nan_b, nan_l = np.full(self.num_buses, np.nan), np.full(self.num_lines, np.nan)
            return GridResult(False, np.full(len(self.monitored_lines), np.nan), nan_l, nan_l, nan_l, nan_b,
                              math.nan, math.nan, np.full(len(self.sgen_p_mw), np.nan), bus_p,
                              int(iterations)), voltage
        s_from = voltage[self._line_from] * np.conj(self._yf_lines @ voltage) * self._base_mva
        s_to = voltage[self._line_to] * np.conj(self._yt_lines @ voltage) * self._base_mva
        sqrt3 = math.sqrt(3.0)
        i_from = np.abs(s_from) / (sqrt3 * np.abs(voltage[self._line_from]) * self._base_kv[self._line_from])
        i_to = np.abs(s_to) / (sqrt3 * np.abs(voltage[self._line_to]) * self._base_kv[self._line_to])
        current = np.zeros(self.num_lines)
        p_from = np.zeros(self.num_lines)
        p_to = np.zeros(self.num_lines)
        current[self._line_in_service] = np.maximum(i_from, i_to)
        p_from[self._line_in_service] = s_from.real
        p_to[self._line_in_service] = s_to.real
        vm = np.abs(voltage)[self._bus_to_ppci]
        ref = self._ref[0]
        s_ref = voltage[ref] * np.conj(self._ybus_ref @ voltage)[0] * self._base_mva
        ext_grid_p = float(s_ref.real + bus_p[self.ext_grid_bus] - gen_p[self.ext_grid_bus])
        return GridResult(
            converged=True,
            line_loading=current[self.monitored_lines] / self.line_ratings_ka,
            line_current_ka=current,
            p_from_mw=p_from,
            p_to_mw=p_to,
            vm_pu=vm,
            min_voltage_pu=float(vm.min()),
            ext_grid_p_mw=ext_grid_p,
            sgen_p_mw=self.sgen_p_mw.copy(),
            load_p_mw=bus_p,
            iterations=int(iterations),
        ), voltage

    def reference_runpp(self, station_ev_mw: np.ndarray, multiplier: float):
        """Full ``pandapower.runpp`` on a copy of the network with the same loads; returns the solved net.

        Host side, not jittable; slow (tens of ms). For tests and cross-checks.
        Raises ``pandapower.LoadflowNotConverged`` on divergence.
        """
        net = copy.deepcopy(self.net)
        net.load["p_mw"], net.load["q_mvar"] = self.load_elements_mw(station_ev_mw, multiplier)
        pp.runpp(net, **self._runpp_kwargs)
        return net


def multiplier_for_step(grid_cfg: GridConfig, step: int, day_profile: np.ndarray | None = None) -> float:
    """Non-EV load multiplier of a step: the configured profile, or the day's station profile if so configured."""
    if grid_cfg.multiplier_from_day_profile:
        if day_profile is None:
            raise ValueError("grid.multiplier_from_day_profile needs the scenario's load_profile")
        return float(day_profile[step])
    return float(grid_cfg.load_multiplier[step])
