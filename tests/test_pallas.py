import jax.numpy as jnp
import numpy as np
import pytest

import lrcc_jax as L
from lrcc_jax import _mask
from lrcc_jax._pallas import block_sparse_dense_masked, block_sparse_dense_prefetch
from helpers import int_layer_like, make_layer, np_block_mask, np_estimate, np_masked_dense


@pytest.mark.parametrize("rows", [1, 8])
def test_masked_kernel_matches_masked_dense(rows):
  w, b, est = make_layer(0, 128, 64, 8)
  p = L.pack(w, b, est, block_size=8)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, 128)), jnp.float32)
  scores = _mask.block_scores(L.estimate(x, est, b), 8)  # (rows, 8)
  block_mask = scores[0] > jnp.median(scores[0])  # half the blocks, shared by the rows
  got = block_sparse_dense_masked(x, p.weight, p.bias, block_mask, interpret=True)
  unit = _mask.expand_blocks(jnp.broadcast_to(block_mask[None], scores.shape), 8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(L.masked_dense(x, w, b, unit)), rtol=1e-5, atol=1e-5)
  assert not bool(jnp.all(block_mask))  # some block really was skipped


def test_prefetch_kernel_matches_packed_dense_at_batch_1():
  w, b, est = make_layer(2, 128, 64, 8)
  p = L.pack(w, b, est, block_size=8)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128)), jnp.float32)
  scores = _mask.block_scores(L.estimate(x, est, b), 8)
  idx = _mask.top_blocks(scores, 3)[0]
  got = block_sparse_dense_prefetch(x, p.weight, p.bias, idx, interpret=True)
  # with threshold -inf the contract's mask is exactly the capacity's top blocks
  want = L.packed_dense(x, p, threshold=-jnp.inf, capacity=3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kernel_shape_errors():
  w, b, est = make_layer(0, 16, 16, 2)
  p = L.pack(w, b, est, block_size=4)
  with pytest.raises(ValueError, match=r"block_mask has shape \(3,\)"):
    block_sparse_dense_masked(jnp.ones((1, 16)), p.weight, p.bias, jnp.ones((3,), bool), interpret=True)
  with pytest.raises(ValueError, match=r"x has shape \(1, 15\)"):
    block_sparse_dense_prefetch(jnp.ones((1, 15)), p.weight, p.bias, jnp.arange(2), interpret=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_pallas_kernels_equal_numpy_reference_at_the_edges(seed):
  """Guards both Pallas kernels (interpret mode) on an integer layer at batch 1 whose
  estimates hit the threshold and tie at the capacity boundary: the masked kernel with the
  reference's block mask, the prefetch kernel with `top_blocks`' indices, which must be the
  reference's ranking (ties to the lower index)."""
  layer = int_layer_like(np.random.default_rng(seed), 3, 32, 2, 1, 0.0, 3, 4)
  p = layer.packed()
  x = jnp.asarray(layer.x)
  block_mask = np_block_mask(np_estimate(layer.x, layer.u, layer.v, layer.b), 0.0, 3, 4)[0]
  got = block_sparse_dense_masked(x, p.weight, p.bias, jnp.asarray(block_mask), interpret=True)
  np.testing.assert_array_equal(np.asarray(got), layer.reference())
  scores = _mask.block_scores(L.estimate(x, layer.est, jnp.asarray(layer.b)), 4)
  idx = np.asarray(_mask.top_blocks(scores, 3)[0])
  top = np_block_mask(np_estimate(layer.x, layer.u, layer.v, layer.b), -np.inf, 3, 4)[0]
  np.testing.assert_array_equal(idx, np.flatnonzero(top))
  got = block_sparse_dense_prefetch(x, p.weight, p.bias, jnp.asarray(idx), interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np_masked_dense(layer.x, layer.w, layer.b, np.repeat(top, 4)[None]))
