"""Flax NNX modules: a conditional ReLU layer and a whole conditional MLP.

The modules are thin wrappers over the functional core. Each layer has its own estimator
rank, threshold, capacity and block size, and runs in one of three modes:

- ``"dense"``: `relu(x W + b)`, the ordinary network;
- ``"mask"``: `conditional_dense`, the training semantics (dense product, estimator mask);
- ``"skip"``: `packed_dense`, the compute-skipping path (same values as ``"mask"``).

The estimator factors are `EstimatorFactor` variables, not `nnx.Param`, so an optimizer
built with ``wrt=nnx.Param`` never trains them; `refit` recomputes them from the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lrcc_jax import _checks
from lrcc_jax._estimator import LowRankEstimator, add_bias, fit_data_aware, fit_svd
from lrcc_jax._layers import conditional_dense
from lrcc_jax._mlp import PackedMLP
from lrcc_jax._packed import PackedDense, pack, packed_dense
from lrcc_jax._registry import NEEDS_INPUTS, fit_estimator
from lrcc_jax._stats import calibrate_threshold

Array = jax.Array
Mode = Literal["dense", "mask", "skip"]
Method = Literal["svd", "data_aware"]
MODES = ("dense", "mask", "skip")


class EstimatorFactor(nnx.Variable):
  """A non-trainable low-rank factor of a layer's estimator."""


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}.")


