"""The fused native layer (`_fused`, csrc/fused_layer.cc) against numpy, the XLA path, and
under jit/vmap/grad; its lowering appears only for CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lrcc_jax as L
from lrcc_jax import _fused, _native, _packed, _sparse
from lrcc_jax._policy import Policy
from lrcc_jax.apps import lowering_table as T
from tests.helpers import int_chains, int_layers, np_chain

needs_native = pytest.mark.skipif(
    not _native.available(), reason=f"native kernel unavailable: {_native.status()['reason']}"
)
XLA = Policy("cpu", "xla", max_fraction_one_row=1.0, max_gathered_layers=64.0)  # always gathers, in XLA
# Always gathers with the native kernels (the shipped policy runs several rows of these
# half-selected toy layers densely), so the fused kernel is what runs.
NATIVE = Policy("cpu", "native", max_fraction_one_row=1.0, max_gathered_layers=64.0)
# Never gathers, and the fused kernel replaces every dense path up to `_fused.MAX_REPLACE_ROWS`
# rows: the fused kernel past `MAX_ROWS` rows too (its estimate in groups of eight rows).
FUSED = Policy("cpu", "native", max_fraction_one_row=0.0, max_gathered_layers=0.0, fused_small_fraction=1.0)


def _fused_dense(x, p, threshold, capacity):
  return _fused.dense_layer(x, p.weight, p.bias, p.u, p.v, threshold, capacity, _packed._xla_gathered_matvec)


def _fused_sparse(sp, p, threshold, capacity):
  return _fused.sparse_layer(sp.indices, sp.values, sp.block_size, p.weight, p.bias, p.u, p.v, threshold,
                             capacity, _sparse._xla_tile_product)


def _dense_of(idx, vals, n_out):
  rows, k, bs = vals.shape
  out = np.zeros((rows, n_out // bs, bs), np.float64)
  for r in range(rows):
    out[r, np.asarray(idx[r])] = np.asarray(vals[r])
  return out.reshape(rows, n_out)


def _xla_selected(x, p, threshold, capacity):
  """The XLA path's (idx, vals) for dense rows."""
  scores = _fused.xla_scores(x, None, p.u, p.v, p.bias, p.block_size)
  return _packed.gather_selected(x, p, scores, threshold, capacity, kernel="xla")


@needs_native
@settings(max_examples=20, deadline=None)
@given(layer=int_layers())
def test_dense_kernel_equals_numpy_reference_at_ties_thresholds_and_nonfinite(layer):
  # Integer layers: every estimate is exact, so ties, scores equal to the threshold and
  # NaN/inf estimates are decided exactly as the contract says, whatever the summation order.
  p = layer.packed()
  k = layer.capacity or p.weight.shape[0]
  idx, vals = jax.jit(_fused_dense, static_argnums=3)(jnp.asarray(layer.x), p, layer.threshold, k)
  assert np.all(np.diff(np.asarray(idx), axis=1) > 0)  # ascending, distinct
  np.testing.assert_array_equal(_dense_of(idx, vals, p.n_out), layer.reference())
  ref_idx, ref_vals = _xla_selected(jnp.asarray(layer.x), p, layer.threshold, k)
  np.testing.assert_array_equal(idx, ref_idx)  # the same blocks as top_k, ties included
  np.testing.assert_array_equal(vals, ref_vals)


@needs_native
@settings(max_examples=12, deadline=None)
@given(layers=int_chains(n_layers=2))
def test_sparse_kernel_equals_numpy_chain(layers):
  first, second = layers
  p1, p2 = first.packed(), second.packed()
  sp = L.sparse_packed_dense(jnp.asarray(first.x), p1, threshold=first.threshold, capacity=first.capacity,
                             policy=XLA)
  idx, vals = jax.jit(_fused_sparse, static_argnums=3)(sp, p2, second.threshold, second.capacity)
  np.testing.assert_array_equal(_dense_of(idx, vals, p2.n_out), np_chain(first.x, layers)[1])


@needs_native
@pytest.mark.parametrize("n_in,n_out,bs,k,rows", [
    (37, 24, 1, 5, 1), (64, 64, 16, 2, 3), (50, 60, 4, 15, 2), (33, 48, 16, 3, 1),
    (100, 30, 3, 10, 5), (20, 12, 4, 3, 1),  # capacity = n_blocks
    (50, 60, 4, 15, 9), (64, 64, 16, 2, 16), (100, 30, 3, 10, 12), (33, 96, 32, 2, 8)])
