import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

import lrcc_jax as L
from lrcc_jax._sparse import NATIVE_MIN_RUN, SparseRows, densify, sparse_packed_dense
from lrcc_jax import packed_mlp
from lrcc_jax.nn import ConditionalMLP
from helpers import (
    int_chains, make_layer, np_chain, np_chain_grads, np_estimate, np_unit_mask, scaled_examples,
)
from lrcc_jax import _native


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_sparse_layer_equals_packed_dense_on_dense_and_sparse_inputs(block_size, rows):
  w1, b1, e1 = make_layer(0, 12, 16, 4)
  w2, b2, e2 = make_layer(1, 16, 20, 5)
  p1, p2 = L.pack(w1, b1, e1, block_size=block_size), L.pack(w2, b2, e2, block_size=block_size)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 12)), jnp.float32)
  c1, c2 = 8 // block_size, 6 // block_size
  h1 = sparse_packed_dense(x, p1, threshold=-0.05, capacity=c1)
  ref1 = L.packed_dense(x, p1, threshold=-0.05, capacity=c1)
  chex.assert_shape(h1.indices, (rows, c1 * block_size))
  np.testing.assert_allclose(np.asarray(densify(h1, 16)), np.asarray(ref1), rtol=1e-5, atol=1e-6)
  h2 = sparse_packed_dense(h1, p2, threshold=0.0, capacity=c2)
  ref2 = L.conditional_dense(ref1, w2, b2, e2, capacity=c2, block_size=block_size)
  np.testing.assert_allclose(np.asarray(densify(h2, 20)), np.asarray(ref2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_sizes", [(2, 4, 1), (4, 2, 8), (8, 8, 8)])
def test_tile_reads_across_block_sizes_equal_conditional_dense(block_sizes):
  # Each layer's output block size is the next layer's input tile width.
  widths = (16, 32, 24, 16)
  layers = [make_layer(i, a, b, 5) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
  x = jnp.asarray(np.random.default_rng(7).standard_normal((3, 16)), jnp.float32)
  h, ref = x, x
  for (w, b, e), bs in zip(layers, block_sizes):
    cap = max(1, w.shape[1] // bs // 3)
    h = sparse_packed_dense(h, L.pack(w, b, e, block_size=bs), threshold=-0.02, capacity=cap)
    ref = L.conditional_dense(ref, w, b, e, threshold=-0.02, capacity=cap, block_size=bs)
    assert h.block_size == bs
    np.testing.assert_allclose(np.asarray(densify(h, w.shape[1])), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sparse_rows_block_size_is_static_under_jit():
  w, b, e = make_layer(0, 8, 16, 3)
  p1, p2 = L.pack(w, b, e, block_size=4), L.pack(*make_layer(1, 16, 8, 3), block_size=2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def chain(x):
    h = sparse_packed_dense(x, p1, capacity=2)
    return h, sparse_packed_dense(h, p2, capacity=2)

  h, out = chain(x)
  chain(x + 1.0)
  assert h.block_size == 4 and out.block_size == 2
  assert jax.tree.leaves(h) == [h.indices, h.values]  # block_size is metadata, not a leaf
  np.testing.assert_array_equal(np.asarray(h.indices) % 4, np.tile(np.arange(4), (2, 2)))


def test_sparse_chain_of_mlp_equals_layerwise_conditional_dense():
  m = ConditionalMLP(20, [32, 24, 16], 5, ranks=[8, 6, 4], thresholds=[-0.1, 0.0, 0.0],
                     capacities=[10, 8, 6], rngs=nnx.Rngs(3))
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 20)), jnp.float32)
  packed = m.pack()
  kw = dict(thresholds=m.thresholds, capacities=[10, 8, 6], return_activations=True)
  logits, acts = packed_mlp(x, packed, strategy="sparse", **kw)
  ref_logits, ref_acts = m(x, mode="mask", return_activations=True)
  chex.assert_trees_all_close(acts, ref_acts, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
  jitted = jax.jit(lambda x: packed_mlp(x, packed, strategy="sparse", thresholds=m.thresholds, capacities=[10, 8, 6]))
  chex.assert_trees_all_close(jitted(x), ref_logits, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(packed_mlp(x[0], packed, strategy="sparse", **kw)[0], ref_logits[0], rtol=1e-5, atol=1e-5)


def test_sparse_errors():
  w, b, e = make_layer(0, 6, 8, 2)
  p = L.pack(w, b, e)
  with pytest.raises(ValueError, match="needs a capacity"):
    sparse_packed_dense(jnp.zeros((1, 6)), p, capacity=None)
  with pytest.raises(ValueError, match=r"\(1, 3\) and \(1, 2\)"):
    sparse_packed_dense(SparseRows(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 2))), p, capacity=2)
  with pytest.raises(ValueError, match=r"block_size=4 must divide both the layer's n_in=6 and the 4"):
    sparse_packed_dense(SparseRows(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4)), 4), p, capacity=2)
  with pytest.raises(ValueError, match=r"block_size=2 must divide both the layer's n_in=6 and the 3"):
    sparse_packed_dense(SparseRows(jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)), 2), p, capacity=2)
  m = ConditionalMLP(6, [8], 2, ranks=[2], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="capacity on every layer"):
    packed_mlp(jnp.zeros((1, 6)), m.pack(), thresholds=[0.0], capacities=[None], strategy="sparse")


