"""The native CPU output product of `packed_ffn` (`csrc/ffn.cc`) and its per-platform plan.

Every value is checked against the float64 numpy contract (`helpers.np_block_mask`, which
spells out ties to the lower index and NaN ranked first) and against the XLA path of the
same call (`policy=CPU_XLA` turns the native kernels off).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import np_block_mask, np_estimate

import lrcc_jax as L
from lrcc_jax import _ffn, _native, _policy

needs_native = pytest.mark.skipif(not _native.available(), reason="native kernel not built")
VARIANTS = [("relu", False), ("relu2", False), ("relu", True)]  # (activation, gated)


def _int_ffn(seed, d, d_ff, d_out, rank, gated, rows):
  """Small-integer weights, factors and inputs: estimates are exact, so ties are real ties."""
  rng = np.random.default_rng(seed)

  def i(*s):
    return jnp.asarray(rng.integers(-2, 3, s), jnp.float32)

  p = {"w_in": i(d, d_ff), "b_in": i(d_ff), "w_out": i(d_ff, d_out), "b_out": i(d_out)}
  if gated:
    p["w_up"], p["b_up"] = i(d, d_ff), i(d_ff)
  est = L.LowRankEstimator(i(d, rank), i(rank, d_ff))
  return p, est, i(rows, d)


def _reference(x, p, est, threshold, capacity, bs, activation):
  """The contract in float64: the mask from `np_block_mask`, then the masked FFN."""

  def f(a):
    return np.asarray(a, np.float64)

  z_hat = np_estimate(x, est.u, est.v, p["b_in"])
  mask = np.repeat(np_block_mask(z_hat, threshold, capacity, bs), bs, axis=-1)
  with np.errstate(invalid="ignore"):
    z = f(x) @ f(p["w_in"]) + f(p["b_in"])
    h = np.maximum(z, 0.0)
    h = np.where(np.isnan(z), z, h)
    if activation == "relu2":
      h = h * h
    if "w_up" in p:
      h = h * (f(x) @ f(p["w_up"]) + f(p["b_up"]))
    return np.where(mask, h, 0.0) @ f(p["w_out"]) + f(p["b_out"])


def _pack(p, est, bs, dtype=None):
  return L.pack_ffn(**p, est=est, block_size=bs, dtype=dtype)


# --- the kernel alone ------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_rows_product_equals_numpy_and_xla(bs, dtype, rows):
  rng = np.random.default_rng(bs + rows)
  n_blocks, k, d_out = 9, 4, 300  # 300: a column tail after the vector chunks
  w = jnp.asarray(rng.standard_normal((n_blocks, bs, d_out)), jnp.float32).astype(dtype)
  idx = jnp.asarray(np.sort(rng.choice(n_blocks, (rows, k)), -1), jnp.int32)
  h = np.maximum(rng.standard_normal((rows, k, bs)), 0.0)  # ReLU zeros inside blocks
  h[0, 0, 0] = np.nan  # a NaN coefficient reaches y
  h = jnp.asarray(h, jnp.float32)
  wf = np.asarray(w.astype(jnp.float32), np.float64)
  want = np.einsum("rkb,rkbd->rd", np.asarray(h, np.float64), wf[np.asarray(idx)])
  got = _ffn.rows_product(h, w, idx, kernel="native")
  xla = _ffn.rows_product(h, w, idx, kernel="xla")
  assert got.dtype == jnp.float32 and got.shape == (rows, d_out)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  assert np.isnan(got[0]).all() and not np.isnan(got[1:]).any()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-5, atol=1e-4)


@needs_native
def test_rows_product_threads_split_columns_of_a_large_product():
  """Past the single-thread bound the columns are split across threads: same values."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((64, 16, 2050)), jnp.float32)
  idx = jnp.asarray(np.sort(rng.choice(64, (2, 12), replace=False), -1), jnp.int32)
  h = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.float32)
  got = jax.jit(lambda h, w, i: _ffn.rows_product(h, w, i, kernel="native"))(h, w, idx)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(_ffn.rows_product(h, w, idx)), rtol=1e-4, atol=1e-3
  )


