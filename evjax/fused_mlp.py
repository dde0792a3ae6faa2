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


def _precision(dtype):
    """HIGHEST for float32 matmuls (no TF32 rounding), the default for bfloat16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


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
    kernel = functools.partial(_mlp_kernel, widths=tuple(padded), chunk=chunk or max(padded), dtype=dtype,
                               precision=_precision(dtype), activation=activation)
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


# ------------------------------------------------------------------ one kernel per layer (``planner.kernel: pallas_layers``)

LAYER_BLOCK_M = 64  # rows of one kernel instance (read at trace time, like the DEFAULT_* above)
LAYER_BLOCK_N = 128  # output columns of one kernel instance
LAYER_BLOCK_K = 64  # the contraction is a loop over blocks of K columns, which Triton pipelines (num_stages)
LAYER_NUM_WARPS = 4
LAYER_NUM_STAGES = 3


def _dense_kernel(x_ref, w_ref, b_ref, o_ref, *, block_k: int, precision, activation):
    """One [BM, BN] block of activation(x @ w + b): a loop over K in blocks, float32 accumulation and epilogue."""
    num_k = x_ref.shape[1] // block_k

    def accumulate(k, acc):
        columns = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        return acc + jnp.dot(x_ref[:, columns], w_ref[columns, :], preferred_element_type=jnp.float32,
                             precision=precision)

    acc = jax.lax.fori_loop(0, num_k, accumulate, jnp.zeros(o_ref.shape, jnp.float32))
    z = acc + b_ref[...][None, :]
    o_ref[...] = activation(z).astype(o_ref.dtype)


def dense(x: jax.Array, w: jax.Array, b: jax.Array, *, activation, interpret: bool = False) -> jax.Array:
    """activation(x @ w + b) of every member, one Pallas kernel: x [E, M, K], w [E, K, N] (x's dtype), b [E, N].

    The bias add, the activation and the cast back to x's dtype run in the
    matmul's epilogue, on the float32 accumulator, so the product is never
    written to memory. M, K and N must be multiples of the blocks
    (``LAYER_BLOCK_*``, each capped at the dimension) and powers of two >= 16
    where smaller than a block; ``ensemble_head_layers`` pads them so.
    """
    members, rows, depth = x.shape
    width = w.shape[-1]
    block_m, block_n, block_k = (min(LAYER_BLOCK_M, rows), min(LAYER_BLOCK_N, width), min(LAYER_BLOCK_K, depth))
    for name, size, block in (("M", rows, block_m), ("N", width, block_n), ("K", depth, block_k)):
        if size % block or block < 16 or block & (block - 1):
            raise ValueError(f"dense: {name} = {size} is no multiple of a power-of-two block >= 16 (block {block})")
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        compiler_params = plgpu.CompilerParams(num_warps=LAYER_NUM_WARPS, num_stages=LAYER_NUM_STAGES)
    return pl.pallas_call(
        functools.partial(_dense_kernel, block_k=block_k, precision=_precision(x.dtype), activation=activation),
        out_shape=jax.ShapeDtypeStruct((members, rows, width), x.dtype),
        grid=(members, rows // block_m, width // block_n),
        in_specs=[pl.BlockSpec((None, block_m, depth), lambda e, i, j: (e, i, 0)),
                  pl.BlockSpec((None, depth, block_n), lambda e, i, j: (e, 0, j)),
                  pl.BlockSpec((None, block_n), lambda e, i, j: (e, j))],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda e, i, j: (e, i, j)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="ensemble_dense",
    )(x, w, b.astype(jnp.float32))


def ensemble_head_layers(params: dict, x_norm: jax.Array, dtype, *, layer_names: tuple[str, ...], activation,
                         interpret: bool = False) -> jax.Array:
    """Raw head outputs [E, M, O], like ``ensemble_head``, with one ``dense`` kernel per hidden layer.

    Each hidden layer is a Pallas matmul with the bias + activation + cast
    fused into its epilogue (on the XLA path they are a separate pass over
    the [E, M, 256] product after every matmul); the head is an XLA matmul.
    Inputs, widths and M are zero-padded once (exact, as in ``ensemble_head``)
    and the padding is sliced off the head's output.
    """
    members, samples, input_dim = x_norm.shape
    rows = -(-samples // LAYER_BLOCK_M) * LAYER_BLOCK_M if samples > LAYER_BLOCK_M else _padded(samples)
    widths = [input_dim] + [params[name]["w"].shape[-1] for name in layer_names]
    padded = [_padded(width) if width < LAYER_BLOCK_K else -(-width // LAYER_BLOCK_K) * LAYER_BLOCK_K
              for width in widths[:-1]] + [widths[-1]]
    h = jnp.pad(x_norm.astype(dtype), ((0, 0), (0, rows - samples), (0, padded[0] - input_dim)))
    for name, fan_in, fan_out, pad_in, pad_out in zip(layer_names[:-1], widths[:-2], widths[1:-1], padded[:-2],
                                                      padded[1:-1]):
        w = jnp.pad(params[name]["w"].astype(dtype), ((0, 0), (0, pad_in - fan_in), (0, pad_out - fan_out)))
        b = jnp.pad(params[name]["b"], ((0, 0), (0, pad_out - fan_out)))
        h = dense(h, w, b, activation=activation, interpret=interpret)
    head = params[layer_names[-1]]
    w = jnp.pad(head["w"].astype(dtype), ((0, 0), (0, padded[-2] - widths[-2]), (0, 0)))
    out = jnp.einsum("emk,eko->emo", h, w, preferred_element_type=jnp.float32, precision=_precision(dtype))
    return (out + head["b"][:, None, :])[:, :samples]  # [E, M, O]
