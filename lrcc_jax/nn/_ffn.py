"""`ConditionalFFN`: a transformer MLP block whose hidden units can be skipped.

A drop-in feed-forward block `x -> act(x W_in + b_in) [⊙ (x W_up + b_up)] W_out + b_out`
with the three modes of `ConditionalDense`:

- ``"dense"``: the ordinary block;
- ``"mask"``: `conditional_ffn`, the training semantics (dense products, estimator mask);
- ``"skip"``: `packed_ffn` on a cached `PackedFFN` (same values as ``"mask"``).

The packed form is built by `pack()` and refreshed by `refit()` and `calibrate()`, never
per call: packing transposes the input weights, which reads and writes every weight and
would cost more than the skipped products save. After changing the weights otherwise
(an optimizer step), call `pack()` again before using ``"skip"``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lrcc_jax import _checks
from lrcc_jax._estimator import (
  FitMethod,
  LowRankEstimator,
  add_bias,
  fit_svd,
)
from lrcc_jax._ffn import (
  ACTIVATIONS,
  Activation,
  PackedFFN,
  activate,
  conditional_ffn,
  pack_ffn,
  packed_ffn,
)
from lrcc_jax._registry import fit_estimator
from lrcc_jax._stats import calibrate_threshold
from lrcc_jax.nn._modules import MODES, EstimatorFactor, Mode, Threshold, default_rank

Array = jax.Array


class PackedCache(nnx.Variable):
  """The cached `PackedFFN` of a `ConditionalFFN` (None until packed); never trained."""


class ConditionalFFN(nnx.Module):
  """A ReLU / ReLU² / ReLU-gated transformer FFN with low-rank conditional computation.

  Attributes:
    w_in: (d_model, d_ff) `nnx.Param`; b_in: (d_ff,).
    w_up, b_up: the gate projection when `gated` (else absent).
    w_out: (d_ff, d_out) `nnx.Param`; b_out: (d_out,).
    u, v: `EstimatorFactor` variables, `u @ v ≈ w_in`.
    packed: `PackedCache` holding the skip mode's `PackedFFN`.
    threshold: `Threshold` variable (a scalar): calibrating changes a value, not the graph.
    rank, capacity, block_size, activation, gated: static settings.
  """

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    *,
    d_out: int | None = None,
    rank: int | None = None,
    activation: Activation = "relu",
    gated: bool = False,
    threshold: float = 0.0,
    capacity: int | None = None,
    block_size: int = 1,
    rngs: nnx.Rngs,
  ):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}.")
    d_out = d_model if d_out is None else d_out
    n_blocks = _checks.check_block_size(block_size, d_ff)
    self.capacity = _checks.check_capacity(capacity, n_blocks, block_size)
    rank = default_rank(d_model, d_ff) if rank is None else rank
    self.rank = _checks.check_rank(rank, d_model, d_ff)
    self.block_size = block_size
    self.threshold = Threshold(jnp.asarray(threshold, jnp.float32))
    self.activation = activation
    self.gated = bool(gated)
    init_in = jax.nn.initializers.he_normal()
    init_out = jax.nn.initializers.lecun_normal()
    self.w_in = nnx.Param(init_in(rngs.params(), (d_model, d_ff), jnp.float32))
    self.b_in = nnx.Param(jnp.zeros((d_ff,), jnp.float32))
    if self.gated:
      self.w_up = nnx.Param(init_out(rngs.params(), (d_model, d_ff), jnp.float32))
      self.b_up = nnx.Param(jnp.zeros((d_ff,), jnp.float32))
    self.w_out = nnx.Param(init_out(rngs.params(), (d_ff, d_out), jnp.float32))
    self.b_out = nnx.Param(jnp.zeros((d_out,), jnp.float32))
    est = fit_svd(self.w_in[...], self.rank)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)
    self.packed = PackedCache(None)

  @property
  def estimator(self) -> LowRankEstimator:
    return LowRankEstimator(self.u[...], self.v[...])

  def _weights(self) -> dict[str, Any]:
    names = ("w_in", "b_in", "w_out", "b_out") + (("w_up", "b_up") if self.gated else ())
    return {n: getattr(self, n)[...] for n in names}

  def pack(self, dtype: jnp.dtype | None = None) -> PackedFFN:
    """Packs the current weights and estimator (`pack_ffn`) and caches them for ``"skip"``."""
    packed = pack_ffn(
      **self._weights(), est=self.estimator, block_size=self.block_size, dtype=dtype
    )
    self.packed = PackedCache(packed)
    return packed

  def refit(
    self,
    inputs: Array | None = None,
    *,
    method: str = "svd",
    rank: int | None = None,
    fit: FitMethod = "exact",
  ) -> None:
    """Refits the estimator of `w_in` (optionally at a new rank) and repacks.

    Args:
      inputs: calibration inputs (..., d_model), needed by the fits that read them.
      method: an estimator of the registry (`lrcc_jax.ESTIMATORS`): ``"svd"`` (the
        paper), ``"data_aware"`` or ``"trained"`` (fitted on `w_in` and `b_in`).
      rank: new rank; keeps the current one when None.
      fit: ``"exact"`` or ``"randomized"`` (see `fit_svd`).
    """
    w_in = self.w_in[...]
    if rank is not None:
      self.rank = _checks.check_rank(rank, *w_in.shape)
    options: dict[str, Any] = {} if fit == "exact" else {"fit": fit}
    est = fit_estimator(method, w_in, self.rank, inputs, bias=self.b_in[...], **options)
    self.u = EstimatorFactor(est.u)
    self.v = EstimatorFactor(est.v)
    self.pack()

  def calibrate(self, x: Array, *, recall: float = 0.99) -> Array:
    """Sets the threshold to keep `recall` of the nonzero hidden units on `x`, and repacks.

    A hidden unit of every activation here is nonzero only where `z = x W_in + b_in > 0`,
    so `calibrate_threshold` on the input projection is the right criterion, gated or not.
    """
    t = calibrate_threshold(x, self.w_in[...], self.b_in[...], self.estimator, recall=recall)
    self.threshold[...] = jnp.asarray(t, jnp.float32)
    self.pack()
    return self.threshold[...]

  def hidden(self, x: Array) -> Array:
    """The dense hidden activations `h` (..., d_ff), for statistics and penalties."""
    w = self._weights()
    _checks.check_features(x, w["w_in"].shape[0], "FFN's w_in")
    z = add_bias(x @ w["w_in"], w["b_in"])
    up = add_bias(x @ w["w_up"], w["b_up"]) if self.gated else None
    return activate(z, up, self.activation)

  def __call__(self, x: Array, mode: Mode = "dense") -> Array:
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} must be one of {MODES}.")
    if mode == "dense":
      return add_bias(self.hidden(x) @ self.w_out[...], self.b_out[...])
    if mode == "mask":
      return conditional_ffn(
        x,
        **self._weights(),
        est=self.estimator,
        threshold=self.threshold[...],
        capacity=self.capacity,
        block_size=self.block_size,
        activation=self.activation,
      )
    packed = self.packed.get_value()
    if packed is None:  # not packed yet: correct, but packs on every call
      packed = pack_ffn(**self._weights(), est=self.estimator, block_size=self.block_size)
    return packed_ffn(
      x, packed, threshold=self.threshold[...], capacity=self.capacity, activation=self.activation
    )
