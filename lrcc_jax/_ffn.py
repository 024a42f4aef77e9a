"""Conditional transformer feed-forward blocks: ReLU, ReLU² and ReLU-gated FFNs.

A transformer FFN is two (or, gated, three) projections around one elementwise
nonlinearity: `y = h(x) W_out + b_out` with `h = act(x W_in + b_in)`, times
`x W_up + b_up` when gated. Every nonlinearity here is zero wherever `z = x W_in + b_in`
is not positive, so the low-rank sign estimate of `z` (Davis & Arel) predicts which hidden
units are zero, and a zero hidden unit costs nothing in *any* projection: its row of
`W_in` (and `W_up`) and its row of `W_out` are never read. Skipping 90% of the hidden
units therefore skips 90% of every weight byte of the block, which is what bounds a
batch-1 decode step.

The mask `M` is the contract's (`lrcc_jax.unit_mask`): blocks of `block_size` hidden
units, block score = the largest estimate in the block, selected when above `threshold`
and, with a capacity, among the row's `capacity` best blocks.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _mask, _native
from lrcc_jax._estimator import LowRankEstimator, add_bias, estimate
from lrcc_jax._layers import unit_mask
from lrcc_jax._packed import (
  gathered_matvec,
  group_bounds,
  skip_pays,
  unit_major_product,
)

Array = jax.Array
Activation = Literal["relu", "relu2"]
Strategy = Literal["auto", "gather", "dense"]
ACTIVATIONS = ("relu", "relu2")


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}.")


def _shape(a) -> str:
  return "None" if a is None else str(tuple(a.shape))


def _check_ffn(x, w_in, b_in, w_out, b_out, w_up, b_up) -> tuple[int, int, int]:
  """Validates the FFN's shapes; returns (d_model, d_ff, d_out)."""
  d, d_ff = _checks.check_kernel(w_in, b_in)
  if x is not None:
    _checks.check_features(x, d, "FFN's w_in")
  if getattr(w_out, "ndim", None) != 2 or w_out.shape[0] != d_ff:
    raise ValueError(
      f"w_out has shape {tuple(getattr(w_out, 'shape', ()))} but w_in {tuple(w_in.shape)}"
      f" needs ({d_ff}, d_out): one row per hidden unit."
    )
  d_out = _checks.check_kernel(w_out, b_out)[1]
  if (w_up is None) != (b_up is None):
    raise ValueError(
      f"a gated FFN needs both w_up and b_up, got w_up={_shape(w_up)} and b_up={_shape(b_up)}."
    )
  if w_up is not None and (tuple(w_up.shape) != (d, d_ff) or tuple(b_up.shape) != (d_ff,)):
    raise ValueError(
      f"w_up {tuple(w_up.shape)} and b_up {tuple(b_up.shape)} must match w_in: ({d}, {d_ff})"
      f" and ({d_ff},)."
    )
  return d, d_ff, d_out


def activate(z: Array, up: Array | None, activation: str) -> Array:
  r"""`act(z)`, times the gate `up` when given: `relu(z)` or `relu(z)²`.

  Both are zero exactly where `z <= 0`, so the sign estimate of `z` alone decides which
  hidden units can be skipped, gated or not.
  """
  h = jax.nn.relu(z)
  if activation == "relu2":
    h = h * h
  return h if up is None else h * up


