import chex
import jax.numpy as jnp
import numpy as np
import pytest

import lrcc_jax as L
from lrcc_jax._trained import fit_trained


def _layer(seed, n=1024, n_in=32, n_out=24, k=6):
  """A layer whose exact rank-r fits waste rank on units that are never active.

  Inputs are nonnegative and lie near a k-dim subspace (structured, like images or ReLU
  outputs). Half the units have large weights and a bias of -30: they are always off, but
  they carry most of the variance of `x W`, so the least-squares fits spend rank on them.
  Returns (calibration rows, held-out rows, kernel, bias).
  """
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((k, n_in)) / np.sqrt(k)
  x = np.maximum(rng.standard_normal((n, k)) @ basis, 0) + 0.02 * rng.standard_normal((n, n_in))
  w = rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
  b = 0.1 * rng.standard_normal(n_out)
  dead = np.arange(n_out) < n_out // 2
  w[:, dead] *= 3.0
  b[dead] = -30.0
  f = lambda a: jnp.asarray(a, jnp.float32)
  return f(x[: n // 2]), f(x[n // 2:]), f(w), f(b)


def _held_out(est, x_cal, x_test, w, b):
  t = L.calibrate_threshold(x_cal, w, b, est, recall=0.99)
  s = L.estimator_stats(x_test, w, b, est, t)
  return float(s["computed_fraction"]), float(s["recall"])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("init", ["data_aware", "svd"])
def test_trained_computes_fewer_units_than_its_init_at_the_same_recall(init, seed):
  x_cal, x_test, w, b = _layer(seed)
  start = L.fit_data_aware(w, 3, x_cal) if init == "data_aware" else L.fit_svd(w, 3)
  c0, r0 = _held_out(start, x_cal, x_test, w, b)
  c1, r1 = _held_out(fit_trained(w, b, 3, x_cal, init=init), x_cal, x_test, w, b)
  # Held-out rows: the recall stays at the target (no overfitting of the calibration)...
  assert r1 >= 0.98 and r0 >= 0.98
  # ...and the trained estimator computes clearly fewer units.
  assert c1 < c0 - 0.01, (c0, c1)


def test_shapes_cost_and_canonical_form():
  x_cal, _, w, b = _layer(0)
  est = fit_trained(w, b, 3, x_cal, steps=20)
  chex.assert_shape(est.u, (32, 3))
  chex.assert_shape(est.v, (3, 24))
  # Same form as fit_svd: orthonormal rows in v, scales folded into u.
  np.testing.assert_allclose(np.asarray(est.v @ est.v.T), np.eye(3), atol=1e-5)
  chex.assert_tree_all_finite(est)


def test_zero_steps_is_the_initial_fit():
  x_cal, _, w, b = _layer(0)
  for init, ref in [("svd", L.fit_svd(w, 4)), ("data_aware", L.fit_data_aware(w, 4, x_cal))]:
    est = fit_trained(w, b, 4, x_cal, init=init, steps=0)
    np.testing.assert_allclose(
        np.asarray(est.u @ est.v), np.asarray(ref.u @ ref.v), rtol=1e-4, atol=1e-4
    )


def test_deterministic_given_seed_and_leading_dims_are_rows():
  x_cal, _, w, b = _layer(1)
  a = fit_trained(w, b, 2, x_cal, steps=30, seed=3)
  again = fit_trained(w, b, 2, x_cal, steps=30, seed=3)
  chex.assert_trees_all_equal(a, again)
  other = fit_trained(w, b, 2, x_cal, steps=30, seed=4)
  assert not np.allclose(np.asarray(a.u @ a.v), np.asarray(other.u @ other.v))
  folded = fit_trained(w, b, 2, jnp.reshape(x_cal, (8, -1, 32)), steps=30, seed=3)
  chex.assert_trees_all_close(a, folded, rtol=1e-4, atol=1e-5)


def test_explicit_margin_and_small_batches():
  x_cal, _, w, b = _layer(0)
  est = fit_trained(w, b, 2, x_cal[:40], steps=10, batch_size=1000, margin=0.3)
  chex.assert_tree_all_finite(est)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inputs=jnp.ones((50, 31))), r"x has shape \(50, 31\).*n_in=32"),
        (dict(inputs=jnp.ones((2, 32))), r"at least rank=3 calibration rows, got 2"),
        (dict(recall=0.0), r"recall=0.0 must lie in \(0, 1\]"),
        (dict(recall=1.5), r"recall=1.5 must lie in \(0, 1\]"),
        (dict(rank=0), r"rank=0 is out of range.*\(32, 24\).*\[1, 24\]"),
        (dict(rank=25), r"rank=25 is out of range"),
        (dict(rank=2.5), r"rank must be a static Python int"),
        (dict(init="pca"), r"init='pca' must be one of"),
        (dict(steps=-1), r"steps=-1"),
        (dict(batch_size=0), r"batch_size=0"),
        (dict(learning_rate=0.0), r"learning_rate=0.0"),
        (dict(margin=-1.0), r"margin=-1.0"),
    ],
)
def test_value_errors_name_the_values(kwargs, match):
  x_cal, _, w, b = _layer(0)
  args = dict(kernel=w, bias=b, rank=3, inputs=x_cal)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    fit_trained(args.pop("kernel"), args.pop("bias"), args.pop("rank"), args.pop("inputs"), **args)


def test_bad_bias_shape():
  x_cal, _, w, b = _layer(0)
  with pytest.raises(ValueError, match=r"bias has shape \(23,\)"):
    fit_trained(w, b[:23], 3, x_cal)
