"""Block selection: which units a row computes, from the estimate, a threshold and a capacity.

The rule (docs/design.md, "The mask"): units form contiguous blocks of `block_size`;
a block's score is the largest estimate among its units; a block is selected when its
score is above `threshold` and, with a `capacity`, also among the row's `capacity` highest
scores. Every shape here is static, and there is no control flow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrcc_jax import _native

Array = jax.Array


def block_scores(z_hat: Array, block_size: int) -> Array:
  """(..., n_out) estimates -> (..., n_blocks) block scores (max over each block)."""
  if block_size == 1:
    return z_hat
  return jnp.max(jnp.reshape(z_hat, z_hat.shape[:-1] + (-1, block_size)), axis=-1)


def above(scores: Array, threshold: float | Array) -> Array:
  """`scores > threshold`, with NaN counted as above (it is computed, never hidden)."""
  return ~(scores <= threshold)


def ranking_scores(scores: Array) -> Array:
  """Scores for `top_k`: NaN ranks first so a NaN block is always computed."""
  return jnp.where(jnp.isnan(scores), jnp.inf, scores)


def top_blocks(scores: Array, capacity: int, *, kernel: str = "xla") -> Array:
  """Indices (..., capacity) of the highest block scores of each row, sorted ascending.

  NaN ranks first and ties go to the lower index (`lax.top_k`'s order). Sorting keeps the
  later gathers of weight rows in memory order.

  `kernel="native"` (XLA:CPU, f32 scores; staged in CPU lowerings only) runs
  `csrc/select.cc`'s selection: the k-th highest order-preserving integer key by bisection
  over its high, then its low 16 bits, and one ascending scan for the members, in time
  linear in the row. XLA:CPU's `top_k` sorts each row: measured on 2 cores, 40 µs for one
  row of 1024 scores, 0.4 ms for one row of 8192 and for 64 rows of 256. The scores carry
  no gradient through the indices either way.
  """
  if kernel == "native":
    if not _native.available():
      raise ValueError(f"kernel='native' needs the native library: {_native.status()['reason']}")
    if scores.dtype == jnp.float32:
      out = jax.ShapeDtypeStruct(scores.shape[:-1] + (capacity,), jnp.int32)
      call = jax.ffi.ffi_call(_native.TOP_BLOCKS, out, vmap_method="broadcast_all")
      return call(lax.stop_gradient(scores))
  elif kernel != "xla":
    raise ValueError(f"kernel={kernel!r} must be 'native' or 'xla'.")
  _, idx = lax.top_k(ranking_scores(scores), capacity)
  return jnp.sort(idx, axis=-1)


def _order_keys(scores: Array) -> Array:
  """uint32 keys whose unsigned order is the float order of `scores` (NaN ranked first)."""
  bits = lax.bitcast_convert_type(ranking_scores(scores).astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_k_membership(scores: Array, capacity: int) -> Array:
  """bool (..., n): is each score among its row's `capacity` largest?

  Exactly `top_k`'s choice, ties going to the lower index, but computed without `top_k`:
  a 32-step bisection on order-preserving integer keys finds each row's k-th largest key
  (every step is one fused compare-and-count over the row), then ties at that key are
  resolved by a cumulative count. On XLA:CPU this is up to about 2x faster than `top_k`
  followed by a scatter on large score arrays (`BISECT_MIN_*`).
  """
  keys = _order_keys(scores)
  kth = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
  for bit in range(31, -1, -1):  # unrolled: static shapes, no loop primitive
    cand = kth | jnp.uint32(1 << bit)
    count = jnp.sum(keys >= cand, axis=-1, keepdims=True, dtype=jnp.int32)
    kth = jnp.where(count >= capacity, cand, kth)
  greater = keys > kth
  ties_left = capacity - jnp.sum(greater, axis=-1, keepdims=True, dtype=jnp.int32)
  tie = keys == kth
  return greater | (tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= ties_left))


# Where the bisection beats top_k + scatter for the membership mask (measured, 2 cores):
# rows of at least 256 scores and at least 32768 scores in all (64 x 256: top_k 116 µs,
# bisection 150 µs; 128 x 256: 431 against 355 µs; 64 x 1024: 1251 against 980 µs). The
# width bound also keeps out 8-wide rows, where XLA:CPU fuses the 32 steps into one
# kernel whose compile time doubles with every step (jax 0.10.2: it never finishes).
BISECT_MIN_WIDTH = 256
BISECT_MIN_SCORES = 32768


def block_selection(
  scores: Array, threshold: float | Array, capacity: int | None, *, kernel: str = "xla"
) -> Array:
  """bool (..., n_blocks): the selected blocks of each row.

  `kernel="native"` finds the capacity's members with `top_blocks`' native selection.
  """
  selected = above(scores, threshold)
  if capacity is None or capacity == scores.shape[-1]:
    return selected
  flat = jnp.reshape(scores, (-1, scores.shape[-1]))
  large = flat.shape[1] >= BISECT_MIN_WIDTH and flat.size >= BISECT_MIN_SCORES
  if kernel == "xla" and large:
    in_top = top_k_membership(flat, capacity)
  else:
    idx = top_blocks(flat, capacity, kernel=kernel)
    rows = jnp.arange(flat.shape[0])[:, None]
    in_top = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
  return selected & jnp.reshape(in_top, scores.shape)


def expand_blocks(block_mask: Array, block_size: int) -> Array:
  """(..., n_blocks) -> (..., n_blocks * block_size) by repeating each block's value."""
  if block_size == 1:
    return block_mask
  shape = block_mask.shape
  wide = jnp.broadcast_to(block_mask[..., None], shape + (block_size,))
  return jnp.reshape(wide, shape[:-1] + (shape[-1] * block_size,))


def masked_relu(
  z: Array,
  scores: Array,
  bias: Array,
  threshold: float | Array,
  capacity: int | None,
  *,
  kernel: str = "xla",
) -> Array:
  """The dense fallback's epilogue: `where(M, relu(z + bias), 0)` with `M` the contract's mask.

  `z` (rows, n_out) is the dense product without bias, `scores` (rows, n_blocks) the block
  scores of the estimate, `bias` (n_out,). `M` expands `block_selection(scores, threshold,
  capacity)` over each block's units.

  `kernel="native"` (XLA:CPU, f32 only; staged in CPU lowerings only) runs
  `csrc/select.cc`: one pass over `z` per row that finds the capacity's k-th highest key
  with a linear-time selection instead of XLA's `top_k` + scatter or the 32-step bisection,
  and applies the bias, ReLU and mask while reading `z` once. Same values as the XLA form,
  which supplies its JVP and its batching rule.
  """
  if kernel == "native":
    if not _native.available():
      raise ValueError(f"kernel='native' needs the native library: {_native.status()['reason']}")
    return _native_masked_relu(capacity)(z, scores, bias, jnp.asarray(threshold, jnp.float32))
  if kernel != "xla":
    raise ValueError(f"kernel={kernel!r} must be 'native' or 'xla'.")
  return _xla_masked_relu(z, scores, bias, threshold, capacity=capacity)


def _xla_masked_relu(
  z: Array, scores: Array, bias: Array, threshold: float | Array, *, capacity: int | None
) -> Array:
  block_size = z.shape[-1] // scores.shape[-1]
  keep = expand_blocks(block_selection(scores, threshold, capacity), block_size)
  zb = z + jnp.reshape(bias, (1,) * (z.ndim - 1) + bias.shape).astype(z.dtype)
  return jnp.where(keep, jax.nn.relu(zb), jnp.zeros((), zb.dtype))


def estimated_masked_relu(
  z: Array,
  x: Array,
  u: Array,
  v: Array,
  bias: Array,
  threshold: float | Array,
  capacity: int | None,
  block_size: int,
  *,
  kernel: str = "xla",
) -> Array:
  r"""`masked_relu` with the scores computed from the inputs: the whole dense fallback
  after its product.

  `z` (rows, n_out) is the dense product without bias, `x` (rows, n_in) the inputs, `u`
  (n_in, r) and `v` (r, n_out) the estimator's factors. The scores are the block maxima
  of `\hat z = (x U) V + b` (`block_scores`), held out of the gradient as in
  `packed_dense`; then `where(M, relu(z + b), 0)`.

  `kernel="native"` (XLA:CPU, all f32) runs the estimate, the scores, the selection and
  the epilogue in one call of `csrc/select.cc`, eight rows at a time: XLA runs the two thin
  products `x U` (r = 64 columns) and `t V` at about half the rate of the dense product,
  and it writes the scores out and reads them back. The estimate is summed in another
  order than XLA's, so a score within rounding of the k-th one may rank differently, as
  with any two implementations of `(x U) V`. The XLA form supplies the JVP and batching.
  """
  if kernel == "native":
    if not _native.available():
      raise ValueError(f"kernel='native' needs the native library: {_native.status()['reason']}")
    call = _native_estimated_masked_relu(capacity, block_size)
    return call(z, x, u, v, bias, jnp.asarray(threshold, jnp.float32))
  if kernel != "xla":
    raise ValueError(f"kernel={kernel!r} must be 'native' or 'xla'.")
  return _xla_estimated_masked_relu(
    z, x, u, v, bias, threshold, capacity=capacity, block_size=block_size
  )


def _xla_estimated_masked_relu(
  z: Array,
  x: Array,
  u: Array,
  v: Array,
  bias: Array,
  threshold: float | Array,
  *,
  capacity: int | None,
  block_size: int,
) -> Array:
  z_hat = jax.lax.stop_gradient((x @ u) @ v + jnp.reshape(bias, (1, -1)).astype(x.dtype))
  scores = block_scores(z_hat, block_size)
  return _xla_masked_relu(z, scores, bias, threshold, capacity=capacity)


@functools.cache
def _native_estimated_masked_relu(capacity: int | None, block_size: int):
  """`estimated_masked_relu`'s native call for one static capacity and block size."""
  xla = functools.partial(_xla_estimated_masked_relu, capacity=capacity, block_size=block_size)

  @jax.custom_batching.custom_vmap
  def call(z, x, u, v, bias, threshold):
    out = jax.ShapeDtypeStruct(z.shape, jnp.float32)
    cap = np.int64(0 if capacity is None else capacity)
    return jax.ffi.ffi_call(_native.ESTIMATED_MASKED_RELU, out)(
      z, x, u, v, bias, threshold, capacity=cap, block_size=np.int64(block_size)
    )

  @call.def_vmap
  def _vmap(axis_size, in_batched, z, x, u, v, bias, threshold):
    if any(in_batched[2:]):  # per-example factors, bias or threshold: the XLA form
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(xla, in_axes=in_axes)(z, x, u, v, bias, threshold), True
    z, x = (
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip((z, x), in_batched[:2])
    )
    flat = call(
      jnp.reshape(z, (-1, z.shape[-1])), jnp.reshape(x, (-1, x.shape[-1])), u, v, bias, threshold
    )
    return jnp.reshape(flat, z.shape), True

  @jax.custom_jvp
  def masked(z, x, u, v, bias, threshold):
    return call(z, x, u, v, bias, threshold)

  @masked.defjvp
  def _jvp(primals, tangents):
    dz, _, _, _, db, _ = tangents
    y = masked(*primals)
    # y > 0 exactly where the unit is kept and relu passes z + b (relu's JVP at NaN and 0
    # is 0): the primal's own mask, whatever order its estimate was summed in.
    dzb = dz + jnp.reshape(db, (1,) * (dz.ndim - 1) + db.shape).astype(dz.dtype)
    return y, jnp.where(y > 0, dzb, jnp.zeros((), dzb.dtype))

  return masked


@functools.cache
def _native_masked_relu(capacity: int | None):
  """`masked_relu`'s native call for one static capacity, with JVP and batching rules."""
  xla = functools.partial(_xla_masked_relu, capacity=capacity)

  @jax.custom_batching.custom_vmap
  def call(z, scores, bias, threshold):
    out = jax.ShapeDtypeStruct(z.shape, jnp.float32)
    cap = np.int64(0 if capacity is None else capacity)
    return jax.ffi.ffi_call(_native.MASKED_RELU, out)(z, scores, bias, threshold, capacity=cap)

  @call.def_vmap
  def _vmap(axis_size, in_batched, z, scores, bias, threshold):
    if in_batched[2] or in_batched[3]:  # per-example bias or threshold: the XLA form
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(xla, in_axes=in_axes)(z, scores, bias, threshold), True
    z, scores = (
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip((z, scores), in_batched[:2])
    )
    y = call(
      jnp.reshape(z, (-1, z.shape[-1])),
      jnp.reshape(scores, (-1, scores.shape[-1])),
      bias,
      threshold,
    )
    return jnp.reshape(y, z.shape), True

  @jax.custom_jvp
  def masked(z, scores, bias, threshold):
    return call(z, scores, bias, threshold)

  @masked.defjvp
  def _jvp(primals, tangents):
    z, scores, bias, threshold = primals
    dz, _, db, _ = tangents
    y = masked(*primals)
    _, dy = jax.jvp(lambda z, b: xla(z, scores, b, threshold), (z, bias), (dz, db))
    return y, dy

  return masked
