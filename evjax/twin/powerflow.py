"""AC power flow of the feeder in JAX, on the host grid's own admittance matrix (twin of ``evjax/grid.py``).

Pure JAX in complex128/float64: trace and run under ``jax.enable_x64(True)``
(``twin.jit`` does). Shapes: n ppc buses, B
pandapower buses, L lines in service, K stations, G static generators.
Two solvers of the same equations S_bus(V) = S_gen - S_load, both started from
the host's start voltage (the reset solution) and stopped by the host's test
max |mismatch| < ``tolerance_mva`` (p.u. on ``base_mva``):

- ``sweep`` (default): the backward/forward sweep in matrix form (implicit
  Z-bus Gauss), V_pq <- Z (conj(S_pq / V_pq)) + V_0 with Z = inv(Y_pq,pq) and
  V_0 = -Z Y_pq,ref V_ref. On this radial, shunt-free feeder Z is the sweep's
  branch-path matrix; one iteration is one complex matvec. It converges
  linearly (about 10 iterations at the heaviest realistic load, 30 near the
  nose) and is capped (100 by default, ``make_params``).
- ``newton``: pandapower's polar Newton-Raphson (``newtonpf``) with a dense
  Jacobian, capped at ``grid.max_iteration`` like the host.

Newton agrees with pandapower to 1e-13 p.u., the sweep to 1e-8 p.u. at
realistic loads (3e-8 near the nose, where it stops with a larger residual
error per unit of mismatch); both fail where pandapower's Newton-Raphson fails
on this feeder (tested). A failed solve returns ``converged=False`` and NaN
results, which the environment turns into ``grid.nonconvergence_cost`` as the
host does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from evjax import grid as host_grid


@struct.dataclass
class Network:
    """The feeder's constant arrays (jnp leaves) and index sets (static); built by ``network_from_feeder``."""

    ybus: jax.Array  # [n, n] complex128
    z_pq: jax.Array  # [n_pq, n_pq] complex128 inverse of Y_pq,pq (sweep)
    v_no_load: jax.Array  # [n_pq] complex128 -Z Y_pq,ref V_ref (sweep)
    yf: jax.Array  # [L, n] complex128
    yt: jax.Array  # [L, n] complex128
    base_kv: jax.Array  # [n]
    base_p_mw: jax.Array  # [U] non-EV active load per bus at multiplier 1
    base_q_mvar: jax.Array  # [U] non-EV reactive load per bus at multiplier 1
    gen_p_mw: jax.Array  # [U] static generator active power per bus
    gen_q_mvar: jax.Array  # [U]
    sgen_p_mw: jax.Array  # [G]
    v_start: jax.Array  # [n] complex128 start voltage (the host's reset solution)
    line_ratings_ka: jax.Array  # [K]
    base_mva: float = struct.field(pytree_node=False)
    ref: int = struct.field(pytree_node=False)  # slack (ppc index)
    pq: tuple = struct.field(pytree_node=False)  # PQ buses (ppc indices)
    line_from: tuple = struct.field(pytree_node=False)  # [L] ppc from bus
    line_to: tuple = struct.field(pytree_node=False)  # [L] ppc to bus
    bus_to_ppci: tuple = struct.field(pytree_node=False)  # [U]
    station_bus: tuple = struct.field(pytree_node=False)  # [K] pandapower bus of each station's EV load
    ext_grid_bus: int = struct.field(pytree_node=False)
    sgen_bus: tuple = struct.field(pytree_node=False)  # [G] pandapower bus of each static generator
    monitored: tuple = struct.field(pytree_node=False)  # [K] row (among lines in service) of each monitored line
    lines_pp_from: tuple = struct.field(pytree_node=False)  # [L] pandapower from bus of each line in service
    lines_pp_to: tuple = struct.field(pytree_node=False)  # [L] pandapower to bus


class PowerFlow(NamedTuple):
    """One solved (or failed) power flow, the twin of ``grid.GridResult`` (lines: those in service)."""

    converged: jax.Array  # [] bool
    iterations: jax.Array  # [] int
    voltage: jax.Array  # [n] complex p.u. (ppc order)
    vm_pu: jax.Array  # [U]
    min_voltage_pu: jax.Array  # []
    line_current_ka: jax.Array  # [L] max of from/to end current
    line_loading: jax.Array  # [K] monitored lines, current / rating
    p_from_mw: jax.Array  # [L]
    p_to_mw: jax.Array  # [L]
    ext_grid_p_mw: jax.Array  # []
    sgen_p_mw: jax.Array  # [G]
    load_p_mw: jax.Array  # [U] total active load per bus (non-EV and EV)


