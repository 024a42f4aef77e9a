"""Input sparsity across layers: activations kept as (indices, values) between layers.

A conditional layer's zeros are the next layer's zero inputs. Keeping only the computed
units of each row, the next layer needs just the estimator rows `U[active]` and the
weights at (computed outputs × active inputs): with `m` active inputs and `k` computed
outputs it reads `m r + r n_out + k m` numbers instead of `n_in n_out` (docs/design.md, FLOP
model with `c_in`). Everything keeps static shapes: `m` and `k` are capacities.

When the upstream layer selects whole blocks of `b_in` units, the active inputs come in
aligned runs, so the weights at (computed outputs × active inputs) are `k · m / b_in`
tiles of `b_out × b_in` numbers, each row of a tile contiguous in the unit-major layout.
Reading tiles instead of single elements is what makes input sparsity pay on a CPU: each
cache line fetched is then fully used (4-layer 4096-wide MLP at 10%, batch 1, blocks of
16, pure XLA: 1.0-1.2 ms for the chain against 1.4-1.65 ms with element gathers; the
native kernel of `_tile_product` brings it to about 0.6 ms, `lrcc-jax bench --suite mlp`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _fused, _mask, _native, _policy
from lrcc_jax._packed import (
  PackedDense,
  _xla_gathered_matvec,
  gather_selected,
  group_bounds,
  unit_major_product,
)
from lrcc_jax._policy import Policies

Array = jax.Array

# The native kernel reads runs of at least this many inputs; single inputs are faster as
# XLA's grouped element gathers (4-layer 4096 MLP at 10%: 3.3 ms native, 2.2 ms XLA with
# b_in = 1; 2.2 against 3.3 ms with b_in = 2, and 0.7-1.6 against 1.0-2.3 ms for 4-32).
NATIVE_MIN_RUN = 2


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["indices", "values"], meta_fields=["block_size"]
)
@dataclasses.dataclass(frozen=True)
class SparseRows:
  """Row-wise sparse activations: `dense[r, indices[r, i]] = values[r, i]`, zero elsewhere.

  Attributes:
    indices: (rows, m) int32 unit indices, ascending and distinct within a row.
    values: (rows, m) values; entries may be zero (a selected unit that came out <= 0).
    block_size: static; when > 1 the indices come in aligned runs of whole blocks,
      `indices[r, j*b:(j+1)*b] = B * b + arange(b)` for a block `B`, as
      `sparse_packed_dense` produces them for a layer with block size `b`. The next layer
      then reads weight tiles instead of single elements.
  """

  indices: Array
  values: Array
  block_size: int = 1


def densify(sp: SparseRows, width: int) -> Array:
  """(rows, width) dense array of `sp`."""
  rows = sp.indices.shape[0]
  return (
    jnp.zeros((rows, width), sp.values.dtype)
    .at[jnp.arange(rows)[:, None], sp.indices]
    .set(sp.values, unique_indices=True, indices_are_sorted=True)
  )


def _unit_indices(block_idx: Array, block_size: int) -> Array:
  """(rows, k) block indices -> (rows, k * block_size) unit indices, ascending."""
  if block_size == 1:
    return block_idx
  offsets = jnp.arange(block_size, dtype=block_idx.dtype).reshape(
    (1,) * block_idx.ndim + (block_size,)
  )
  units = block_idx[..., None] * block_size + offsets
  return jnp.reshape(units, block_idx.shape[:-1] + (-1,))


def sparse_packed_dense(
  x: Array | SparseRows,
  packed: PackedDense,
  *,
  threshold: float | Array = 0.0,
  capacity: int,
  policy: Policies = None,
) -> SparseRows:
  r"""`packed_dense` that returns its output as `SparseRows` and accepts them as input.

  Same values as `packed_dense` (densified), per row. With a sparse input of `m` active
  units per row the estimate is `ẑ = (x_A U_A) V + b` with `U_A = U[A]`, and the exact
  outputs are `z_S = W_{S,A} x_A + b_S` for the `k · block_size` selected units `S`. The
  weights `W_{S,A}` are gathered inside a fused multiply-reduce (`_tile_product`), as
  `b_out × b_in` tiles when the input carries `block_size = b_in > 1`. The output carries
  this layer's block size, so a chain of block-selecting layers reads tiles throughout.

  Args:
    x: dense (rows, n_in) inputs, or `SparseRows` of an upstream layer.
    packed: output of `pack`.
    threshold: blocks whose score is not above it are zero.
    capacity: static number of blocks computed per row.
    policy: optional `Policy` (or one per platform); with `kernel="xla"` the dense-input
      gather runs XLA's gather on that platform instead of the Pallas kernel.

  The kernels belong to the lowering platform (`_policy.dispatch`): a dense input is
  gathered as in `packed_dense` (native on CPU, Pallas on CUDA/TPU); the tile product of a
  sparse input is native on CPU (f32, runs of `NATIVE_MIN_RUN`), XLA elsewhere.

  Returns:
    `SparseRows` with `capacity · block_size` entries per row.
  """
  n_blocks, block_size, n_in = packed.weight.shape
  n_out = n_blocks * block_size
  _checks.check_bias(packed.bias, n_out, "packed layer", (n_blocks, block_size))
  checked = _checks.check_capacity(capacity, n_blocks, block_size)
  if checked is None:
    raise ValueError("sparse_packed_dense needs a capacity: it fixes the output size.")
  capacity = checked
  sparse = isinstance(x, SparseRows)
  if isinstance(x, SparseRows):
    _check_sparse_input(x, n_in)
    rows, m, dtype = x.values.shape[0], x.values.shape[1], x.values.dtype
    b_in = x.block_size
    operands: tuple = (x.indices, x.values)
  else:
    _checks.check_features(x, n_in, "packed layer")
    if x.ndim != 2:
      raise ValueError(f"x has shape {tuple(x.shape)}: sparse chaining takes (rows, n_in).")
    rows, m, dtype, b_in = x.shape[0], n_in, x.dtype, 1
    operands = (x,)

  def plan_of(platform: str) -> tuple[str, str]:
    path = _layer_path(platform, rows, capacity, packed, dtype, m, b_in, sparse, policy)
    return path, _policy.epilogue_kernel(platform, dtype)  # and the selection's kernel

  def run(plan: tuple[str, str], operands: tuple, packed: PackedDense, threshold: Array) -> tuple:
    return _run_layer(*plan, operands, packed, threshold, capacity, b_in, policy)

  with jax.named_scope("lrcc_sparse_packed_dense"):
    idx, vals = _policy.dispatch(plan_of, run, (operands, packed, threshold))
  return SparseRows(_unit_indices(idx, block_size), jnp.reshape(vals, (rows, -1)), block_size)


def _layer_path(
  platform: str,
  rows: int,
  capacity: int,
  packed: PackedDense,
  dtype: jnp.dtype,
  m: int,
  b_in: int,
  sparse: bool,
  policy: Policies,
) -> str:
  """`sparse_packed_dense`'s path on `platform`: "fused", "gather" or "dense".

  "fused" where the fused native kernel runs (`_fused.runs`: CPU) and gathering pays (at
  most 8 rows) or the fused kernel replaces the dense path (`_fused.replaces_dense`);
  else "gather" (XLA selection, then the platform's gather or tile kernel) where
  `_policy.plan_layer`'s "auto" gathers, and "dense" (dense product, then the selected
  units' values) where it does not.
  """
  shape, w_dtype = packed.weight.shape, packed.weight.dtype
  plan = _policy.plan_layer(platform, "auto", rows, capacity, shape, w_dtype, dtype, policy)
  if _fused.runs(plan, platform, rows, capacity, shape, w_dtype, dtype, m, packed.u.shape[1]):
    return "fused"
  return "gather" if plan.gather else "dense"


def _run_layer(
  path: str,
  select: str,
  operands: tuple,
  packed: PackedDense,
  threshold: Array,
  capacity: int,
  b_in: int,
  policy: Policies,
) -> tuple[Array, Array]:
  """`(idx, vals)` of `sparse_packed_dense` on one path (see `_layer_path`), selecting
  with `_mask.top_blocks`' kernel `select` outside the fused kernel."""
  n_blocks, block_size, n_in = packed.weight.shape
  sparse = len(operands) == 2
  if path == "fused":
    if sparse:
      return _fused.sparse_layer(
        operands[0],
        operands[1],
        b_in,
        packed.weight,
        packed.bias,
        packed.u,
        packed.v,
        threshold,
        capacity,
        _xla_tile_product,
      )
    return _fused.dense_layer(
      operands[0],
      packed.weight,
      packed.bias,
      packed.u,
      packed.v,
      threshold,
      capacity,
      _xla_gathered_matvec,
    )
  indices = operands[0] if sparse else None
  values = operands[-1]
  scores = _fused.xla_scores(values, indices, packed.u, packed.v, packed.bias, block_size)
  if path == "dense":  # dense product, then the selected units' values (same values)
    rows = values.shape[0]
    xd = densify(SparseRows(operands[0], operands[1], b_in), n_in) if sparse else values
    z = unit_major_product(xd, jnp.reshape(packed.weight, (n_blocks * block_size, n_in)))
    z = jnp.reshape(z, (rows, n_blocks, block_size)) + packed.bias[None].astype(z.dtype)
    idx = _mask.top_blocks(scores, capacity, kernel=select)
    keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
    z = jnp.take_along_axis(z, idx[..., None], axis=1)
    return idx, jnp.where(keep[..., None], jax.nn.relu(z), jnp.zeros((), z.dtype))
  if not sparse:
    return gather_selected(
      values, packed, scores, threshold, capacity, policy=policy, select=select
    )
  x = SparseRows(operands[0], operands[1], b_in)
  idx = _mask.top_blocks(scores, capacity, kernel=select)  # (rows, k)
  keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  dtype = values.dtype
  z = _tile_product(packed.weight, idx, x, policy).astype(dtype) + packed.bias[idx].astype(dtype)
  return idx, jnp.where(keep[..., None], jax.nn.relu(z), jnp.zeros((), z.dtype))


def _check_sparse_input(x: SparseRows, n_in: int) -> None:
  if x.indices.ndim != 2 or x.indices.shape != x.values.shape:
    raise ValueError(
      f"SparseRows needs indices and values of one (rows, m) shape, got"
      f" {tuple(x.indices.shape)} and {tuple(x.values.shape)}."
    )
  b, m = x.block_size, x.indices.shape[1]
  if b < 1 or n_in % b or m % b:
    raise ValueError(
      f"SparseRows.block_size={b} must divide both the layer's n_in={n_in} and the"
      f" {m} active inputs per row."
    )


def native_tiles(
  b_in: int, weight_dtype: jnp.dtype, values_dtype: jnp.dtype, platform: str | None = None
) -> bool:
  """Whether `_tile_product` runs the native kernel for input runs of `b_in` on `platform`.

  `_policy.tile_kernel`; `platform` defaults to the current device's.
  """
  platform = _policy.current_platform() if platform is None else platform
  return _policy.tile_kernel(platform, b_in, weight_dtype, values_dtype, NATIVE_MIN_RUN) == "native"


def _tile_product(
  weight: Array, out_blocks: Array, x: SparseRows, policy: Policies = None
) -> Array:
  """`z[r, o, j] = Σ_i W[out_blocks[r, o] * b_out + j, x.indices[r, i]] · x.values[r, i]`.

  The inputs come in runs of `b_in = x.block_size` units starting at `x.indices[:, ::b_in]`,
  so the weights needed are `b_out × b_in` tiles of the unit-major layout. Lowered for CPU
  with f32 weights and `b_in >= NATIVE_MIN_RUN` this is the fused native kernel (`_native`,
  20-30 µs per 4096-wide layer at 10% in blocks of 16); elsewhere, or without a compiler,
  `_xla_tile_product` (same values). Returns (rows, k, b_out).
  """
  b_in = x.block_size
  starts = x.indices[:, ::b_in]

  def run(kernel: str, weight: Array, out_blocks: Array, starts: Array, values: Array) -> Array:
    if kernel == "native":
      shared = _policy.native_shared(out_blocks.shape[0], weight.dtype, policy)
      return _native.tile_product(
        weight, out_blocks, starts, values, b_in, _xla_tile_product, shared=shared
      )
    return _xla_tile_product(weight, out_blocks, starts, values, b_in=b_in)

  return _policy.dispatch(
    lambda platform: _policy.tile_kernel(
      platform, b_in, weight.dtype, x.values.dtype, NATIVE_MIN_RUN
    ),
    run,
    (weight, out_blocks, starts, x.values),
  )


def _xla_tile_product(
  weight: Array, out_blocks: Array, starts: Array, values: Array, *, b_in: int
) -> Array:
  """`_tile_product` in XLA ops: `starts` (rows, m / b_in) are the first units of the runs.

  With `b_in > 1` one gather of the (rows, k, m / b_in, b_out, b_in) tiles (692 KB for 26 ×
  26 tiles of 16 × 16) and one reduction; XLA:CPU materialises the gather. Single
  elements (`b_in = 1`) are gathered by flat index in `group_bounds` groups, which XLA:CPU
  runs concurrently; the gather-and-reduce form measured slower there.
  """
  n_blocks, b_out, n_in = weight.shape
  rows, m = values.shape
  if b_in == 1:  # element gathers: a flat index and a matvec, in concurrent groups
    units = _unit_indices(out_blocks, b_out)  # (rows, k * b_out)
    flat_weight = jnp.reshape(weight, (-1,))
    parts = []
    for a, b in group_bounds(units.shape[1], m // 8):
      w = jnp.take(flat_weight, units[:, a:b, None] * n_in + starts[:, None, :], mode="clip")
      parts.append(jnp.einsum("rom,rm->ro", w.astype(values.dtype), values))
    return jnp.reshape(jnp.concatenate(parts, axis=1), (rows, -1, b_out))
  in_blocks = starts // b_in  # (rows, m / b_in)
  w4 = jnp.reshape(weight, (n_blocks, b_out, n_in // b_in, b_in))
  tiles = w4[out_blocks[:, :, None], :, in_blocks[:, None, :], :]  # (rows, k, m/b_in, b_out, b_in)
  vals = jnp.reshape(values, (rows, 1, m // b_in, 1, b_in))
  return jnp.sum(tiles.astype(values.dtype) * vals, axis=(2, 4))


def sparse_linear(x: SparseRows, kernel: Array, bias: Array) -> Array:
  """Dense linear head on sparse inputs: `x_A W[A] + b`, shape (rows, n_out)."""
  _checks.check_kernel(kernel, bias)
  return jnp.einsum("rm,rmc->rc", x.values, kernel[x.indices].astype(x.values.dtype)) + bias[None]
