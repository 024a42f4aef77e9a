import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrcc_jax as L
from lrcc_jax._estimator import subspace_refit


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_fit_svd_is_the_optimal_rank_r_approximation():
  w = _rand(0, 20, 12)
  est = L.fit_svd(jnp.asarray(w), 5)
  chex.assert_shape(est.u, (20, 5))
  chex.assert_shape(est.v, (5, 12))
  s = np.linalg.svd(w, compute_uv=False)
  err = np.linalg.norm(w - np.asarray(est.u @ est.v))
  np.testing.assert_allclose(err, np.sqrt(np.sum(s[5:] ** 2)), rtol=1e-4)


def test_full_rank_reproduces_kernel():
  w = _rand(1, 9, 13)
  est = L.fit_svd(jnp.asarray(w), 9)
  np.testing.assert_allclose(np.asarray(est.u @ est.v), w, atol=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 13, 100])
def test_fit_svd_rank_out_of_range_names_values(rank):
  with pytest.raises(ValueError, match=rf"rank={rank}.*\(12, 13\).*\[1, 12\]"):
    L.fit_svd(jnp.zeros((12, 13)), rank)


def test_fit_svd_rejects_non_int_rank_and_bad_kernel():
  with pytest.raises(ValueError, match="rank must be a static Python int"):
    L.fit_svd(jnp.zeros((4, 4)), 2.5)
  with pytest.raises(ValueError, match=r"kernel must be 2-D.*\(4,\)"):
    L.fit_svd(jnp.zeros((4,)), 1)


def test_estimate_matches_numpy_for_any_leading_dims():
  w, b = _rand(2, 16, 8), _rand(3, 8)
  est = L.fit_svd(jnp.asarray(w), 3)
  x = _rand(4, 2, 3, 16)
  got = L.estimate(jnp.asarray(x), est, jnp.asarray(b))
  want = (x @ np.asarray(est.u)) @ np.asarray(est.v) + b
  chex.assert_shape(got, (2, 3, 8))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(L.estimate(jnp.asarray(x), est)), want - b, rtol=1e-4, atol=1e-4)


def test_estimate_wrong_width_names_shapes():
  est = L.fit_svd(jnp.ones((16, 8)), 2)
  with pytest.raises(ValueError, match=r"x has shape \(3, 15\).*n_in=16"):
    L.estimate(jnp.zeros((3, 15)), est)


def test_sign_mask_threshold_and_nan_is_computed_not_hidden():
  est = L.LowRankEstimator(jnp.eye(3), jnp.eye(3))
  x = jnp.array([[0.5, -0.2, 0.0]])
  np.testing.assert_array_equal(np.asarray(L.sign_mask(x, est)), [[True, False, False]])
  np.testing.assert_array_equal(
      np.asarray(L.sign_mask(x, est, threshold=-0.3)), [[True, True, True]]
  )
  np.testing.assert_array_equal(
      np.asarray(L.sign_mask(x, est, jnp.array([-1.0, 0.0, 0.1]))), [[False, False, True]]
  )
  # A NaN estimate is never a confident "inactive": the unit is computed.
  nan_est = L.LowRankEstimator(jnp.eye(3), jnp.array([[1.0, 0, 0], [0, jnp.nan, 0], [0, 0, 1]]))
  np.testing.assert_array_equal(np.asarray(L.sign_mask(x, nan_est)), [[True, True, False]])


def _proj_err(x, w, est):
  return np.linalg.norm(x @ (w - np.asarray(est.u @ est.v)))


def test_data_aware_beats_svd_on_its_inputs():
  rng = np.random.default_rng(5)
  w = rng.standard_normal((30, 20)).astype(np.float32)
  x = (rng.standard_normal((200, 30)) * np.linspace(0.01, 3.0, 30)).astype(np.float32)
  svd = L.fit_svd(jnp.asarray(w), 4)
  da = L.fit_data_aware(jnp.asarray(w), 4, jnp.asarray(x))
  assert _proj_err(x, w, da) < 0.9 * _proj_err(x, w, svd)


def test_data_aware_singular_inputs_are_safe():
  rng = np.random.default_rng(6)
  w = rng.standard_normal((20, 10)).astype(np.float32)
  x = rng.standard_normal((50, 20)).astype(np.float32)
  x[:, :8] = 0.0  # constant border pixels: X^T X is singular
  est = L.fit_data_aware(jnp.asarray(w), 3, jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(est.u))) and np.all(np.isfinite(np.asarray(est.v)))
  assert _proj_err(x, w, est) <= 1.01 * _proj_err(x, w, L.fit_svd(jnp.asarray(w), 3))
  full = L.fit_data_aware(jnp.asarray(w), 10, jnp.asarray(x))
  np.testing.assert_allclose(x @ np.asarray(full.u @ full.v), x @ w, rtol=1e-3, atol=1e-3)


def test_data_aware_bad_inputs():
  w = jnp.zeros((6, 5))
  with pytest.raises(ValueError, match=r"x has shape \(10, 7\).*n_in=6"):
    L.fit_data_aware(w, 2, jnp.zeros((10, 7)))
  with pytest.raises(ValueError, match=r"at least rank=4 calibration rows, got 3"):
    L.fit_data_aware(w, 4, jnp.zeros((3, 6)))
  with pytest.raises(ValueError, match=r"rank=6"):
    L.fit_data_aware(w, 6, jnp.zeros((10, 6)))


