import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lrcc_jax as L
from helpers import (
    int_layer_like, int_layers, layer_cases, make_layer, np_estimate, np_masked_dense_grads,
    np_unit_mask, reference_mask, scaled_examples, selection_margin,
)
from lrcc_jax import _fused, _native, _policy


@settings(max_examples=scaled_examples(0.5))  # costly: shapes vary, so every example compiles
@given(layer_cases(), st.sampled_from(["auto", "gather", "dense"]))
def test_packed_dense_equals_masked_reference(case, strategy):
  n_in, n_out, rank, block_size, capacity, threshold, batch, seed = case
  w, b, est = make_layer(seed, n_in, n_out, rank)
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(batch + (n_in,)), jnp.float32)
  z_hat = np.asarray(L.estimate(x, est, b))
  assume(selection_margin(z_hat, threshold, capacity, block_size) > 1e-4)
  mask = reference_mask(z_hat, threshold, capacity, block_size)
  packed = L.pack(w, b, est, block_size=block_size)
  got = L.packed_dense(x, packed, threshold=threshold, capacity=capacity, strategy=strategy)
  chex.assert_shape(got, batch + (n_out,))
  np.testing.assert_allclose(np.asarray(got), np.asarray(L.masked_dense(x, w, b, mask)), rtol=1e-4, atol=1e-5)
  cond = L.conditional_dense(x, w, b, est, threshold=threshold, capacity=capacity, block_size=block_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(cond), rtol=1e-4, atol=1e-5)


def test_pack_layout_is_unit_major_blocks():
  w, b, est = make_layer(0, 5, 12, 3)
  p = L.pack(w, b, est, block_size=4)
  chex.assert_shape(p.weight, (3, 4, 5))
  chex.assert_shape(p.bias, (3, 4))
  for blk in range(3):
    for j in range(4):
      np.testing.assert_array_equal(np.asarray(p.weight[blk, j]), np.asarray(w[:, 4 * blk + j]))
  assert (p.n_in, p.n_out, p.block_size) == (5, 12, 4)
  with pytest.raises(ValueError, match="block_size=5 must be a positive divisor of n_out=12"):
    L.pack(w, b, est, block_size=5)


def test_packed_errors_name_values():
  w, b, est = make_layer(0, 6, 12, 2)
  p = L.pack(w, b, est, block_size=3)
  with pytest.raises(ValueError, match=r"x has shape \(7,\).*n_in=6"):
    L.packed_dense(jnp.zeros((7,)), p)
  with pytest.raises(ValueError, match=r"capacity=5 is outside \[1, 4\]"):
    L.packed_dense(jnp.zeros((6,)), p, capacity=5)
  with pytest.raises(ValueError, match="strategy='fast'"):
    L.packed_dense(jnp.zeros((6,)), p, capacity=1, strategy="fast")


@pytest.mark.parametrize("rows", [1, 3])
def test_gather_path_gradients_equal_masked_reference(rows):
  w, b, est = make_layer(1, 8, 12, 3)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 8)), jnp.float32)
  mask = L.unit_mask(L.estimate(x, est, b), 0.0, 2, 2)

  def loss_packed(x, packed):
    return jnp.sum(L.packed_dense(x, packed, capacity=2, strategy="gather") ** 2)

  def loss_ref(x, w, b):
    return jnp.sum(L.masked_dense(x, w, b, mask) ** 2)

  gx, gp = jax.grad(loss_packed, argnums=(0, 1))(x, L.pack(w, b, est, block_size=2))
  rx, rw, rb = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, b)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gp.weight).reshape(12, 8).T, np.asarray(rw), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gp.bias).reshape(12), np.asarray(rb), rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(gp.u)) and not np.any(np.asarray(gp.v))


def test_jit_vmap_and_leading_dims_agree():
  w, b, est = make_layer(3, 10, 16, 4)
  p = L.pack(w, b, est, block_size=2)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 10)), jnp.float32)
  f = lambda x: L.packed_dense(x, p, threshold=-0.1, capacity=3, strategy="gather")
  ref = f(x)
  chex.assert_trees_all_close(jax.jit(f)(x), ref, atol=1e-6)
  chex.assert_trees_all_close(jax.vmap(jax.vmap(f))(x), ref, atol=1e-6)
  chex.assert_trees_all_close(f(x[0, 0]), ref[0, 0], atol=1e-6)


