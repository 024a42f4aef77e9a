"""How good an estimator is: recall, precision, work, and threshold calibration."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrcc_jax import _checks
from lrcc_jax._estimator import LowRankEstimator, add_bias, estimate

Array = jax.Array


def exact_and_estimate(
  x: Array, kernel: Array, bias: Array | None, est: LowRankEstimator
) -> tuple[Array, Array]:
  """The exact pre-activations `z = x W + b` and their estimate `ẑ = (x U) V + b`.

  Every statistic of the estimator compares these two, on checked shapes.

  Returns:
    ``(z, z_hat)``, both (..., n_out).
  """
  n_in, n_out = _checks.check_kernel(kernel, bias)
  _checks.check_features(x, n_in)
  _checks.check_estimator(est, n_in, n_out)
  return add_bias(x @ kernel, bias), estimate(x, est, bias)


def estimator_stats(
  x: Array,
  kernel: Array,
  bias: Array,
  est: LowRankEstimator,
  threshold: float | Array = 0.0,
) -> dict[str, Array]:
  r"""Quality of the sign estimate over all rows and units.

  With `A = {z > 0}` the truly active units and `P = {ẑ > t}` the computed ones
  (NaN estimates count as computed, as in `sign_mask`):

  - `recall = |A ∩ P| / |A|`: the fraction of nonzero outputs that survive (1 if A = ∅);
  - `precision = |A ∩ P| / |P|` (1 if P = ∅);
  - `computed_fraction = |P| / (rows · n_out)`: the work done, the FLOP model's `c`;
  - `density = |A| / (rows · n_out)`: the dense layer's fraction of nonzero outputs.

  Args:
    x: (..., n_in) inputs.
    kernel: (n_in, n_out) kernel.
    bias: (n_out,) bias.
    est: the estimator.
    threshold: the estimator's threshold.

  Returns:
    Mapping of the four float32 scalars above.
  """
  z, z_hat = exact_and_estimate(x, kernel, bias, est)
  active = z > 0
  computed = ~(z_hat <= threshold)
  n_active = jnp.sum(active)
  n_computed = jnp.sum(computed)
  hit = jnp.sum(active & computed)
  f32 = jnp.float32
  return {
    "recall": jnp.where(n_active > 0, hit / jnp.maximum(n_active, 1), 1.0).astype(f32),
    "precision": jnp.where(n_computed > 0, hit / jnp.maximum(n_computed, 1), 1.0).astype(f32),
    "computed_fraction": jnp.mean(computed.astype(f32)),
    "density": jnp.mean(active.astype(f32)),
  }


def calibrate_threshold(
  x: Array,
  kernel: Array,
  bias: Array,
  est: LowRankEstimator,
  *,
  recall: float = 0.99,
) -> Array:
  r"""The largest threshold whose recall on `x` is at least `recall`.

  Sort the estimates of the truly active units in decreasing order, `e_(1) ≥ e_(2) ≥ …`.
  Keeping `m = ⌈recall · |A|⌉` of them needs `t < e_(m)`; the largest such float is
  `nextafter(e_(m), -inf)`. Thresholds are usually negative: a safety margin below the
  paper's 0. With no active unit in `x` every threshold has recall 1 and the result is
  `+inf`.

  Args:
    x: (..., n_in) calibration inputs (not the evaluation data).
    kernel: (n_in, n_out) kernel.
    bias: (n_out,) bias.
    est: the estimator.
    recall: target recall in (0, 1].

  Returns:
    float32 scalar threshold.

  Raises:
    ValueError: if `recall` is outside (0, 1] or shapes mismatch.
  """
  recall = _checks.check_fraction(recall, "recall")
  z, z_hat = exact_and_estimate(x, kernel, bias, est)
  active = jnp.reshape(z > 0, (-1,))
  vals = jnp.where(active, jnp.reshape(z_hat, (-1,)), -jnp.inf)
  desc = -jnp.sort(-vals)
  n_active = jnp.sum(active).astype(jnp.float32)
  # Smallest m with m >= recall * n_active, robust to float rounding of the product.
  m = jnp.floor(recall * n_active)
  m = jnp.where(m < recall * n_active, m + 1, m)
  m = jnp.clip(m, 1, jnp.maximum(n_active, 1)).astype(jnp.int32)
  e_m = desc[m - 1]
  t = jnp.nextafter(e_m.astype(jnp.float32), jnp.float32(-jnp.inf))
  return jnp.where(n_active > 0, t, jnp.inf).astype(jnp.float32)