def network_from_feeder(feeder: host_grid.FeederGrid) -> Network:
    """Copy the host feeder's admittances, loads and start voltage into a ``Network``.

    Host side, not jittable; call under ``jax.enable_x64(True)``. The feeder is a
    slack bus and PQ buses (``grid.build_network`` adds the DG as a PQ static
    generator), which the sweep and the Newton step below assume; a feeder with
    voltage-controlled (PV) buses is rejected with ``ValueError``.
    """
    arrays = feeder.network_arrays()
    if arrays.pv.size:
        raise ValueError(f"the twin's power flow needs a slack and PQ buses; the feeder has PV buses {arrays.pv.tolist()}")
    ref, pq = int(arrays.ref[0]), np.asarray(arrays.pq, dtype=np.int64)
    y_pq = arrays.ybus[np.ix_(pq, pq)]
    z_pq = np.linalg.inv(y_pq)
    v_no_load = -z_pq @ (arrays.ybus[pq, ref] * arrays.v_start[ref])
    num_buses = feeder.num_buses
    per_bus = lambda bus, values: np.bincount(bus, values, minlength=num_buses)  # noqa: E731
    in_service = np.flatnonzero(arrays.line_in_service)
    row_of_line = {int(line): row for row, line in enumerate(in_service)}
    if any(int(line) not in row_of_line for line in feeder.monitored_lines):
        raise ValueError("a monitored line is out of service")
    return Network(
        ybus=jnp.asarray(arrays.ybus, jnp.complex128),
        z_pq=jnp.asarray(z_pq, jnp.complex128),
        v_no_load=jnp.asarray(v_no_load, jnp.complex128),
        yf=jnp.asarray(arrays.yf, jnp.complex128),
        yt=jnp.asarray(arrays.yt, jnp.complex128),
        base_kv=jnp.asarray(arrays.base_kv, jnp.float64),
        base_p_mw=jnp.asarray(per_bus(arrays.load_bus, arrays.base_p_mw), jnp.float64),
        base_q_mvar=jnp.asarray(per_bus(arrays.load_bus, arrays.base_q_mvar), jnp.float64),
        gen_p_mw=jnp.asarray(per_bus(feeder.sgen_bus, feeder.sgen_p_mw), jnp.float64),
        gen_q_mvar=jnp.asarray(per_bus(feeder.sgen_bus, arrays.sgen_q_mvar), jnp.float64),
        sgen_p_mw=jnp.asarray(feeder.sgen_p_mw, jnp.float64),
        v_start=jnp.asarray(arrays.v_start, jnp.complex128),
        line_ratings_ka=jnp.asarray(feeder.line_ratings_ka, jnp.float64),
        base_mva=float(arrays.base_mva),
        ref=ref,
        pq=tuple(int(b) for b in pq),
        line_from=tuple(int(b) for b in arrays.line_from),
        line_to=tuple(int(b) for b in arrays.line_to),
        bus_to_ppci=tuple(int(b) for b in arrays.bus_to_ppci),
        station_bus=tuple(int(arrays.load_bus[i]) for i in arrays.ev_load_index),
        ext_grid_bus=int(feeder.ext_grid_bus),
        sgen_bus=tuple(int(b) for b in feeder.sgen_bus),
        monitored=tuple(row_of_line[int(line)] for line in feeder.monitored_lines),
        lines_pp_from=tuple(int(b) for b in feeder.line_from_bus[in_service]),
        lines_pp_to=tuple(int(b) for b in feeder.line_to_bus[in_service]),
    )


