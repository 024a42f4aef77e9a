"""Input sparsity across layers: activations kept as (indices, values) between layers.

A conditional layer's zeros are the next layer's zero inputs. Keeping only the computed
units of each row, the next layer needs just the estimator rows `U[active]` and the
weights at (computed outputs × active inputs): with `m` active inputs and `k` computed
outputs it reads `m r + r n_out + k m` numbers instead of `n_in n_out` (DESIGN, FLOP
model with `c_in`). Everything keeps static shapes: `m` and `k` are capacities.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _mask
from lrcc_jax._packed import PackedDense, gather_selected, group_bounds

Array = jax.Array


class SparseRows(NamedTuple):
  """Row-wise sparse activations: `dense[r, indices[r, i]] = values[r, i]`, zero elsewhere.

  Attributes:
    indices: (rows, m) int32 unit indices, ascending and distinct within a row.
    values: (rows, m) values; entries may be zero (a selected unit that came out <= 0).
  """

  indices: Array
  values: Array


def densify(sp: SparseRows, width: int) -> Array:
  """(rows, width) dense array of `sp`."""
  rows = sp.indices.shape[0]
  return jnp.zeros((rows, width), sp.values.dtype).at[jnp.arange(rows)[:, None], sp.indices].set(
      sp.values, unique_indices=True, indices_are_sorted=True
  )


def _unit_indices(block_idx: Array, block_size: int) -> Array:
  """(rows, k) block indices -> (rows, k * block_size) unit indices, ascending."""
  if block_size == 1:
    return block_idx
  offsets = jnp.arange(block_size, dtype=block_idx.dtype).reshape((1,) * block_idx.ndim + (block_size,))
  units = block_idx[..., None] * block_size + offsets
  return jnp.reshape(units, block_idx.shape[:-1] + (-1,))


def sparse_packed_dense(
    x: Array | SparseRows,
    packed: PackedDense,
    *,
    threshold: float | Array = 0.0,
    capacity: int,
) -> SparseRows:
  r"""`packed_dense` that returns its output as `SparseRows` and accepts them as input.

  Same values as `packed_dense` (densified), per row. With a sparse input of `m` active
  units per row the estimate is `ẑ = (x_A U_A) V + b` with `U_A = U[A]`, and the exact
  outputs are `z_S = W_{S,A} x_A + b_S` for the `k · block_size` selected units `S`; the
  weights come from one gather of a flat index into the unit-major layout, so inputs in
  the same block are contiguous in memory.

  Args:
    x: dense (rows, n_in) inputs, or `SparseRows` of an upstream layer.
    packed: output of `pack`.
    threshold: blocks whose score is not above it are zero.
    capacity: static number of blocks computed per row.

  Returns:
    `SparseRows` with `capacity · block_size` entries per row.
  """
  n_blocks, block_size, n_in = packed.weight.shape
  n_out = n_blocks * block_size
  capacity = _checks.check_capacity(capacity, n_blocks, block_size)
  if capacity is None:
    raise ValueError("sparse_packed_dense needs a capacity: it fixes the output size.")
  bias = jnp.reshape(packed.bias, (n_out,))
  if isinstance(x, SparseRows):
    if x.indices.ndim != 2 or x.indices.shape != x.values.shape:
      raise ValueError(
          f"SparseRows needs indices and values of one (rows, m) shape, got"
          f" {tuple(x.indices.shape)} and {tuple(x.values.shape)}."
      )
    dtype = x.values.dtype
    u_rows = packed.u[x.indices].astype(dtype)  # (rows, m, r)
    z_hat = jnp.einsum("rm,rmq->rq", x.values, u_rows) @ packed.v
  else:
    _checks.check_features(x, n_in, "packed layer")
    if x.ndim != 2:
      raise ValueError(f"x has shape {tuple(x.shape)}: sparse chaining takes (rows, n_in).")
    dtype = x.dtype
    z_hat = (x @ packed.u) @ packed.v
  z_hat = jax.lax.stop_gradient(z_hat + bias[None].astype(dtype))
  scores = _mask.block_scores(z_hat, block_size)
  if not isinstance(x, SparseRows):
    idx, vals = gather_selected(x, packed, scores, threshold, capacity)
    return SparseRows(_unit_indices(idx, block_size), jnp.reshape(vals, (x.shape[0], -1)))
  idx = _mask.top_blocks(scores, capacity)  # (rows, k)
  keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  out_units = _unit_indices(idx, block_size)  # (rows, k*bs)
  flat_weight = jnp.reshape(packed.weight, (-1,))
  parts = []
  for a, b in group_bounds(out_units.shape[1], x.indices.shape[1] // 8):
    flat = out_units[:, a:b, None] * n_in + x.indices[:, None, :]  # (rows, o_g, m)
    w = jnp.take(flat_weight, flat, mode="clip").astype(dtype)
    parts.append(jnp.einsum("rom,rm->ro", w, x.values))
  z = jnp.concatenate(parts, axis=1) + bias[out_units].astype(dtype)
  keep_units = jnp.reshape(
      jnp.broadcast_to(keep[..., None], keep.shape + (block_size,)), out_units.shape
  )
  vals = jnp.where(keep_units, jax.nn.relu(z), jnp.zeros((), z.dtype))
  return SparseRows(out_units, vals)


def sparse_linear(x: SparseRows, kernel: Array, bias: Array) -> Array:
  """Dense linear head on sparse inputs: `x_A W[A] + b`, shape (rows, n_out)."""
  return jnp.einsum("rm,rmc->rc", x.values, kernel[x.indices].astype(x.values.dtype)) + bias[None]
