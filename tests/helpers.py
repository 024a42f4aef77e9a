"""Independent numpy references for the tests."""

import numpy as np


def reference_mask(z_hat, threshold, capacity, block_size):
  """The contract's mask M, written directly in numpy from the estimates."""
  z_hat = np.asarray(z_hat, np.float64)
  lead, n_out = z_hat.shape[:-1], z_hat.shape[-1]
  rows = z_hat.reshape(-1, n_out // block_size, block_size).max(-1)
  sel = ~(rows <= threshold)
  if capacity is not None:
    keep = np.zeros_like(sel)
    order = np.argsort(-np.where(np.isnan(rows), np.inf, rows), axis=-1, kind="stable")
    np.put_along_axis(keep, order[:, :capacity], True, axis=-1)
    sel &= keep
  return np.repeat(sel, block_size, axis=-1).reshape(lead + (n_out,))


def selection_margin(z_hat, threshold, capacity, block_size):
  """Distance of the block scores to the decision boundaries (threshold, k-th score)."""
  z_hat = np.asarray(z_hat, np.float64)
  n_out = z_hat.shape[-1]
  rows = z_hat.reshape(-1, n_out // block_size, block_size).max(-1)
  margin = np.min(np.abs(rows - threshold))
  if capacity is not None and capacity < rows.shape[-1]:
    s = -np.sort(-rows, axis=-1)
    margin = min(margin, np.min(s[:, capacity - 1] - s[:, capacity]))
  return margin


def relu_dense(x, kernel, bias):
  return np.maximum(np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64), 0.0)
