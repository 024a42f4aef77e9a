import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcc_jax as L
from helpers import int_layer_like, make_layer, np_estimate


def _data(seed=0, n_in=20, n_out=30, rank=4, rows=64):
  w, b, est = make_layer(seed, n_in, n_out, rank)
  x = jnp.asarray(np.random.default_rng(seed + 10).standard_normal((rows, n_in)), jnp.float32)
  z = np.asarray(x @ w + b[None])
  z_hat = np.asarray(L.estimate(x, est, b))
  return x, w, b, est, z, z_hat


@pytest.mark.parametrize("threshold", [-0.3, 0.0, 0.2])
def test_estimator_stats_match_numpy(threshold):
  x, w, b, est, z, z_hat = _data()
  stats = jax.jit(L.estimator_stats)(x, w, b, est, threshold)
  active, computed = z > 0, z_hat > threshold
  np.testing.assert_allclose(float(stats["recall"]), (active & computed).sum() / active.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["precision"]), (active & computed).sum() / computed.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["computed_fraction"]), computed.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["density"]), active.mean(), rtol=1e-6)


def test_full_rank_stats_are_perfect():
  x, w, b, _, z, _ = _data()
  est = L.fit_svd(w, 20)
  stats = L.estimator_stats(x, w, b, est)
  assert float(stats["recall"]) > 0.999 and float(stats["precision"]) > 0.999


def test_empty_sets_give_recall_and_precision_one():
  w = jnp.zeros((3, 4))
  b = -jnp.ones((4,))
  stats = L.estimator_stats(jnp.ones((2, 3)), w, b, L.fit_svd(w, 1))
  assert float(stats["recall"]) == 1.0 and float(stats["precision"]) == 1.0
  assert float(stats["density"]) == 0.0


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99, 1.0])
def test_calibrated_threshold_is_the_largest_reaching_recall(target):
  x, w, b, est, z, z_hat = _data(seed=3)
  t = float(jax.jit(lambda x: L.calibrate_threshold(x, w, b, est, recall=target))(x))
  active = z > 0
  recall_at = lambda t: (active & (z_hat > t)).sum() / active.sum()
  assert recall_at(t) >= target
  # Any larger threshold that changes the selection loses recall below the target.
  above = np.sort(z_hat[active & (z_hat > t)])
  assert recall_at(above[0]) < target


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_calibrate_recall_out_of_range(bad):
  x, w, b, est, _, _ = _data()
  with pytest.raises(ValueError, match=rf"recall={bad} must lie in \(0, 1\]"):
    L.calibrate_threshold(x, w, b, est, recall=bad)


def test_calibrate_wrong_width():
  x, w, b, est, _, _ = _data()
  with pytest.raises(ValueError, match=r"x has shape \(64, 19\).*n_in=20"):
    L.calibrate_threshold(x[:, :19], w, b, est)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0])
def test_estimator_stats_at_exact_zeros_and_threshold_ties(threshold):
  """Guards the strict comparisons of the statistics on integer data, where many exact
  outputs are exactly 0 (not active) and many estimates equal the threshold (not computed),
  and a NaN estimate (computed)."""
  layer = int_layer_like(np.random.default_rng(5), 4, 24, 2, 16, threshold, None, 1)
  layer.v[0, 3] = np.inf  # 0 · inf = NaN where a row's (x u)[0] is 0
  z = layer.x.astype(np.float64) @ layer.w + layer.b
  z_hat = np_estimate(layer.x, layer.u, layer.v, layer.b)
  active, computed = z > 0, ~(z_hat <= threshold)
  assert (z == 0).any() and (z_hat == threshold).any() and np.isnan(z_hat).any()
  stats = L.estimator_stats(jnp.asarray(layer.x), jnp.asarray(layer.w), jnp.asarray(layer.b), layer.est, threshold)
  hit = (active & computed).sum()
  np.testing.assert_allclose(float(stats["recall"]), hit / active.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["precision"]), hit / computed.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["computed_fraction"]), computed.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["density"]), active.mean(), rtol=1e-6)


