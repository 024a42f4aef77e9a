"""Inference layout that makes skipping cheap: unit-major weight blocks.

At batch 1 a dense layer is bound by the weight bytes it reads. Reading only the selected
units is cheap when each unit's weights are contiguous, i.e. rows of `Wᵀ` (n_out, n_in);
gathering columns of the (n_in, n_out) training layout is slower than the whole dense
product on XLA:CPU (docs/design.md, "Measured facts"). `pack` does that transpose once.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _fused, _mask, _native, _pallas, _policy
from lrcc_jax._estimator import LowRankEstimator
from lrcc_jax._policy import Policies

Array = jax.Array
Strategy = Literal["auto", "gather", "dense"]

# "auto" gathers while these hold (measured with the protocol of `lrcc-jax bench`: 4096
# and 8192 wide, block sizes 1 and 16, 1-8 rows, 2 cores). The dense fallback runs at
# dense speed (`unit_major_product`), so these only keep the gathers where they win.
#
# With the native CPU kernel (`_native`), which streams each selected block once on every
# core, gathering pays while the rows together read at most this many layers' worth of
# weights (1024-8192 wide, blocks of 1 and 16, 1-64 rows: 1.3-5.7x dense at or below it;
# 2 rows x 40% = 0.8 layers: 1.1-1.4x; 4 x 25%: 0.9-1.2x)...
NATIVE_MAX_GATHERED_LAYERS = 0.6
# ...or while each row computes at most this fraction, up to this many rows: past a few
# rows the dense product is bound by its flops, not its bytes (5%, i.e. 13 of 256 blocks:
# 1.4x at 64 rows, 1.5-2.4x at 16-32; 10%: 1.2x at 16 rows, 0.7-0.95x at 32-64). `lrcc-jax
# tune` later extended it to 128 rows (blocks of 16, 5-10%: 1.20-2.52x against 0.85-1.04x
# for the native dense fallback, 1024-4096 wide).
NATIVE_SMALL_FRACTION = 0.06
NATIVE_SMALL_FRACTION_MAX_ROWS = 128
# Blocks under 32 KiB (single units up to 8192 wide) gather only at one row (a few rows,
# and up to 128 rows at 6% per row, still run the fused kernel, `_fused.replaces_dense`):
# against the native dense fallback with its native estimate, 16 rows of single units at
# 5% gathered through the tile kernel at 0.75-1.87x of dense jit and computed densely at
# 1.20-2.04x (1024-4096 wide, `lrcc-jax tune` and `bench --suite full --compare-default`).
NATIVE_MIN_BATCHED_BLOCK_BYTES = 32 * 2**10
NATIVE_SMALL_BLOCK_MAX_ROWS = 1
#
# With XLA's gathers (no native kernel: not on CPU, not f32, or no compiler):
# - one row: up to 40% of the blocks; one gathered weight row costs about 2.5 dense rows.
MAX_GATHER_FRACTION_ONE_ROW = 0.4
# - several rows: the rows' blocks together up to a quarter of the layer (8 rows x 5% of
#   4096: 0.5x dense when gathered, 2 rows x 10%: 3.4x)...
MAX_GATHER_FRACTION = 0.25
# - ...with at most this many bytes gathered per call: past it the gathers thrash the
#   cache (8192 wide, 1 row x 25%: 64 MB, 0.4x dense; 2 rows x 5%: 26 MB, 5x faster)...
MAX_GATHER_BYTES = 32 * 2**20
# - ...and blocks of at least this many bytes once there are more than 2 rows: many small
#   per-row gathers lose (4 rows x 5% of 4096 in single units: 0.9x dense).
MIN_BATCHED_BLOCK_BYTES = 64 * 2**10


# Independent gather+matvec groups per call. XLA:CPU runs independent ops concurrently, so
# splitting the selected rows into a few groups uses both cores where one gather followed
# by one matvec runs on one (0.37 ms against 0.63 ms for 410 of 4096 rows, measured with
# `lrcc-jax bench --suite layer`).
GATHER_GROUPS = 4
MIN_GROUP_ROWS = 32


def group_bounds(k: int, rows_per_item: int = 1) -> list[tuple[int, int]]:
  """Static [start, stop) bounds splitting `k` selected blocks into `GATHER_GROUPS`."""
  groups = max(1, min(GATHER_GROUPS, (k * rows_per_item) // MIN_GROUP_ROWS))
  edges = [round(i * k / groups) for i in range(groups + 1)]
  return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def gathered_matvec(
  weight: Array, idx: Array, x: Array, *, kernel: str | None = None, policy: Policies = None
) -> Array:
  """`z[r, j] = weight[idx[r, j]] @ x[r]`: (n_blocks, bs, n_in), (rows, k), (rows, n_in) -> (rows,
  k, bs).

  The kernel depends on the platform the program is lowered for (`_policy.gather_kernel`,
  staged per platform by `_policy.dispatch` unless `kernel` names one):

  - "native" (CPU, f32): the native kernel (`_native`) with one run of `n_in` inputs; it
    streams each selected block once, on every core (26 of 256 blocks of 16 × 4096:
    65-180 µs against 270-940 µs for the XLA form, scratch measurement);
  - "triton" (CUDA): `_pallas.gathered_matvec_gpu`; "mosaic" (TPU):
    `_pallas.gathered_matvec_tpu`; both Pallas kernels load only the selected blocks;
    `LRCC_JAX_PALLAS=0` or a policy
    with `kernel="xla"` turns them off;
  - "xla": `_xla_gathered_matvec`. All give the same values.
  """
  if kernel is None:
    _, block_size, n_in = weight.shape
    return _policy.dispatch(
      lambda platform: _policy.gather_kernel(
        platform, block_size, n_in, weight.dtype, x.dtype, policy
      ),
      lambda k, weight, idx, x: gathered_matvec(weight, idx, x, kernel=k, policy=policy),
      (weight, idx, x),
    )
  if kernel == "native":
    starts = jnp.zeros((x.shape[0], 1), jnp.int32)
    shared = _policy.native_shared(idx.shape[0], weight.dtype, policy)
    return _native.tile_product(
      weight, idx, starts, x, weight.shape[2], _dense_input_product, shared=shared
    )
  if kernel == "mosaic":
    return _pallas.differentiable_matvec(_pallas.gathered_matvec_tpu, _xla_gathered_matvec)(
      weight, idx, x
    )
  if kernel == "triton":
    return _pallas.differentiable_matvec(_pallas.gathered_matvec_gpu, _xla_gathered_matvec)(
      weight, idx, x
    )
  if kernel != "xla":
    raise ValueError(f"kernel={kernel!r} must be 'native', 'mosaic', 'triton' or 'xla'.")
  return _xla_gathered_matvec(weight, idx, x)


def _dense_input_product(weight: Array, idx: Array, starts: Array, x: Array, *, b_in: int) -> Array:
  """`gathered_matvec`'s XLA form in `_native.tile_product`'s signature (one run, at 0)."""
  del starts, b_in
  return _xla_gathered_matvec(weight, idx, x)


def _xla_gathered_matvec(weight: Array, idx: Array, x: Array) -> Array:
  """`gathered_matvec` in XLA ops.

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

  The packed form holds one copy of the weights: the dense fallback multiplies the same
  unit-major blocks (`unit_major_product`).
  """

  weight: Array
  bias: Array
  u: Array
  v: Array

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
  return PackedDense(weight, jnp.reshape(bias, (n_blocks, block_size)), est.u, est.v)


def skip_pays(
  rows: int,
  capacity: int | None,
  n_blocks: int,
  *,
  block_bytes: int = 0,
  native: bool | None = None,
) -> bool:
  """Static choice of the "auto" strategy: gather only where it measured faster than dense.

  Args:
    rows: rows in the batch.
    capacity: blocks per row (None: no capacity, nothing to gather).
    n_blocks: blocks in the layer.
    block_bytes: bytes of one weight block (block_size · n_in · itemsize); see the
      `MAX_GATHER_*` constants for the limits and the measurements behind them.
    native: whether the gathers run the native CPU kernel (the `NATIVE_*` limits apply);
      None asks `_native.active()`, which holds for f32 layers on the CPU backend.

  The CPU shipped policies (`_policy.CPU_NATIVE`, `_policy.CPU_XLA`) through the one
  decision function `_policy.gather_pays`; kept for the measurements' tests.
  """
  if native is None:
    native = _native.active()
  policy = _policy.CPU_NATIVE if native else _policy.CPU_XLA
  return _policy.gather_pays(policy, rows, capacity, n_blocks, block_bytes)


def auto_gathers(
  packed: PackedDense,
  rows: int,
  capacity: int | None,
  dtype: jnp.dtype = jnp.float32,
  *,
  platform: str | None = None,
  policy: Policies = None,
) -> bool:
  """Whether `packed_dense`'s "auto" strategy gathers for `rows` rows of `dtype` inputs.

  `_policy.plan_layer` on `platform` (default: the current device's), upgraded to the
  fused kernel where it replaces the dense fallback (`_fused.upgrade`), as `packed_dense`
  decides in that platform's branch.
  """
  platform = _policy.current_platform() if platform is None else platform
  shape, w_dtype = packed.weight.shape, packed.weight.dtype
  plan = _policy.plan_layer(platform, "auto", rows, capacity, shape, w_dtype, dtype, policy)
  rank = packed.u.shape[1]
  return _fused.upgrade(plan, "auto", platform, rows, capacity, shape, w_dtype, dtype, rank).gather


def gather_selected(
  xr: Array,
  packed: PackedDense,
  scores: Array,
  threshold: float | Array,
  capacity: int,
  *,
  kernel: str | None = None,
  policy: Policies = None,
  select: str = "xla",
) -> tuple[Array, Array]:
  """Each row's `capacity` best blocks and their activations, computing only those.

  Args:
    xr: (rows, n_in) inputs.
    packed: the packed layer.
    scores: (rows, n_blocks) block scores of the estimate.
    threshold: blocks not above it are zero.
    capacity: static number of blocks per row.
    kernel: `gathered_matvec`'s kernel; None picks it per lowering platform.
    policy: the caller's policies (they may select the XLA gather on a platform).
    select: `_mask.top_blocks`' kernel: "native" (CPU only) or "xla".

  Returns:
    `idx` (rows, capacity) ascending block indices and `vals` (rows, capacity,
    block_size) = `where(score > threshold, relu(W_blocks x + b), 0)`.
  """
  idx = _mask.top_blocks(scores, capacity, kernel=select)
  keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  z = gathered_matvec(packed.weight, idx, xr, kernel=kernel, policy=policy) + packed.bias[
    idx
  ].astype(xr.dtype)
  return idx, jnp.where(keep[..., None], jax.nn.relu(z), jnp.zeros((), z.dtype))


def unit_major_product(x: Array, w: Array) -> Array:
  """`x @ w.T` for unit-major `w` (n_out, n_in), in the orientation XLA:CPU runs faster.

  Up to 32 rows (64 at 4096 inputs or more) it is computed as `(w @ x.T).T`: written as
  `x @ w.T`, XLA:CPU repacks `w` on every call there. Measured in one interleaved run on
  2 cores (1024-4096 wide): at 2-8 rows the contraction `x @ w.T` took 1.6-2.3x the time of
  the transposed form, at 16-32 rows 1.3-1.6x; against `x @ W` for the Flax-layout kernel
  `W` the transposed form ran 1.0-2.7x faster. From 64 rows on (128 at 4096) the plain
  contraction was as fast as `x @ W` and the transposed form 1.05-1.4x slower. The
  optimisation barriers keep XLA's simplifier from rewriting it back.
  """
  rows, n_in = math.prod(x.shape[:-1]), w.shape[1]
  if rows <= 32 or (n_in >= 4096 and rows <= 64):
    barrier = jax.lax.optimization_barrier
    return barrier(w.astype(x.dtype) @ barrier(x.T)).T
  # contracting over w's second axis directly: no transpose of the weights in the program
  return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


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
  policy: Policies = None,
) -> Array:
  r"""Conditional ReLU layer that computes only the selected blocks.

  Same values as `conditional_dense` (and `masked_dense` under the contract's mask `M`).
  With `capacity = k`, each row gathers its `k` best-scoring weight blocks and computes
  `k · block_size` dot products, so the flops and the weight bytes read are
  `O(rows · k · block_size · n_in)` instead of `O(n_out · n_in)`; the estimator adds
  `r (n_in + n_out)` per row. Selection is `top_k` with static `k`: no `cond`, no loops,
  one compiled program for every input.

  `strategy="auto"` decides from static shapes: when `rows · k` is so large that the
  gathers would read more than the dense product (`_policy.gather_pays`), it computes
  densely and masks, which gives the same values. That fallback costs the dense product
  (`unit_major_product`), the estimator (`r (n_in + n_out)` multiply-adds per row: 12.5%
  of a 1024-wide layer's at rank 64, 6% of a 2048-wide one's) and one epilogue pass
  (selection, bias, ReLU and mask), which sets its floor against a dense jit. On CPU the
  estimator and the epilogue are one native call (`_mask.estimated_masked_relu`,
  `csrc/select.cc`); elsewhere XLA's ops (`_mask.masked_relu`). `"gather"` and `"dense"`
  force a path (for benchmarks and tests).

  The decision and the gather kernel belong to the platform the program is lowered for
  (`_policy.plan_layer`, staged by `_policy.dispatch`): the native kernel on CPU, the
  Pallas kernels on CUDA (Triton) and TPU (Mosaic), XLA's gather elsewhere or with
  `LRCC_JAX_PALLAS=0`. A single-platform lowering holds only that platform's code.

  Without a capacity the number of selected units is data dependent, which static shapes
  cannot exploit: the product is dense and then masked.

  Args:
    x: (..., n_in) inputs; leading dimensions are independent rows.
    packed: output of `pack`.
    threshold: blocks whose score is not above it are zero.
    capacity: optional static number of blocks computed per row, in [1, n_blocks].
    strategy: "auto", "gather" or "dense".
    policy: optional `Policy` (or several, one per platform) overriding the shipped or
      tuned crossover on its platform; its `kernel` also selects the gather kernel there
      (`kernel="xla"`: XLA's gather instead of the Pallas kernel).

  Returns:
    (..., n_out) activations.

  Raises:
    ValueError: on a wrong input width, a bad capacity or strategy.
  """
  n_blocks, block_size, n_in = packed.weight.shape
  n_out = n_blocks * block_size
  _checks.check_bias(packed.bias, n_out, "packed layer", (n_blocks, block_size))
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

  def plan_of(platform: str) -> _policy.Plan:
    plan = _policy.plan_layer(
      platform, strategy, rows, capacity, packed.weight.shape, packed.weight.dtype, xr.dtype, policy
    )
    shape, w_dtype = packed.weight.shape, packed.weight.dtype
    return _fused.upgrade(
      plan, strategy, platform, rows, capacity, shape, w_dtype, xr.dtype, packed.u.shape[1]
    )

  def run(
    plan: _policy.Plan, xr: Array, scores: Array, threshold: Array, packed: PackedDense
  ) -> Array:
    if not plan.gather:
      z = unit_major_product(xr, jnp.reshape(packed.weight, (n_out, n_in)))
      bias = jnp.reshape(packed.bias, (n_out,)).astype(xr.dtype)
      if plan.epilogue == "native" and packed.u.dtype == packed.v.dtype == jnp.float32:
        # the estimate in the epilogue's call: `scores` is then unused (dead in XLA)
        return _mask.estimated_masked_relu(
          z, xr, packed.u, packed.v, bias, threshold, capacity, block_size, kernel="native"
        )
      return _mask.masked_relu(z, scores, bias, threshold, capacity, kernel=plan.epilogue)
    assert capacity is not None  # a plan without a capacity never gathers
    if plan.kernel == "fused":  # the whole layer in one native call (estimate included)
      idx, vals = _fused.dense_layer(
        xr,
        packed.weight,
        packed.bias,
        packed.u,
        packed.v,
        threshold,
        capacity,
        _xla_gathered_matvec,
      )
    else:
      idx, vals = gather_selected(
        xr,
        packed,
        scores,
        threshold,
        capacity,
        kernel=plan.kernel,
        policy=policy,
        select=plan.epilogue,
      )
    row_ids = jnp.arange(rows)[:, None]
    y = (
      jnp.zeros((rows, n_blocks, block_size), vals.dtype)
      .at[row_ids, idx]
      .set(vals, unique_indices=True, indices_are_sorted=True)
    )
    return jnp.reshape(y, (rows, n_out))

  with jax.named_scope("lrcc_packed_dense"):
    y = _policy.dispatch(plan_of, run, (xr, scores, threshold, packed), key=lambda plan: plan.key)
  return jnp.reshape(y, lead + (n_out,))
