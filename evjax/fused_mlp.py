"""Fused ensemble-MLP forward passes on the GPU: Pallas kernels for ``planner.kernel`` pallas, pallas_layers, mosaic.

``mosaic`` (the fastest, Hopper only, at the end of this module) is one Mosaic GPU
kernel per model step with warpgroup matmuls and weights streamed through shared
memory by the copy engine; ``pallas`` (below) is one Triton kernel per model step;
``pallas_layers`` one Triton matmul with a fused epilogue per hidden layer.

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
from typing import NamedTuple, Optional

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


# ------------------------------------------------------------------ one Mosaic GPU kernel per model step (``planner.kernel: mosaic``)

MOSAIC_TILE = 64  # rows of one kernel instance: one Hopper warpgroup matmul (wgmma) has M = 64
MOSAIC_CHUNK = 64  # weights stream through shared memory in [64, H] row blocks (64 bf16 = one 128-byte swizzle)
MOSAIC_SLOTS = 3  # depth of the shared-memory ring of weight blocks (capped so that everything fits)
MOSAIC_PENDING = 0  # wgmma groups left in flight when the next block is issued (0 = wait for each)
MOSAIC_A_FROM_REGISTERS = False  # single warpgroup: hidden activations fed to wgmma from registers, not shared memory
MOSAIC_SPLIT = 2  # 0: one warpgroup does everything; 1 or 2: that many compute warpgroups split each layer's
#                   columns, and one more warpgroup issues the weight copies
MOSAIC_APPROX_MATH = True  # tanh.approx.f32 in the activation (error ~1e-3 relative, below the bf16 cast after it)
MOSAIC_SMEM_BYTES = 227 * 1024  # a Hopper block's shared-memory limit


def _aligned(size: int) -> int:
    """Bytes of a shared-memory allocation: Mosaic GPU aligns each to 1 KiB."""
    return -(-size // 1024) * 1024


def mosaic_shape_problem(hidden_sizes: tuple[int, ...], input_dim: int, out_dim: int) -> str:
    """Why ``ensemble_head_mosaic`` cannot run an MLP of these widths ("" when it can): one hidden width, a multiple
    of 64 per compute warpgroup up to 256; input and head widths up to 256."""
    parts = max(MOSAIC_SPLIT, 1)
    hidden = hidden_sizes[0]
    if any(h != hidden for h in hidden_sizes) or hidden % (MOSAIC_CHUNK * parts) or hidden > 256:
        return (f"planner.kernel 'mosaic' needs hidden layers of one width, a multiple of {MOSAIC_CHUNK * parts} up "
                f"to 256, got {list(hidden_sizes)}")
    if input_dim > 256 or out_dim > 256:
        return f"planner.kernel 'mosaic' needs input and head widths up to 256, got {input_dim}, {out_dim}"
    return ""


class MosaicWeights(NamedTuple):
    """The ensemble's weights in the Mosaic kernel's layout (``mosaic_weights``): K blocks of 64 rows per layer."""

    blocks: jax.Array  # [E, C, parts, 64, H / parts] bfloat16: block c (all hidden layers' inputs), column part p
    biases: jax.Array  # [E, L, parts, H / parts] float32
    head_w: jax.Array  # [E, H, O'] bfloat16, O' = the head width padded to a multiple of 64
    head_b: jax.Array  # [E, O'] float32


def mosaic_weights(params: dict, *, layer_names: tuple[str, ...]) -> MosaicWeights:
    """Lay the weights out for ``ensemble_head_mosaic``: pad, cast to bfloat16, cut into 64-row blocks.

    About 16 small kernels on a GPU. The planner computes this once per plan (``dynamics.prepare``), not once per
    CEM iteration: XLA does not move it out of the CEM loop by itself.
    """
    hidden_names, head_name = layer_names[:-1], layer_names[-1]
    members, input_dim, hidden = params[hidden_names[0]]["w"].shape
    out_dim = params[head_name]["w"].shape[-1]
    parts = max(MOSAIC_SPLIT, 1)  # column parts of a hidden layer
    chunk, part, bf16 = MOSAIC_CHUNK, hidden // parts, jnp.bfloat16
    padded_input, padded_out = -(-input_dim // chunk) * chunk, -(-out_dim // chunk) * chunk
    weights = [jnp.pad(params[hidden_names[0]]["w"], ((0, 0), (0, padded_input - input_dim), (0, 0)))]
    weights += [params[name]["w"] for name in hidden_names[1:]]
    blocks = jnp.concatenate([w.astype(bf16).reshape(members, -1, chunk, parts, part) for w in weights], axis=1)
    biases = jnp.stack([params[name]["b"] for name in hidden_names], axis=1).astype(jnp.float32)
    return MosaicWeights(
        blocks=jnp.swapaxes(blocks, 2, 3),
        biases=biases.reshape(members, len(hidden_names), parts, part),
        head_w=jnp.pad(params[head_name]["w"].astype(bf16), ((0, 0), (0, 0), (0, padded_out - out_dim))),
        head_b=jnp.pad(params[head_name]["b"].astype(jnp.float32), ((0, 0), (0, padded_out - out_dim))))


def ensemble_head_mosaic(params: dict, x_norm: jax.Array, dtype, *, layer_names: tuple[str, ...], activation,
                         interpret: bool = False, weights: Optional[MosaicWeights] = None) -> jax.Array:
    """Raw head outputs [E, M, O], like ``ensemble_head``: the whole member MLP in one Mosaic GPU kernel (Hopper).

    One instance per (member, 64 rows) keeps its activations on chip through
    every layer: each layer is a chain of warpgroup matmuls (``wgmma``, bf16
    inputs, float32 accumulator) over [64, H] blocks of the weights, which
    the copy engine (TMA) streams from memory through a ring of
    ``MOSAIC_SLOTS`` shared-memory slots, the next blocks in flight while the
    current ones multiply; the head's weights, the biases and the input rows
    are copied in once. Bias + activation run on the accumulator, and the
    bf16 activations go back to shared memory as the next layer's left operand.
    With ``MOSAIC_SPLIT`` = s > 0, s compute warpgroups each produce H / s
    columns of every hidden layer (a barrier per layer: all parts written
    before any is read) and one more warpgroup only issues the weight copies,
    refilling a slot once its consumer has arrived on the slot's barrier;
    with 0, one warpgroup does everything.

    Needs bfloat16 matmuls, hidden layers of one width H (a multiple of 64 per
    compute warpgroup, at most 256), an input width and a head width of at most 256; inputs are
    zero-padded to 64 columns, the head to a multiple of 64 and M to a
    multiple of 64 (exact, as in ``ensemble_head``). ``weights``: ``mosaic_weights(params)``
    computed beforehand (computed here when None). ``interpret`` runs it in
    Pallas' Mosaic GPU interpret mode on CPU (tests).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"planner.kernel 'mosaic' needs planner.matmul_dtype bfloat16, got {jnp.dtype(dtype).name}")
    hidden_names, head_name = layer_names[:-1], layer_names[-1]
    members, samples, input_dim = x_norm.shape
    hidden = params[hidden_names[0]]["w"].shape[-1]
    out_dim = params[head_name]["w"].shape[-1]
    split = MOSAIC_SPLIT
    parts = max(split, 1)  # column parts of a hidden layer
    problem = mosaic_shape_problem(tuple(params[name]["w"].shape[-1] for name in hidden_names), input_dim, out_dim)
    if problem:
        raise ValueError(problem)
    a_from_registers = MOSAIC_A_FROM_REGISTERS and not interpret and not split  # the interpreter reads operands from memory
    chunk, tile, part = MOSAIC_CHUNK, MOSAIC_TILE, hidden // parts
    padded_input, padded_out = -(-input_dim // chunk) * chunk, -(-out_dim // chunk) * chunk
    rows = -(-samples // tile) * tile
    bf16 = jnp.bfloat16
    num_layers = len(hidden_names)

    x = jnp.pad(x_norm.astype(bf16), ((0, 0), (0, rows - samples), (0, padded_input - input_dim)))
    blocks, biases, head_w, head_b = mosaic_weights(params, layer_names=layer_names) if weights is None else weights
    num_blocks = blocks.shape[1]
    layer_blocks = [padded_input // chunk] + [hidden // chunk] * (num_layers - 1)  # blocks of each layer
    h_buffers = 2 if split else 1  # compute warpgroups write layer l+1 while the other may still read layer l
    h_width = chunk if a_from_registers else hidden
    fixed_bytes = (_aligned(2 * tile * padded_input) + _aligned(2 * hidden * padded_out) + _aligned(4 * num_layers * hidden)
                   + _aligned(4 * padded_out) + _aligned(4 * tile * padded_out) + h_buffers * _aligned(2 * tile * h_width))
    slots = min(MOSAIC_SLOTS, num_blocks)
    while slots > 1 and fixed_bytes + slots * _aligned(2 * chunk * hidden) > MOSAIC_SMEM_BYTES:
        slots -= 1
    pending = min(MOSAIC_PENDING, 1)
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # bf16 operands of wgmma
    swizzled_f32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def row_vector(ref, width):
        """A [width] float32 vector from shared memory, broadcast over the tile's rows in the accumulator's layout."""
        vector = ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
        return jax.lax.broadcast_in_dim(vector, (tile, width), [1])

    def body(x_gmem, blocks_gmem, head_w_gmem, biases_gmem, head_b_gmem, out_gmem,
             x_smem, ring, head_w_smem, biases_smem, head_b_smem, out_smem, h_smem, loaded, consumed, fixed, ready):
        member, rows_block = jax.lax.axis_index("e"), jax.lax.axis_index("m")
        tile_rows = pl.ds(rows_block * tile, tile)

        def left(layer, h, k):
            """A layer's left operand: K columns k*64 .. k*64+63 of its input."""
            if layer == 0:
                return x_smem.at[:, pl.ds(k * chunk, chunk)]
            if a_from_registers:
                return h[:, k * chunk:(k + 1) * chunk]
            return h_smem.at[(layer - 1) % h_buffers, (k * chunk) // part].at[:, pl.ds((k * chunk) % part, chunk)]

        def head(h):
            def matmuls(acc):
                for k in range(hidden // chunk):
                    plgpu.wgmma(acc, left(num_layers, h, k), head_w_smem.at[pl.ds(k * chunk, chunk), :])
                plgpu.wgmma_wait(0)
                return acc[...]

            out_smem[...] = pl.run_scoped(matmuls, plgpu.ACC((tile, padded_out), jnp.float32)) + row_vector(
                head_b_smem, padded_out)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[member, tile_rows])
            plgpu.wait_smem_to_gmem(0)

        def fetch(block, part_index):
            slot = block % slots
            plgpu.copy_gmem_to_smem(blocks_gmem.at[member, block, part_index], ring.at[slot, part_index],
                                    loaded.at[slot * parts + part_index])

        def issue_fixed():
            plgpu.copy_gmem_to_smem(x_gmem.at[member, tile_rows], x_smem, fixed.at[0])
            plgpu.copy_gmem_to_smem(biases_gmem.at[member], biases_smem, fixed.at[1])
            plgpu.copy_gmem_to_smem(head_w_gmem.at[member], head_w_smem, fixed.at[2])
            plgpu.copy_gmem_to_smem(head_b_gmem.at[member], head_b_smem, fixed.at[3])

        def release(block, start, wg):
            """Warpgroup wg's wgmma on ``block`` (of the layer starting at ``start``) is done: free its slot."""
            if block < start or block + slots >= num_blocks:
                return
            if split:  # tell the copy warpgroup
                plgpu.barrier_arrive(consumed.at[(block % slots) * parts + wg])
            else:
                fetch(block + slots, 0)

        def compute(wg):
            """Hidden layers' column part ``wg`` (all of them with one compute warpgroup), then the head (part 0)."""
            plgpu.barrier_wait(fixed.at[0])
            plgpu.barrier_wait(fixed.at[1])
            h, start = None, 0
            for layer, count in enumerate(layer_blocks):
                def matmuls(acc, layer=layer, count=count, start=start, h=h):
                    for k in range(count):
                        block = start + k
                        plgpu.barrier_wait(loaded.at[(block % slots) * parts + wg])
                        plgpu.wgmma(acc, left(layer, h, k), ring.at[block % slots, wg])
                        plgpu.wgmma_wait(pending)
                        release(block - pending, start, wg)
                    if pending:
                        plgpu.wgmma_wait(0)
                        release(start + count - 1, start, wg)
                    return acc[...]

                z = pl.run_scoped(matmuls, plgpu.ACC((tile, part), jnp.float32))
                h = activation(z + row_vector(biases_smem.at[layer, wg], part)).astype(bf16)
                if not a_from_registers:
                    h_smem[layer % h_buffers, wg] = h
                    plgpu.commit_smem()
                    if split > 1:  # every part written before any warpgroup reads the next layer
                        plgpu.barrier_arrive(ready)
                        plgpu.barrier_wait(ready)
                start += count
            plgpu.barrier_wait(fixed.at[2])
            plgpu.barrier_wait(fixed.at[3])

            if split:
                pl.when(wg == 0)(lambda: head(h))
            else:
                head(h)

        if not split:  # one warpgroup: it issues the copies and refills a slot as soon as its block is done
            issue_fixed()
            for block in range(slots):
                fetch(block, 0)
            compute(0)
            return

        wg = jax.lax.axis_index("wg")

        @pl.when(wg == split)
        def _producer():
            issue_fixed()
            for block in range(num_blocks):
                for part_index in range(parts):
                    if block >= slots:
                        plgpu.barrier_wait(consumed.at[(block % slots) * parts + part_index])
                    fetch(block, part_index)

        @pl.when(wg < split)
        def _compute():
            compute(wg)

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        interpret = InterpretGPUParams()
    threads = dict(num_threads=split + 1, thread_name="wg") if split else {}
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((members, rows, padded_out), jnp.float32),
        grid=(members, rows // tile),
        grid_names=("e", "m"),
        scratch_types=[plgpu.SMEM((tile, padded_input), bf16, transforms=swizzled),
                       plgpu.SMEM((slots, parts, chunk, part), bf16, transforms=swizzled),
                       plgpu.SMEM((hidden, padded_out), bf16, transforms=swizzled),
                       plgpu.SMEM((num_layers, parts, part), jnp.float32),
                       plgpu.SMEM((padded_out,), jnp.float32),
                       plgpu.SMEM((tile, padded_out), jnp.float32, transforms=swizzled_f32),
                       plgpu.SMEM((h_buffers, parts, tile, h_width // parts), bf16, transforms=swizzled),
                       plgpu.Barrier(num_barriers=slots * parts),  # loaded: a block's column part has landed
                       plgpu.Barrier(num_barriers=slots * parts),  # consumed: its warpgroup is done (split only)
                       plgpu.Barrier(num_barriers=4),  # fixed: input rows, biases, head weights, head bias
                       plgpu.Barrier(num_arrivals=max(split, 1))],  # ready: a layer's activations are written
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=MOSAIC_APPROX_MATH),
        interpret=interpret or None,
        **threads,
    )
    out = kernel(x, blocks, head_w, biases, head_b)
    return out[:, :samples, :out_dim]  # [E, M, O]