class ConditionalDense(nnx.Module):
  """A ReLU layer whose units can be skipped when a low-rank estimate predicts zero.

  Attributes:
    kernel: (in_features, out_features) `nnx.Param`.
    bias: (out_features,) `nnx.Param`.
    u, v: `EstimatorFactor` variables with `u @ v ≈ kernel`.
    rank, threshold, capacity, block_size: the static estimator settings.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      threshold: float = 0.0,
      capacity: int | None = None,
      block_size: int = 1,
      rngs: nnx.Rngs,
  ):
    n_blocks = _checks.check_block_size(block_size, out_features)
    self.capacity = _checks.check_capacity(capacity, n_blocks, block_size)
    self.rank = _checks.check_rank(rank, in_features, out_features)
    self.block_size = block_size
    self.threshold = float(threshold)
    init = jax.nn.initializers.he_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    est = fit_svd(self.kernel[...], self.rank)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)

  @property
  def estimator(self) -> LowRankEstimator:
    return LowRankEstimator(self.u[...], self.v[...])

  def set_estimator(self, est: LowRankEstimator) -> None:
    """Replaces the estimator factors (and the rank) with `est`, checked against the kernel.

    The one way factors reach a layer: refits, rank selection and evaluation all go
    through it, so the rank attribute can never disagree with the factors.
    """
    rank = _checks.check_estimator(est, *self.kernel.shape)
    self.rank = _checks.check_rank(rank, *self.kernel.shape)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)

  def refit(
      self, inputs: Array | None = None, *, method: str = "svd", rank: int | None = None,
      **options,
  ) -> None:
    """Refits the estimator from the current kernel (optionally at a new rank).

    Args:
      inputs: calibration inputs (..., in_features), needed by the data-dependent fits.
      method: an estimator name of `lrcc_jax.ESTIMATORS` (``"svd"``: the paper).
      rank: new rank; keeps the current one when None.
      **options: passed to `lrcc_jax.fit_estimator` (e.g. ``recall``, ``seed``).
    """
    kernel = self.kernel[...]
    rank = self.rank if rank is None else _checks.check_rank(rank, *kernel.shape)
    self.set_estimator(
        fit_estimator(method, kernel, rank, inputs, bias=self.bias[...], **options)
    )

  def pack(self, dtype: jnp.dtype | None = None) -> PackedDense:
    """The layer in the unit-major inference layout (`lrcc_jax.pack`)."""
    return pack(
        self.kernel[...], self.bias[...], self.estimator, block_size=self.block_size,
        dtype=dtype,
    )

  def __call__(self, x: Array, mode: Mode = "dense") -> Array:
    _check_mode(mode)
    kernel, bias = self.kernel[...], self.bias[...]
    if mode == "dense":
      _checks.check_features(x, kernel.shape[0])
      return jax.nn.relu(add_bias(x @ kernel, bias))
    if mode == "mask":
      return conditional_dense(
          x, kernel, bias, self.estimator, threshold=self.threshold,
          capacity=self.capacity, block_size=self.block_size,
      )
    return packed_dense(x, self.pack(), threshold=self.threshold, capacity=self.capacity)


def _per_layer(value, n: int, name: str) -> list:
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries but the network has {n} hidden layers.")
    return list(value)
  return [value] * n


def default_rank(n_in: int, n_out: int) -> int:
  """Default estimator rank: an eighth of the smaller side, at least 1."""
  return max(1, min(n_in, n_out) // 8)


class ConditionalMLP(nnx.Module):
  """A fully connected ReLU classifier whose hidden layers are `ConditionalDense`.

  The architecture of Davis & Arel: hidden ReLU layers with dropout, then a dense linear
  classifier. `__call__` can return the hidden activations (before dropout) for the L1
  sparsity penalty and the estimator statistics.
  """

  def __init__(
      self,
      in_features: int,
      hidden_sizes: Sequence[int],
      num_classes: int,
      *,
      ranks: int | Sequence[int] | None = None,
      thresholds: float | Sequence[float] = 0.0,
      capacities: int | None | Sequence[int | None] = None,
      block_sizes: int | Sequence[int] = 1,
      dropout_rate: float = 0.0,
      rngs: nnx.Rngs,
  ):
    if not hidden_sizes:
      raise ValueError("hidden_sizes must name at least one hidden layer.")
    n = len(hidden_sizes)
    widths = [in_features, *hidden_sizes]
    ranks = _per_layer(ranks, n, "ranks")
    ranks = [default_rank(a, b) if r is None else r for r, a, b in zip(ranks, widths, widths[1:])]
    thresholds = _per_layer(thresholds, n, "thresholds")
    capacities = _per_layer(capacities, n, "capacities")
    block_sizes = _per_layer(block_sizes, n, "block_sizes")
    self.layers = nnx.List([
        ConditionalDense(a, b, rank=r, threshold=t, capacity=c, block_size=bs, rngs=rngs)
        for a, b, r, t, c, bs in zip(widths, widths[1:], ranks, thresholds, capacities, block_sizes)
    ])
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  @property
  def ranks(self) -> tuple[int, ...]:
    return tuple(l.rank for l in self.layers)

  @property
  def thresholds(self) -> tuple[float, ...]:
    return tuple(l.threshold for l in self.layers)

  def __call__(
      self, x: Array, *, mode: Mode = "dense", return_activations: bool = False
  ) -> Array | tuple[Array, list[Array]]:
    """Logits (..., num_classes), and optionally the hidden activations."""
    _check_mode(mode)
    acts = []
    h = x
    for layer in self.layers:
      h = layer(h, mode)
      acts.append(h)
      h = self.dropout(h)
    logits = self.head(h)
    return (logits, acts) if return_activations else logits

  def layer_inputs(self, x: Array, *, mode: Mode = "mask") -> list[Array]:
    """The input each hidden layer sees when the layers before it run in `mode`."""
    inputs, h = [], x
    for layer in self.layers:
      inputs.append(h)
      h = layer(h, mode)
    return inputs

  def refit(
      self,
      inputs: Array | None = None,
      *,
      method: str = "svd",
      ranks: int | Sequence[int] | None = None,
      **options,
  ) -> None:
    """Refits every layer's estimator; data-dependent fits see the dense network's inputs."""
    ranks = _per_layer(ranks, len(self.layers), "ranks")
    layer_x = self.layer_inputs(inputs, mode="dense") if method in NEEDS_INPUTS else [None] * len(ranks)
    for layer, r, xi in zip(self.layers, ranks, layer_x):
      layer.refit(xi, method=method, rank=r, **options)

  def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
    for layer, t in zip(self.layers, _per_layer(thresholds, len(self.layers), "thresholds")):
      layer.threshold = float(t)

  def set_capacities(self, capacities: int | None | Sequence[int | None]) -> None:
    for layer, c in zip(self.layers, _per_layer(capacities, len(self.layers), "capacities")):
      n_blocks = layer.kernel.shape[1] // layer.block_size
      layer.capacity = _checks.check_capacity(c, n_blocks, layer.block_size)

  def calibrate(self, x: Array, *, recall: float = 0.99) -> tuple[float, ...]:
    """Sets each layer's threshold to reach `recall` on `x`, in order.

    Layer `l` is calibrated on the inputs produced by the conditional layers before it,
    so the thresholds account for the errors upstream.
    """
    h = x
    for layer in self.layers:
      layer.threshold = float(
          calibrate_threshold(h, layer.kernel[...], layer.bias[...], layer.estimator, recall=recall)
      )
      h = layer(h, "mask")
    return self.thresholds

  def pack(self, dtype: jnp.dtype | None = None) -> PackedMLP:
    """The network in the inference layout, for `packed_mlp` (see `lrcc_jax.pack`)."""
    return PackedMLP(
        tuple(l.pack(dtype) for l in self.layers),
        self.head.kernel[...], self.head.bias[...],
    )

  def settings(self) -> dict:
    return {
        "ranks": list(self.ranks),
        "thresholds": list(self.thresholds),
        "capacities": [l.capacity for l in self.layers],
        "block_sizes": [l.block_size for l in self.layers],
    }