def _eqns(jaxpr, platform="cpu"):
  """Every equation of a jaxpr, descending into sub-jaxprs (pjit, custom_jvp, ...).

  A platform switch (`_switch.platform_switch`, resolved at lowering) contributes only the
  branch `platform` lowers; tests/test_lowering.py checks the lowered programs hold none.
  """
  from jax.extend.core import jaxprs_in_params

  for eqn in jaxpr.eqns:
    platforms = eqn.params.get("platforms") if eqn.primitive.name == "lrcc_platform_switch" else None
    if platforms:
      hits = [i for i, ps in enumerate(platforms) if ps is not None and platform in ps]
      i = hits[0] if hits else platforms.index(None)
      yield from _eqns(eqn.params["branches"][i].jaxpr, platform)
      continue
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


def _primitive_names(jaxpr):
  return {e.primitive.name for e in _eqns(jaxpr)}


@pytest.mark.parametrize("strategy", ["gather", "dense", "auto"])
@pytest.mark.parametrize("rows", [1, 4])
def test_skipping_paths_are_cond_free(strategy, rows):
  w, b, est = make_layer(5, 16, 32, 4)
  p = L.pack(w, b, est, block_size=4)
  x = jnp.ones((rows, 16))
  fns = {
      "packed": lambda x: L.packed_dense(x, p, threshold=0.1, capacity=2, strategy=strategy),
      "conditional": lambda x: L.conditional_dense(x, w, b, est, capacity=2, block_size=4),
      "mask": lambda x: L.sign_mask(x, est, b),
      "stats": lambda x: L.estimator_stats(x, w, b, est),
      "calibrate": lambda x: L.calibrate_threshold(x, w, b, est),
  }
  for name, fn in fns.items():
    prims = _primitive_names(jax.make_jaxpr(fn)(x).jaxpr)
    bad = {p for p in prims if p in ("cond", "while") or "callback" in p}
    assert not bad, (name, bad)
  jaxpr = jax.make_jaxpr(fns["packed"])(x).jaxpr
  # The selected blocks are read by an XLA gather, or by the native kernel on CPU.
  gathers = any(
      e.primitive.name in ("gather", "ffi_call")
      and any(getattr(v.aval, "shape", None) == p.weight.shape for v in e.invars)
      for e in _eqns(jaxpr)
  )
  # "auto" gathers at one row, and at 4 rows where the fused kernel replaces the dense
  # fallback (4 rows x 2 of 8 blocks: at most one layer of gathers, `_fused.replaces_dense`)
  auto = rows == 1 or (_native.available() and _fused.replaces_dense(rows, 2, 8, _policy.CPU_NATIVE))
  assert gathers == (strategy == "gather" or (strategy == "auto" and auto))


def test_no_recompilation_on_repeated_calls():
  w, b, est = make_layer(6, 12, 24, 4)
  p = L.pack(w, b, est, block_size=2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, p, t):
    return L.packed_dense(x, p, threshold=t, capacity=3)

  rng = np.random.default_rng(0)
  for i in range(4):
    f(jnp.asarray(rng.standard_normal((12,)), jnp.float32), p, jnp.float32(0.1 * i))


def test_bf16_storage_error_is_bounded():
  w, b, est = make_layer(7, 64, 32, 8)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 64)), jnp.float32)
  exact = L.packed_dense(x, L.pack(w, b, est), capacity=8, strategy="gather")
  half = L.packed_dense(x, L.pack(w, b, est, dtype=jnp.bfloat16), capacity=8, strategy="gather")
  # bf16 keeps 8 mantissa bits: |Δz| <= 2^-8 · Σ|x_i w_ij| per unit.
  bound = 2.0**-8 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w)))
  assert np.all(np.abs(np.asarray(half - exact)) <= bound + 1e-6)


def test_pack_accepts_numpy_and_the_jitted_gather_works():
  w, b, est = make_layer(9, 8, 16, 3)
  p = L.pack(np.asarray(w), np.asarray(b), L.LowRankEstimator(np.asarray(est.u), np.asarray(est.v)))
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(p))
  x = jnp.ones((8,))
  got = jax.jit(lambda x: L.packed_dense(x, p, capacity=4, strategy="gather"))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(L.packed_dense(x, L.pack(w, b, est), capacity=4)), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 6, 8, 32, 33, 64])