@pytest.mark.parametrize("block_size", [1, 8])
def test_auto_chain_decision_is_shared_by_packed_mlp_and_the_sweep(block_size, monkeypatch):
  from lrcc_jax import _mlp, _native
  from lrcc_jax.apps import sweep

  caps = [16 // block_size, 16 // block_size]  # half of each 32-wide layer
  m = ConditionalMLP(20, [32, 32], 5, ranks=4, capacities=caps, block_sizes=block_size, rngs=nnx.Rngs(5))
  packed = m.pack()
  # Runs of one input never use the native tile kernel, but these small layers run the fused
  # kernel (`_fused.runs`) at one row whatever the block size.
  expect = _native.active()
  assert _mlp.sparse_chain_pays(1, packed, caps) == expect
  assert sweep._skip_strategy(m) == _mlp.auto_path(1, packed, caps)
  assert (sweep._skip_strategy(m) == "sparse") == expect
  calls = []
  real = _mlp.sparse_packed_dense
  monkeypatch.setattr(_mlp, "sparse_packed_dense", lambda *a, **k: calls.append(1) or real(*a, **k))
  x = jnp.ones((1, 20), jnp.float32)
  _mlp.packed_mlp(x, packed, thresholds=m.thresholds, capacities=caps)
  assert bool(calls) == expect


# ---------------------------------------------------------------------------------------
# Edge properties and gradients of the sparse chain against the numpy reference.


@contextlib.contextmanager
def _with_native(native):
  """The native kernels as built ("native") or reported inactive ("xla")."""
  if native == "native" and not _native.active():
    pytest.skip(f"native kernel unavailable: {_native.status()['reason']}")
  with pytest.MonkeyPatch.context() as mp:
    if native == "xla":
      mp.setattr(_native, "active", lambda: False)
    yield


@pytest.mark.parametrize("native", ["native", "xla"])
@settings(max_examples=scaled_examples(0.5))
@given(int_chains())
def test_sparse_chain_equals_numpy_reference_at_the_edges(native, chain):
  """Guards `sparse_packed_dense` on dense then sparse inputs (tile products with runs of
  the upstream block size, native kernel or XLA) at the selection edges of `int_layers`:
  exact threshold hits, capacity-boundary ties, NaN/±inf single units."""
  l1, l2 = chain
  with _with_native(native):
    h1 = sparse_packed_dense(jnp.asarray(l1.x), l1.packed(), threshold=l1.threshold, capacity=l1.capacity)
    h2 = sparse_packed_dense(h1, l2.packed(), threshold=l2.threshold, capacity=l2.capacity)
  r1, r2 = np_chain(l1.x, chain)
  np.testing.assert_array_equal(np.asarray(densify(h1, l1.w.shape[1])), r1)
  np.testing.assert_array_equal(np.asarray(densify(h2, l2.w.shape[1])), r2)


@pytest.mark.parametrize("native", ["native", "xla"])
@pytest.mark.parametrize("block_sizes", [(1, 1), (2, 4)])
def test_sparse_chain_gradients_equal_numpy_reference(native, block_sizes):
  """Guards gradients through the sparse chain (gathers, tile products, their native JVP):
  they reach x, both layers' weights and nonzero biases through computed units only."""
  (w1, b1, e1), (w2, b2, e2) = make_layer(20, 10, 16, 3), make_layer(21, 16, 16, 4)
  bs1, bs2 = block_sizes
  p1, p2 = L.pack(w1, b1, e1, block_size=bs1), L.pack(w2, b2, e2, block_size=bs2)
  c1, c2 = 8 // bs1, 6 // bs2
  x = jnp.asarray(np.random.default_rng(22).standard_normal((3, 10)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(23).standard_normal((3, 16)), jnp.float32)

  def loss(x, p1, p2):
    h = sparse_packed_dense(x, p1, threshold=-0.05, capacity=c1)
    return jnp.sum(cot * densify(sparse_packed_dense(h, p2, threshold=0.0, capacity=c2), 16))

  with _with_native(native):
    gx, g1, g2 = jax.grad(loss, argnums=(0, 1, 2))(x, p1, p2)
  m1 = np_unit_mask(np_estimate(x, e1.u, e1.v, b1), -0.05, c1, bs1)
  h1 = np.where(m1, np.maximum(np.asarray(x, np.float64) @ np.asarray(w1, np.float64) + np.asarray(b1), 0), 0)
  m2 = np_unit_mask(np_estimate(h1, e2.u, e2.v, b2), 0.0, c2, bs2)
  rx, ((rw1, rb1), (rw2, rb2)), _ = np_chain_grads(x, [(w1, b1), (w2, b2)], [m1, m2], cot)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), rx, **tol)
  for g, rw, rb in ((g1, rw1, rb1), (g2, rw2, rb2)):
    n_blocks, bs, n_in = g.weight.shape
    np.testing.assert_allclose(np.asarray(g.weight).reshape(n_blocks * bs, n_in).T, rw, **tol)
    np.testing.assert_allclose(np.asarray(g.bias).reshape(-1), rb, **tol)
    assert np.any(rw) and not np.any(np.asarray(g.u)) and not np.any(np.asarray(g.v))