def test_recall_and_precision_with_a_single_active_or_computed_unit():
  """Guards the empty-set guards' boundaries: with exactly one active unit that is not
  computed the recall is 0 (not the empty-set 1), and likewise the precision with exactly
  one computed unit that is not active."""
  est = L.LowRankEstimator(jnp.eye(2), jnp.eye(2))
  x = jnp.array([[1.0, 0.0]])
  w = jnp.array([[-1.0, 0.0], [0.0, 0.0]])
  # z = (-1, 0) + b, z_hat = (1, 0) + b: unit 0 computed not active, unit 1 neither.
  s = L.estimator_stats(x, w, jnp.zeros(2), est)
  assert float(s["precision"]) == 0.0 and float(s["recall"]) == 1.0
  # z = (1, 0), z_hat = (1, 0) under threshold 2: unit 0 active not computed, unit 1 neither.
  s = L.estimator_stats(x, -w, jnp.zeros(2), est, threshold=2.0)
  assert float(s["recall"]) == 0.0 and float(s["precision"]) == 1.0


def test_calibrate_threshold_equals_numpy_reference_with_exact_zeros():
  """Guards `calibrate_threshold`'s active set (z > 0 strictly: exact zeros are inactive)
  and its order statistic on integer data full of exact zeros and ties."""
  layer = int_layer_like(np.random.default_rng(6), 4, 24, 2, 16, 0.0, None, 1)
  z = layer.x.astype(np.float64) @ layer.w + layer.b
  z_hat = np_estimate(layer.x, layer.u, layer.v, layer.b)
  assert (z == 0).any()
  for recall in (0.01, 0.5, 0.9, 1.0):  # 0.01: the first (largest) estimate, m = 1
    vals = np.sort(z_hat[z > 0])[::-1]
    m = int(np.ceil(recall * len(vals)))
    want = np.nextafter(np.float32(vals[m - 1]), np.float32(-np.inf))
    got = L.calibrate_threshold(jnp.asarray(layer.x), jnp.asarray(layer.w), jnp.asarray(layer.b), layer.est, recall=recall)
    assert float(got) == float(want), recall


def test_calibrate_recall_is_keyword_only():
  """Guards the signature: `recall` cannot be passed positionally (it reads like a threshold)."""
  x, w, b, est, _, _ = _data()
  with pytest.raises(TypeError):
    L.calibrate_threshold(x, w, b, est, 0.9)


def test_calibrate_threshold_without_active_units_is_plus_inf():
  """Guards the documented empty case: with no active unit every threshold has recall 1,
  and the largest one is +inf (not -inf, which would compute everything)."""
  w = jnp.zeros((3, 4))
  t = L.calibrate_threshold(jnp.ones((2, 3)), w, -jnp.ones((4,)), L.fit_svd(w, 1))
  assert float(t) == np.inf


def test_calibrate_threshold_with_a_single_active_unit():
  """Guards the one-active-unit boundary: the threshold sits just below its estimate."""
  est = L.LowRankEstimator(jnp.eye(2), jnp.eye(2))
  w = jnp.array([[1.0, 0.0], [0.0, -1.0]])
  t = L.calibrate_threshold(jnp.array([[0.75, 1.0]]), w, jnp.zeros(2), est, recall=0.5)
  assert float(t) == float(np.nextafter(np.float32(0.75), np.float32(-np.inf)))


def _one_input_layer(z, z_hat):
  """n_in = 1, x = [[1]]: the exact pre-activations are `z` and the estimates `z_hat`."""
  x = jnp.ones((1, 1), jnp.float32)
  kernel = jnp.asarray([z], jnp.float32)
  est = L.LowRankEstimator(jnp.ones((1, 1), jnp.float32), jnp.asarray([z_hat], jnp.float32))
  return x, kernel, jnp.zeros((len(z),), jnp.float32), est


def test_stats_with_one_active_unit_that_is_computed():
  """One active unit, computed, and one inactive unit, skipped: recall = precision = 1."""
  stats = L.estimator_stats(*_one_input_layer([1.0, -1.0], [1.0, -1.0]), threshold=0.0)
  assert float(stats["recall"]) == 1.0 and float(stats["precision"]) == 1.0
  assert float(stats["computed_fraction"]) == 0.5 and float(stats["density"]) == 0.5


def test_calibrate_threshold_counts_only_positive_pre_activations_as_active():
  """A unit whose exact value is 0 is zero after the ReLU, whatever its estimate."""
  t = L.calibrate_threshold(*_one_input_layer([1.0, 0.0], [0.5, -5.0]), recall=1.0)
  assert float(t) == float(np.nextafter(np.float32(0.5), np.float32(-np.inf)))


def test_calibrate_threshold_keeps_at_least_one_unit_at_a_small_recall():
  """recall 0.1 of 3 active units needs m = 1: just below the largest estimate."""
  t = L.calibrate_threshold(*_one_input_layer([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]), recall=0.1)
  assert float(t) == float(np.nextafter(np.float32(3.0), np.float32(-np.inf)))