@pytest.mark.parametrize("sparse_in", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_random_layers_match_the_xla_path(n_in, n_out, bs, k, rows, sparse_in, dtype):
  rng = np.random.default_rng(n_in * n_out + k)
  w = jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), jnp.float32)
  b = jnp.asarray(0.1 * rng.standard_normal(n_out), jnp.float32)
  p = L.pack(w, b, L.fit_svd(w, min(6, n_in, n_out)), block_size=bs, dtype=dtype)
  x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
  if sparse_in:  # an upstream layer's SparseRows, blocks of 2 or single units
    b_up = 2 if n_in % 2 == 0 else 1
    eye = jnp.eye(n_in, dtype=jnp.float32)
    up = L.pack(eye, jnp.zeros(n_in), L.fit_svd(eye, 4), block_size=b_up)
    x = L.sparse_packed_dense(x, up, threshold=-1.0, capacity=max(1, n_in // (3 * b_up)), policy=XLA)
  got = jax.jit(lambda x, t: L.densify(L.sparse_packed_dense(x, p, threshold=t, capacity=k, policy=FUSED),
                                       p.n_out))
  want = jax.jit(lambda x, t: L.densify(L.sparse_packed_dense(x, p, threshold=t, capacity=k, policy=XLA),
                                        p.n_out))
  for t in (0.0, -0.05, 0.1):
    np.testing.assert_allclose(got(x, t), want(x, t), rtol=1e-5, atol=1e-5)
  text = jax.jit(got).lower(x, 0.0).as_text()
  assert ("lrcc_fused_sparse_layer" if sparse_in else "lrcc_fused_layer") in text


@needs_native
@pytest.mark.parametrize("rank", [1, 16, 25, 48, 64, 70, 131])
@pytest.mark.parametrize("sparse_in", [False, True])
@pytest.mark.parametrize("rows", [3, 11])
def test_estimator_ranks_past_one_vector_match_the_xla_path(rank, sparse_in, rows):
  # x U runs in column groups of up to 64 with a masked last chunk of 16 lanes (up to
  # seven dense rows, and sparse ones), or eight dense rows at a time on U padded to a
  # multiple of 16 columns: ranks on and off those edges, and inputs both dense and
  # gathered (rows of U by index).
  rng = np.random.default_rng(rank)
  n_in, n_out = 150, 160
  w = jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), jnp.float32)
  b = jnp.asarray(0.1 * rng.standard_normal(n_out), jnp.float32)
  est = L.LowRankEstimator(u=jnp.asarray(rng.standard_normal((n_in, rank)), jnp.float32) / 10,
                           v=jnp.asarray(rng.standard_normal((rank, n_out)), jnp.float32) / 10)
  p = L.pack(w, b, est, block_size=1)
  x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
  if sparse_in:
    eye = jnp.eye(n_in, dtype=jnp.float32)
    up = L.pack(eye, jnp.zeros(n_in), L.fit_svd(eye, 4), block_size=1)
    x = L.sparse_packed_dense(x, up, threshold=-1.0, capacity=37, policy=XLA)
  for policy in (FUSED, XLA):
    sp = jax.jit(lambda x, policy=policy: L.sparse_packed_dense(x, p, capacity=40, policy=policy))(x)
    if policy is FUSED:
      got = sp
  np.testing.assert_array_equal(got.indices, sp.indices)
  np.testing.assert_allclose(got.values, sp.values, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("block_size, lanes", [(16, (0, 7, 15)), (32, (3, 16, 31))])
def test_few_rows_block_scores_of_whole_vectors_rank_a_nan_unit_first(block_size, lanes):
  """Guards the per-row block maxima in vectors of 16 (1-7 rows, blocks of 16 and 32): a NaN
  estimate in any one lane of a block makes its score NaN, ranked first; the others are
  their blocks' largest unit, as in the XLA path."""
  rng = np.random.default_rng(block_size)
  n_out = 8 * block_size
  w = jnp.asarray(rng.standard_normal((64, n_out)) / 8, jnp.float32)
  bias = rng.standard_normal(n_out).astype(np.float32) / 4
  nan_blocks = (1, 4, 6)
  for blk, lane in zip(nan_blocks, lanes, strict=True):
    bias[blk * block_size + lane] = np.nan
  p = L.pack(w, jnp.asarray(bias), L.fit_svd(w, 8), block_size=block_size)
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  idx, vals = jax.jit(_fused_dense, static_argnums=3)(x, p, 0.0, 4)
  ref_idx, ref_vals = _xla_selected(x, p, 0.0, 4)
  np.testing.assert_array_equal(idx, ref_idx)
  assert all(set(nan_blocks) <= set(np.asarray(row).tolist()) for row in idx)
  np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-5)  # NaN where the bias is


