"""`packed_mlp` (the functional core's whole-network skip mode) against the numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import lrcc_jax as L
from helpers import int_chains, make_layer, np_chain, np_chain_grads, np_estimate, np_unit_mask, scaled_examples
from lrcc_jax import packed_mlp
from lrcc_jax._mlp import PackedMLP


@pytest.mark.parametrize("strategy", ["sparse", "layerwise"])
@settings(max_examples=scaled_examples(0.35))
@given(int_chains())
def test_packed_mlp_equals_numpy_reference_at_the_edges(strategy, chain):
  """Guards both chain strategies at the selection edges of `int_layers` (threshold hits,
  capacity-boundary ties, NaN/±inf units): hidden activations and logits, exactly."""
  rng = np.random.default_rng(0)
  n_last = chain[-1].w.shape[1]
  head_w, head_b = rng.integers(-2, 3, (n_last, 3)).astype(np.float32), np.array([1.0, -1.0, 0.0], np.float32)
  packed = PackedMLP(tuple(l.packed() for l in chain), jnp.asarray(head_w), jnp.asarray(head_b))
  logits, acts = packed_mlp(
      jnp.asarray(chain[0].x), packed, thresholds=[l.threshold for l in chain],
      capacities=[l.capacity for l in chain], return_activations=True, strategy=strategy,
  )
  ref = np_chain(chain[0].x, chain)
  for got, want in zip(acts, ref):
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(logits), ref[-1] @ head_w + head_b)


@pytest.mark.parametrize("strategy", ["sparse", "layerwise"])
def test_packed_mlp_gradients_equal_numpy_reference(strategy):
  """Guards gradients through the whole skip-mode network: x, every hidden layer's weights
  and nonzero biases and the head, as the masked reference's."""
  (w1, b1, e1), (w2, b2, e2) = make_layer(30, 10, 16, 3), make_layer(31, 16, 12, 4)
  hw, hb = make_layer(32, 12, 5, 2)[:2]
  packed = PackedMLP((L.pack(w1, b1, e1, block_size=2), L.pack(w2, b2, e2)), hw, hb)
  x = jnp.asarray(np.random.default_rng(33).standard_normal((3, 10)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(34).standard_normal((3, 5)), jnp.float32)
  kw = dict(thresholds=[-0.05, 0.0], capacities=[4, 5], strategy=strategy)
  gx, gp = jax.grad(lambda x, p: jnp.sum(cot * packed_mlp(x, p, **kw)), argnums=(0, 1))(x, packed)
  m1 = np_unit_mask(np_estimate(x, e1.u, e1.v, b1), -0.05, 4, 2)
  h1 = np.where(m1, np.maximum(np.asarray(x, np.float64) @ np.asarray(w1, np.float64) + np.asarray(b1), 0), 0)
  m2 = np_unit_mask(np_estimate(h1, e2.u, e2.v, b2), 0.0, 5, 1)
  dh2 = np.asarray(cot, np.float64) @ np.asarray(hw, np.float64).T
  rx, ((rw1, rb1), (rw2, rb2)), (_, h2) = np_chain_grads(x, [(w1, b1), (w2, b2)], [m1, m2], dh2)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), rx, **tol)
  np.testing.assert_allclose(np.asarray(gp.head_kernel), h2.T @ np.asarray(cot, np.float64), **tol)
  np.testing.assert_allclose(np.asarray(gp.head_bias), np.asarray(cot).sum(0), **tol)
  for g, rw, rb in zip(gp.layers, (rw1, rw2), (rb1, rb2)):
    n_blocks, bs, n_in = g.weight.shape
    np.testing.assert_allclose(np.asarray(g.weight).reshape(n_blocks * bs, n_in).T, rw, **tol)
    np.testing.assert_allclose(np.asarray(g.bias).reshape(-1), rb, **tol)
    assert np.any(rw)
