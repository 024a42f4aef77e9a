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
`masked_dense`; on CPU they are slow and only for testing.
"""

from __future__ import annotations

import functools

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
    z = jax.lax.dot_general(x_ref[...], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
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
  z = jax.lax.dot_general(x_ref[...], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
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
    raise ValueError(f"block_idx has shape {block_idx.shape}: expected (capacity,) with capacity in [1, {n_blocks}].")
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
