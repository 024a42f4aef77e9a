"""Flax NNX modules: a conditional ReLU layer and a whole conditional MLP.

The modules are thin wrappers over the functional core. Each layer has its own estimator
rank, threshold, capacity and block size, and runs in one of three modes:

- ``"dense"``: `relu(x W + b)`, the ordinary network;
- ``"mask"``: `conditional_dense`, the training semantics (dense product, estimator mask);
- ``"skip"``: `packed_dense`, the compute-skipping path (same values as ``"mask"``).

What is state and what is static follows what changes the compiled program:

- the kernel and bias are `nnx.Param`, the only trainable variables;
- the estimator factors are `EstimatorFactor` variables, so an optimizer built with
  ``wrt=nnx.Param`` never trains them; `refit` recomputes them from the kernel;
- the threshold is a `Threshold` variable: calibrating it changes a value, not the graph,
  so a jitted model does not retrace;
- the unit-major copy of the kernel that skip mode reads is a `PackedWeight` variable,
  refreshed by `refit`, `set_estimator`, `calibrate`, `pack` and `repack`;
- the rank, capacity and block size are static Python ints, since they fix shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lrcc_jax import _checks
from lrcc_jax._estimator import LowRankEstimator, add_bias, fit_svd
from lrcc_jax._layers import conditional_dense
from lrcc_jax._mlp import PackedMLP, packed_mlp
from lrcc_jax._packed import PackedDense, packed_dense
from lrcc_jax._registry import NEEDS_INPUTS, fit_estimator
from lrcc_jax._stats import calibrate_threshold

Array = jax.Array
Mode = Literal["dense", "mask", "skip"]
Method = Literal["svd", "data_aware"]
MODES = ("dense", "mask", "skip")
Initializer = Any

default_kernel_init = jax.nn.initializers.he_normal()
default_bias_init = jax.nn.initializers.zeros


class EstimatorFactor(nnx.Variable):
  """A non-trainable low-rank factor of a layer's estimator."""


class Threshold(nnx.Variable):
  """A layer's estimator threshold: state, so calibration never changes the graph."""


class PackedWeight(nnx.Variable):
  """The kernel in the unit-major (n_blocks, block_size, n_in) layout that skip mode reads."""


@jax.custom_jvp
def _read_packed(packed_weight: Array, kernel: Array) -> Array:
  """`packed_weight`, whose tangent also carries the kernel's: the pack of `dkernel`.

  The forward pass reads the unit-major copy as it is (the kernel is unused, so no
  transpose is computed); under differentiation the copy stands for `pack(kernel)`, which
  it equals whenever it is current, so gradients reach the `nnx.Param` kernel.
  """
  del kernel
  return packed_weight


@_read_packed.defjvp
def _read_packed_jvp(primals, tangents):
  packed_weight, _ = primals
  d_packed, d_kernel = tangents
  return packed_weight, d_packed + jnp.reshape(d_kernel.T, packed_weight.shape)


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}.")


