"""Pallas block-skipping kernels: only the selected weight blocks are fetched and computed.

Two forms of the same layer, `y = M ⊙ relu(x Wᵀ_blocks + b)` over the unit-major packed
weights (`PackedDense.weight`, (n_blocks, block_size, n_in)):

- `block_sparse_dense_masked` (GPU style): one program per output block; the block mask
  is an ordinary input and `pl.when` branches, so a skipped block's weights are never
  loaded (Triton lowers the loads inside the branch).
- `block_sparse_dense_prefetch` (TPU style): scalar prefetch of the selected block
  indices (`pltpu.PrefetchScalarGridSpec`); the grid runs over the `capacity` selected
  blocks only and the weight `BlockSpec`'s index map reads the prefetched index, so the
  pipeline DMAs only selected blocks. Unselected outputs keep the zeros of an aliased
  output buffer.

Both run on CPU with ``interpret=True``, which is how the tests check them against
`masked_dense`; on CPU they are slow and only for testing. They take one selection for all
rows and are not used by the skipping paths.

The skipping paths' gather kernels are below: `gathered_matvec_tpu` (Mosaic, scalar
prefetch) and `gathered_matvec_gpu` (Triton), with per-row selections. `_policy` stages
them in the TPU and CUDA branches of the program; `LRCC_JAX_PALLAS=0` selects XLA's gather
instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lrcc_jax import _checks

Array = jax.Array


def _masked_kernel(mask_ref, x_ref, w_ref, b_ref, o_ref):
  selected = mask_ref[0, 0] != 0

  @pl.when(selected)
  def _compute():
    w = w_ref[0]  # (bs, n_in)
    z = jax.lax.dot_general(
      x_ref[...], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    o_ref[...] = jnp.maximum(z + b_ref[...], 0.0).astype(o_ref.dtype)

  @pl.when(jnp.logical_not(selected))
  def _skip():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def block_sparse_dense_masked(
  x: Array, weight: Array, bias: Array, block_mask: Array, *, interpret: bool = False
) -> Array:
  """`relu(x Wᵀ + b)` on the selected blocks, zero elsewhere (one mask for all rows).

  Args:
    x: (rows, n_in) inputs.
    weight: (n_blocks, block_size, n_in) unit-major weights (`PackedDense.weight`).
    bias: (n_blocks, block_size) bias.
    block_mask: bool (n_blocks,): the blocks to compute (e.g. the union over the rows of
      `unit_mask`'s selection; apply each row's own mask to the result).
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    (rows, n_blocks * block_size) activations.
  """
  rows, n_in = x.shape
  n_blocks, block_size, w_in = weight.shape
  _checks.check_features(x, w_in, "packed layer")
  if block_mask.shape != (n_blocks,):
    raise ValueError(f"block_mask has shape {block_mask.shape}, expected ({n_blocks},).")
  mask = block_mask.astype(jnp.int32).reshape(n_blocks, 1)
  return pl.pallas_call(
    _masked_kernel,
    grid=(n_blocks,),
    in_specs=[
      pl.BlockSpec((1, 1), lambda j: (j, 0)),
      pl.BlockSpec((rows, n_in), lambda j: (0, 0)),
      pl.BlockSpec((1, block_size, n_in), lambda j: (j, 0, 0)),
      pl.BlockSpec((1, block_size), lambda j: (0, j)),
    ],
    out_specs=pl.BlockSpec((rows, block_size), lambda j: (0, j)),
    out_shape=jax.ShapeDtypeStruct((rows, n_blocks * block_size), x.dtype),
    interpret=interpret,
  )(mask, x, weight, bias.reshape(1, n_blocks * block_size))


def _prefetch_kernel(idx_ref, x_ref, w_ref, b_ref, zeros_ref, o_ref):
  del idx_ref, zeros_ref  # the indices only steer the index maps; zeros only alias
  w = w_ref[0]
  z = jax.lax.dot_general(
    x_ref[...], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
  )
  o_ref[...] = jnp.maximum(z + b_ref[...], 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def block_sparse_dense_prefetch(
  x: Array, weight: Array, bias: Array, block_idx: Array, *, interpret: bool = False
) -> Array:
  """`relu(x Wᵀ + b)` on the blocks `block_idx` only, via scalar prefetch (TPU style).

  Args:
    x: (rows, n_in) inputs.
    weight: (n_blocks, block_size, n_in) unit-major weights.
    bias: (n_blocks, block_size) bias.
    block_idx: int32 (capacity,) distinct block indices to compute (e.g. `top_k`'s).
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    (rows, n_blocks * block_size) activations; blocks not in `block_idx` are zero.
  """
  from jax.experimental.pallas import tpu as pltpu

  rows, n_in = x.shape
  n_blocks, block_size, w_in = weight.shape
  _checks.check_features(x, w_in, "packed layer")
  if block_idx.ndim != 1 or not 1 <= block_idx.shape[0] <= n_blocks:
    raise ValueError(
      f"block_idx has shape {block_idx.shape}: expected (capacity,) with capacity in [1,"
      f" {n_blocks}]."
    )
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(block_idx.shape[0],),
    in_specs=[
      pl.BlockSpec((rows, n_in), lambda i, idx: (0, 0)),
      pl.BlockSpec((1, block_size, n_in), lambda i, idx: (idx[i], 0, 0)),
      pl.BlockSpec((1, block_size), lambda i, idx: (0, idx[i])),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=pl.BlockSpec((rows, block_size), lambda i, idx: (0, idx[i])),
  )
  zeros = jnp.zeros((rows, n_blocks * block_size), x.dtype)
  return pl.pallas_call(
    _prefetch_kernel,
    grid_spec=grid_spec,
    out_shape=jax.ShapeDtypeStruct(zeros.shape, x.dtype),
    input_output_aliases={4: 0},
    interpret=interpret,
  )(block_idx.astype(jnp.int32), x, weight, bias.reshape(1, n_blocks * block_size), zeros)


# --- Gather-path kernels: `z[r, j] = weight[idx[r, j]] @ x[r]`, one selection per row. ---
#
# These are `_packed.gathered_matvec` on GPU and TPU: the platform dispatch
# (`_policy.dispatch`) calls them in the "cuda" and "tpu" branches of the program where
# `gpu_fits` / `tpu_fits` hold, and the XLA gather elsewhere. `LRCC_JAX_PALLAS=0` (or a
# `Policy` with `kernel="xla"`) selects the XLA gather on both platforms instead.

# Bytes of one weight tile (block_size × n_in tile) a TPU grid step reads. The pipeline
# double-buffers it, so two tiles plus the input tile stay far below the 16 MiB of VMEM
# that Mosaic scopes by default on every TPU generation.
TPU_TILE_BYTES = 2 * 2**20
# Elements of one (block_size × n_in tile) weight tile a GPU program holds. Triton keeps the
# tile in registers, staged through shared memory `num_stages` deep: 4096 f32 elements are
# 32 per thread of 4 warps and 2 × 16 KB of shared memory, well inside every CUDA GPU's.
GPU_TILE_ELEMENTS = 4096
GPU_MIN_TILE = 16


def enabled() -> bool:
  """False when `LRCC_JAX_PALLAS=0`: the GPU/TPU gather path is then XLA's gather.

  Read at trace time, so a process can switch it for the programs it traces next.
  """
  return os.environ.get("LRCC_JAX_PALLAS", "1") != "0"


def _sublanes(dtype: jnp.dtype) -> int:
  """Rows of one Mosaic vreg tile: 8 for 32-bit types, 16 for bf16, 32 for 8-bit."""
  return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def tpu_tile(block_size: int, n_in: int, dtype: jnp.dtype) -> int | None:
  """The n_in tile of `gathered_matvec_tpu`, or None where the kernel does not apply.

  A weight block is a `(block_size, tile)` VMEM buffer. Mosaic tiles the last two
  dimensions in (8, 128) (16 rows for bf16): a block of fewer rows than that still
  occupies, and DMAs, a whole tile, so blocks must fill whole tiles (block sizes 8, 16,
  ... for f32; 16, 32, ... for bf16). Smaller blocks (e.g. single units) are gathered
  by XLA: at one unit per block the kernel would move 8x the bytes it uses. The tile is
  the widest multiple of 128 dividing `n_in` within `TPU_TILE_BYTES`.
  """
  if block_size % _sublanes(dtype) or n_in % 128:
    return None
  itemsize = jnp.dtype(dtype).itemsize
  lanes = n_in // 128
  best = 1
  for d in range(1, lanes + 1):
    if lanes % d == 0 and block_size * 128 * d * itemsize <= TPU_TILE_BYTES:
      best = d
  return 128 * best


def gpu_tile(block_size: int, n_in: int) -> int | None:
  """The n_in tile of `gathered_matvec_gpu`, or None where the kernel does not apply.

  Triton blocks have power-of-two shapes: `block_size` must be one, and the tile is the
  largest power of two dividing `n_in` with `block_size · tile <= GPU_TILE_ELEMENTS`;
  below `GPU_MIN_TILE` lanes the loads are too narrow to pay and XLA gathers instead.
  """
  if block_size & (block_size - 1) or block_size > GPU_TILE_ELEMENTS // GPU_MIN_TILE:
    return None
  tile = n_in & -n_in  # largest power of two dividing n_in
  tile = min(tile, GPU_TILE_ELEMENTS // block_size)
  return tile if tile >= GPU_MIN_TILE else None


def gathered_matvec_tpu(weight: Array, idx: Array, x: Array, *, interpret: bool = False) -> Array:
  """`z[r, j] = weight[idx[r, j]] @ x[r]` on TPU: Mosaic DMAs only the selected blocks.

  The (rows, k) block indices are scalar-prefetched into SMEM (flattened, since SMEM pads
  2-D arrays); the grid is (rows, k, n_in / tile) and the weight `BlockSpec`'s index map
  reads `idx[r, j]`, so the pipeline fetches exactly the selected `(block_size, tile)`
  tiles, double-buffered, and unselected blocks never leave HBM. Each row has its own
  selection, as the contract requires. The n_in axis is innermost and accumulates into an
  f32 VMEM scratch; rows and selected blocks are parallel grid axes (megacore).

  Shapes must satisfy `tpu_tile` (the dispatch falls back to XLA's gather otherwise;
  `LRCC_JAX_PALLAS=0` forces that fallback).

  Args:
    weight: (n_blocks, block_size, n_in) unit-major weights.
    idx: (rows, k) int block indices.
    x: (rows, n_in) inputs.
    interpret: run in the Pallas TPU interpreter (CPU tests).

  Returns:
    (rows, k, block_size) in `x.dtype`.
  """
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

  _, block_size, n_in = weight.shape
  rows, k = idx.shape
  tile = tpu_tile(block_size, n_in, weight.dtype)
  if tile is None:
    raise ValueError(
      f"gathered_matvec_tpu needs block_size a multiple of {_sublanes(weight.dtype)} and n_in a"
      f" multiple of 128, got ({block_size}, {n_in}); use the XLA gather (LRCC_JAX_PALLAS=0)."
    )
  n_tiles = n_in // tile

  def kernel(idx_ref, x_ref, w_ref, o_ref, acc_ref):
    del idx_ref  # it only steers the index maps
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _init():
      acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    acc_ref[...] += jax.lax.dot_general(
      x_ref[0].astype(jnp.float32),
      w_ref[0].astype(jnp.float32),
      (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32,
    )  # (1, tile) · (block_size, tile)ᵀ

    @pl.when(t == n_tiles - 1)
    def _store():
      o_ref[0] = acc_ref[...].astype(o_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=(rows, k, n_tiles),
    in_specs=[
      pl.BlockSpec((1, 1, tile), lambda r, j, t, ids: (r, 0, t)),
      pl.BlockSpec((1, block_size, tile), lambda r, j, t, ids: (ids[r * k + j], 0, t)),
    ],
    out_specs=pl.BlockSpec((1, 1, block_size), lambda r, j, t, ids: (r * k + j, 0, 0)),
    scratch_shapes=[pltpu.VMEM((1, block_size), jnp.float32)],
  )
  with jax.named_scope("lrcc_gathered_matvec_tpu"):
    out = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((rows * k, 1, block_size), x.dtype),
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary")
      ),
      interpret=interpret,
    )(jnp.reshape(idx, (-1,)).astype(jnp.int32), jnp.reshape(x, (rows, 1, n_in)), weight)
  return jnp.reshape(out, (rows, k, block_size))


def gathered_matvec_gpu(weight: Array, idx: Array, x: Array, *, interpret: bool = False) -> Array:
  """`z[r, j] = weight[idx[r, j]] @ x[r]` on CUDA GPUs, as a Triton kernel.

  One program per (row, selected block): it reads its block index, then loops over n_in in
  `gpu_tile` steps, loading the `(block_size, tile)` weight tile and the input tile and
  accumulating the products in f32 registers. Only selected blocks are ever addressed, so
  skipped blocks are never loaded.

  Triton rather than Mosaic GPU (Pallas's default on CUDA): the work is a gather of small
  blocks at data-dependent addresses, which Triton expresses as pointer offsets on every
  CUDA GPU. Mosaic GPU moves data with TMA copies whose byte counts must be multiples of
  the warpgroup size and is built around Hopper tensor-core tiles; a block of one unit or
  a one-row matvec fits neither. The Triton compiler parameters select that backend.

  Shapes must satisfy `gpu_tile` (the dispatch falls back to XLA's gather otherwise;
  `LRCC_JAX_PALLAS=0` forces that fallback).

  Args:
    weight: (n_blocks, block_size, n_in) unit-major weights.
    idx: (rows, k) int block indices.
    x: (rows, n_in) inputs.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    (rows, k, block_size) in `x.dtype`.
  """
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top

  _, block_size, n_in = weight.shape
  rows, k = idx.shape
  tile = gpu_tile(block_size, n_in)
  if tile is None:
    raise ValueError(
      f"gathered_matvec_gpu needs a power-of-two block_size and n_in divisible by {GPU_MIN_TILE},"
      f" got ({block_size}, {n_in}); use the XLA gather (LRCC_JAX_PALLAS=0)."
    )
  n_tiles = n_in // tile

  def kernel(idx_ref, x_ref, w_ref, o_ref):
    r, j = pl.program_id(0), pl.program_id(1)
    block = idx_ref[r, j]

    def step(t, acc):
      start = pl.multiple_of(t * tile, tile)
      w = w_ref[block, :, pl.ds(start, tile)].astype(jnp.float32)  # (block_size, tile)
      xt = x_ref[r, pl.ds(start, tile)].astype(jnp.float32)  # (tile,)
      return acc + jnp.sum(w * xt[None, :], axis=1)

    acc = jax.lax.fori_loop(0, n_tiles, step, jnp.zeros((block_size,), jnp.float32))
    o_ref[r, j, :] = acc.astype(o_ref.dtype)

  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  with jax.named_scope("lrcc_gathered_matvec_gpu"):
    return pl.pallas_call(
      kernel,
      grid=(rows, k),
      in_specs=[anywhere] * 3,
      out_specs=anywhere,
      out_shape=jax.ShapeDtypeStruct((rows, k, block_size), x.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
    )(idx.astype(jnp.int32), x, weight)


# --- AD and batching for the gather kernels. ---


@functools.cache
def differentiable_matvec(kernel: Callable, fallback: Callable) -> Callable:
  """`kernel(weight, idx, x)` with `fallback`'s derivatives and a batching rule.

  The result is differentiable (the tangent is `fallback`'s, an XLA form with the same
  values: the Pallas kernels have no general JVP) and batches under `vmap` (batch axes of
  `idx` and `x` fold into rows; batched weights run `fallback`), like `_native`.
  """

  @jax.custom_batching.custom_vmap
  def call(weight, idx, x):
    return kernel(weight, idx, x)

  @call.def_vmap
  def _vmap(axis_size, in_batched, weight, idx, x):
    if in_batched[0]:
      in_axes = (0, *(0 if b else None for b in in_batched[1:]))
      return jax.vmap(fallback, in_axes=in_axes)(weight, idx, x), True
    idx, x = (
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip((idx, x), in_batched[1:])
    )
    rows = idx.shape[1]
    z = call(
      weight, jnp.reshape(idx, (axis_size * rows, -1)), jnp.reshape(x, (axis_size * rows, -1))
    )
    return jnp.reshape(z, (axis_size, rows) + z.shape[1:]), True

  @jax.custom_jvp
  def product(weight, idx, x):
    return call(weight, idx, x)

  @product.defjvp
  def _jvp(primals, tangents):
    weight, idx, x = primals
    dw, _, dx = tangents
    _, dz = jax.jvp(lambda w, v: fallback(w, idx, v), (weight, x), (dw, dx))
    return product(*primals), dz

  return product
