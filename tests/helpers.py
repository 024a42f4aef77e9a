"""Shared test data and independent numpy references.

The `np_*` references share no code with the library: they restate the contract in plain
numpy / Python (float64, a Python sort for the capacity) so a bug in `lrcc_jax._mask` cannot
hide in a reference that calls it.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import lrcc_jax as L


def make_layer(seed, n_in, n_out, rank):
  """A random float32 layer (kernel, nonzero bias) and its rank-`rank` SVD estimator."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
  b = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
  w, b = jnp.asarray(w), jnp.asarray(b)
  return w, b, L.fit_svd(w, rank)


@st.composite
def layer_cases(draw):
  """Random float layers: shapes, block size, optional capacity, threshold, batch dims."""
  n_in = draw(st.integers(1, 24))
  block_size = draw(st.sampled_from([1, 2, 3, 4]))
  n_blocks = draw(st.integers(1, 12))
  n_out = n_blocks * block_size
  rank = draw(st.integers(1, min(n_in, n_out)))
  capacity = draw(st.one_of(st.none(), st.integers(1, n_blocks)))
  threshold = draw(st.floats(-0.5, 0.5))
  batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  seed = draw(st.integers(0, 2**31 - 1))
  return n_in, n_out, rank, block_size, capacity, threshold, batch, seed


# ---------------------------------------------------------------------------------------
# Independent references.


def _np_matmul(a, b):
  """`a @ b` as explicit products and sums (no BLAS): `0 · inf` stays NaN, as in IEEE."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(invalid="ignore"):
    return (a[:, :, None] * b[None, :, :]).sum(1)


def np_estimate(x, u, v, b):
  """`(x u) v + b` in float64 (exact for the small integer cases below)."""
  with np.errstate(invalid="ignore"):
    return _np_matmul(_np_matmul(x, u), v) + np.asarray(b, np.float64)


def _rank_key(value, index):
  """Sort key of one block score, best first: NaN counts as +inf, +0.0 above -0.0 (the
  float total order `lax.top_k` uses), then the lower index first."""
  value = float(value)
  if value != value:  # NaN
    value = float("inf")
  return (-value, bool(np.signbit(value)), index)


def np_block_mask(z_hat, threshold, capacity, block_size):
  """bool (rows, n_blocks) block selection of the contract, from (rows, n_out) estimates."""
  z = np.asarray(z_hat, np.float64)
  rows, n_out = z.shape
  n_blocks = n_out // block_size
  sel = np.zeros((rows, n_blocks), bool)
  for r in range(rows):
    scores = []
    for blk in range(n_blocks):
      unit = z[r, blk * block_size:(blk + 1) * block_size]
      scores.append(float("nan") if np.isnan(unit).any() else float(unit.max()))
    ranked = sorted(range(n_blocks), key=lambda i: _rank_key(scores[i], i))
    allowed = set(ranked if capacity is None else ranked[:capacity])
    for blk in range(n_blocks):
      s = scores[blk]
      above = s != s or s > threshold  # NaN is computed, never hidden
      sel[r, blk] = above and blk in allowed
  return sel


def np_unit_mask(z_hat, threshold, capacity, block_size):
  """The unit mask `M`: each block's selection repeated over its units."""
  return np.repeat(np_block_mask(z_hat, threshold, capacity, block_size), block_size, axis=-1)


def np_masked_dense(x, w, b, mask):
  """`where(M, relu(x W + b), 0)` in float64."""
  f = lambda a: np.asarray(a, np.float64)
  return np.where(mask, np.maximum(f(x) @ f(w) + f(b), 0.0), 0.0)


def np_masked_dense_grads(x, w, b, mask, cotangent):
  """Gradients of `sum(cotangent * masked_dense(x, W, b, M))` w.r.t. (x, W, b), with `M`
  constant and relu' = [z > 0]: only computed, positive units pass gradient."""
  f = lambda a: np.asarray(a, np.float64)
  x, w, b, g = f(x), f(w), f(b), f(cotangent)
  dz = g * mask * ((x @ w + b) > 0)
  return dz @ w.T, x.T @ dz, dz.sum(0)


# ---------------------------------------------------------------------------------------
# Edge cases built to hit the decision boundaries (not filtered away from them).


class IntLayer:
  """A small layer whose every number is a small integer, so all estimates and outputs are
  exact in float32 and float64 alike: scores equal to the threshold and ties between blocks
  are exact, whatever the summation order of a path.

  Attributes: x (rows, n_in), w (n_in, n_out), b (n_out,), u (n_in, r), v (r, n_out) float32
  numpy arrays; threshold, capacity, block_size.
  """

  def __init__(self, x, w, b, u, v, threshold, capacity, block_size):
    self.x, self.w, self.b, self.u, self.v = x, w, b, u, v
    self.threshold, self.capacity, self.block_size = threshold, capacity, block_size

  @property
  def est(self):
    return L.LowRankEstimator(jnp.asarray(self.u), jnp.asarray(self.v))

  def packed(self, dtype=None):
    return L.pack(jnp.asarray(self.w), jnp.asarray(self.b), self.est, block_size=self.block_size, dtype=dtype)

  def mask(self, x=None):
    x = self.x if x is None else x
    return np_unit_mask(np_estimate(x, self.u, self.v, self.b), self.threshold, self.capacity, self.block_size)

  def reference(self, x=None):
    """The contract's output in float64: `where(M, relu(x W + b), 0)` with numpy's `M`."""
    x = self.x if x is None else x
    return np_masked_dense(x, self.w, self.b, self.mask(x))

  def __repr__(self):
    arrays = {k: getattr(self, k).tolist() for k in ("x", "w", "b", "u", "v")}
    return (f"IntLayer(threshold={self.threshold}, capacity={self.capacity},"
            f" block_size={self.block_size}, {arrays})")