def conditional_ffn(
  x: Array,
  w_in: Array,
  b_in: Array,
  w_out: Array,
  b_out: Array,
  est: LowRankEstimator,
  *,
  threshold: float | Array = 0.0,
  capacity: int | None = None,
  block_size: int = 1,
  activation: Activation = "relu",
  w_up: Array | None = None,
  b_up: Array | None = None,
) -> Array:
  r"""A transformer FFN that keeps only the hidden units the estimator predicts active.

  .. math::  y = (M ⊙ h) W_{out} + b_{out}, \quad h = act(x W_{in} + b_{in})
             \; [⊙ (x W_{up} + b_{up})]

  with `M = unit_mask(estimate(x, est, b_in), threshold, capacity, block_size)`, exactly
  the mask `conditional_dense` builds. `act` is `relu` or `relu2` (`relu(z)²`, Primer's
  activation); with `w_up` the block is ReLU-gated. `M` is a constant for
  differentiation, so gradients reach `x` and every weight through the kept units only,
  and none reach the estimator.

  This is the training form: every product is dense, then masked. `pack_ffn` +
  `packed_ffn` compute the same values reading only the selected units' weights.

  Args:
    x: (..., d_model) inputs; leading dimensions are independent rows (tokens).
    w_in: (d_model, d_ff) input projection (Flax layout).
    b_in: (d_ff,) its bias.
    w_out: (d_ff, d_out) output projection, one row per hidden unit.
    b_out: (d_out,) its bias.
    est: estimator of `w_in`: `u` (d_model, r), `v` (r, d_ff).
    threshold: blocks whose score is not above it are zero.
    capacity: optional static cap on the selected blocks per row.
    block_size: static size of contiguous hidden-unit blocks; must divide d_ff.
    activation: "relu" or "relu2".
    w_up: optional (d_model, d_ff) gate projection (ReLU-gated FFN).
    b_up: its (d_ff,) bias, required with `w_up`.

  Returns:
    (..., d_out) outputs.

  Raises:
    ValueError: on mismatched widths, an unknown activation, `w_up` without `b_up`, a bad
      block size or capacity.
  """
  _check_activation(activation)
  d, d_ff, _ = _check_ffn(x, w_in, b_in, w_out, b_out, w_up, b_up)
  _checks.check_estimator(est, d, d_ff)
  with jax.named_scope("estimate"):
    z_hat = estimate(x, est, b_in)
  with jax.named_scope("select"):
    mask = unit_mask(z_hat, threshold, capacity, block_size)
  z = add_bias(x @ w_in, b_in)
  up = None if w_up is None else add_bias(x @ w_up, b_up)
  h = jnp.where(mask, activate(z, up, activation), jnp.zeros((), z.dtype))
  return add_bias(h @ w_out, b_out)


class PackedFFN(NamedTuple):
  """An FFN packed for compute-skipping inference (`packed_ffn`).

  Attributes:
    w_in: (n_blocks, g · block_size, d_model) unit-major input weights. Block `b` holds
      the `block_size` columns of `w_in` of hidden units `b · block_size + j` in its rows
      `[0, block_size)` and, gated (g = 2), the same columns of `w_up` in rows
      `[block_size, 2 block_size)`: one selected block is one contiguous slab, read once
      for both projections.
    b_in: (n_blocks, g · block_size) biases in the same order.
    w_out: (n_blocks, block_size, d_out): rows of the output projection by hidden unit
      (the Flax layout of `w_out`, reshaped; no copy of a transpose needed).
    b_out: (d_out,) output bias.
    u: (d_model, r) estimator factor.
    v: (r, d_ff) estimator factor.
  """

  w_in: Array
  b_in: Array
  w_out: Array
  b_out: Array
  u: Array
  v: Array

  @property
  def block_size(self) -> int:
    return self.w_out.shape[1]

  @property
  def n_blocks(self) -> int:
    return self.w_out.shape[0]

  @property
  def gated(self) -> bool:
    return self.w_in.shape[1] == 2 * self.w_out.shape[1]

  @property
  def d_model(self) -> int:
    return self.w_in.shape[2]

  @property
  def d_ff(self) -> int:
    return self.w_out.shape[0] * self.w_out.shape[1]

  @property
  def estimator(self) -> LowRankEstimator:
    return LowRankEstimator(self.u, self.v)

  def gate_bias(self) -> Array:
    """(d_ff,) the bias of `w_in` alone, the one the estimate adds."""
    return jnp.reshape(self.b_in[:, : self.block_size], (-1,))


