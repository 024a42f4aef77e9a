"""Masked and conditional dense ReLU layers in the training (Flax) layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrcc_jax import _checks, _mask
from lrcc_jax._estimator import LowRankEstimator, add_bias, estimate

Array = jax.Array


def masked_dense(x: Array, kernel: Array, bias: Array, mask: Array) -> Array:
  r"""Reference semantics: `where(mask, relu(x @ kernel + bias), 0)`.

  Computes every unit and zeroes the unmasked ones. It saves no work: it defines the
  values the skipping paths must reproduce. Gradients reach only the units where `mask`
  is true.

  Args:
    x: (..., n_in) inputs.
    kernel: (n_in, n_out) kernel.
    bias: (n_out,) bias.
    mask: bool, broadcastable to (..., n_out).

  Returns:
    (..., n_out) activations.
  """
  n_in, _ = _checks.check_kernel(kernel, bias)
  _checks.check_features(x, n_in)
  z = add_bias(x @ kernel, bias)
  mask = jnp.broadcast_to(mask, z.shape)
  return jnp.where(mask, jax.nn.relu(z), jnp.zeros((), z.dtype))


def unit_mask(
  z_hat: Array,
  threshold: float | Array = 0.0,
  capacity: int | None = None,
  block_size: int = 1,
) -> Array:
  r"""The mask `M` of the contract, from estimates `ẑ` (..., n_out).

  `score_b = max_{j ∈ b} ẑ_j`; block `b` is selected when `score_b > threshold` and, with
  a capacity `k`, `b` is among the row's `k` largest scores. `M` repeats the selection over
  each block's units. NaN scores count as selected (see `sign_mask`).

  Raises:
    ValueError: if `block_size` does not divide n_out or `capacity` is outside
      [1, n_out / block_size].
  """
  n_out = z_hat.shape[-1]
  n_blocks = _checks.check_block_size(block_size, n_out)
  capacity = _checks.check_capacity(capacity, n_blocks, block_size)
  scores = _mask.block_scores(jax.lax.stop_gradient(z_hat), block_size)
  return _mask.expand_blocks(_mask.block_selection(scores, threshold, capacity), block_size)


def conditional_dense(
  x: Array,
  kernel: Array,
  bias: Array,
  est: LowRankEstimator,
  *,
  threshold: float | Array = 0.0,
  capacity: int | None = None,
  block_size: int = 1,
) -> Array:
  r"""A ReLU layer that keeps only the units the low-rank estimator predicts active.

  `y = M ⊙ relu(x W + b)` with `M = unit_mask((x u) v + b, threshold, capacity,
  block_size)`. `M` is a constant for differentiation (as under `stop_gradient`), so
  gradients reach `x`, `W` and `b` through the computed units only, and none reach the
  estimator.

  This is the training-layout (n_in, n_out) form used by the `mask` mode. On XLA:CPU a
  column gather from this layout is slower than the whole dense product (docs/design.md,
  "Measured facts"), so it computes the product densely; the compute-skipping form is
  `pack` + `packed_dense`, which returns the same values.

  Args:
    x: (..., n_in) inputs; leading dimensions are independent rows.
    kernel: (n_in, n_out) kernel (Flax layout).
    bias: (n_out,) bias.
    est: estimator with `u` (n_in, r) and `v` (r, n_out).
    threshold: units (blocks) whose estimate is not above it are skipped.
    capacity: optional static cap on the selected blocks per row, in [1, n_out/block_size].
    block_size: static size of the contiguous unit blocks; must divide n_out.

  Returns:
    (..., n_out) activations, equal to `masked_dense(x, kernel, bias, M)`.

  Raises:
    ValueError: on mismatched shapes, a bad block size or capacity.
  """
  n_in, n_out = _checks.check_kernel(kernel, bias)
  _checks.check_features(x, n_in)
  _checks.check_estimator(est, n_in, n_out)
  mask = unit_mask(estimate(x, est, bias), threshold, capacity, block_size)
  return masked_dense(x, kernel, bias, mask)