def test_unit_major_product_equals_the_flax_layout_product(rows):
  from lrcc_jax._packed import unit_major_product

  w, _, _ = make_layer(10, 12, 16, 3)
  x = jnp.asarray(np.random.default_rng(11).standard_normal((rows, 12)), jnp.float32)
  got = jax.jit(unit_major_product)(x, w.T)
  np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6)
  gx = jax.grad(lambda x: unit_major_product(x, w.T).sum())(x)
  np.testing.assert_allclose(np.asarray(gx), np.broadcast_to(np.asarray(w).sum(1), x.shape), rtol=1e-5, atol=1e-6)
  # the transposed orientation (behind barriers) only where it measured faster: up to 32
  # rows at these 12 inputs
  text = jax.jit(unit_major_product).lower(x, w.T).as_text()
  assert ("optimization_barrier" in text) == (rows <= 32)


def test_auto_strategy_rules():
  from lrcc_jax._packed import skip_pays

  assert skip_pays(1, 409, 4096, native=False) and not skip_pays(1, 1700, 4096, native=False)
  assert not skip_pays(1, None, 4096)
  row = 4096 * 4  # one f32 unit row of a 4096-wide layer
  assert skip_pays(2, 410, 4096, block_bytes=row, native=False)  # 20% of the layer, 13 MB
  assert not skip_pays(2, 1024, 4096, block_bytes=row, native=False)  # half the layer
  assert not skip_pays(4, 205, 4096, block_bytes=row, native=False)  # > 2 rows of small blocks
  assert skip_pays(4, 13, 256, block_bytes=16 * row, native=False)  # 16-unit blocks: 20%, 13 MB
  assert not skip_pays(8, 13, 256, block_bytes=16 * row, native=False)  # 40% of the layer
  assert skip_pays(2, 26, 512, block_bytes=32 * row, native=False)  # 8192 wide, 5%: 26 MB
  assert not skip_pays(2, 51, 512, block_bytes=32 * row, native=False)  # 8192 wide, 10%: 53 MB thrashes
  assert not skip_pays(1, 128, 512, block_bytes=32 * row, native=False)  # one row, 67 MB thrashes too


def test_auto_strategy_rules_with_the_native_kernel():
  from lrcc_jax._packed import skip_pays

  big = 16 * 4096 * 4  # blocks of 16 units of 4096 inputs
  assert skip_pays(1, 153, 256, block_bytes=big, native=True)  # one row, 60%
  assert not skip_pays(1, 180, 256, block_bytes=big, native=True)
  assert skip_pays(4, 26, 256, block_bytes=big, native=True)  # 4 rows x 10%: 0.4 layers
  assert not skip_pays(4, 64, 256, block_bytes=big, native=True)  # 4 rows x 25%
  assert skip_pays(128, 13, 256, block_bytes=big, native=True)  # 5% per row, up to 128 rows
  assert not skip_pays(129, 13, 256, block_bytes=big, native=True)
  assert not skip_pays(32, 26, 256, block_bytes=big, native=True)
  assert not skip_pays(1, None, 256, block_bytes=big, native=True)
  # Single units (16 KiB): one row only.
  assert skip_pays(1, 205, 4096, block_bytes=4096 * 4, native=True)
  assert not skip_pays(2, 205, 4096, block_bytes=4096 * 4, native=True)


# ---------------------------------------------------------------------------------------
# Edge properties: every path against the independent numpy reference, exactly.

PATHS = ["gather-native", "gather-xla", "dense", "auto"]


def _run_path(path, x, packed, **kw):
  """`packed_dense` on one path; "-xla" reports the native kernel inactive (as on GPU/TPU or
  without a compiler), so the XLA gathers, grouped for larger selections, run instead."""
  strategy = path.split("-")[0]
  with pytest.MonkeyPatch.context() as mp:
    if path.endswith("-xla"):
      mp.setattr(_native, "active", lambda: False)
    elif path.endswith("-native") and not _native.active():
      pytest.skip(f"native kernel unavailable: {_native.status()['reason']}")
    return L.packed_dense(x, packed, strategy=strategy, **kw)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=scaled_examples(0.5))