# --- packed_ffn with the native kernels --------------------------------------------------


@needs_native
@pytest.mark.parametrize("activation,gated", VARIANTS)
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("capacity", [None, 2])
def test_packed_ffn_native_equals_contract_with_ties_and_nan(activation, gated, bs, capacity):
  d, d_ff, d_out = 6, 4 * bs, 5
  p, est, x = _int_ffn(bs + 7 * gated, d, d_ff, d_out, 2, gated, rows=4)
  x = x.at[3, 0].set(jnp.nan)  # NaN estimates: every block of row 3 ranks first and computes
  x = x.at[2].set(0.0)  # estimate = b_in: ties between blocks
  pk = _pack(p, est, bs)
  for t in (0.0, 1.5):
    want = _reference(x, p, est, t, capacity, bs, activation)
    f = jax.jit(
      lambda x, pk, t: L.packed_ffn(
        x, pk, threshold=t, capacity=capacity, activation=activation, strategy="gather"
      )
    )
    got = f(x, pk, jnp.float32(t))
    xla = L.packed_ffn(
      x,
      pk,
      threshold=t,
      capacity=capacity,
      activation=activation,
      strategy="gather",
      policy=_policy.CPU_XLA,
    )
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), rtol=1e-5, atol=1e-3)


@needs_native
def test_packed_ffn_bf16_native_equals_xla():
  p, est, x = _int_ffn(3, 8, 64, 16, 3, True, rows=2)
  pk = _pack(p, est, 16, jnp.bfloat16)  # small integers are exact in bf16
  kw = {"capacity": 2, "strategy": "gather"}
  got = L.packed_ffn(x, pk, **kw)
  np.testing.assert_allclose(
    np.asarray(got), _reference(x, p, est, 0.0, 2, 16, "relu"), rtol=1e-5, atol=1e-3
  )
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(L.packed_ffn(x, pk, policy=_policy.CPU_XLA, **kw))
  )


@needs_native
@pytest.mark.parametrize("activation,gated", VARIANTS)
def test_native_gradients_equal_the_xla_path(activation, gated):
  rng = np.random.default_rng(1)
  p, est, _ = _int_ffn(4, 8, 32, 3, 2, gated, rows=1)
  p = {k: v + 0.1 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in p.items()}
  x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)

  def loss(x, pk, policy):
    y = L.packed_ffn(
      x, pk, threshold=-0.5, capacity=3, activation=activation, strategy="gather", policy=policy
    )
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))

  pk = _pack(p, est, 4)
  native = jax.grad(loss, argnums=(0, 1))(x, pk, None)
  xla = jax.grad(loss, argnums=(0, 1))(x, pk, _policy.CPU_XLA)
  chex.assert_trees_all_close(native, xla, rtol=1e-3, atol=1e-4)  # sums in another order
  assert float(jnp.abs(native[1].w_out).sum()) > 0  # gradients reach the output rows


@needs_native
def test_native_jit_vmap_and_batched_weights_agree():
  p, est, _ = _int_ffn(5, 8, 32, 4, 2, False, rows=1)
  pk = _pack(p, est, 4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)), jnp.float32)

  def f(x, pk):
    return L.packed_ffn(x, pk, capacity=2, activation="relu2", strategy="gather")

  ref = f(x, pk)
  chex.assert_trees_all_close(jax.jit(f)(x, pk), ref, atol=1e-5)
  chex.assert_trees_all_close(jax.vmap(jax.vmap(f, (0, None)), (0, None))(x, pk), ref, atol=1e-5)
  # a batch of weights: the kernel's vmap rule falls back to the XLA product
  pks = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), pk)
  both = jax.vmap(f, (None, 0))(x[0], pks)
  chex.assert_trees_all_close(both[0], f(x[0], pk), atol=1e-5)
  chex.assert_trees_all_close(both[1], f(x[0], jax.tree.map(lambda a: 2 * a, pk)), atol=1e-4)


