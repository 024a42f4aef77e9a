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
    np_unit_mask, reference_mask, relu_dense, scaled_examples, selection_margin,
)


@settings(max_examples=scaled_examples(0.5))  # costly: shapes vary, so every example compiles
@given(layer_cases())
def test_conditional_dense_equals_masked_reference(case):
  n_in, n_out, rank, block_size, capacity, threshold, batch, seed = case
  w, b, est = make_layer(seed, n_in, n_out, rank)
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(batch + (n_in,)), jnp.float32)
  z_hat = np.asarray(L.estimate(x, est, b))
  assume(selection_margin(z_hat, threshold, capacity, block_size) > 1e-4)
  mask = reference_mask(z_hat, threshold, capacity, block_size)
  got = L.conditional_dense(x, w, b, est, threshold=threshold, capacity=capacity, block_size=block_size)
  chex.assert_shape(got, batch + (n_out,))
  np.testing.assert_allclose(np.asarray(got), np.asarray(L.masked_dense(x, w, b, mask)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got), np.where(mask, relu_dense(x, w, b), 0.0), rtol=1e-4, atol=1e-4)
  if capacity is not None:
    per_row = mask.reshape(-1, n_out).sum(-1)
    assert np.all(per_row <= capacity * block_size)


def test_masked_dense_matches_numpy():
  w, b, _ = make_layer(0, 7, 5, 2)
  x = np.random.default_rng(1).standard_normal((3, 7)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0]] * 3, bool)
  np.testing.assert_allclose(
      np.asarray(L.masked_dense(jnp.asarray(x), w, b, jnp.asarray(mask))),
      np.where(mask, relu_dense(x, w, b), 0.0), rtol=1e-5, atol=1e-6,
  )


def test_full_rank_estimator_reproduces_dense_relu_layer():
  w, b, est = make_layer(2, 12, 10, 10)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 12)), jnp.float32)
  dense = jax.nn.relu(x @ w + b[None])
  np.testing.assert_allclose(np.asarray(L.conditional_dense(x, w, b, est)), np.asarray(dense), rtol=1e-4, atol=1e-5)


def test_capacity_keeps_the_highest_scoring_blocks():
  w, b, est = make_layer(4, 8, 12, 8)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((12, 8)), jnp.float32)
  z_hat = np.asarray(L.estimate(x, est, b))
  y = np.asarray(L.conditional_dense(x, w, b, est, threshold=-np.inf, capacity=2, block_size=3))
  scores = z_hat.reshape(12, 4, 3).max(-1)
  chosen = np.abs(y).reshape(12, 4, 3).sum(-1) > 0
  top2 = np.argsort(-scores, axis=-1)[:, :2]
  for r in range(12):
    assert set(np.flatnonzero(chosen[r])) <= set(top2[r])


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(block_size=5), r"block_size=5 must be a positive divisor of n_out=12"),
        (dict(block_size=0), r"block_size=0"),
        (dict(capacity=0), r"capacity=0 is outside \[1, 12\]"),
        (dict(capacity=13), r"capacity=13 is outside \[1, 12\]"),
        (dict(capacity=5, block_size=3), r"capacity=5 is outside \[1, 4\].*12 / 3"),
        (dict(capacity=2.5), r"capacity must be a static Python int"),
    ],
)
def test_bad_block_and_capacity_name_values(kwargs, pattern):
  w, b, est = make_layer(0, 6, 12, 2)
  with pytest.raises(ValueError, match=pattern):
    L.conditional_dense(jnp.zeros((2, 6)), w, b, est, **kwargs)


def test_shape_errors_name_shapes():
  w, b, est = make_layer(0, 6, 12, 2)
  with pytest.raises(ValueError, match=r"x has shape \(2, 5\).*n_in=6"):
    L.conditional_dense(jnp.zeros((2, 5)), w, b, est)
  with pytest.raises(ValueError, match=r"bias has shape \(11,\).*\(12,\)"):
    L.conditional_dense(jnp.zeros((2, 6)), w, b[:11], est)
  with pytest.raises(ValueError, match=r"estimator v has shape \(2, 12\).*n_out=10"):
    L.conditional_dense(jnp.zeros((2, 6)), w[:, :10], b[:10], est)
  with pytest.raises(ValueError, match=r"x has shape \(2, 5\)"):
    L.masked_dense(jnp.zeros((2, 5)), w, b, jnp.ones((12,), bool))


def test_jit_and_vmap_equal_eager():
  w, b, est = make_layer(6, 10, 8, 3)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 10)), jnp.float32)
  f = lambda x: L.conditional_dense(x, w, b, est, threshold=-0.1, capacity=3, block_size=2)
  eager = f(x)
  chex.assert_trees_all_close(jax.jit(f)(x), eager, atol=1e-6)
  chex.assert_trees_all_close(jax.vmap(f)(x), eager, atol=1e-6)