class ConditionalDense(nnx.Module):
  """A ReLU layer whose units can be skipped when a low-rank estimate predicts zero.

  `y = M ⊙ relu(x W + b)`, where `M` keeps the blocks of `block_size` units whose largest
  estimate `((x U) V + b)_j` is above `threshold` (and, with a `capacity`, among the row's
  `capacity` best blocks). ``mode="skip"`` computes only those blocks from a unit-major
  copy of the kernel, `PackedWeight` (n_out/block_size, block_size, n_in), kept next to
  the Flax-layout `kernel`: it costs one more copy of the kernel in memory (and in
  checkpoints), and saves transposing the whole kernel on every call.

  The packed copy follows the kernel only when refreshed: `refit` (and `set_estimator`,
  `calibrate`, `pack`, `repack`) refresh it. After training the kernel, call `refit`,
  which the estimator needs anyway.

  Jitting inference: `nnx.jit` with graph updates (its default) returns every variable of
  a module argument as a new output, a copy of all the module's arrays per call (for a
  4096² layer far more than the skipped product costs; an `nnx.Linear` pays it too). For
  inference use ``nnx.jit(f, graph=False)``, or `nnx.split` once and `jax.jit` over the
  state: skip mode then costs what `lrcc_jax.packed_dense` costs. Donating the module
  (``donate_argnums=0``) also avoids the copy but measured about 2x slower than that
  (`lrcc-jax bench --suite module` times all of them).

  Attributes:
    kernel: (in_features, out_features) `nnx.Param`.
    bias: (out_features,) `nnx.Param`.
    u, v: `EstimatorFactor` variables with `u @ v ≈ kernel`.
    threshold: `Threshold` variable (a scalar).
    packed_weight: `PackedWeight` variable, the unit-major kernel read by skip mode.
    rank, capacity, block_size: static settings.

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lrcc_jax.nn import ConditionalDense
    >>> layer = ConditionalDense(64, 128, rank=8, capacity=4, block_size=16, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 64))
    >>> y = layer(x, "skip")
    >>> y.shape
    (2, 128)
    >>> bool(jnp.allclose(y, layer(x, "mask"), atol=1e-5))
    True
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
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    rngs: nnx.Rngs,
  ):
    """Creates the layer.

    Args:
      in_features, out_features: the kernel's shape.
      rank: the estimator's rank, in [1, min(in_features, out_features)].
      threshold: initial estimator threshold (0 in the paper; negative is a margin).
      capacity: static number of blocks computed per row in skip mode (None: no cap).
      block_size: static size of the unit blocks; must divide `out_features`.
      dtype: computation dtype (None: the inputs' and parameters' promoted dtype).
      param_dtype: dtype of the parameters and of the packed copy.
      kernel_init: kernel initializer (He normal, for ReLU layers).
      bias_init: bias initializer (zeros).
      rngs: the `nnx.Rngs` for the initializers.
    """
    n_blocks = _checks.check_block_size(block_size, out_features)
    self.capacity = _checks.check_capacity(capacity, n_blocks, block_size)
    self.rank = _checks.check_rank(rank, in_features, out_features)
    self.block_size = block_size
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    self.threshold = Threshold(jnp.asarray(threshold, jnp.float32))
    est = fit_svd(self.kernel[...], self.rank)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)
    self.packed_weight = PackedWeight(self._unit_major())

  def __setattr__(self, name: str, value: Any) -> None:
    # `layer.threshold = t` sets the variable's value: the graph (and a jitted model's
    # trace) stays the same.
    if name == "threshold" and not isinstance(value, nnx.Variable) and "threshold" in vars(self):
      self.threshold[...] = jnp.asarray(value, jnp.float32)
      return
    super().__setattr__(name, value)

  @property
  def estimator(self) -> LowRankEstimator:
    return LowRankEstimator(self.u[...], self.v[...])

  def _unit_major(self) -> Array:
    kernel = self.kernel[...]
    n_in, n_out = kernel.shape
    return jnp.reshape(kernel.T, (n_out // self.block_size, self.block_size, n_in))

  def repack(self) -> None:
    """Refreshes the unit-major copy of the kernel that skip mode reads."""
    self.packed_weight[...] = self._unit_major()

  def set_estimator(self, est: LowRankEstimator) -> None:
    """Replaces the estimator factors (and the rank) with `est`, checked against the kernel.

    The one way factors reach a layer: refits, rank selection and evaluation all go
    through it, so the rank attribute can never disagree with the factors. It also
    refreshes the packed copy of the kernel, so skip mode reads the current weights.
    """
    rank = _checks.check_estimator(est, *self.kernel.shape)
    self.rank = _checks.check_rank(rank, *self.kernel.shape)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)
    self.repack()

  def refit(
    self,
    inputs: Array | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
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
    self.set_estimator(fit_estimator(method, kernel, rank, inputs, bias=self.bias[...], **options))

  def calibrate(self, x: Array, *, recall: float = 0.99) -> Array:
    """Sets the threshold to the largest one with `recall` on `x` (`calibrate_threshold`)."""
    self.threshold[...] = jnp.asarray(
      calibrate_threshold(x, self.kernel[...], self.bias[...], self.estimator, recall=recall),
      jnp.float32,
    )
    self.repack()
    return self.threshold[...]

  def packed(self) -> PackedDense:
    """The layer's current inference form, read from the packed copy (no transpose).

    Differentiating through it gives the kernel the gradient it would get through a pack
    of the kernel (`_read_packed`), so skip mode trains like mask mode.
    """
    weight = _read_packed(self.packed_weight[...], self.kernel[...])
    bias = jnp.reshape(self.bias[...], weight.shape[:2])
    return PackedDense(weight, bias, self.u[...], self.v[...])

  def pack(self, dtype: Any = None) -> PackedDense:
    """Refreshes the packed copy and returns the layer for `lrcc_jax.packed_dense`.

    Args:
      dtype: optional storage dtype of the returned weights (e.g. `jnp.bfloat16`).
    """
    self.repack()
    packed = self.packed()
    if dtype is not None:
      packed = packed._replace(weight=packed.weight.astype(dtype))
    return packed

  def __call__(self, x: Array, mode: Mode = "dense") -> Array:
    _check_mode(mode)
    with jax.named_scope(f"lrcc.ConditionalDense.{mode}"):
      if mode == "skip":
        packed = self.packed()
        if self.dtype is not None:
          x = x.astype(self.dtype)
        return packed_dense(x, packed, threshold=self.threshold[...], capacity=self.capacity)
      kernel, bias = self.kernel[...], self.bias[...]
      if self.dtype is not None:
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
      if mode == "dense":
        _checks.check_features(x, kernel.shape[0])
        return jax.nn.relu(add_bias(x @ kernel, bias))
      return conditional_dense(
        x,
        kernel,
        bias,
        self.estimator,
        threshold=self.threshold[...],
        capacity=self.capacity,
        block_size=self.block_size,
      )


def default_rank(n_in: int, n_out: int) -> int:
  """Default estimator rank: an eighth of the smaller side, at least 1."""
  return max(1, min(n_in, n_out) // 8)


class ConditionalMLP(nnx.Module):
  """A fully connected ReLU classifier whose hidden layers are `ConditionalDense`.

  The architecture of Davis & Arel: hidden ReLU layers with dropout, then a dense linear
  classifier. `__call__` can return the hidden activations (before dropout) for the L1
  sparsity penalty and the estimator statistics. In skip mode, with dropout off, the whole
  network runs `lrcc_jax.packed_mlp`, which may keep activations sparse between layers.

  Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from lrcc_jax.nn import ConditionalMLP
    >>> model = ConditionalMLP(784, [256, 128], 10, capacities=[4, 4], block_sizes=16,
    ...                        rngs=nnx.Rngs(0))
    >>> model.eval()
    >>> x = jnp.ones((1, 784))
    >>> bool(jnp.allclose(model(x, mode="skip"), model(x, mode="mask"), atol=1e-4))
    True
  """

  def __init__(
    self,
    in_features: int,
    hidden_sizes: Sequence[int],
    num_classes: int,
    *,
    ranks: int | Sequence[int] | None = None,
    thresholds: float | Sequence[float] = 0.0,
    capacities: int | Sequence[int | None] | None = None,
    block_sizes: int | Sequence[int] = 1,
    dropout_rate: float = 0.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    bias_init: Initializer = default_bias_init,
    rngs: nnx.Rngs,
  ):
    if not hidden_sizes:
      raise ValueError("hidden_sizes must name at least one hidden layer.")
    n = len(hidden_sizes)
    widths = [in_features, *hidden_sizes]
    ranks = _checks.per_layer(ranks, n, "ranks")
    ranks = [default_rank(a, b) if r is None else r for r, a, b in zip(ranks, widths, widths[1:])]
    thresholds = _checks.per_layer(thresholds, n, "thresholds")
    capacities = _checks.per_layer(capacities, n, "capacities")
    block_sizes = _checks.per_layer(block_sizes, n, "block_sizes")
    init = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init)
    self.layers = nnx.List(
      [
        ConditionalDense(a, b, rank=r, threshold=t, capacity=c, block_size=bs, rngs=rngs, **init)
        for a, b, r, t, c, bs in zip(widths, widths[1:], ranks, thresholds, capacities, block_sizes)
      ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  @property
  def ranks(self) -> tuple[int, ...]:
    return tuple(l.rank for l in self.layers)

  @property
  def thresholds(self) -> tuple[float, ...]:
    """The layers' thresholds as Python floats (outside `jit`)."""
    return tuple(float(l.threshold[...]) for l in self.layers)

  @property
  def capacities(self) -> tuple[int | None, ...]:
    return tuple(l.capacity for l in self.layers)

  def __call__(
    self, x: Array, *, mode: Mode = "dense", return_activations: bool = False
  ) -> Array | tuple[Array, list[Array]]:
    """Logits (..., num_classes), and optionally the hidden activations."""
    _check_mode(mode)
    if mode == "skip" and (self.dropout.deterministic or not self.dropout.rate):
      with jax.named_scope("lrcc.ConditionalMLP.skip"):
        if self.head.dtype is not None:
          x = x.astype(self.head.dtype)
        return packed_mlp(
          x,
          self.packed(),
          thresholds=[l.threshold[...] for l in self.layers],
          capacities=list(self.capacities),
          return_activations=return_activations,
        )
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
    ranks = _checks.per_layer(ranks, len(self.layers), "ranks")
    layer_x: list[Array | None] = [None] * len(ranks)
    if method in NEEDS_INPUTS:
      if inputs is None:
        raise ValueError(f"method={method!r} needs calibration inputs.")
      layer_x = list(self.layer_inputs(inputs, mode="dense"))
    for layer, r, xi in zip(self.layers, ranks, layer_x):
      layer.refit(xi, method=method, rank=r, **options)

  def set_thresholds(self, thresholds: float | Sequence[float]) -> None:
    """Sets the thresholds' values (no retrace of a jitted model)."""
    for layer, t in zip(self.layers, _checks.per_layer(thresholds, len(self.layers), "thresholds")):
      layer.threshold[...] = jnp.asarray(t, jnp.float32)

  def set_capacities(self, capacities: int | Sequence[int | None] | None) -> None:
    """Sets the static capacities (they fix shapes: a jitted model retraces)."""
    for layer, c in zip(self.layers, _checks.per_layer(capacities, len(self.layers), "capacities")):
      n_blocks = layer.kernel.shape[1] // layer.block_size
      layer.capacity = _checks.check_capacity(c, n_blocks, layer.block_size)

  def calibrate(self, x: Array, *, recall: float = 0.99) -> tuple[float, ...]:
    """Sets each layer's threshold to reach `recall` on `x`, in order.

    Layer `l` is calibrated on the inputs produced by the conditional layers before it,
    so the thresholds account for the errors upstream.
    """
    h = x
    for layer in self.layers:
      layer.calibrate(h, recall=recall)
      h = layer(h, "mask")
    return self.thresholds

  def repack(self) -> None:
    """Refreshes every layer's packed copy of its kernel."""
    for layer in self.layers:
      layer.repack()

  def packed(self) -> PackedMLP:
    """The network's current inference form, read from the packed copies (no transpose)."""
    return PackedMLP(tuple(l.packed() for l in self.layers), *self._head())

  def pack(self, dtype: Any = None) -> PackedMLP:
    """Refreshes the packed copies; the network for `lrcc_jax.packed_mlp`."""
    return PackedMLP(tuple(l.pack(dtype) for l in self.layers), *self._head())

  def _head(self) -> tuple[Array, Array]:
    bias = self.head.bias
    assert bias is not None  # built with use_bias=True
    return self.head.kernel[...], bias[...]

  def settings(self) -> dict:
    return {
      "ranks": list(self.ranks),
      "thresholds": list(self.thresholds),
      "capacities": list(self.capacities),
      "block_sizes": [l.block_size for l in self.layers],
    }
