"""Fused ensemble-MLP forward pass: one Pallas (Triton) kernel per model step on the GPU (``planner.kernel: pallas``).

The XLA path (``dynamics.member_step_forward``) runs each layer as a batched
matmul and writes and re-reads the float32 activations [E, M, 256] between the
matmul, the bias + swish and the next cast, at every layer of every model step.
Here one kernel instance takes a tile of T samples of one member through all
layers with the activations on chip: the grid is (E, M / T), every instance
reads its member's weights and its T inputs and writes only the head's raw
outputs [T, S+2+W]. Inside, activations and weights are handled in column
blocks of 64 (``_mlp_kernel``), so that no instance holds a whole 256 x 256
weight matrix in registers: the first version, whole layers at T = 64 and 4
warps, planned at 9.7 ms on an H200 against the XLA path's 4.7 ms.

Triton needs power-of-two block dims of at least 16 for its matmuls, so the
wrapper zero-pads the input width (S+A), every hidden width and the head
width, and M to a multiple of T. The padding is exact: a padded hidden unit
has pre-activation 0, swish(0) = 0, and its (zero) outgoing weights add nothing.

On CPU the kernel runs only in Pallas interpret mode (``interpret=True``), which
is how it is tested against the XLA path; it is far too slow to plan with there.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_TILE = 64  # T, samples per kernel instance (read at trace time: benchmarks/gpu_planner.py sweeps it)
DEFAULT_NUM_WARPS = 4  # Triton warps per instance (read at trace time too)
DEFAULT_CHUNK = 64  # column block of the activations and weights inside the kernel; 0 = whole layers


def _padded(size: int) -> int:
    """The smallest power of two >= max(size, 16)."""
    return max(16, 1 << (size - 1).bit_length())


def _mlp_kernel(x_ref, *refs, widths: tuple[int, ...], chunk: int, dtype, precision, activation):
    """One tile of one member: x [T, K0] -> raw head output [T, O]; refs are (w, b) per layer, then the output.

    Activations are kept as a list of column blocks of ``chunk`` (or the whole
    width when narrower); output block j of a layer is
    activation(sum_i h_i @ W[block i, block j] + b[block j]), so no value is ever
    sliced or concatenated and each matmul's weight block is [chunk, chunk].
    """
    *layer_refs, out_ref = refs
    num_layers = len(widths) - 1
    blocks = [x_ref[...]]  # [T, K0]: one block
    for layer in range(num_layers):
        w_ref, b_ref = layer_refs[2 * layer], layer_refs[2 * layer + 1]
        fan_in, fan_out = widths[layer], widths[layer + 1]
        in_size, out_size = min(chunk, fan_in), min(chunk, fan_out)
        new_blocks = []
        for j in range(fan_out // out_size):
            columns = pl.ds(j * out_size, out_size)
            z = b_ref[columns][None, :]
            for i, h in enumerate(blocks):
                w = w_ref[pl.ds(i * in_size, in_size), columns]
                z = z + jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32, precision=precision)
            new_blocks.append(activation(z) if layer < num_layers - 1 else z)
        blocks = new_blocks
    for j, block in enumerate(blocks):
        out_ref[:, pl.ds(j * block.shape[1], block.shape[1])] = block


def ensemble_head(params: dict, x_norm: jax.Array, dtype, *, layer_names: tuple[str, ...], activation,
                  tile: Optional[int] = None, num_warps: Optional[int] = None, chunk: Optional[int] = None,
                  interpret: bool = False) -> jax.Array:
    """Raw head outputs [E, M, O] of every member on its own inputs x_norm [E, M, S+A]; one fused kernel.

    The same maths as ``dynamics.member_step_forward`` up to the soft
    log-variance bound: for each hidden layer h <- activation(h @ W + b) with
    ``dtype`` matmul inputs and float32 accumulation, bias and activation; then
    h @ W_head + b_head. ``params`` holds ``{"w": [E, K, N], "b": [E, N]}`` per
    name of ``layer_names`` (hidden layers, then the head). ``tile`` T and
    ``chunk`` (the column block of ``_mlp_kernel``; 0 = whole layers), powers
    of two >= 16, and ``num_warps`` default to the module's ``DEFAULT_*``.
    """
    tile = DEFAULT_TILE if tile is None else tile
    num_warps = DEFAULT_NUM_WARPS if num_warps is None else num_warps
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be 0 or a power of two >= 16, got {chunk}")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    members, samples, input_dim = x_norm.shape
    padded_samples = -(-samples // tile) * tile
    widths = [input_dim] + [params[name]["w"].shape[-1] for name in layer_names]
    padded = [_padded(width) for width in widths]
    x = jnp.pad(x_norm.astype(dtype), ((0, 0), (0, padded_samples - samples), (0, padded[0] - input_dim)))
    operands, in_specs = [x], [pl.BlockSpec((None, tile, padded[0]), lambda e, i: (e, i, 0))]
    for name, fan_in, fan_out, pad_in, pad_out in zip(layer_names, widths[:-1], widths[1:], padded[:-1], padded[1:]):
        w = jnp.pad(params[name]["w"].astype(dtype), ((0, 0), (0, pad_in - fan_in), (0, pad_out - fan_out)))
        b = jnp.pad(params[name]["b"].astype(jnp.float32), ((0, 0), (0, pad_out - fan_out)))
        operands += [w, b]
        in_specs += [pl.BlockSpec((None, pad_in, pad_out), lambda e, i: (e, 0, 0)),
                     pl.BlockSpec((None, pad_out), lambda e, i: (e, 0))]
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    kernel = functools.partial(_mlp_kernel, widths=tuple(padded), chunk=chunk or max(padded), dtype=dtype,
                               precision=precision, activation=activation)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((members, padded_samples, padded[-1]), jnp.float32),
        grid=(members, padded_samples // tile),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, tile, padded[-1]), lambda e, i: (e, i, 0)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="ensemble_mlp",
    )(*operands)
    return out[:, :samples, :widths[-1]]  # [E, M, O]
