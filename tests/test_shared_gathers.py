"""Batches that share their gathers: the native kernel's shared (block-major) mode.

The shared mode must give bit-identical values to the per-row mode (same sums in the same
order), match the XLA form and numpy, survive duplicated and out-of-range block indices,
compose with jit and vmap, appear only in CPU lowerings, and be chosen by the policy from
static shapes only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcc_jax as L
from lrcc_jax import _fused, _native, _packed, _policy, _sparse
from lrcc_jax.apps import lowering_table as T

needs_native = pytest.mark.skipif(
  not _native.available(), reason=f"native kernel unavailable: {_native.status()['reason']}"
)
PER_ROW = dataclasses.replace(_policy.CPU_NATIVE, shared_min_rows=0)
SHARED = dataclasses.replace(_policy.CPU_NATIVE, shared_min_rows=1)


def _selections(kind, rng, rows, n_blocks, k):
  if kind == "identical":
    one = np.sort(rng.choice(n_blocks, k, replace=False))
    return np.tile(one, (rows, 1))
  if kind == "overlapping":  # drawn from a pool of k + 2 blocks
    pool = rng.choice(n_blocks, min(n_blocks, k + 2), replace=False)
    return np.stack([np.sort(rng.choice(pool, k, replace=False)) for _ in range(rows)])
  if kind == "disjoint":
    perm = rng.permutation(n_blocks)[: rows * k]
    return np.sort(perm.reshape(rows, k), axis=1)
  if kind == "duplicates":  # cannot come out of top_k, but the kernel must not care
    return rng.integers(0, 2, (rows, k))
  if kind == "clamped":  # out of range on both sides: the kernel clamps
    return rng.integers(-3, n_blocks + 4, (rows, k))
  raise AssertionError(kind)


def _numpy(w, out, starts, values, b_in):
  """z[r, o] = W[clip(out[r, o])][:, cols(r)] @ values[r], in float64."""
  rows, k = out.shape
  n_blocks, _, n_in = w.shape
  z = np.zeros((rows, k, w.shape[1]))
  for r in range(rows):
    cols = (np.clip(starts[r], 0, n_in - b_in)[:, None] + np.arange(b_in)).reshape(-1)
    for o in range(k):
      z[r, o] = w[np.clip(out[r, o], 0, n_blocks - 1)][:, cols].astype(np.float64) @ values[r]
  return z


def _modes(w, out, starts, values, b_in, xla):
  fn = lambda shared: jax.jit(  # noqa: E731
    lambda w, o, s, v: _native.tile_product(w, o, s, v, b_in, xla, shared=shared)
  )
  return np.asarray(fn(False)(w, out, starts, values)), np.asarray(fn(True)(w, out, starts, values))


KINDS = ["identical", "overlapping", "disjoint", "duplicates", "clamped"]


@needs_native
@pytest.mark.parametrize("b_out", [1, 4, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_equals_per_row_with_dense_inputs(b_out, kind):
  rng = np.random.default_rng(b_out * 7 + KINDS.index(kind))
  rows, n_blocks, k, n_in = 5, 12, 2, 37  # n_in: a tail past the vectors of 16
  w = rng.standard_normal((n_blocks, b_out, n_in)).astype(np.float32)
  out = _selections(kind, rng, rows, n_blocks, k).astype(np.int32)
  x = rng.standard_normal((rows, n_in)).astype(np.float32)
  starts = np.zeros((rows, 1), np.int32)
  per_row, shared = _modes(w, out, starts, x, n_in, _packed._dense_input_product)
  np.testing.assert_array_equal(shared, per_row)
  np.testing.assert_allclose(shared, _numpy(w, out, starts, x, n_in), rtol=1e-5, atol=1e-5)
  if kind != "clamped":  # XLA wraps negative indices; the kernel clamps them
    xla = _packed._xla_gathered_matvec(jnp.asarray(w), jnp.asarray(out), jnp.asarray(x))
    np.testing.assert_allclose(shared, xla, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("b_out", [1, 4, 16])
@pytest.mark.parametrize("b_in", [1, 4, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_equals_per_row_with_sparse_inputs(b_out, b_in, kind):
  rng = np.random.default_rng(100 * b_out + 10 * b_in + KINDS.index(kind))
  rows, n_blocks, k, runs, n_tiles = 4, 13, 3, 3, 6
  n_in = n_tiles * b_in
  w = rng.standard_normal((n_blocks, b_out, n_in)).astype(np.float32)
  out = _selections(kind, rng, rows, n_blocks, k).astype(np.int32)
  if kind == "identical":  # the same inputs too, as for duplicated rows
    tiles = np.tile(np.sort(rng.choice(n_tiles, runs, replace=False)), (rows, 1))
  else:
    tiles = np.stack([np.sort(rng.choice(n_tiles, runs, replace=False)) for _ in range(rows)])
  starts = (tiles * b_in).astype(np.int32)
  if kind == "clamped":
    starts[0, -1] = n_in + 5  # past the end: clamped to the last run
  values = rng.standard_normal((rows, runs * b_in)).astype(np.float32)
  per_row, shared = _modes(w, out, starts, values, b_in, _sparse._xla_tile_product)
  np.testing.assert_array_equal(shared, per_row)
  np.testing.assert_allclose(shared, _numpy(w, out, starts, values, b_in), rtol=1e-5, atol=1e-5)
  if kind != "clamped":
    xla = _sparse._xla_tile_product(jnp.asarray(w), out, starts, values, b_in=b_in)
    np.testing.assert_allclose(shared, xla, rtol=1e-5, atol=1e-5)


@needs_native
def test_shared_mode_under_vmap_jit_and_grad():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((6, 4, 32)), jnp.float32)
  out = jnp.asarray([[0, 2, 5], [2, 3, 5]], jnp.int32)
  starts = jnp.asarray([[0, 16], [8, 24]], jnp.int32)
  vb = jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32)
  xla = _sparse._xla_tile_product

  def fn(shared):
    return lambda v: _native.tile_product(w, out, starts, v, 8, xla, shared=shared)

  ref = jax.vmap(lambda v: xla(w, out, starts, v, b_in=8))(vb)
  got = jax.jit(jax.vmap(fn(True)))(vb)
  np.testing.assert_array_equal(got, jax.jit(jax.vmap(fn(False)))(vb))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda v: jnp.sum(jnp.sin(fn(True)(v))))(vb[0])
  g_ref = jax.grad(lambda v: jnp.sum(jnp.sin(xla(w, out, starts, v, b_in=8))))(vb[0])
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def _mlp(block_size=16, width=128, capacity=2, seed=0):
  rng = np.random.default_rng(seed)
  layers = []
  for _ in range(3):
    kernel = jnp.asarray(rng.standard_normal((width, width)) / np.sqrt(width), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(width), jnp.float32)
    layers.append(L.pack(kernel, bias, L.fit_svd(kernel, 8), block_size=block_size))
  head = jnp.asarray(rng.standard_normal((width, 10)), jnp.float32), jnp.zeros(10, jnp.float32)
  return L.PackedMLP(tuple(layers), *head), [capacity] * 3


@needs_native
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_public_paths_give_identical_values_in_both_modes(block_size):
  packed, caps = _mlp(block_size, capacity=max(1, 32 // block_size))
  rng = np.random.default_rng(block_size)
  base = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
  # rows from one distribution (overlapping selections), and a repeated row
  x = jnp.concatenate([base + 0.3 * jnp.asarray(rng.standard_normal((5, 128))), base], 0)
  x = x.astype(jnp.float32)
  th = [-0.05] * 3

  def run(policy, strategy="sparse"):
    return jax.jit(
      lambda x: L.packed_mlp(
        x, packed, thresholds=th, capacities=caps, strategy=strategy, policy=policy
      )
    )(x)

  shared, per_row = run(SHARED), run(PER_ROW)
  np.testing.assert_array_equal(shared, per_row)
  xla = run(dataclasses.replace(_policy.CPU_XLA))
  np.testing.assert_allclose(shared, xla, rtol=1e-4, atol=1e-4)
  layer = packed.layers[0]
  one = lambda p: jax.jit(  # noqa: E731
    lambda x: L.packed_dense(
      x, layer, threshold=-0.05, capacity=caps[0], strategy="gather", policy=p
    )
  )(x)
  np.testing.assert_array_equal(one(SHARED), one(PER_ROW))
  mask = L.unit_mask(
    L.estimate(x, layer.estimator, jnp.reshape(layer.bias, -1)), -0.05, caps[0], block_size
  )
  kernel = jnp.reshape(layer.weight, (-1, 128)).T
  np.testing.assert_allclose(
    one(SHARED), L.masked_dense(x, kernel, jnp.reshape(layer.bias, -1), mask), rtol=1e-4, atol=1e-4
  )


@needs_native
@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_shared_target_lowers_for_cpu_only(platform):
  packed, caps = _mlp()
  # More rows than the fused kernel takes (`_fused.MAX_ROWS`), and a policy that gathers.
  x = jnp.zeros((_fused.MAX_ROWS + 1, 128), jnp.float32)
  gathers = dataclasses.replace(
    SHARED, max_gathered_layers=64.0, max_union_fraction=1.0, small_block_max_rows=64
  )
  text = T.lowered_text(
    lambda x: L.packed_mlp(
      x, packed, thresholds=[0.0] * 3, capacities=caps, strategy="sparse", policy=gathers
    ),
    x,
    (platform,),
  )
  assert (_native.TARGET_SHARED in text) == (platform == "cpu")
  assert (platform == "cpu") == ("lrcc_tile_product" in text)
  assert not T.control_flow_in(text)
  one = T.lowered_text(
    lambda x: L.packed_mlp(x, packed, thresholds=[0.0] * 3, capacities=caps, strategy="sparse"),
    x[:1],
    (platform,),
  )
  assert _native.TARGET_SHARED not in one  # one row: nothing to share


def test_batch_mode_for_key_shapes():
  nat, xla, block = _policy.CPU_NATIVE, _policy.CPU_XLA, 16 * 4096 * 4
  k = 26  # 10% of 256 blocks of 16: the 4096-wide MLP of the benchmarks
  assert _policy.batch_mode(nat, 1, k, 256, block) == "per_row"
  assert _policy.batch_mode(nat, 4, k, 256, block) == "shared"
  assert _policy.batch_mode(nat, 8, k, 256, block) == "shared"  # union 57% of the layer
  # union 82-100%, but 10% of the flops in blocks of 64 KiB: shared up to 128 rows
  assert _policy.batch_mode(nat, 16, k, 256, block) == "shared"
  assert _policy.batch_mode(nat, 128, k, 256, block) == "shared"
  assert _policy.batch_mode(nat, 129, k, 256, block) == "dense"  # past small_fraction_max_rows
  assert _policy.batch_mode(nat, 16, 64, 256, block) == "dense"  # 25% per row
  assert _policy.batch_mode(nat, 16, 30, 256, block) == "shared"  # 11.7% <= 12%
  assert _policy.batch_mode(nat, 16, 31, 256, block) == "dense"  # 12.1%
  assert _policy.batch_mode(nat, 16, 410, 4096, 4096 * 4) == "dense"  # 10% in single units: small blocks
  assert _policy.batch_mode(nat, 8, None, 256, block) == "dense"
  assert _policy.batch_mode(xla, 1, k, 256, block) == "per_row"
  assert _policy.batch_mode(xla, 8, k, 256, block) == "dense"
  for p in (_policy.CUDA_PALLAS, _policy.TPU_PALLAS, PER_ROW):  # no shared mode there
    assert _policy.batch_mode(p, 8, 2, 256, block) == "per_row"
  assert _policy.batch_mode(SHARED, 1, k, 256, block) == "shared"
  assert _policy.union_fraction(8, 0.1) == pytest.approx(1 - 0.9**8)
  assert _policy.union_fraction(1, 0.3) == pytest.approx(0.3)


@needs_native
def test_planning_uses_the_shared_mode():
  shape, f32 = (256, 16, 4096), jnp.float32
  assert _policy.plan_layer("cpu", "auto", 8, 26, shape, f32, f32).gather
  assert _policy.plan_layer("cpu", "auto", 16, 26, shape, f32, f32).gather
  assert not _policy.plan_layer("cpu", "auto", 16, 64, shape, f32, f32).gather
  assert not _policy.plan_layer("cpu", "auto", 8, 26, shape, f32, f32, PER_ROW).gather
  layers = [(shape, f32)] * 4
  assert _policy.plan_chain("cpu", 8, layers, [26] * 4, f32, 2)
  assert not _policy.plan_chain("cpu", 8, layers, [26] * 4, f32, 2, PER_ROW)
  assert not _policy.plan_chain("cuda", 8, layers, [26] * 4, f32, 2)
  assert _policy.native_shared(2, f32) and not _policy.native_shared(1, f32)
  assert not _policy.native_shared(8, f32, PER_ROW)


def test_policy_files_without_the_new_fields_still_load(tmp_path):
  """A policy tuned before the shared mode existed loads with it off."""
  old = dataclasses.asdict(_policy.CPU_NATIVE)
  del old["shared_min_rows"], old["max_union_fraction"], old["shared_max_fraction"]
  del old["fused_max_layers"]
  path = tmp_path / "p.json"
  text = _policy.policy_to_json([_policy.CPU_NATIVE], "kind")
  data = __import__("json").loads(text)
  data["policies"] = [old]
  path.write_text(__import__("json").dumps(data))
  (loaded,) = _policy.load_policy_file(path, "kind")
  assert loaded.shared_min_rows == 0 and loaded.max_union_fraction == 0.0
  assert loaded.shared_max_fraction == 0.0 and loaded.fused_max_layers == 0.0
