r"""One conditional layer in one native XLA:CPU call (`csrc/fused_layer.cc`).

At batch 1 a conditional layer written in XLA ops is a string of small ops (the two
estimator products, block scores, `top_k`, a sort, a gather of the scores, the tile or
gather product, the bias gather, relu, the selection), and XLA:CPU pays a few
microseconds of fixed cost per op. The fused kernel does all of it in one call, per row:

- the estimate `ẑ = (x U) V + b` (dense rows), or `ẑ = (Σ_{i ∈ A} x_i U_i) V + b` over the
  active inputs `A` of `SparseRows`;
- block scores `s_B = max_{j ∈ B} ẑ_j` (NaN when any unit of the block is NaN);
- the `k` best blocks exactly as `_mask.top_blocks`: NaN ranks as `+inf`, `-0` below `+0`,
  ties go to the lower block index, and the chosen indices come out ascending;
- `keep_B = ¬(s_B ≤ t)` (`_mask.above`: a NaN score is kept);
- for every kept block `relu(W_B x + b_B)` from the unit-major weights (dense rows read
  whole rows of `W_B`; sparse rows only the columns in `A`, runs of `b_in` at a time); a
  block not kept is zero and is not computed.

It returns `idx` (rows, k) int32 and `vals` (rows, k, block_size) f32, the values of
`_packed.gather_selected` (and of the sparse path of `_sparse.sparse_packed_dense`) up to
f32 rounding of the sums. The threshold is an operand (a traced scalar never recompiles);
the capacity is a static attribute.

Differentiation: the selection is a constant (the estimate is under `stop_gradient` in
every path), so the JVP of `vals` is that of `where(keep, relu(W_idx x + b_idx), 0)` with
the kernel's `idx`, computed in XLA ops by the caller-supplied product. Under `vmap`, batch
axes of the inputs fold into rows; batched weights, factors or thresholds run the XLA form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lrcc_jax import _mask, _native

if TYPE_CHECKING:
  from lrcc_jax._policy import Plan, Policy

Array = jax.Array

# (sparse input, weight dtype) -> FFI target of csrc/fused_layer.cc.
_TARGETS = {
  (False, jnp.dtype(jnp.float32)): "lrcc_fused_layer",
  (False, jnp.dtype(jnp.bfloat16)): "lrcc_fused_layer_bf16",
  (True, jnp.dtype(jnp.float32)): "lrcc_fused_sparse_layer",
  (True, jnp.dtype(jnp.bfloat16)): "lrcc_fused_sparse_layer_bf16",
}

# `runs`' limits. At most this many rows (the tile kernel's row ordering and shared
# gathers are tuned for batches). The product and estimator limits were 2^20 and 2^17 while
# the kernel ran every phase on one thread; with its phases split over the XLA:CPU pool
# above 2^18 multiply-adds (csrc/fused_layer.cc, `kParallelWork`) it beats the op string
# with the tile kernel at every 4096-wide setting measured (1-8 rows, 5-25% in blocks of
# 16; 4-layer MLP at 10%, one row: 20.9x against 12.1x of dense jit, interleaved), so the
# limits now only bound the work one call holds up the pool for.
MAX_ROWS = 8
# Rows up to which the fused kernel may still replace the dense fallback at small fractions
# (`replaces_dense`). Its selection is the bisection of csrc/topk.h: the std::nth_element
# it had took a third of its time at 64 rows (perf), and the call 0.82-0.99 ms against
# 0.50-0.57 ms after (1024 wide, single units at 5%).
MAX_REPLACE_ROWS = 128
MAX_PRODUCT = 2**26
MAX_ESTIMATE = 2**22

# Products as `product(weight, idx, x) -> (rows, k, block_size)` in XLA ops.
Product = Callable[[Array, Array, Array], Array]


def usable(rows: int, weight_dtype: jnp.dtype, x_dtype: jnp.dtype) -> bool:
  """f32 inputs, f32 or bf16 weights (`_native.usable`), the library built, at most
  `MAX_REPLACE_ROWS` rows (`MAX_ROWS` where it gathers on a plan's behalf: `runs`)."""
  return rows <= MAX_REPLACE_ROWS and _native.usable(weight_dtype, x_dtype)


def replaces_dense(rows: int, capacity: int, n_blocks: int, policy: Policy | None) -> bool:
  """Whether the fused kernel replaces `policy`'s dense fallback: up to `MAX_ROWS` rows
  while `rows · capacity ≤ policy.fused_max_layers · n_blocks` (1 layer in the shipped CPU
  policy), and up to `MAX_REPLACE_ROWS` rows while `capacity ≤
  policy.fused_small_fraction · n_blocks` (10.1% in the shipped CPU policy).

  Where the policy would compute densely, the fused kernel still wins while the rows'
  per-row gathers add up to at most one layer (one row at any capacity, two rows at half,
  four at a quarter): it saves the op string's fixed costs and reads at most the bytes of
  the dense product. Measured against dense jit, one interleaved run on 2 cores, 1024-4096
  wide, blocks of 1 and 16: one row at 25-50% 1.3-5.7x fused against 1.2-5.4x for the
  policy's path; two rows at 50% 0.83-1.68x against 0.90-1.16x; four rows at 25%
  0.82-2.73x against 0.71-1.28x; past one layer (four rows at 50%, eight at 25%) the fused
  kernel lost at 1024-2048 (0.45-0.88x). The paper's 784-1000-600-400 network at 82/70/73%
  of its units: 1.42x for the fused chain against 0.83-0.89x for the dense path. Past a
  few rows the dense product is bound by its flops, which the fused kernel does `f` of:
  with single units at 5% per row, 16-128 rows ran at 0.94-4.7x of dense jit fused against
  0.81-3.1x for the dense fallback (1024-4096 wide); at 10% the fused kernel lost past 32
  rows until it ran the eight-row estimate of `csrc/estimate.h`, and then won by
  1.10-1.74x against the dense fallback at 16-128 rows.
  """
  if policy is None:
    return False
  layers = rows <= MAX_ROWS and rows * capacity <= policy.fused_max_layers * n_blocks
  small = rows <= MAX_REPLACE_ROWS and capacity <= policy.fused_small_fraction * n_blocks
  return layers or small


def runs(
  plan: Plan,
  platform: str,
  rows: int,
  capacity: int,
  weight_shape: tuple[int, ...],
  weight_dtype: jnp.dtype,
  x_dtype: jnp.dtype,
  m: int,
  rank: int,
) -> bool:
  """The one static rule for "auto": does a layer planned as `plan` run the fused kernel?

  - the plan's kernel is the native one (CPU, not a caller's `kernel="xla"` policy), and
    the kernel is `usable` (f32 inputs, f32 or bf16 weights);
  - the plan gathers at most `MAX_ROWS` rows, or the fused kernel `replaces_dense` under
    the plan's policy (up to `MAX_REPLACE_ROWS` rows);
  - the exact products are at most `MAX_PRODUCT` multiply-adds (`rows · capacity ·
    block_size · m` for `m` inputs per row) and the estimator's second factor at most
    `MAX_ESTIMATE` numbers (`rank · n_out`): one call instead of an op string saves its
    fixed costs, and above 2^18 multiply-adds per phase the kernel splits the work over
    the XLA:CPU pool, as the tile kernel (`_native.tile_product`) does.

  `upgrade`, `_sparse._layer_path` and `_mlp.chain_path` all ask this.
  """
  if platform != "cpu" or plan.kernel != "native" or not usable(rows, weight_dtype, x_dtype):
    return False
  if plan.gather and rows > MAX_ROWS:  # the tile kernel's shared mode serves those rows
    return False
  if not (plan.gather or replaces_dense(rows, capacity, weight_shape[0], plan.policy)):
    return False
  n_blocks, block_size, _ = weight_shape
  return (
    rows * capacity * block_size * m <= MAX_PRODUCT and rank * n_blocks * block_size <= MAX_ESTIMATE
  )


def upgrade(
  plan: Plan,
  strategy: str,
  platform: str,
  rows: int,
  capacity: int | None,
  weight_shape: tuple[int, ...],
  weight_dtype: jnp.dtype,
  x_dtype: jnp.dtype,
  rank: int,
) -> Plan:
  """`packed_dense`'s `plan` with kernel "fused" where `runs` says so.

  Only plans whose kernel is the native one (CPU, f32 or bf16 weights, not a caller's
  `kernel="xla"` policy), and that gather or, under "auto", where the fused kernel
  `replaces_dense`.
  """
  if capacity is None or (strategy != "auto" and not plan.gather):
    return plan
  n_in = weight_shape[2]
  if runs(plan, platform, rows, capacity, weight_shape, weight_dtype, x_dtype, n_in, rank):
    return plan._replace(gather=True, kernel="fused")
  return plan


def _f32(a: Array) -> Array:
  return jnp.asarray(a).astype(jnp.float32)


def xla_scores(
  x: Array, indices: Array | None, u: Array, v: Array, bias: Array, block_size: int
) -> Array:
  """Block scores of the estimate in XLA ops (dense rows, or sparse when `indices`)."""
  if indices is None:
    z = (x @ u) @ v
  else:
    z = jnp.einsum("rm,rmq->rq", x, u[indices].astype(x.dtype)) @ v
  z = jax.lax.stop_gradient(z + jnp.reshape(bias, (1, -1)).astype(x.dtype))
  return _mask.block_scores(z, block_size)


def _xla_values(
  product: Callable[..., Array],
  idx: Array,
  x: Any,
  weight: Array,
  bias: Array,
  scores: Array,
  threshold: Array,
) -> Array:
  """`where(keep, relu(W_idx x + b_idx), 0)` for given blocks, in XLA ops."""
  keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  z = product(weight, idx, x)
  z = z + bias[idx].astype(z.dtype)
  return jnp.where(keep[..., None], jax.nn.relu(z), jnp.zeros((), z.dtype))


def _unfold(a: Array, axis_size: int) -> Array:
  return jnp.reshape(a, (axis_size, a.shape[0] // axis_size) + a.shape[1:])


@functools.cache
def _layer(capacity: int, b_in: int, sparse: bool, product: Callable[..., Array]) -> Callable:
  """The fused layer for static (capacity, b_in, input kind), with JVP and vmap rules.

  Arguments of the returned function: `indices` (rows, m) int32 (ignored for dense rows),
  `x` (rows, m), `weight`, `bias` (n_blocks, bs), `u`, `v`, `threshold` ().
  """

  def prod(w: Array, idx: Array, xin: Any) -> Array:
    if sparse:  # the tile product on (indices, values) in runs of b_in
      return product(w, idx, xin[0][:, ::b_in], xin[1], b_in=b_in)
    return product(w, idx, xin)

  def xla_layer(indices, x, weight, bias, u, v, threshold):
    scores = xla_scores(x, indices if sparse else None, u, v, bias, weight.shape[1])
    idx = _mask.top_blocks(scores, capacity).astype(jnp.int32)
    xin = (indices, x) if sparse else x
    return idx, _xla_values(prod, idx, xin, weight, bias, scores, threshold)

  @jax.custom_batching.custom_vmap
  def call(indices, x, weight, bias, u, v, threshold):
    rows = x.shape[0]
    _, bs, _ = weight.shape
    out = (
      jax.ShapeDtypeStruct((rows, capacity), jnp.int32),
      jax.ShapeDtypeStruct((rows, capacity, bs), jnp.float32),
    )
    target = _TARGETS[(sparse, jnp.dtype(weight.dtype))]
    operands = [_f32(u), _f32(v), _f32(jnp.reshape(bias, (-1,))), weight, _f32(threshold)]
    if sparse:
      return jax.ffi.ffi_call(target, out)(
        indices, x, *operands, capacity=np.int64(capacity), b_in=np.int64(b_in)
      )
    return jax.ffi.ffi_call(target, out)(x, *operands, capacity=np.int64(capacity))

  @call.def_vmap
  def _vmap(axis_size, in_batched, indices, x, weight, bias, u, v, threshold):
    if any(in_batched[2:]):  # batched weights, factors or threshold: the XLA form
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(xla_layer, in_axes=in_axes)(indices, x, weight, bias, u, v, threshold), (
        True,
        True,
      )
    args = [
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip((indices, x), in_batched[:2])
    ]
    flat = [jnp.reshape(a, (a.shape[0] * a.shape[1],) + a.shape[2:]) for a in args]
    idx, vals = call(*flat, weight, bias, u, v, threshold)
    return (_unfold(idx, axis_size), _unfold(vals, axis_size)), (True, True)

  @jax.custom_jvp
  def layer(indices, x, weight, bias, u, v, threshold):
    return call(indices, x, weight, bias, u, v, threshold)

  @layer.defjvp
  def _jvp(primals, tangents):
    indices, x, weight, bias, u, v, threshold = primals
    _, dx, dw, db, _, _, _ = tangents
    idx, vals = layer(*primals)
    scores = xla_scores(x, indices if sparse else None, u, v, bias, weight.shape[1])
    xin = (lambda x: (indices, x)) if sparse else (lambda x: x)
    _, dvals = jax.jvp(
      lambda x, w, b: _xla_values(prod, idx, xin(x), w, b, scores, threshold),
      (x, weight, bias),
      (dx, dw, db),
    )
    return (idx, vals), (np.zeros(idx.shape, jax.dtypes.float0), dvals)

  return layer


def dense_layer(
  x: Array,
  weight: Array,
  bias: Array,
  u: Array,
  v: Array,
  threshold: float | Array,
  capacity: int,
  product: Product,
) -> tuple[Array, Array]:
  """The fused layer on dense rows `x` (rows, n_in): `(idx, vals)`.

  `product(weight, idx, x)` is the gathered product in XLA ops (JVP and vmap fallback).
  """
  indices = jnp.zeros((x.shape[0], 0), jnp.int32)  # unused by the dense kernel
  return _layer(capacity, 1, False, product)(
    indices, x, weight, bias, u, v, jnp.asarray(threshold, jnp.float32)
  )


def sparse_layer(
  indices: Array,
  values: Array,
  b_in: int,
  weight: Array,
  bias: Array,
  u: Array,
  v: Array,
  threshold: float | Array,
  capacity: int,
  product: Callable[..., Array],
) -> tuple[Array, Array]:
  """The fused layer on sparse rows (`indices`, `values`, runs of `b_in`): `(idx, vals)`.

  `product(weight, idx, starts, values, b_in=b_in)` is the tile product in XLA ops, with
  `starts = indices[:, ::b_in]` (`_sparse._xla_tile_product`).
  """
  return _layer(capacity, b_in, True, product)(
    indices.astype(jnp.int32), values, weight, bias, u, v, jnp.asarray(threshold, jnp.float32)
  )