@given(int_layers())
def test_every_packed_path_equals_numpy_reference_at_the_edges(path, layer):
  """Guards the selection of every `packed_dense` path at its edges (see `int_layers`):
  estimates equal to the threshold, ties at a binding capacity with blocks > 1 over several
  rows, NaN/±inf in single units. Integer data: the values must match exactly."""
  got = _run_path(path, jnp.asarray(layer.x), layer.packed(), threshold=layer.threshold, capacity=layer.capacity)
  np.testing.assert_array_equal(np.asarray(got), layer.reference())


@pytest.mark.parametrize("path", PATHS)
def test_every_packed_path_at_bisection_size(path):
  """Guards the bisection selection inside the paths (128 rows x 256 blocks of 2 units,
  capacity 37, integer estimates: ties across the boundary in every row), and the XLA
  gathers' multi-group code (128 rows x 37 blocks)."""
  layer = int_layer_like(np.random.default_rng(0), 3, 512, 2, 128, 0.0, 37, 2)
  packed = layer.packed()
  got = _run_path(path, jnp.asarray(layer.x), packed, threshold=0.0, capacity=37)
  np.testing.assert_array_equal(np.asarray(got), layer.reference())


def test_xla_gathers_split_into_several_groups_at_these_sizes():
  """Guards that the "-xla" cases above reach the grouped gathers (more than one group)."""
  from lrcc_jax._packed import group_bounds

  assert len(group_bounds(37, 128 * 2)) > 1
  assert len(group_bounds(6, 5 * 4)) > 1  # int_layers' largest: 5 rows x 6 of 7 blocks of 4


def _loss_grads(fn, x, packed, cot):
  return jax.grad(lambda x, p: jnp.sum(fn(x, p) * cot), argnums=(0, 1))(x, packed)


@pytest.mark.parametrize("path", ["gather-native", "gather-xla", "dense"])
@pytest.mark.parametrize("rows", [1, 5])
def test_packed_path_gradients_equal_masked_reference(path, rows):
  """Guards gradients through each path (the dense fallback's `unit_major_product`
  included): they reach x, the weights and the nonzero bias through computed units only,
  as the masked reference's, and never the estimator."""
  w, b, est = make_layer(12, 9, 16, 3)
  packed = L.pack(w, b, est, block_size=2)
  x = jnp.asarray(np.random.default_rng(13).standard_normal((rows, 9)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(14).standard_normal((rows, 16)), jnp.float32)
  mask = np_unit_mask(np_estimate(x, est.u, est.v, b), -0.05, 3, 2)
  assert 0 < mask.sum() < mask.size
  fn = lambda x, p: _run_path(path, x, p, threshold=-0.05, capacity=3)
  gx, gp = _loss_grads(fn, x, packed, cot)
  rx, rw, rb = np_masked_dense_grads(x, w, b, mask, cot)
  np.testing.assert_allclose(np.asarray(gx), rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gp.weight).reshape(16, 9).T, rw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gp.bias).reshape(16), rb, rtol=1e-5, atol=1e-5)
  assert np.any(rw) and not np.any(np.asarray(gp.u)) and not np.any(np.asarray(gp.v))


def test_pack_stores_the_requested_dtype_and_products_read_it():
  """Guards `pack(dtype=...)`: the weights are stored in bf16 (half the bytes) and every
  path computes with the rounded weights, not silently with the f32 originals."""
  n_in, n_out = 4, 8
  w = np.full((n_in, n_out), 1.0 + 2.0**-10, np.float32)  # rounds to 1.0 in bf16
  b = np.zeros(n_out, np.float32) + 0.5
  est = L.LowRankEstimator(jnp.ones((n_in, 1)), jnp.ones((1, n_out)))
  packed = L.pack(jnp.asarray(w), jnp.asarray(b), est, block_size=2, dtype=jnp.bfloat16)
  assert packed.weight.dtype == jnp.bfloat16
  x = jnp.ones((2, n_in), jnp.float32)
  for strategy in ("gather", "dense"):
    got = np.asarray(L.packed_dense(x, packed, capacity=2, strategy=strategy))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:, :4], np.full((2, 4), 4.5, np.float32))  # 4 · 1.0 + 0.5
    np.testing.assert_array_equal(got[:, 4:], 0.0)