def bus_loads_mw(network: Network, station_ev_mw: jax.Array, multiplier: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Active and reactive load per pandapower bus [U]: non-EV base x multiplier plus EV power at the station buses."""
    station = np.asarray(network.station_bus)
    p = (network.base_p_mw * multiplier).at[station].add(station_ev_mw)
    return p, network.base_q_mvar * multiplier


def _mismatch(network: Network, voltage: jax.Array, s_bus: jax.Array) -> jax.Array:
    """max |P, Q mismatch| over the PQ buses (p.u.), newtonpf's convergence measure."""
    pq = np.asarray(network.pq)
    mis = (voltage * jnp.conj(network.ybus @ voltage) - s_bus)[pq]
    return jnp.maximum(jnp.max(jnp.abs(mis.real)), jnp.max(jnp.abs(mis.imag)))


class _Iterate(NamedTuple):
    voltage: jax.Array  # [n] complex
    error: jax.Array  # [] max mismatch at ``voltage``
    iteration: jax.Array  # [] int


def _iterate(network: Network, s_bus: jax.Array, update, max_iterations: int, tolerance: float) -> _Iterate:
    """Apply ``update(voltage) -> (voltage, its mismatch)`` until the mismatch is below ``tolerance`` or non-finite, at most ``max_iterations`` times."""
    def keep_going(carry: _Iterate):
        return (carry.error >= tolerance) & jnp.isfinite(carry.error) & (carry.iteration < max_iterations)

    def body(carry: _Iterate) -> _Iterate:
        voltage, error = update(carry.voltage)
        return _Iterate(voltage, error, carry.iteration + 1)

    start = _Iterate(network.v_start, _mismatch(network, network.v_start, s_bus), jnp.asarray(0, jnp.int32))
    return jax.lax.while_loop(keep_going, body, start)


def sweep_update(network: Network, s_bus: jax.Array):
    """One sweep: V_pq <- Z conj(S_pq / V_pq) + V_0 (the load currents at the present voltages, pushed through Z).

    The new voltages satisfy Y_pq,: V' = conj(S_pq / V_pq), so the mismatch at
    V' is V' conj(Y V') - S = S (V' / V - 1) on the PQ buses: elementwise,
    without a Ybus product (equal to it up to rounding, ~1e-12 of the
    1e-8 tolerance here).
    """
    pq = np.asarray(network.pq)

    def update(voltage):
        old, s_pq = voltage[pq], s_bus[pq]
        new = network.z_pq @ jnp.conj(s_pq / old) + network.v_no_load
        mis = s_pq * (new / old - 1.0)
        error = jnp.maximum(jnp.max(jnp.abs(mis.real)), jnp.max(jnp.abs(mis.imag)))
        return voltage.at[pq].set(new), error
    return update


def newton_update(network: Network, s_bus: jax.Array):
    """One polar Newton-Raphson step of pandapower's ``newtonpf`` (no PV buses): J dx = -F, angles then magnitudes."""
    pq = np.asarray(network.pq)
    ybus = network.ybus

    def update(voltage):
        current = ybus @ voltage
        mis = voltage * jnp.conj(current) - s_bus
        f = jnp.concatenate([mis.real[pq], mis.imag[pq]])
        v_norm = voltage / jnp.abs(voltage)
        ds_dvm = voltage[:, None] * jnp.conj(ybus * v_norm[None, :]) + jnp.diag(jnp.conj(current) * v_norm)
        ds_dva = 1j * voltage[:, None] * jnp.conj(jnp.diag(current) - ybus * voltage[None, :])
        dva, dvm = ds_dva[np.ix_(pq, pq)], ds_dvm[np.ix_(pq, pq)]
        jacobian = jnp.block([[dva.real, dvm.real], [dva.imag, dvm.imag]])
        dx = -jnp.linalg.solve(jacobian, f)
        angle = jnp.angle(voltage).at[pq].add(dx[:len(pq)])
        magnitude = jnp.abs(voltage).at[pq].add(dx[len(pq):])
        voltage = magnitude * jnp.exp(1j * angle)
        return voltage, _mismatch(network, voltage, s_bus)
    return update


def solve(network: Network, station_ev_mw: jax.Array, multiplier: jax.Array, *, method: str = "sweep",
          max_iterations: int = 100, tolerance_mva: float = 1e-8) -> PowerFlow:
    """AC power flow for the EV power per station [K] (MW) and the non-EV load multiplier; the twin of ``FeederGrid.solve``.

    Branch flows S_f = V_f conj(Y_f V) S_base at both ends, currents
    |S| / (sqrt(3) |V| V_n) (kA), a line's current the larger of the two, its
    loading current / rating. ``method`` is "sweep" or "newton" (module
    docstring). On failure (cap reached or non-finite) every result is NaN.
    """
    load_p, load_q = bus_loads_mw(network, station_ev_mw, multiplier)
    to_ppci = np.asarray(network.bus_to_ppci)
    injection = (network.gen_p_mw - load_p) + 1j * (network.gen_q_mvar - load_q)
    s_bus = jnp.zeros(network.v_start.shape, jnp.complex128).at[to_ppci].add(injection) / network.base_mva
    if method == "sweep":
        update = sweep_update(network, s_bus)
    elif method == "newton":
        update = newton_update(network, s_bus)
    else:
        raise ValueError(f"unknown power flow method {method!r}")
    result = _iterate(network, s_bus, update, max_iterations, tolerance_mva)
    converged = (result.error < tolerance_mva) & jnp.all(jnp.isfinite(result.voltage))
    voltage = jnp.where(converged, result.voltage, jnp.nan)

    line_from, line_to = np.asarray(network.line_from), np.asarray(network.line_to)
    s_from = voltage[line_from] * jnp.conj(network.yf @ voltage) * network.base_mva
    s_to = voltage[line_to] * jnp.conj(network.yt @ voltage) * network.base_mva
    sqrt3 = math.sqrt(3.0)
    i_from = jnp.abs(s_from) / (sqrt3 * jnp.abs(voltage[line_from]) * network.base_kv[line_from])
    i_to = jnp.abs(s_to) / (sqrt3 * jnp.abs(voltage[line_to]) * network.base_kv[line_to])
    current = jnp.maximum(i_from, i_to)
    vm = jnp.abs(voltage)[to_ppci]
    ref = network.ref
    s_ref = voltage[ref] * jnp.conj(network.ybus[ref] @ voltage) * network.base_mva
    ext_bus = network.ext_grid_bus
    return PowerFlow(
        converged=converged,
        iterations=result.iteration,
        voltage=voltage,
        vm_pu=vm,
        min_voltage_pu=jnp.min(vm),
        line_current_ka=current,
        line_loading=current[np.asarray(network.monitored)] / network.line_ratings_ka,
        p_from_mw=s_from.real,
        p_to_mw=s_to.real,
        ext_grid_p_mw=s_ref.real + load_p[ext_bus] - network.gen_p_mw[ext_bus],
        sgen_p_mw=jnp.where(converged, network.sgen_p_mw, jnp.nan),
        load_p_mw=load_p,
    )