def pack_ffn(
  w_in: Array,
  b_in: Array,
  w_out: Array,
  b_out: Array,
  est: LowRankEstimator,
  *,
  block_size: int = 1,
  w_up: Array | None = None,
  b_up: Array | None = None,
  dtype: jnp.dtype | None = None,
) -> PackedFFN:
  r"""Packs an FFN for `packed_ffn`: unit-major input (and gate) weights, once.

  Do this outside the inference loop: it transposes `w_in` (and `w_up`). `w_out` already
  has one contiguous row per hidden unit and is only reshaped.

  Args:
    w_in, b_in, w_out, b_out, est, w_up, b_up: as for `conditional_ffn`.
    block_size: static size of the hidden-unit blocks; must divide d_ff.
    dtype: optional storage dtype of the three weight matrices (e.g. `jnp.bfloat16`);
      products accumulate in the input's dtype.

  Returns:
    A `PackedFFN`.

  Raises:
    ValueError: on mismatched shapes, `w_up` without `b_up`, or a bad block size.
  """
  w_in, b_in, w_out, b_out = map(jnp.asarray, (w_in, b_in, w_out, b_out))
  if w_up is not None:
    w_up = jnp.asarray(w_up)
  if b_up is not None:
    b_up = jnp.asarray(b_up)
  est = LowRankEstimator(jnp.asarray(est.u), jnp.asarray(est.v))
  d, d_ff, d_out = _check_ffn(None, w_in, b_in, w_out, b_out, w_up, b_up)
  _checks.check_estimator(est, d, d_ff)
  n_blocks = _checks.check_block_size(block_size, d_ff)
  w = jnp.reshape(w_in.T, (n_blocks, block_size, d))
  b = jnp.reshape(b_in, (n_blocks, block_size))
  if w_up is not None:
    assert b_up is not None  # checked with w_up above
    w = jnp.concatenate([w, jnp.reshape(w_up.T, (n_blocks, block_size, d))], axis=1)
    b = jnp.concatenate([b, jnp.reshape(b_up, (n_blocks, block_size))], axis=1)
  w_o = jnp.reshape(w_out, (n_blocks, block_size, d_out))
  if dtype is not None:
    w, w_o = w.astype(dtype), w_o.astype(dtype)
  return PackedFFN(w, b, w_o, b_out, est.u, est.v)


def ffn_block_bytes(packed: PackedFFN) -> int:
  """Bytes of one selected block over all projections (in, gate, out)."""
  _, g_bs, d = packed.w_in.shape  # shapes only: nothing is read or traced
  _, bs, d_out = packed.w_out.shape
  return g_bs * d * packed.w_in.dtype.itemsize + bs * d_out * packed.w_out.dtype.itemsize


def ffn_gathers(
  packed: PackedFFN, rows: int, capacity: int | None, dtype: jnp.dtype = jnp.float32
) -> bool:
  """Whether `packed_ffn`'s "auto" strategy gathers for `rows` rows of `dtype` inputs.

  The existing `skip_pays` decision, with the block bytes of all of the FFN's
  projections; its native limits apply where the input projection runs the native
  kernel (f32 on CPU).
  """
  native = _native.usable(packed.w_in.dtype, dtype)
  return skip_pays(
    rows, capacity, packed.n_blocks, block_bytes=ffn_block_bytes(packed), native=native
  )


def _gathered_rows_product(h: Array, w_out: Array, idx: Array) -> Array:
  r"""`y[r] = Σ_k Σ_j h[r, k, j] · w_out[idx[r, k], j]`.

  Shapes: `h` (rows, k, bs), `w_out` (n_blocks, bs, d), `idx` (rows, k).

  A weighted sum of the selected rows of the output projection. For one row the blocks
  are gathered and reduced in `group_bounds` groups, which XLA:CPU runs concurrently on
  its cores (d=2048, 51 of 512 blocks of 16: 0.40 ms against 0.48 ms for one gather and
  one product, scratch measurement); the partial sums are added at the end.
  """
  rows, k, bs = h.shape
  w_dtype = h.dtype
  if rows == 1:
    parts = [
      jnp.einsum("kb,kbd->d", h[0, a:b], w_out[idx[0, a:b]].astype(w_dtype))
      for a, b in group_bounds(k, bs)
    ]
    return sum(parts[1:], parts[0])[None]
  return jnp.einsum("rkb,rkbd->rd", h, w_out[idx].astype(w_dtype))


