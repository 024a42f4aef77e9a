"""Per-layer estimator ranks chosen for the cheapest network at a recall target."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from lrcc_jax import _checks
from lrcc_jax._estimator import LowRankEstimator
from lrcc_jax._flops import LayerCost, layer_flops, network_costs, theoretical_speedup
from lrcc_jax._layers import conditional_dense
from lrcc_jax._registry import ESTIMATORS, NEEDS_INPUTS, check_estimator_name, fit_estimator
from lrcc_jax._stats import calibrate_threshold, estimator_stats


class _Layer(Protocol):
  kernel: Any
  bias: Any


class _Network(Protocol):
  """What `select_ranks` reads of a network (`lrcc_jax.nn.ConditionalMLP` has it)."""

  layers: Sequence[_Layer]
  head: Any


Array = jax.Array
Method = Literal["svd", "data_aware", "trained"]
METHODS: tuple[str, ...] = ESTIMATORS
DEFAULT_CANDIDATES: tuple[int, ...] = (5, 10, 25, 50, 100, 200)


class RankCandidate(NamedTuple):
  """One candidate rank of one layer, measured on the calibration rows.

  Attributes:
    rank: the estimator rank.
    threshold: the threshold calibrated to the recall target.
    computed_fraction: `c`, the fraction of the layer's units computed at that threshold.
    recall: the recall reached at that threshold (at least the target).
    input_fraction: `c_in`, the nonzero fraction of the layer's (conditional) input.
    flops: conditional multiply-adds per example of the FLOP model.
    dense_flops: `n_in n_out`, the dense layer's multiply-adds per example.
  """

  rank: int
  threshold: float
  computed_fraction: float
  recall: float
  input_fraction: float
  flops: float
  dense_flops: float


class RankSelection(NamedTuple):
  """The result of `select_ranks`.

  Attributes:
    ranks: the chosen rank of every hidden layer.
    thresholds: their calibrated thresholds.
    estimators: the chosen estimator of every hidden layer (apply with
      ``layer.set_estimator(est); layer.threshold = t``).
    table: per hidden layer, `{rank: RankCandidate}` for every candidate that was tried.
    costs: the FLOP model of the chosen network, hidden layers then the classifier.
    speedup: `theoretical_speedup(costs)`.
  """

  ranks: tuple[int, ...]
  thresholds: tuple[float, ...]
  estimators: tuple[LowRankEstimator, ...]
  table: tuple[Mapping[int, RankCandidate], ...]
  costs: tuple[LayerCost, ...]
  speedup: float


def _nonzero_fraction(h: Array) -> float:
  return float(jnp.mean((h != 0).astype(jnp.float32)))


def select_ranks(
  model: _Network,
  x: Array,
  *,
  recall: float = 0.99,
  candidates: Sequence[int] = DEFAULT_CANDIDATES,
  method: Method = "svd",
  fit_kwargs: Mapping | None = None,
) -> RankSelection:
  r"""Per-layer estimator ranks that minimise the network's FLOP-model cost at a recall.

  For hidden layer `l` with input width `n_in` and output width `n_out`, a candidate rank
  `r` costs (the FLOP model of `layer_flops`)

    cost_l(r) = r (c_in n_in + n_out) + c_in c_l(r) n_in n_out,

  where `c_l(r)` is the fraction of units computed at the threshold calibrated to
  `recall` (`calibrate_threshold`) on the calibration rows, and `c_in` the nonzero fraction
  of the layer's input (1 for the first layer). A larger rank buys a sharper estimate
  (smaller `c`) for more estimator work; the best trade-off differs per layer.

  The choice is greedy, layer by layer in order: layer `l` is fitted, calibrated and
  costed on the inputs produced by the conditional layers `< l` at their chosen ranks and
  thresholds (as `ConditionalMLP.calibrate` does), the cheapest candidate is kept, and its
  conditional output becomes the next layer's input. A layer's rank affects the later
  layers only through `c_in`, the nonzero fraction of its output; at a fixed recall that
  is about `recall · density` whatever the rank, so the greedy order loses little against
  a joint search over all rank tuples, and it needs `len(candidates)` fits per layer
  instead of `len(candidates) ** n_layers`.

  The model is never modified: kernels and biases are only read, and the fitting is done
  by the pure functions of the estimator registry (`fit_estimator`). To run the chosen
  network, apply the result::

    for layer, est, t in zip(model.layers, sel.estimators, sel.thresholds):
      layer.set_estimator(est)
      layer.threshold = t

  Masks are per unit (block size 1, no capacity), whatever the layers' own settings.

  Args:
    model: a `ConditionalMLP`.
    x: (N, n_features) calibration rows (e.g. a seeded subset of the training split).
    recall: recall target in (0, 1], met by every layer on `x`.
    candidates: ranks to try. Ranks outside `[1, min(n_in, n_out)]` of a layer, or above
      `N` for the data-dependent methods, are skipped for that layer.
    method: an estimator name of `ESTIMATORS`: ``"svd"`` (the paper), ``"data_aware"``
      (`fit_data_aware`) or ``"trained"`` (`fit_trained`); the data-dependent fits see the
      conditional inputs of the layer.
    fit_kwargs: extra options of the fit (`fit_estimator`; only ``"trained"`` takes any,
      e.g. ``steps``, ``seed``).

  Returns:
    A `RankSelection` with the ranks, thresholds, estimators, the per-layer candidate table and the
    FLOP model of the chosen network (with the classifier as an always-computed layer).

  Raises:
    ValueError: for a `recall` outside (0, 1], an unknown `method`, empty or non-integer
      `candidates`, a wrong input width, or a layer where no candidate is valid.

  References:
    Davis & Arel, Low-Rank Approximations for Conditional Feedforward Computation in Deep
    Neural Networks, arXiv:1312.4461, 2013 (the per-layer rank sweep this automates).
  """
  recall = _checks.check_fraction(recall, "recall")
  check_estimator_name(method)
  candidates = sorted({_checks.as_static_int(r, "candidates entry") for r in candidates})
  if not candidates:
    raise ValueError("candidates must name at least one rank.")
  fit_kwargs = dict(fit_kwargs or {})
  layers = list(model.layers)
  _checks.check_features(x, int(layers[0].kernel.shape[0]), "first hidden layer")
  h = jnp.reshape(jnp.asarray(x, jnp.float32), (-1, x.shape[-1]))
  n_rows = h.shape[0]

  c_in = 1.0
  ranks, thresholds, table, chosen_est = [], [], [], []
  computed, input_fractions = [], []
  for i, layer in enumerate(layers):
    kernel, bias = layer.kernel[...], layer.bias[...]
    n_in, n_out = (int(d) for d in kernel.shape)
    limit = min(n_in, n_out, n_rows if method in NEEDS_INPUTS else n_in)
    valid = [r for r in candidates if 1 <= r <= limit]
    if not valid:
      raise ValueError(
        f"hidden layer {i + 1} ({n_in}, {n_out}) with {n_rows} calibration rows: none of"
        f" candidates={candidates} lies in [1, {limit}]."
      )
    rows, fits = {}, {}
    for r in valid:
      est = fit_estimator(method, kernel, r, h, bias=bias, recall=recall, **fit_kwargs)
      t = calibrate_threshold(h, kernel, bias, est, recall=recall)
      stats = estimator_stats(h, kernel, bias, est, t)
      c = float(stats["computed_fraction"])
      dense, cond = layer_flops(LayerCost(n_in, n_out, r, c, c_in))
      rows[r] = RankCandidate(r, float(t), c, float(stats["recall"]), c_in, cond, dense)
      fits[r] = est
    best = min(valid, key=lambda r: (rows[r].flops, r))
    pick = rows[best]
    ranks.append(best)
    thresholds.append(pick.threshold)
    table.append(rows)
    computed.append(pick.computed_fraction)
    input_fractions.append(c_in)
    chosen_est.append(fits[best])
    h = conditional_dense(h, kernel, bias, fits[best], threshold=pick.threshold)
    c_in = _nonzero_fraction(h)
  head = model.head.kernel[...]
  widths = [int(layers[0].kernel.shape[0])] + [int(l.kernel.shape[1]) for l in layers]
  costs = network_costs(
    widths,
    ranks,
    computed,
    input_fractions,
    num_classes=int(head.shape[1]),
    head_input_fraction=c_in,
  )
  return RankSelection(
    ranks=tuple(ranks),
    thresholds=tuple(thresholds),
    estimators=tuple(chosen_est),
    table=tuple(table),
    costs=tuple(costs),
    speedup=theoretical_speedup(costs),
  )