def _int_arrays(rng, n_in, n_out, rank, rows):
  small = lambda *shape: rng.integers(-1, 2, shape).astype(np.float32)
  return small(rows, n_in), rng.integers(-2, 3, (n_in, n_out)).astype(np.float32), small(n_in, rank), small(rank, n_out)


@st.composite
def int_layers(draw, *, n_in=None, rows=None, nonfinite=True, binding=True, max_blocks=7):
  """`IntLayer`s at the edges of the contract.

  - Estimates in a handful of integer values, so blocks tie everywhere, including at the
    capacity boundary (resolved by the lower index, as `lax.top_k`).
  - The threshold is one of those values, and row 0's first-drawn block is made to score
    exactly the threshold (bias chosen for it): `>` against `>=` decides it.
  - Optionally one entry of `v` is ±inf, so single units of single rows estimate +inf,
    -inf or NaN (`0 · inf`) while the rest of the row stays finite.
  - Several rows, blocks of 1, 2 or 4 units, and a capacity that binds (below the block
    count) unless `binding=False`.
  """
  # Shapes come from a few buckets: each new shape costs XLA compilations, the values
  # (drawn per example) are what reaches the edges.
  n_in = draw(st.sampled_from([2, 4])) if n_in is None else n_in
  rows = draw(st.sampled_from([2, 5])) if rows is None else rows
  block_size = draw(st.sampled_from([1, 2, 4]))
  n_blocks = draw(st.sampled_from([3, min(7, max_blocks)]))
  n_out = n_blocks * block_size
  rank = draw(st.sampled_from([1, 2]))
  capacity = draw(st.integers(1, n_blocks - 1)) if binding else draw(st.one_of(st.none(), st.integers(1, n_blocks)))
  threshold = float(draw(st.integers(-1, 1)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x, w, u, v = _int_arrays(rng, n_in, n_out, rank, rows)
  b = rng.integers(-2, 3, n_out).astype(np.float64)
  # Row 0, block `hit`: its best unit estimates exactly the threshold, the others 1 below.
  hit = draw(st.integers(0, n_blocks - 1))
  best = draw(st.integers(0, block_size - 1))
  e0 = np_estimate(x[:1], u, v, np.zeros(n_out))[0]
  for j in range(block_size):
    unit = hit * block_size + j
    b[unit] = threshold - e0[unit] - (0.0 if j == best else 1.0)
  kind = draw(st.sampled_from([None, np.inf, -np.inf])) if nonfinite else None
  if kind is not None:
    v[draw(st.integers(0, rank - 1)), draw(st.integers(0, n_out - 1))] = kind
  return IntLayer(x, w, b.astype(np.float32), u, v, threshold, capacity, block_size)


def int_layer_like(rng, n_in, n_out, rank, rows, threshold, capacity, block_size):
  """A random `IntLayer` of fixed shapes (no forced edges; ties come from the small values)."""
  x, w, u, v = _int_arrays(rng, n_in, n_out, rank, rows)
  b = rng.integers(-2, 3, n_out).astype(np.float32)
  return IntLayer(x, w, b, u, v, threshold, capacity, block_size)


# ---------------------------------------------------------------------------------------
# Legacy helpers of the first tests (the selection margin filters ties out; the edge
# properties construct them instead).


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


def scaled_examples(fraction, minimum=5):
  """Examples for a costly property: `fraction` of the loaded profile's `max_examples`."""
  from hypothesis import settings

  return max(minimum, int(settings.default.max_examples * fraction))


@st.composite
def int_chains(draw, n_layers=2, binding=True):
  """`n_layers` chained `IntLayer`s (each layer's n_in is the previous one's n_out); the
  first layer's `x` is the chain's input. Every layer has a capacity (sparse chains need
  one), binding by default."""
  layers = [draw(int_layers(binding=binding))]
  while len(layers) < n_layers:
    layers.append(draw(int_layers(n_in=layers[-1].w.shape[1], rows=layers[0].x.shape[0], binding=binding)))
  for layer in layers:
    if layer.capacity is None:
      layer.capacity = layer.w.shape[1] // layer.block_size
  return layers


def np_chain(x, layers):
  """Reference activations of chained layers: each layer's mask from its own input."""
  acts = []
  for layer in layers:
    x = layer.reference(x)
    acts.append(x)
  return acts


def np_chain_grads(x, layers, masks, cotangent):
  """Gradients of `sum(cotangent * last activation)` through float layers given as
  (w, b) pairs with constant masks: [dx, (dW, db) per layer]."""
  inputs = [np.asarray(x, np.float64)]
  for (w, b), m in zip(layers, masks):
    inputs.append(np_masked_dense(inputs[-1], w, b, m))
  grads = []
  g = np.asarray(cotangent, np.float64)
  for i in reversed(range(len(layers))):
    w, b = layers[i]
    g, dw, db = np_masked_dense_grads(inputs[i], w, b, masks[i], g)
    grads.append((dw, db))
  return g, grads[::-1], inputs[1:]


def write_quadrant_npz(path, n_per_class: int, seed: int, n_classes: int = 4):
  """A learnable `npz:` dataset of 8×8 uint8 images: a class-specific bright quadrant plus
  noise, `n_per_class` images per class. Returns `path`."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(n_classes), n_per_class)
  images = rng.integers(0, 90, (len(labels), 8, 8)).astype(np.uint8)
  for c in range(n_classes):
    r, q = divmod(c % 4, 2)
    images[labels == c, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 150
  np.savez(path, image=images, label=labels)
  return path