def packed_ffn(
  x: Array,
  packed: PackedFFN,
  *,
  threshold: float | Array = 0.0,
  capacity: int | None = None,
  activation: Activation = "relu",
  strategy: Strategy = "auto",
) -> Array:
  r"""Conditional FFN that computes only the selected hidden blocks, in every projection.

  Same values as `conditional_ffn` with the packed block size. With `capacity = k` each
  row picks its `k` best-scoring blocks (`top_k`, static `k`), reads their rows of
  `w_in` (and `w_up`, stacked in the same slab) through `gathered_matvec` (the native CPU
  kernel for f32 on CPU, XLA gathers elsewhere), applies the activation and the threshold,
  and adds up the same blocks' rows of `w_out`. Weight bytes read and multiply-adds drop
  from `(g + 1) d_ff d` to `(g + 1) k · block_size · d` per row, plus the estimator's
  `r (d + d_ff)`. No `cond`, no loops: one compiled program for every input.

  `strategy="auto"` gathers where `skip_pays` says the gathers beat the dense product
  (`ffn_gathers`); otherwise, and always without a capacity (the number of selected
  units is then data dependent), it runs the dense products and masks. `"gather"` and
  `"dense"` force a path (benchmarks, tests).

  Args:
    x: (..., d_model) inputs; leading dimensions are independent rows.
    packed: output of `pack_ffn`.
    threshold: blocks whose score is not above it are zero.
    capacity: optional static number of blocks per row, in [1, n_blocks].
    activation: "relu" or "relu2"; gating comes with the packed weights.
    strategy: "auto", "gather" or "dense".

  Returns:
    (..., d_out) outputs.

  Raises:
    ValueError: on a wrong input width, a bad capacity, activation or strategy.
  """
  _check_activation(activation)
  n_blocks, rows_per_block, d = packed.w_in.shape
  bs, d_ff, d_out = packed.block_size, packed.d_ff, packed.w_out.shape[2]
  g = rows_per_block // bs
  _checks.check_features(x, d, "packed FFN")
  capacity = _checks.check_capacity(capacity, n_blocks, bs)
  if strategy not in ("auto", "gather", "dense"):
    raise ValueError(f"strategy={strategy!r} must be 'auto', 'gather' or 'dense'.")

  lead = x.shape[:-1]
  xr = jnp.reshape(x, (-1, d))
  rows = xr.shape[0]
  dtype = xr.dtype
  with jax.named_scope("estimate"):
    gate_bias = jnp.reshape(packed.gate_bias(), (1, d_ff)).astype(dtype)
    z_hat = jax.lax.stop_gradient((xr @ packed.u) @ packed.v + gate_bias)
  scores = _mask.block_scores(z_hat, bs)
  gather = capacity is not None and (
    strategy == "gather" or (strategy == "auto" and ffn_gathers(packed, rows, capacity, dtype))
  )
  b_out = jnp.reshape(packed.b_out, (1, d_out)).astype(dtype)

  if not gather:
    with jax.named_scope("select"):
      keep = _mask.expand_blocks(_mask.block_selection(scores, threshold, capacity), bs)
    zz = unit_major_product(xr, jnp.reshape(packed.w_in, (n_blocks * rows_per_block, d)))
    zz = jnp.reshape(zz + jnp.reshape(packed.b_in, (1, -1)).astype(dtype), (rows, n_blocks, g, bs))
    z, up = zz[:, :, 0], (zz[:, :, 1] if g == 2 else None)
    up = None if up is None else jnp.reshape(up, (rows, d_ff))
    h = activate(jnp.reshape(z, (rows, d_ff)), up, activation)
    h = jnp.where(keep, h, jnp.zeros((), h.dtype))
    y = h @ jnp.reshape(packed.w_out, (d_ff, d_out)).astype(dtype) + b_out
    return jnp.reshape(y, lead + (d_out,))

  assert capacity is not None  # the dense path above covers no capacity
  with jax.named_scope("select"):
    idx = _mask.top_blocks(scores, capacity)  # (rows, k) ascending
    keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
  with jax.named_scope("gather_in"):
    zz = gathered_matvec(packed.w_in, idx, xr) + packed.b_in[idx].astype(dtype)  # (rows, k, g·bs)
  z, up = zz[..., :bs], (zz[..., bs:] if g == 2 else None)
  h = jnp.where(keep[..., None], activate(z, up, activation), jnp.zeros((), dtype))
  with jax.named_scope("gather_out"):
    y = _gathered_rows_product(h, packed.w_out, idx) + b_out
  return jnp.reshape(y, lead + (d_out,))