@needs_native
def test_nan_input_and_nan_estimates_are_computed_and_propagate():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
  p = L.pack(w, jnp.zeros(32), L.fit_svd(w, 4), block_size=4)
  x = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32).at[1, 3].set(jnp.nan)
  idx, vals = _fused_dense(x, p, 0.0, 3)
  ref_idx, ref_vals = _xla_selected(x, p, 0.0, 3)
  np.testing.assert_array_equal(idx[1], [0, 1, 2])  # all NaN scores: the lowest indices
  assert np.isnan(np.asarray(vals[1])).all()
  assert not np.isnan(np.asarray(vals[0])).any()
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-5)


@needs_native
def test_threshold_is_an_operand_one_compilation():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((24, 32)), jnp.float32)
  p = L.pack(w, jnp.zeros(32), L.fit_svd(w, 4), block_size=2)
  x = jnp.asarray(rng.standard_normal((1, 24)), jnp.float32)
  traces = []

  @jax.jit
  def f(x, t):
    traces.append(1)
    return L.packed_dense(x, p, threshold=t, capacity=5)

  outs = [np.asarray(f(x, jnp.float32(t))) for t in (-1.0, 0.0, 0.5, 3.0)]
  assert len(traces) == 1
  assert (outs[0] != 0).sum() >= (outs[1] != 0).sum() >= (outs[3] != 0).sum()
  assert "lrcc_fused_layer" in f.lower(x, 0.0).as_text()


@needs_native
def test_jit_vmap_grad_agree_with_the_xla_path():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.standard_normal((20, 24)) / 4, jnp.float32)
  b = jnp.asarray(rng.standard_normal(24) / 10, jnp.float32)
  p = L.pack(w, b, L.fit_svd(w, 5), block_size=4)
  x = jnp.asarray(rng.standard_normal((3, 2, 20)), jnp.float32)
  fused = lambda x, p: L.packed_dense(x, p, capacity=3, strategy="gather")
  xla = lambda x, p: L.packed_dense(x, p, capacity=3, strategy="gather", policy=XLA)
  np.testing.assert_allclose(jax.vmap(fused, (0, None))(x, p), xla(x, p), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda x, p: jnp.sum(jnp.sin(f(x, p)))
  for argnums in (0, 1):
    g1 = jax.grad(loss(fused), argnums)(x, p)
    g2 = jax.grad(loss(xla), argnums)(x, p)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  # a batch of weights takes the XLA form
  ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
  np.testing.assert_allclose(jax.vmap(fused, (None, 0))(x[0], ps), jax.vmap(xla, (None, 0))(x[0], ps),
                             rtol=1e-5, atol=1e-6)
  # vmap over sparse rows folds into rows
  sp = L.sparse_packed_dense(x[0], p, capacity=3)
  w2 = jnp.asarray(rng.standard_normal((24, 24)) / 4, jnp.float32)
  p2 = L.pack(w2, b, L.fit_svd(w2, 5), block_size=4)
  f2 = lambda i, v: L.densify(L.sparse_packed_dense(L.SparseRows(i[None], v[None], 4), p2, capacity=2), 24)[0]
  got = jax.vmap(f2)(sp.indices, sp.values)
  want = L.densify(L.sparse_packed_dense(sp, p2, capacity=2, policy=XLA), 24)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@needs_native
def test_kernel_only_in_cpu_lowerings():
  p = L.pack(jnp.ones((32, 32)) / 32, jnp.zeros(32), L.fit_svd(jnp.eye(32), 4), block_size=4)
  x = jnp.ones((1, 32), jnp.float32)
  fn = lambda x: L.densify(L.sparse_packed_dense(L.sparse_packed_dense(x, p, capacity=2), p, capacity=2), 32)
  assert "lrcc_fused" in T.lowered_text(fn, x, ("cpu",))
  for platforms in (("cuda",), ("tpu",)):
    assert "lrcc_fused" not in T.lowered_text(fn, x, platforms)
  both = T.lowered_text(fn, x, ("cpu", "cuda"))
  assert "lrcc_fused" in both


def test_chain_path_is_one_static_decision():
  from lrcc_jax._mlp import chain_path

  small = [((1000, 1, 784), jnp.float32), ((600, 1, 1000), jnp.float32)]
  # without the native library XLA's gathers take at most 40% of a row's blocks: dense
  assert chain_path("cpu", 1, small, [600, 350], jnp.float32) == ("sparse" if _native.available() else "dense")
  assert chain_path("cpu", 512, small, [600, 350], jnp.float32) == "dense"
  assert chain_path("cpu", 1, small, [None, None], jnp.float32) in ("layerwise", "dense")


@needs_native
@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 4), bs=st.sampled_from([1, 2, 5, 16]), n_blocks=st.integers(1, 9),
       n_in=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_random_shapes_match_the_xla_path(rows, bs, n_blocks, n_in, seed):
  rng = np.random.default_rng(seed)
  n_out = bs * n_blocks
  k = int(rng.integers(1, n_blocks + 1))
  w = jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)
  p = L.pack(w, jnp.asarray(rng.standard_normal(n_out), jnp.float32), L.fit_svd(w, 1), block_size=bs)
  x = jnp.asarray(rng.standard_normal((rows, n_in)), jnp.float32)
  idx, vals = _fused_dense(x, p, 0.0, k)
  ref_idx, ref_vals = _xla_selected(x, p, 0.0, k)
  scores = np.asarray(_fused.xla_scores(x, None, p.u, p.v, p.bias, bs))
  if np.min(np.abs(scores)) > 1e-4 and np.min(np.abs(np.diff(np.sort(scores, axis=1), axis=1)), initial=1) > 1e-4:
    np.testing.assert_array_equal(idx, ref_idx)  # away from rounding ties the choice is the same
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-4, atol=1e-4)