def test_estimator_functions_jit_and_vmap():
  w = jnp.asarray(_rand(7, 10, 6))
  x = jnp.asarray(_rand(8, 4, 10))
  est = jax.jit(L.fit_svd, static_argnums=1)(w, 3)
  chex.assert_trees_all_close(est, L.fit_svd(w, 3), atol=1e-5)
  batched = jax.vmap(lambda r: L.estimate(r, est))(x)
  chex.assert_trees_all_close(batched, L.estimate(x, est), atol=1e-5)
  jitted = jax.jit(L.fit_data_aware, static_argnums=1)(w, 3, x)
  eager = L.fit_data_aware(w, 3, x)
  chex.assert_trees_all_close(jitted.u @ jitted.v, eager.u @ eager.v, rtol=1e-3, atol=1e-3)


def test_subspace_refit_is_near_optimal():
  kernel = jax.random.normal(jax.random.key(0), (48, 40)) / 7.0
  exact = L.fit_svd(kernel, 6)
  # Unchanged kernel: the warm start reproduces the exact factors.
  same = subspace_refit(kernel, exact)
  chex.assert_shape((same.u, same.v), ((48, 6), (6, 40)))
  np.testing.assert_allclose(same.u @ same.v, exact.u @ exact.v, atol=1e-4)
  # A drifted kernel: within 1% of the Eckart-Young optimum in Frobenius norm.
  moved = kernel + 0.02 * jax.random.normal(jax.random.key(1), kernel.shape)
  best = L.fit_svd(moved, 6)
  fast = subspace_refit(moved, exact)
  err_best = float(jnp.linalg.norm(moved - best.u @ best.v))
  err_fast = float(jnp.linalg.norm(moved - fast.u @ fast.v))
  assert err_best <= err_fast <= 1.01 * err_best


def test_estimator_rank_is_the_number_of_factor_columns():
  """Guards `LowRankEstimator.rank` (r of u (n_in, r)), with n_in, r, n_out all distinct."""
  est = L.fit_svd(jnp.asarray(_rand(5, 7, 5)), 3)
  assert est.rank == 3 and est.u.shape == (7, 3) and est.v.shape == (3, 5)


def _np_data_aware(w, rank, x, ridge):
  """The documented rule of `fit_data_aware`, in float64 numpy: whiten, truncate, unwhiten."""
  w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
  cov = x.T @ x / x.shape[0]
  lam = ridge * np.trace(cov) / w.shape[0]
  evals, evecs = np.linalg.eigh(cov + lam * np.eye(w.shape[0]))
  p, s, qt = np.linalg.svd((evecs * np.sqrt(evals)) @ evecs.T @ w, full_matrices=False)
  return (evecs / np.sqrt(evals)) @ evecs.T @ (p[:, :rank] * s[:rank]) @ qt[:rank]


@pytest.mark.parametrize("ridge", [1e-4, 0.5])
def test_data_aware_equals_numpy_reference_of_the_documented_rule(ridge):
  """Guards the whitening formula (C = XᵀX/N + λI, λ = ridge·tr/n_in, U = C^{-1/2} P_r S_r)
  against an independent float64 computation, with a ridge large enough to matter."""
  w, x = _rand(30, 12, 9), _rand(31, 40, 12)
  est = L.fit_data_aware(jnp.asarray(w), 4, jnp.asarray(x), ridge=ridge)
  np.testing.assert_allclose(np.asarray(est.u @ est.v), _np_data_aware(w, 4, x, ridge), rtol=2e-3, atol=2e-4)


def test_data_aware_edge_inputs():
  """Guards the input checks' boundaries (exactly `rank` rows is enough; ridge must be
  > 0, 0 included in the rejection) and all-zero inputs (only the ridge keeps C invertible:
  the factors stay finite and reduce to the kernel's SVD)."""
  w = jnp.asarray(_rand(32, 6, 5))
  est = L.fit_data_aware(w, 3, jnp.asarray(_rand(33, 3, 6)))
  assert est.u.shape == (6, 3)
  with pytest.raises(ValueError, match=r"ridge=0.0 must be positive"):
    L.fit_data_aware(w, 2, jnp.ones((4, 6)), ridge=0.0)
  zero = L.fit_data_aware(w, 2, jnp.zeros((4, 6)))
  assert np.all(np.isfinite(np.asarray(zero.u))) and np.all(np.isfinite(np.asarray(zero.v)))
  svd = L.fit_svd(w, 2)
  np.testing.assert_allclose(np.asarray(zero.u @ zero.v), np.asarray(svd.u @ svd.v), rtol=1e-3, atol=1e-4)


def test_subspace_refit_keeps_the_rank():
  """Guards that the refit returns factors of the incoming rank (not n_out)."""
  w = jnp.asarray(_rand(40, 12, 9))
  est = subspace_refit(w, L.fit_svd(w, 3))
  assert est.rank == 3 and est.u.shape == (12, 3) and est.v.shape == (3, 9)
