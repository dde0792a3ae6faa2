"""Timing helpers shared by the benchmark scripts: blocked wall times and the machine's matmul ceiling."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (results blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds


def make_matmul_chain(members: int, rows: int, width: int, dtype, chain: int = 8):
    """A compiled program of ``chain`` dependent batched matmuls [E, rows, width] x [E, width, width].

    Inputs are cast to ``dtype`` each time with float32 accumulation, as in the
    model's hidden layers. Returns (run, flops): ``run()`` executes it once.
    """
    key_h, key_w = jax.random.split(jax.random.key(0))
    h0 = jax.random.normal(key_h, (members, rows, width), jnp.float32)
    w = (jax.random.normal(key_w, (members, width, width), jnp.float32) / np.sqrt(width)).astype(dtype)

    @jax.jit
    def run(h):
        def body(_, h):
            return jnp.einsum("emk,ekn->emn", h.astype(dtype), w, preferred_element_type=jnp.float32)
        return jax.lax.fori_loop(0, chain, body, h)

    return (lambda: run(h0)), chain * 2 * members * rows * width * width


def apply_mosaic_setting(setting: tuple[int, ...]) -> None:
    """Set ``fused_mlp.MOSAIC_*`` from (slots, pending, registers, split, approx), as the scripts' settings
    spell them; the kernel reads them at trace time, so trace a fresh step afterwards."""
    from evjax import fused_mlp

    slots, pending, registers, split, approx = setting
    fused_mlp.MOSAIC_SLOTS, fused_mlp.MOSAIC_PENDING, fused_mlp.MOSAIC_SPLIT = slots, pending, split
    fused_mlp.MOSAIC_A_FROM_REGISTERS, fused_mlp.MOSAIC_APPROX_MATH = bool(registers), bool(approx)
