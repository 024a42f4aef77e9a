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


# --- The gather-path kernels (`_packed.gathered_matvec` on TPU and GPU), in interpret mode.

import functools  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lrcc_jax import _packed, _pallas, _policy  # noqa: E402


def _through_packed_dense(monkeypatch, kernel_name, kernel_fn, x, p, capacity, threshold):
  """`packed_dense`'s gather path with `kernel_fn` (interpret mode) as every platform's kernel."""
  monkeypatch.setattr(_policy, "gather_kernel", lambda *a, **k: kernel_name)
  attr = {"mosaic": "gathered_matvec_tpu", "triton": "gathered_matvec_gpu"}[kernel_name]
  monkeypatch.setattr(_pallas, attr, functools.partial(kernel_fn, interpret=True))
  return L.packed_dense(x, p, threshold=threshold, capacity=capacity, strategy="gather")


def _masked_reference(x, w, b, est, block_size, capacity, threshold):
  scores = _mask.block_scores(L.estimate(x, est, b), block_size)
  sel = _mask.block_selection(scores, threshold, capacity)
  return L.masked_dense(x, w, b, _mask.expand_blocks(sel, block_size))


@settings(max_examples=4, deadline=None)
@given(
    block_size=st.sampled_from([8, 16]),
    n_in=st.sampled_from([128, 384]),
    n_blocks=st.integers(2, 5),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_tpu_gather_kernel_matches_masked_dense(block_size, n_in, n_blocks, rows, seed):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(_pallas, "TPU_TILE_BYTES", block_size * 128 * 4)  # force several n_in tiles
    w, b, est = make_layer(seed, n_in, n_blocks * block_size, 4)
    p = L.pack(w, b, est, block_size=block_size)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((rows, n_in)), jnp.float32)
    capacity = max(1, n_blocks // 2)
    got = _through_packed_dense(mp, "mosaic", _pallas.gathered_matvec_tpu, x, p, capacity, 0.0)
  want = _masked_reference(x, w, b, est, block_size, capacity, 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@settings(max_examples=4, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    n_in=st.sampled_from([16, 48, 64]),
    n_blocks=st.integers(2, 5),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_gpu_gather_kernel_matches_masked_dense(block_size, n_in, n_blocks, rows, seed):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(_pallas, "GPU_TILE_ELEMENTS", 16 * block_size)  # force several n_in tiles
    w, b, est = make_layer(seed, n_in, n_blocks * block_size, 2)
    p = L.pack(w, b, est, block_size=block_size)
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((rows, n_in)), jnp.float32)
    capacity = max(1, n_blocks // 2)
    got = _through_packed_dense(mp, "triton", _pallas.gathered_matvec_gpu, x, p, capacity, 0.0)
  want = _masked_reference(x, w, b, est, block_size, capacity, 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_gather_kernels_have_xla_gradients_and_batch():
  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((4, 8, 128)), jnp.float32)
  idx = jnp.asarray([[0, 2], [1, 3]], jnp.int32)
  x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
  kernel = _pallas.differentiable_matvec(
      functools.partial(_pallas.gathered_matvec_tpu, interpret=True), _packed._xla_gathered_matvec
  )
  ref = _packed._xla_gathered_matvec
  loss = lambda f: lambda w, x: jnp.sum(f(w, idx, x) ** 2)
  for g, r in zip(jax.grad(loss(kernel), (0, 1))(w, x), jax.grad(loss(ref), (0, 1))(w, x)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
  xs = jnp.stack([x, -x])
  got = jax.vmap(lambda x: kernel(w, idx, x))(xs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.vmap(lambda x: ref(w, idx, x))(xs)), rtol=1e-4, atol=1e-4)


def test_kernel_fit_rules():
  assert _pallas.tpu_tile(16, 4096, jnp.float32) == 4096
  assert _pallas.tpu_tile(8, 4096, jnp.bfloat16) is None  # bf16 packs 16 rows per tile
  assert _pallas.tpu_tile(4, 4096, jnp.float32) is None  # below 8 rows: XLA gathers
  assert _pallas.tpu_tile(16, 100, jnp.float32) is None  # n_in not in lanes of 128
  assert _pallas.gpu_tile(1, 4096) == 4096 and _pallas.gpu_tile(16, 4096) == 256
  assert _pallas.gpu_tile(3, 4096) is None and _pallas.gpu_tile(1, 24) is None
  with pytest.raises(ValueError, match="LRCC_JAX_PALLAS=0"):
    _pallas.gathered_matvec_tpu(jnp.ones((2, 4, 128)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 128)))


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