def test_gradients_equal_masked_reference_and_skip_estimator():
  w, b, est = make_layer(8, 9, 6, 2)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 9)), jnp.float32)
  mask = L.unit_mask(L.estimate(x, est, b), -0.05, 4, 1)

  def loss_cond(x, w, b, est):
    return jnp.sum(L.conditional_dense(x, w, b, est, threshold=-0.05, capacity=4) ** 2)

  def loss_ref(x, w, b):
    return jnp.sum(L.masked_dense(x, w, b, mask) ** 2)

  g = jax.grad(loss_cond, argnums=(0, 1, 2, 3))(x, w, b, est)
  g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(x, w, b)
  chex.assert_trees_all_close(g[:3], g_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g[3], jax.tree.map(jnp.zeros_like, est))
  # Skipped units get no gradient.
  dead_cols = ~np.asarray(mask).any(0)
  assert np.all(np.asarray(g[1])[:, dead_cols] == 0)


def test_nan_input_propagates_instead_of_a_confident_zero():
  w, b, est = make_layer(10, 4, 6, 2)
  x = jnp.array([[1.0, jnp.nan, 0.0, 0.5], [1.0, 0.0, 0.0, 0.5]])
  y = np.asarray(L.conditional_dense(x, w, b, est, capacity=2))
  assert np.isnan(y[0]).any()
  assert np.isfinite(y[1]).all()


def test_no_recompilation_on_repeated_calls():
  w, b, est = make_layer(11, 10, 8, 3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, w, b, est, t):
    return L.conditional_dense(x, w, b, est, threshold=t, capacity=3, block_size=2)

  rng = np.random.default_rng(0)
  for i in range(4):
    f(jnp.asarray(rng.standard_normal((3, 10)), jnp.float32), w, b, est, jnp.float32(-0.1 * i))


@given(
    st.integers(1, 40), st.integers(1, 6), st.data(),
)
def test_top_k_membership_is_top_k_with_ties_to_lower_index(n, rows, data):
  from lrcc_jax import _mask

  k = data.draw(st.integers(1, n))
  # Few distinct values, NaN and infinities: ties everywhere.
  pool = st.sampled_from([-np.inf, -2.0, -0.0, 0.0, 1.5, 1.5, 3.0, np.inf, np.nan])
  vals = np.array(data.draw(st.lists(pool, min_size=rows * n, max_size=rows * n)), np.float32)
  scores = jnp.asarray(vals.reshape(rows, n))
  got = np.asarray(_mask.top_k_membership(scores, k))
  _, idx = jax.lax.top_k(_mask.ranking_scores(scores), k)
  want = np.zeros((rows, n), bool)
  np.put_along_axis(want, np.asarray(idx), True, axis=-1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows,n", [(8, 8), (16, 8), (8, 64), (4, 4096), (16, 4096)])
def test_block_selection_compiles_for_short_rows_and_matches_top_k(rows, n):
  # Regression: the bisection on 8-wide rows (>= 8 of them) never finished compiling;
  # (4, 4096) takes top_k and (16, 4096) the bisection: both must agree with numpy.
  from lrcc_jax import _mask

  scores = jnp.asarray(np.random.default_rng(rows + n).standard_normal((rows, n)), jnp.float32)
  got = np.asarray(jax.jit(lambda s: _mask.block_selection(s, -np.inf, 3))(scores))
  want = np.zeros((rows, n), bool)
  np.put_along_axis(want, np.argsort(-np.asarray(scores), axis=-1, kind="stable")[:, :3], True, axis=-1)
  np.testing.assert_array_equal(got, want)


@settings(max_examples=scaled_examples(0.5))
@given(int_layers())
def test_conditional_dense_equals_numpy_reference_at_the_edges(layer):
  """Guards `conditional_dense` (the mask mode) at the selection edges of `int_layers`:
  threshold hits, capacity-boundary ties over several rows and blocks, NaN/±inf units."""
  got = L.conditional_dense(
      jnp.asarray(layer.x), jnp.asarray(layer.w), jnp.asarray(layer.b), layer.est,
      threshold=layer.threshold, capacity=layer.capacity, block_size=layer.block_size,
  )
  np.testing.assert_array_equal(np.asarray(got), layer.reference())


def test_conditional_dense_at_bisection_size():
  """Guards `conditional_dense` where the selection is the bisection (128 x 256 blocks)."""
  layer = int_layer_like(np.random.default_rng(1), 3, 512, 2, 128, 1.0, 37, 2)
  got = L.conditional_dense(
      jnp.asarray(layer.x), jnp.asarray(layer.w), jnp.asarray(layer.b), layer.est,
      threshold=1.0, capacity=37, block_size=2,
  )
  np.testing.assert_array_equal(np.asarray(got), layer.reference())


def test_conditional_dense_gradients_equal_numpy_reference():
  """Guards the mask mode's gradients against the independent reference (nonzero bias)."""
  w, b, est = make_layer(15, 9, 16, 3)
  x = jnp.asarray(np.random.default_rng(16).standard_normal((5, 9)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(17).standard_normal((5, 16)), jnp.float32)
  mask = np_unit_mask(np_estimate(x, est.u, est.v, b), -0.05, 3, 2)
  f = lambda x, w, b: jnp.sum(cot * L.conditional_dense(x, w, b, est, threshold=-0.05, capacity=3, block_size=2))
  got = jax.grad(f, argnums=(0, 1, 2))(x, w, b)
  for g, r in zip(got, np_masked_dense_grads(x, w, b, mask, cot)):
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5)
