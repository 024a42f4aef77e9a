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

On CPU both gathered projections run native kernels (`_native`): the input one the tile
kernel (`lrcc_tile_product`), the output one `lrcc_ffn_rows_product` (`csrc/ffn.cc`),
which reads each selected row of `W_out` once instead of materialising the gathered
blocks as XLA:CPU does. `plan_ffn` chooses per lowering platform (`_policy.dispatch`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _mask, _native, _policy
from lrcc_jax._estimator import LowRankEstimator, add_bias, estimate
from lrcc_jax._layers import unit_mask
from lrcc_jax._packed import gathered_matvec, group_bounds, unit_major_product

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


# "auto" computes an FFN densely while all its weights (every projection) take fewer bytes
# than this: such an FFN sits in the cache, its dense products cost a few microseconds, and
# the fixed costs of skipping (estimate, selection, the gathers' index work, one op per
# step) are comparable. Measured on XLA:CPU, 2 shared cores, batch 1, d_ff = 4 d, ReLU²,
# blocks of 1, rank d / 8, the native kernels, gathers forced against a dense jit at 10% and
# 25% computed (`lrcc-jax bench --suite ffn`, "widths"), with the native selection
# (`_mask.top_blocks`): d = 128 (0.5 MB) 0.61x; 256 (2 MB) 1.98-2.03x; 512 (8 MB)
# 2.7-5.3x. With XLA's top_k the 2 MB FFN had gathered at 0.25x, then 1.1-1.9x (two runs)
# as the native kernels' fixed costs fell, and the bound was 4 MB. Other platforms:
# unmeasured; the same bound is used (a cache-resident FFN is launch-bound there too).
MIN_GATHER_WEIGHT_BYTES = 2**20


def ffn_weight_bytes(packed: PackedFFN) -> int:
  """Bytes of all the FFN's projection weights (what one dense batch-1 call reads)."""
  return packed.n_blocks * ffn_block_bytes(packed)


class FFNPlan(NamedTuple):
  """What one platform's branch of `packed_ffn` computes.

  Attributes:
    gather: gather the selected blocks (else dense products, then the mask).
    kernel: `gathered_matvec`'s kernel for the input (and gate) projection.
    out_kernel: the output projection's kernel: "native" (`csrc/ffn.cc`) or "xla".
    policy: the `_policy.Policy` that decided, if one did.
    select: the capacity's selection (`_mask.top_blocks`): "native" on CPU where
      `_policy.epilogue_kernel` says so, else "xla".
  """

  gather: bool
  kernel: str
  out_kernel: str
  policy: _policy.Policy | None
  select: str = "xla"

  @property
  def key(self) -> tuple:
    """Equal keys stage the same code (`_policy.dispatch`)."""
    if self.gather:
      return (True, self.kernel, self.out_kernel, self.select)
    return (False, self.select)


def plan_ffn(
  platform: str,
  strategy: str,
  rows: int,
  capacity: int | None,
  packed: PackedFFN,
  x_dtype: jnp.dtype,
  policy: _policy.Policies = None,
) -> FFNPlan:
  """`packed_ffn`'s choice on the lowering `platform`: gather or dense, and the kernels.

  The input projection's kernel is `_policy.gather_kernel`'s for a (n_blocks, g·bs, d)
  weight (native on CPU for f32/bf16 weights and f32 inputs, Pallas on CUDA/TPU where it
  fits, XLA otherwise); the output projection runs the native kernel exactly where the
  input one does, else XLA's gathers. "auto" gathers where `_policy.gather_pays` says so
  for blocks of `ffn_block_bytes` bytes (the platform's policy for that kernel, or the
  caller's `policy`), and never for an FFN smaller than `MIN_GATHER_WEIGHT_BYTES`.
  """
  n_blocks, g_bs, d = packed.w_in.shape
  w_dtype = packed.w_in.dtype
  kernel = _policy.gather_kernel(platform, g_bs, d, w_dtype, x_dtype, policy)
  native_out = kernel == "native" and _native.usable(packed.w_out.dtype, x_dtype)
  out_kernel = "native" if native_out else "xla"
  select = _policy.epilogue_kernel(platform, x_dtype)
  if capacity is None or strategy == "dense":
    return FFNPlan(False, kernel, out_kernel, None, select)
  if strategy == "gather":
    return FFNPlan(True, kernel, out_kernel, None, select)
  if ffn_weight_bytes(packed) < MIN_GATHER_WEIGHT_BYTES:
    return FFNPlan(False, kernel, out_kernel, None, select)
  plat = platform if platform in _policy.PLATFORMS else "cuda"
  pol = _policy.policy_for(plat, kernel, w_dtype, policy)
  gather = _policy.gather_pays(pol, rows, capacity, n_blocks, ffn_block_bytes(packed))
  return FFNPlan(gather, kernel, out_kernel, pol, select)


def ffn_gathers(
  packed: PackedFFN,
  rows: int,
  capacity: int | None,
  dtype: jnp.dtype = jnp.float32,
  *,
  platform: str | None = None,
  policy: _policy.Policies = None,
) -> bool:
  """Whether `packed_ffn`'s "auto" strategy gathers for `rows` rows of `dtype` inputs.

  `plan_ffn` on `platform` (default: the current device's), as `packed_ffn` decides in
  that platform's branch.
  """
  platform = _policy.current_platform() if platform is None else platform
  return plan_ffn(platform, "auto", rows, capacity, packed, dtype, policy).gather


def _gathered_rows_product(h: Array, w_out: Array, idx: Array) -> Array:
  r"""`y[r] = Σ_k Σ_j h[r, k, j] · w_out[idx[r, k], j]`, in XLA ops (the reference form).

  Shapes: `h` (rows, k, bs), `w_out` (n_blocks, bs, d), `idx` (rows, k).

  A weighted sum of the selected rows of the output projection. For one row the blocks
  are gathered and reduced in `group_bounds` groups, which XLA:CPU runs concurrently on
  its cores (d=2048, 51 of 512 blocks of 16: 0.40 ms against 0.48 ms for one gather and
  one product, scratch measurement); the partial sums are added at the end. XLA:CPU still
  materialises every gathered block before reducing it, which is why the CPU uses the
  native kernel (`rows_product`).
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


ROWS_TARGETS = {
  jnp.dtype(jnp.float32): "lrcc_ffn_rows_product",
  jnp.dtype(jnp.bfloat16): "lrcc_ffn_rows_product_bf16",
}


@functools.cache
def _native_rows_product() -> Callable[[Array, Array, Array], Array]:
  """The native output product `(h, w_out, idx) -> y` with its JVP and batching rules."""

  @jax.custom_batching.custom_vmap
  def call(h, w_out, idx):
    out = jax.ShapeDtypeStruct((idx.shape[0], w_out.shape[2]), jnp.float32)
    return jax.ffi.ffi_call(ROWS_TARGETS[jnp.dtype(w_out.dtype)], out)(w_out, idx, h)

  @call.def_vmap
  def _vmap(axis_size, in_batched, h, w_out, idx):
    if in_batched[1]:  # a batch of weights: no single kernel call covers it
      in_axes = (0 if in_batched[0] else None, 0, 0 if in_batched[2] else None)
      return jax.vmap(_gathered_rows_product, in_axes=in_axes)(h, w_out, idx), True
    h, idx = (
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in ((h, in_batched[0]), (idx, in_batched[2]))
    )
    rows = idx.shape[1]
    y = call(jnp.reshape(h, (-1,) + h.shape[2:]), w_out, jnp.reshape(idx, (-1, idx.shape[2])))
    return jnp.reshape(y, (axis_size, rows, -1)), True

  @jax.custom_jvp
  def product(h, w_out, idx):
    return call(h, w_out, idx)

  @product.defjvp
  def _jvp(primals, tangents):
    h, w_out, idx = primals
    dh, dw, _ = tangents
    _, dy = jax.jvp(lambda h, w: _gathered_rows_product(h, w, idx), (h, w_out), (dh, dw))
    return product(*primals), dy

  return product


def rows_product(h: Array, w_out: Array, idx: Array, *, kernel: str = "xla") -> Array:
  r"""`y[r] = Σ_k Σ_j h[r, k, j] · w_out[idx[r, k], j]`: (rows, k, bs), (n_blocks, bs, d_out),
  (rows, k) -> (rows, d_out).

  `kernel="native"`: `csrc/ffn.cc` (f32 `h`, f32 or bf16 `w_out`, CPU lowerings only; the
  caller's plan decides). It reads each selected block's rows once and only those with a
  nonzero `h` (a ReLU zero inside a selected block adds `0 · w`, nothing for finite
  weights), splits the `d_out` columns across the CPU threads, and accumulates in f32:
  the same values as `"xla"` up to the order of the sums. Its derivative is the XLA
  form's, and `vmap` folds batch axes into rows (batched weights fall back to XLA).
  """
  if kernel == "native":
    if not _native.available():  # builds and registers the targets on first use
      raise ValueError(f"kernel='native' but the native kernel is off: {_native.status()}")
    return _native_rows_product()(h, w_out, idx.astype(jnp.int32))
  if kernel != "xla":
    raise ValueError(f"kernel={kernel!r} must be 'native' or 'xla'.")
  return _gathered_rows_product(h, w_out, idx)


def packed_ffn(
  x: Array,
  packed: PackedFFN,
  *,
  threshold: float | Array = 0.0,
  capacity: int | None = None,
  activation: Activation = "relu",
  strategy: Strategy = "auto",
  policy: _policy.Policies = None,
) -> Array:
  r"""Conditional FFN that computes only the selected hidden blocks, in every projection.

  Same values as `conditional_ffn` with the packed block size. With `capacity = k` each
  row picks its `k` best-scoring blocks `S` (`_mask.top_blocks`: `top_k` with static `k`,
  ties to the lower index, NaN ranked first) and computes

  .. math::  z_{S} = W^{in}_{S} x + b^{in}_{S}, \quad
             h_{S} = [\mathrm{score}_S > t] ⊙ act(z_S) [⊙ (W^{up}_S x + b^{up}_S)], \quad
             y = Σ_{s ∈ S} Σ_j h_{s j} W^{out}_{s j,:} + b^{out}

  reading only the selected blocks' rows of `w_in` (and `w_up`, stacked in the same slab)
  through `gathered_matvec` and of `w_out` through `rows_product`. Weight bytes read and
  multiply-adds drop from `(g + 1) d_ff d` to `(g + 1) k · bs · d` per row, plus the
  estimator's `r (d + d_ff)`. No `cond`, no loops: one compiled program for every input
  and every threshold.

  The kernels and the gather-or-dense decision belong to the platform the program is
  lowered for (`plan_ffn`, staged by `_policy.dispatch`): on CPU the native kernels
  (`_native`: `lrcc_tile_product` for the input projection, `lrcc_ffn_rows_product` for
  the output one) for f32 inputs, XLA's gathers otherwise; on CUDA/TPU the Pallas gather
  for the input projection and XLA's for the output one. A single-platform lowering holds
  only its own platform's code.

  `strategy="auto"` gathers where the platform's policy says the gathers beat the dense
  product and the FFN is not too small to gain (`plan_ffn`); otherwise, and always without
  a capacity (the number of selected units is then data dependent), it runs the dense
  products and masks. `"gather"` and `"dense"` force a path (benchmarks, tests).

  Args:
    x: (..., d_model) inputs; leading dimensions are independent rows.
    packed: output of `pack_ffn`.
    threshold: blocks whose score is not above it are zero.
    capacity: optional static number of blocks per row, in [1, n_blocks].
    activation: "relu" or "relu2"; gating comes with the packed weights.
    strategy: "auto", "gather" or "dense".
    policy: optional `Policy` (or one per platform) overriding the shipped or tuned
      crossover on its platform; `kernel="xla"` also turns the native and Pallas kernels
      off there.

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

  def plan_of(platform: str) -> FFNPlan:
    return plan_ffn(platform, strategy, rows, capacity, packed, dtype, policy)

  def run(plan: FFNPlan, xr: Array, scores: Array, threshold: Array, packed: PackedFFN) -> Array:
    b_out = jnp.reshape(packed.b_out, (1, d_out)).astype(dtype)
    if not plan.gather:
      with jax.named_scope("select"):
        selected = _mask.block_selection(scores, threshold, capacity, kernel=plan.select)
        keep = _mask.expand_blocks(selected, bs)
      w_in = jnp.reshape(packed.w_in, (n_blocks * rows_per_block, d))
      zz = unit_major_product(xr, w_in) + jnp.reshape(packed.b_in, (1, -1)).astype(dtype)
      zz = jnp.reshape(zz, (rows, n_blocks, g, bs))
      z, up = zz[:, :, 0], (zz[:, :, 1] if g == 2 else None)
      up = None if up is None else jnp.reshape(up, (rows, d_ff))
      h = activate(jnp.reshape(z, (rows, d_ff)), up, activation)
      h = jnp.where(keep, h, jnp.zeros((), h.dtype))
      return h @ jnp.reshape(packed.w_out, (d_ff, d_out)).astype(dtype) + b_out
    assert capacity is not None  # a plan without a capacity never gathers
    with jax.named_scope("select"):
      idx = _mask.top_blocks(scores, capacity, kernel=plan.select)  # (rows, k) ascending
      keep = _mask.above(jnp.take_along_axis(scores, idx, axis=-1), threshold)
    with jax.named_scope("gather_in"):
      zz = gathered_matvec(packed.w_in, idx, xr, kernel=plan.kernel)  # (rows, k, g·bs)
      zz = zz + packed.b_in[idx].astype(dtype)
    z, up = zz[..., :bs], (zz[..., bs:] if g == 2 else None)
    h = jnp.where(keep[..., None], activate(z, up, activation), jnp.zeros((), dtype))
    with jax.named_scope("gather_out"):
      return rows_product(h, packed.w_out, idx, kernel=plan.out_kernel) + b_out

  with jax.named_scope("lrcc_packed_ffn"):
    y = _policy.dispatch(plan_of, run, (xr, scores, threshold, packed), key=lambda p: p.key)
  return jnp.reshape(y, lead + (d_out,))