def test_replaces_dense_by_layers_up_to_8_rows_and_small_fractions_up_to_128():
  """Guards both clauses of `replaces_dense` and their bounds: at most one layer of per-row
  gathers up to `MAX_ROWS` rows, and at most 10.1% of the layer per row up to
  `MAX_REPLACE_ROWS` rows (the shipped CPU policy)."""
  from lrcc_jax._policy import CPU_NATIVE

  replaces = lambda rows, cap: _fused.replaces_dense(rows, cap, 1000, CPU_NATIVE)
  assert replaces(4, 250) and replaces(8, 125) and not replaces(4, 251)  # one layer
  assert not replaces(9, 110)  # 0.99 layers but past MAX_ROWS, and 11% per row
  assert replaces(64, 101) and replaces(128, 101) and not replaces(64, 102)  # 10.1% of 1000
  assert not replaces(129, 10)  # past MAX_REPLACE_ROWS
  assert not _fused.replaces_dense(64, 60, 1000, None)
  off = Policy("cpu", "native", max_fraction_one_row=0.6, max_gathered_layers=0.6, fused_max_layers=1.0)
  assert not _fused.replaces_dense(64, 60, 1000, off)  # fused_small_fraction defaults to 0


@needs_native
@pytest.mark.parametrize("capacity, fused", [(15, True), (26, False)])
def test_auto_runs_the_fused_kernel_for_many_rows_of_small_fractions(capacity, fused):
  """Guards the small-fraction replacement end to end: 16 rows of single units at 15 of 256
  (5.9%) run one fused call and give the dense path's values; at 26 (10.2%) the dense
  fallback with its native epilogue runs instead."""
  rng = np.random.default_rng(capacity)
  w = jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32)
  b = jnp.asarray(rng.standard_normal(256) / 4, jnp.float32)
  p = L.pack(w, b, L.fit_svd(w, 16), block_size=1)
  x = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
  auto = jax.jit(lambda x: L.packed_dense(x, p, capacity=capacity))
  text = auto.lower(x).as_text()
  assert ("lrcc_fused_layer" in text) == fused
  assert ("lrcc_estimated_masked_relu" in text) == (not fused)
  dense = L.packed_dense(x, p, capacity=capacity, strategy="dense")
  np.testing.assert_allclose(np.asarray(auto(x)), np.asarray(dense), rtol=1e-5, atol=1e-5)