@needs_native
def test_no_recompilation_when_the_threshold_changes():
  p, est, x = _int_ffn(6, 8, 64, 5, 2, True, rows=1)
  pk = _pack(p, est, 16)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, pk, t):
    return L.packed_ffn(x, pk, threshold=t, capacity=2, strategy="gather")

  outs = [f(x, pk, jnp.float32(t)) for t in (-10.0, 0.0, 1e9)]
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2]))  # the threshold took effect
  np.testing.assert_allclose(np.asarray(outs[2])[0], np.asarray(p["b_out"]))  # nothing computed


# --- lowering: the native kernel only in CPU programs -------------------------------------


def _lowered(platforms, strategy="gather", policy=None, d=64, d_ff=256, rows=1):
  p, est, _ = _int_ffn(8, d, d_ff, d, 4, True, rows=1)
  pk = _pack(p, est, 16)

  def f(x, pk):
    return L.packed_ffn(x, pk, capacity=2, activation="relu2", strategy=strategy, policy=policy)

  specs = (
    jax.ShapeDtypeStruct((rows, d), jnp.float32),
    jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pk),
  )
  return jax.jit(f).trace(*specs).lower(lowering_platforms=platforms).as_text()


def _no_conditional(text):
  return not any(op in text for op in ("stablehlo.case", "stablehlo.if", "stablehlo.while"))


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_native_kernels_lower_for_cpu_only(platform):
  text = _lowered((platform,))
  native = platform == "cpu" and _native.available()
  assert ("lrcc_ffn_rows_product" in text) == native
  assert (_native.TARGET in text) == native
  assert native or "gather" in text  # elsewhere XLA's gathers read the rows
  assert _no_conditional(text)


def test_one_program_lowers_for_all_three_platforms():
  text = _lowered(("cpu", "cuda", "tpu"))
  assert "stablehlo.case" in text and "gather" in text
  assert ("lrcc_ffn_rows_product" in text) == _native.available()


def test_policy_keyword_turns_the_native_kernel_off_on_cpu():
  text = _lowered(("cpu",), policy=_policy.CPU_XLA)
  assert "lrcc_ffn_rows_product" not in text and _native.TARGET not in text and "gather" in text


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_auto_runs_small_ffns_dense_and_large_ones_gathered(platform):
  small = _lowered((platform,), strategy="auto", d=64, d_ff=256)
  assert "gather" not in small and "lrcc_ffn_rows_product" not in small
  pk = _pack(*_int_ffn(0, 512, 2048, 512, 4, False, rows=1)[:2], 16)
  assert _ffn.ffn_weight_bytes(pk) >= _ffn.MIN_GATHER_WEIGHT_BYTES
  assert _ffn.plan_ffn(platform, "auto", 1, 8, pk, jnp.float32).gather  # 6% of the blocks
  assert not _ffn.plan_ffn(platform, "auto", 64, 8, pk, jnp.float32).gather  # 64 rows: dense
  tiny = _pack(*_int_ffn(0, 64, 256, 64, 4, False, rows=1)[:2], 16)
  assert not _ffn.plan_ffn(platform, "auto", 1, 1, tiny, jnp.float32).gather
  # either side of the 1 MB bound: 256 x 1024 (2 MB) gathers 10% of its units at batch 1,
  # 128 x 512 (0.5 MB) does not
  mid = _pack(*_int_ffn(0, 256, 1024, 256, 4, False, rows=1)[:2], 1)
  assert _ffn.ffn_weight_bytes(mid) == 2 * 2**20
  assert _ffn.plan_ffn(platform, "auto", 1, 102, mid, jnp.float32).gather
  half_mb = _pack(*_int_ffn(0, 128, 512, 128, 4, False, rows=1)[:2], 1)
  assert not _ffn.plan_ffn(platform, "auto", 1, 51, half_mb, jnp.float32).gather
