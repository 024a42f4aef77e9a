"""Inference layout that makes skipping cheap: unit-major weight blocks.

At batch 1 a dense layer is bound by the weight bytes it reads. Reading only the selected
units is cheap when each unit's weights are contiguous, i.e. rows of `Wᵀ` (n_out, n_in);
gathering columns of the (n_in, n_out) training layout is slower than the whole dense
product on XLA:CPU (DESIGN, "Where the speed comes from"). `pack` does that transpose once.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _mask
from lrcc_jax._estimator import LowRankEstimator

Array = jax.Array
Strategy = Literal["auto", "gather", "dense"]

# "auto" gathers while the rows' selected blocks stay below these fractions of the layer
# (measured with experiments/bench_layer.py's protocol, 4096 wide, 2 cores): one row's
# gathered weight row costs about 2.5 dense rows, so gathering pays up to about 40% at
# batch 1; at 2-8 rows the dense fallback in the unit-major layout is itself about 1.7x
# slower than a dense jit (XLA:CPU repacks the transposed weight), so gathering still
# wins up to about half the layer, and past that the per-row gathers thrash the cache.
MAX_GATHER_FRACTION_ONE_ROW = 0.4
MAX_GATHER_FRACTION = 0.5
# Batched per-row gathers of more than this many bytes collapse (8192 wide, 2 rows x 10%:
# 53 MB gathered, 0.8x dense; 26 MB gathers still ran 2-4x faster than dense).
MAX_GATHER_BYTES = 32 * 2**20


# Independent gather+matvec groups per call. XLA:CPU runs independent ops concurrently, so
# splitting the selected rows into a few groups uses both cores where one gather followed
# by one matvec runs on one (0.37 ms against 0.63 ms for 410 of 4096 rows, measured with
# experiments/bench_layer.py's protocol).
GATHER_GROUPS = 4
MIN_GROUP_ROWS = 32


def group_bounds(k: int, rows_per_item: int = 1) -> list[tuple[int, int]]:
  """Static [start, stop) bounds splitting `k` selected blocks into `GATHER_GROUPS`."""
  groups = max(1, min(GATHER_GROUPS, (k * rows_per_item) // MIN_GROUP_ROWS))
  edges = [round(i * k / groups) for i in range(groups + 1)]
  return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def gathered_matvec(weight: Array, idx: Array, x: Array) -> Array:
  """`z[r, j] = weight[idx[r, j]] @ x[r]`: (n_blocks, bs, n_in), (rows, k), (rows, n_in) -> (rows, k, bs).

  The selected blocks are gathered and multiplied in `group_bounds` groups, which XLA:CPU
  runs concurrently; one big gather followed by one matvec runs on one core.
  """
  rows, k = idx.shape
  parts = []
  for a, b in group_bounds(k, rows * weight.shape[1]):
    if rows == 1:  # (k_g, bs, n_in): one contiguous-row gather and one matvec
      parts.append(jnp.einsum("kbi,i->kb", weight[idx[0, a:b]].astype(x.dtype), x[0])[None])
    else:
      parts.append(jnp.einsum("rkbi,ri->rkb", weight[idx[:, a:b]].astype(x.dtype), x))
  return jnp.concatenate(parts, axis=1)


class PackedDense(NamedTuple):
  """A ReLU layer packed for compute-skipping inference.

  Attributes:
    weight: (n_blocks, block_size, n_in) unit-major weights: block `b`, unit `j` holds
      column `b * block_size + j` of the Flax kernel.
    bias: (n_blocks, block_size) bias.
    u: (n_in, r) estimator factor.
    v: (r, n_out) estimator factor.
    kernel: optional (n_in, n_out) copy in the Flax layout, used only by the dense
      fallback (`pack(..., dense_layout=True)`); None by default, so the packed form holds
      one copy of the weights.
  """

  weight: Array
  bias: Array
  u: Array
  v: Array
  kernel: Array | None = None

  @property
  def block_size(self) -> int:
    return self.weight.shape[1]

  @property
  def n_in(self) -> int:
    return self.weight.shape[2]

  @property
  def n_out(self) -> int:
    return self.weight.shape[0] * self.weight.shape[1]

  @property
  def estimator(self) -> LowRankEstimator:
    return LowRankEstimator(self.u, self.v)


def pack(
    kernel: Array,
    bias: Array,
    est: LowRankEstimator,
    *,
    block_size: int = 1,
    dtype: jnp.dtype | None = None,
    dense_layout: bool = False,
) -> PackedDense:
  r"""Packs a layer for `packed_dense`: transposes the kernel to unit-major blocks.

  Do this once, outside the inference loop: the transpose reads and writes every weight.
  The packed form holds one copy of the weights plus the estimator factors.

  Args:
    kernel: (n_in, n_out) Flax-layout kernel.
    bias: (n_out,) bias.
    est: the layer's estimator.
    block_size: static size of contiguous unit blocks; must divide n_out.
    dtype: optional storage dtype for the weights (e.g. `jnp.bfloat16` halves the bytes
      read); products still accumulate in the input's dtype.
    dense_layout: also keep the (n_in, n_out) kernel for the dense fallback. On XLA:CPU
      a product with the unit-major weights at 2-32 rows is about 1.3-2x slower than a
      dense jit; the copy removes that penalty at twice the weight memory.

  Returns:
    A `PackedDense`.

  Raises:
    ValueError: on mismatched shapes or a bad block size.
  """
  kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
  est = LowRankEstimator(jnp.asarray(est.u), jnp.asarray(est.v))
  n_in, n_out = _checks.check_kernel(kernel, bias)
  _checks.check_estimator(est, n_in, n_out)
  n_blocks = _checks.check_block_size(block_size, n_out)
  weight = jnp.reshape(kernel.T, (n_blocks, block_size, n_in))
  if dtype is not None:
    weight = weight.astype(dtype)
  dense = kernel.astype(weight.dtype) if dense_layout else None
  return PackedDense(weight, jnp.reshape(bias, (n_blocks, block_size)), est.u, est.v, dense)


def skip_pays(rows: int, capacity: int | None, n_blocks: int, *, block_bytes: int = 0) -> bool:
  """Static choice of the "auto" strategy: gather only while it reads less than dense.

  Args:
    rows: rows in the batch.
    capacity: blocks per row (None: no capacity, nothing to gather).
    n_blocks: blocks in the layer.
    block_bytes: bytes of one weight block (block_size · n_in · itemsize); with more than
      one row, gathers past `MAX_GATHER_BYTES` in all thrash the cache and fall back.
  """
  if capacity is None:
    return False
  if rows == 1:
    return capacity <= MAX_GATHER_FRACTION_ONE_ROW * n_blocks
  return rows * capacity <= MAX_GATHER_FRACTION * n_blocks and rows * capacity * block_bytes <= MAX_GATHER_BYTES


def gather_selected(
    xr: Array, packed: PackedDense, scores: Array, threshold: float | Array, capacity: int
) -> tuple[Array, Array]:
  """Each row's `capacity` best blocks and their activations, computing only those.

  Args:
    xr: (rows, n_in) inputs.
    packed: the packed layer.
    scores: (rows, n_blocks) block scores of the estimate.
    threshold: blocks not above it are zero.
    capacity: static number of blocks per row.

  Returns:
    `idx` (rows, capacity) ascending block indices and `vals` (rows, capacity,
    block_size) = `where(score > threshold, relu(W_blocks x + b), 0)`.
  """
  idx = _mask.top_blocks(scores, capacity)
  keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  z = gathered_matvec(packed.weight, idx, xr) + packed.bias[idx].astype(xr.dtype)
  return idx, jnp.where(keep[..., None], jax.nn.relu(z), jnp.zeros((), z.dtype))


def block_bytes(packed: PackedDense) -> int:
  """Bytes of one weight block of `packed`."""
  _, block_size, n_in = packed.weight.shape
  return block_size * n_in * packed.weight.dtype.itemsize


def packed_dense(
    x: Array,
    packed: PackedDense,
    *,
    threshold: float | Array = 0.0,
    capacity: int | None = None,
    strategy: Strategy = "auto",
) -> Array:
  r"""Conditional ReLU layer that computes only the selected blocks.

  Same values as `conditional_dense` (and `masked_dense` under the contract's mask `M`).
  With `capacity = k`, each row gathers its `k` best-scoring weight blocks and computes
  `k · block_size` dot products, so the flops and the weight bytes read are
  `O(rows · k · block_size · n_in)` instead of `O(n_out · n_in)`; the estimator adds
  `r (n_in + n_out)` per row. Selection is `top_k` with static `k`: no `cond`, no loops,
  one compiled program for every input.

  `strategy="auto"` decides from static shapes: when `rows · k` is so large that the
  gathers would read more than the dense product (`skip_pays`), it computes densely and
  masks, which gives the same values and never loses much to dense. `"gather"` and
  `"dense"` force a path (for benchmarks and tests).

  Without a capacity the number of selected units is data dependent, which static shapes
  cannot exploit: the product is dense and then masked.

  Args:
    x: (..., n_in) inputs; leading dimensions are independent rows.
    packed: output of `pack`.
    threshold: blocks whose score is not above it are zero.
    capacity: optional static number of blocks computed per row, in [1, n_blocks].
    strategy: "auto", "gather" or "dense".

  Returns:
    (..., n_out) activations.

  Raises:
    ValueError: on a wrong input width, a bad capacity or strategy.
  """
  n_blocks, block_size, n_in = packed.weight.shape
  n_out = n_blocks * block_size
  _checks.check_features(x, n_in, "packed layer")
  capacity = _checks.check_capacity(capacity, n_blocks, block_size)
  if strategy not in ("auto", "gather", "dense"):
    raise ValueError(f"strategy={strategy!r} must be 'auto', 'gather' or 'dense'.")

  lead = x.shape[:-1]
  xr = jnp.reshape(x, (-1, n_in))
  rows = xr.shape[0]
  bias_flat = jnp.reshape(packed.bias, (1, n_out)).astype(xr.dtype)
  z_hat = jax.lax.stop_gradient((xr @ packed.u) @ packed.v + bias_flat)
  scores = _mask.block_scores(z_hat, block_size)

  gather = capacity is not None and (
      strategy == "gather"
      or (strategy == "auto" and skip_pays(rows, capacity, n_blocks, block_bytes=block_bytes(packed)))
  )
  if not gather:
    keep = _mask.expand_blocks(_mask.block_selection(scores, threshold, capacity), block_size)
    if packed.kernel is not None:
      z = xr @ packed.kernel.astype(xr.dtype) + bias_flat
    else:
      w = jnp.reshape(packed.weight, (n_out, n_in)).astype(xr.dtype)
      z = jax.lax.dot_general(xr, w, (((1,), (1,)), ((), ()))) + bias_flat
    y = jnp.where(keep, jax.nn.relu(z), jnp.zeros((), z.dtype))
    return jnp.reshape(y, lead + (n_out,))

  idx, vals = gather_selected(xr, packed, scores, threshold, capacity)
  row_ids = jnp.arange(rows)[:, None]
  y = jnp.zeros((rows, n_blocks, block_size), vals.dtype).at[row_ids, idx].set(
      vals, unique_indices=True, indices_are_sorted=True
  )
  return jnp.reshape(y, lead + (n_out,))
