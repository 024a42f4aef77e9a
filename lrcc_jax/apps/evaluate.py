"""Test-set evaluation of a trained `ConditionalMLP`: errors, estimator quality, FLOPs.

`evaluate_model` reproduces the paper's protocol (Davis & Arel, arXiv:1312.4461): fit the
low-rank sign estimators at the requested ranks, then report the test error of the dense
network next to that of the conditional network, the estimator's recall and the fraction
of units it computes per hidden layer, and the theoretical speed-up of the FLOP model
(`lrcc_jax.network_costs`). Everything the estimator is fitted or calibrated on comes from
the training split; the test split is only ever evaluated (``split="all"`` scores the
training rows too, e.g. a user's own data set scored as a whole).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrcc_jax import PackedMLP, _checks, packed_mlp
from lrcc_jax._flops import network_costs, theoretical_speedup
from lrcc_jax._registry import NEEDS_INPUTS, check_estimator_name
from lrcc_jax._stats import exact_and_estimate
from lrcc_jax.apps.data import SPLITS, Dataset, normalize, padded_batches, split_arrays
from lrcc_jax.apps.table import format_table
from lrcc_jax.nn import ConditionalMLP

Array = jax.Array
Estimator = Literal["svd", "data_aware", "trained"]

RESULT_KEYS: tuple[str, ...] = (
  "dataset",
  "split",
  "n_examples",
  "test_error_dense",
  "test_error_conditional",
  "ranks",
  "threshold",
  "estimator",
  "density",
  "recall",
  "computed_fraction",
  "theoretical_speedup",
)
"""The keys of `evaluate_model`'s result (``lrcc-jax evaluate`` adds the checkpoint's)."""

CAPACITY_KEYS: tuple[str, ...] = ("capacities", "test_error_capacity")
"""The keys `evaluate_model` adds when it is given `capacities`."""


def check_ranks(ranks: Any, model: ConditionalMLP) -> list[int] | None:
  """Validates per-layer estimator ranks against a model's hidden layers.

  Args:
    ranks: None (keep the model's ranks), one int for every layer, or one per layer.
    model: the network.

  Returns:
    None or a list of Python ints, one per hidden layer.

  Raises:
    ValueError: naming the layer, if the count or a rank is out of range.
  """
  if ranks is None:
    return None
  checked = []
  for i, (r, layer) in enumerate(
    zip(_checks.per_layer(ranks, len(model.layers), "ranks"), model.layers)
  ):
    try:
      checked.append(_checks.check_rank(r, *layer.kernel.shape))
    except ValueError as err:
      raise ValueError(f"ranks[{i}] (hidden layer {i + 1}): {err}") from None
  return checked


def _check_thresholds(threshold: Any, n: int) -> list[float] | None:
  """Per-layer float thresholds, or None for ``"calibrated"``."""
  if isinstance(threshold, str):
    if threshold != "calibrated":
      raise ValueError(f"threshold={threshold!r} must be a number, one per layer, or 'calibrated'.")
    return None
  return [float(t) for t in _checks.per_layer(threshold, n, "threshold")]


def calibration_subset(dataset: Dataset, rows: int, seed: int = 0) -> np.ndarray:
  """A seeded subset of `rows` normalised training images (all of them if fewer).

  Args:
    dataset: the data; only its training split is read.
    rows: how many rows to draw, at least 1.
    seed: seed of the draw.

  Returns:
    float32 (min(rows, n_train), n_features) array, in training-set order.
  """
  rows = _checks.as_static_int(rows, "calibration_rows")
  if rows < 1:
    raise ValueError(f"calibration_rows={rows} must be at least 1.")
  n_train = len(dataset.train_images)
  if n_train == 0:
    raise ValueError(f"{dataset.name}: the training split is empty; nothing to calibrate on.")
  idx = np.sort(np.random.default_rng(seed).choice(n_train, size=min(rows, n_train), replace=False))
  return normalize(dataset.train_images[idx])


def _batch_counts(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  packed: PackedMLP,
  thresholds: Array,
  x: Array,
  y: Array,
  valid: Array,
) -> dict[str, Array]:
  """Integer counts over the valid rows of one (padded) test batch.

  The estimator counts use the definitions of `estimator_stats` (active `z > 0`, computed
  `not ẑ <= t`, so NaN estimates count as computed) on the inputs that the conditional
  network feeds each layer. Counts, not ratios, so that batches add up exactly.
  """
  model = nnx.merge(graphdef, state)
  logits_dense, acts_dense = model(x, mode="dense", return_activations=True)
  n = len(packed.layers)
  logits_cond, acts_cond = packed_mlp(
    x,
    packed,
    thresholds=[thresholds[i] for i in range(n)],
    capacities=[None] * n,
    return_activations=True,
  )
  rows = valid[:, None]

  def count(mask: Array) -> Array:
    return jnp.sum(mask & rows, dtype=jnp.int32)

  def errors(logits: Array) -> Array:
    return jnp.sum((jnp.argmax(logits, axis=-1) != y) & valid, dtype=jnp.int32)

  inputs = [x, *acts_cond[:-1]]
  active, computed, hit, nonzero_in, dense_active = [], [], [], [], []
  for i, layer in enumerate(model.layers):
    z, z_hat = exact_and_estimate(inputs[i], layer.kernel[...], layer.bias[...], layer.estimator)
    a = z > 0
    c = ~(z_hat <= thresholds[i])
    active.append(count(a))
    computed.append(count(c))
    hit.append(count(a & c))
    nonzero_in.append(count(inputs[i] != 0))
    dense_active.append(count(acts_dense[i] > 0))
  return {
    "errors_dense": errors(logits_dense),
    "errors_conditional": errors(logits_cond),
    "active": jnp.stack(active),
    "computed": jnp.stack(computed),
    "hit": jnp.stack(hit),
    "nonzero_in": jnp.stack(nonzero_in),
    "dense_active": jnp.stack(dense_active),
    "head_nonzero_in": count(acts_cond[-1] != 0),
  }


_batch_counts_jit = jax.jit(_batch_counts, static_argnums=0)


@functools.partial(jax.jit, static_argnames="capacities")
def _capacity_errors(
  packed: PackedMLP,
  thresholds: Array,
  x: Array,
  y: Array,
  valid: Array,
  *,
  capacities: tuple[int | None, ...],
) -> Array:
  """Errors over the valid rows of the packed network run with static `capacities`."""
  logits = packed_mlp(
    x,
    packed,
    thresholds=[thresholds[i] for i in range(len(capacities))],
    capacities=list(capacities),
  )
  assert not isinstance(logits, tuple)
  return jnp.sum((jnp.argmax(logits, axis=-1) != y) & valid, dtype=jnp.int32)


def _finite_or_none(value: float) -> float | None:
  return value if math.isfinite(value) else None


def fit_estimators(
  model: ConditionalMLP,
  inputs: Array | None,
  *,
  estimator: str = "svd",
  ranks: Sequence[int] | None = None,
  recall: float = 0.99,
  seed: int = 0,
) -> None:
  """Refits every hidden layer's estimator of `model` in place.

  Args:
    model: the network (modified).
    inputs: (rows, n_in) normalised calibration rows; needed by ``"data_aware"`` and
      ``"trained"``. Both fit each layer on the input the dense network feeds it.
    estimator: a name of `lrcc_jax.ESTIMATORS`: ``"svd"`` (the paper), ``"data_aware"``
      (`fit_data_aware`) or ``"trained"`` (`fit_trained`, warm-started from the
      data-aware fit and trained for the operating point at `recall`).
    ranks: one rank per hidden layer, or None to keep the model's.
    recall: the recall target that ``"trained"`` optimises for.
    seed: seed of ``"trained"``'s batch draws.

  Raises:
    ValueError: for an unknown estimator, or missing inputs.
  """
  check_estimator_name(estimator)
  if estimator in NEEDS_INPUTS and inputs is None:
    raise ValueError(f"estimator={estimator!r} needs calibration inputs.")
  model.refit(inputs, method=estimator, ranks=ranks, recall=recall, seed=seed)


def selection_capacities(
  model: ConditionalMLP, inputs: Array, *, quantile: float = 0.99
) -> list[int]:
  """Static per-layer capacities from the units the estimator selects on `inputs`.

  For every hidden layer, counts per row the blocks whose score passes the layer's
  threshold (the mask of `conditional_dense` without a capacity, on the inputs that the
  conditional layers before it produce) and takes the `quantile` of those counts over
  the rows, rounded up, at least 1. A capacity below a row's count drops that row's
  lowest-scoring selected blocks, so report the error with the capacities too
  (`evaluate_model(capacities=...)`).

  Args:
    model: the network, with its estimators and thresholds set.
    inputs: (rows, n_in) normalised calibration rows (never the test split).
    quantile: in (0, 1]; 1 takes the largest count.

  Returns:
    One int per hidden layer, in [1, n_out / block_size].
  """
  quantile = _checks.check_fraction(quantile, "quantile")
  caps = []
  for layer, x in zip(model.layers, model.layer_inputs(inputs, mode="mask")):
    _, z_hat = exact_and_estimate(x, layer.kernel[...], layer.bias[...], layer.estimator)
    n_blocks = z_hat.shape[-1] // layer.block_size
    scores = jnp.max(jnp.reshape(z_hat, (-1, n_blocks, layer.block_size)), axis=-1)
    counts = np.asarray(jnp.sum(~(scores <= layer.threshold[...]), axis=-1))
    cap = int(np.ceil(np.quantile(counts, quantile, method="higher")))
    caps.append(min(max(cap, 1), n_blocks))
  return caps


def check_capacities(capacities: Any, model: ConditionalMLP) -> list[int | None] | str | None:
  """Validates `evaluate_model`'s `capacities`: None, ``"auto"``, an int or one per layer."""
  if capacities is None or capacities == "auto":
    return capacities
  if isinstance(capacities, str):
    raise ValueError(f"capacities={capacities!r} must be None, 'auto', an int or one per layer.")
  capacities = _checks.per_layer(capacities, len(model.layers), "capacities")
  out = []
  for i, (c, layer) in enumerate(zip(capacities, model.layers)):
    try:
      out.append(
        _checks.check_capacity(c, layer.kernel.shape[1] // layer.block_size, layer.block_size)
      )
    except ValueError as err:
      raise ValueError(f"capacities[{i}] (hidden layer {i + 1}): {err}") from None
  return out


def evaluate_prepared(
  model: ConditionalMLP,
  dataset: Dataset,
  *,
  estimator: str,
  batch_size: int = 500,
  split: str = "test",
) -> dict[str, Any]:
  """`evaluate_model`'s statistics for a network whose estimators are already set.

  Uses `model`'s factors, thresholds and capacities as they are (no refit). When every
  hidden layer has no capacity the result has exactly `RESULT_KEYS`; when some layer has
  one, it adds `CAPACITY_KEYS`: the capacities and the test error of the packed network
  run with them (``test_error_conditional`` is always without capacities).

  Args:
    model: the prepared network (not modified).
    dataset: the data; only `split` is read.
    estimator: the name reported in the result.
    batch_size: rows per jitted batch.
    split: ``"test"`` (default), ``"train"`` or ``"all"`` (`lrcc_jax.apps.data.SPLITS`).
  """
  batch_size = _checks.as_static_int(batch_size, "batch_size")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1.")
  images_all, labels_all = split_arrays(dataset, split)
  n_test = len(images_all)
  if n_test == 0:
    raise ValueError(f"{dataset.name}: the {split} split is empty.")
  model = nnx.clone(model)
  model.eval()
  capacities = tuple(l.capacity for l in model.layers)
  with_capacity = any(c is not None for c in capacities)
  thresholds = model.thresholds
  t = jnp.asarray(thresholds, jnp.float32)
  packed = model.pack()
  # The thresholds reach the counts as the array `t` (and are state, not graph). A neutral
  # static capacity lets one compiled program serve every capacity of a shape.
  model.set_capacities(None)
  graphdef, state = nnx.split(model)
  totals: dict[str, Any] = {}
  for images, labels, valid_rows in padded_batches(images_all, labels_all, batch_size):
    x, y, valid = jnp.asarray(normalize(images)), jnp.asarray(labels), jnp.asarray(valid_rows)
    counts = _batch_counts_jit(graphdef, state, packed, t, x, y, valid)
    if with_capacity:
      counts["errors_capacity"] = _capacity_errors(packed, t, x, y, valid, capacities=capacities)
    for key, value in jax.device_get(counts).items():
      totals[key] = totals.get(key, 0) + np.asarray(value, np.int64)

  widths = [dataset.num_features] + [int(l.kernel.shape[1]) for l in model.layers]
  units = [n_test * w for w in widths[1:]]
  active, computed, hit = totals["active"], totals["computed"], totals["hit"]
  recalls = [float(h / a) if a else 1.0 for h, a in zip(hit, active)]
  computed_fraction = [float(c / u) for c, u in zip(computed, units)]
  density = [float(d / u) for d, u in zip(totals["dense_active"], units)]
  input_fraction = [1.0] + [
    float(nz / (n_test * w)) for nz, w in zip(totals["nonzero_in"][1:], widths[1:-1])
  ]
  costs = network_costs(
    widths,
    model.ranks,
    computed_fraction,
    input_fraction,
    num_classes=int(model.head.kernel.shape[1]),
    head_input_fraction=float(totals["head_nonzero_in"] / (n_test * widths[-1])),
  )
  result = {
    "dataset": dataset.name,
    "split": split,
    "n_examples": int(n_test),
    "test_error_dense": float(totals["errors_dense"] / n_test),
    "test_error_conditional": float(totals["errors_conditional"] / n_test),
    "ranks": [int(r) for r in model.ranks],
    "threshold": [_finite_or_none(float(x)) for x in thresholds],
    "estimator": estimator,
    "density": density,
    "recall": recalls,
    "computed_fraction": computed_fraction,
    "theoretical_speedup": float(theoretical_speedup(costs)),
  }
  if with_capacity:
    result["capacities"] = [None if c is None else int(c) for c in capacities]
    result["test_error_capacity"] = float(totals["errors_capacity"] / n_test)
  return result


def evaluate_model(
  model: ConditionalMLP,
  dataset: Dataset,
  *,
  ranks: int | Sequence[int] | None = None,
  threshold: float | Sequence[float] | Literal["calibrated"] = 0.0,
  recall: float = 0.99,
  estimator: Estimator = "svd",
  calibration_rows: int = 1000,
  batch_size: int = 500,
  seed: int = 0,
  capacities: int | Sequence[int | None] | Literal["auto"] | None = None,
  capacity_quantile: float = 0.99,
  split: str = "test",
) -> dict[str, Any]:
  r"""Test error and conditional-computation statistics of a trained network.

  Steps:

  1. Refit every hidden layer's estimator at `ranks` with `estimator`: the paper's
     truncated SVD, `fit_data_aware` on `calibration_rows` seeded training rows, or
     ``"trained"``, `fit_trained` on those rows
     (`fit_estimators`).
  2. Set the thresholds: `threshold` for every layer (or one per layer), or with
     ``"calibrated"`` the largest thresholds whose recall on those training rows is at
     least `recall`, layer by layer (`ConditionalMLP.calibrate`).
  3. Optionally set static capacities: explicit ones, or with ``"auto"`` the
     `capacity_quantile` of the per-row count of selected units on the training rows
     (`selection_capacities`).
  4. Run the test split in jitted batches through the dense network and through the
     compute-skipping packed network (`packed_mlp`, no capacity), and with capacities
     also through the packed network with them (`evaluate_prepared`).

  Per hidden layer `l` it reports `density` (the dense network's fraction of nonzero
  units), and `recall` and `computed_fraction` of the estimator (as in `estimator_stats`)
  on the inputs that the conditional network feeds layer `l`, counted exactly over the
  whole test split. The theoretical speed-up uses those computed fractions `c_l` with the
  measured fraction of nonzero inputs `c_in` (1 for the image), plus the classifier head
  as an always-computed layer:

  .. math::
     \text{speed-up} = \frac{\sum_l n_{in} n_{out}}
                            {\sum_l r_l (c_{in} n_{in} + n_{out}) + c_{in} c_l n_{in} n_{out}
                             + c_{in} n_{L} k}

  The model passed in is not modified: the refit and thresholds apply to a clone.

  Args:
    model: a trained `ConditionalMLP`.
    dataset: the data; the estimator only ever sees its training split.
    ranks: estimator rank of every hidden layer (one int, or one per layer); None keeps
      the model's.
    threshold: a float for every layer, one float per layer, or ``"calibrated"``.
    recall: the target recall of ``threshold="calibrated"`` (and of ``"trained"``'s
      fit), in (0, 1].
    estimator: a name of `lrcc_jax.ESTIMATORS`: ``"svd"`` (the paper), ``"data_aware"``
      or ``"trained"``.
    calibration_rows: number of training rows for data-aware and trained fits, for
      calibration and for ``capacities="auto"``.
    batch_size: test rows per jitted batch (the last batch is padded, so one compile).
    seed: seed of the calibration rows' draw.
    capacities: None (no capacity, the default), one int for every layer, one int or
      None per layer, or ``"auto"``.
    capacity_quantile: the quantile of ``capacities="auto"``, in (0, 1].
    split: the rows scored: ``"test"`` (default), ``"train"`` or ``"all"`` (every
      example, train then test). Calibration always draws from the training split.

  Returns:
    A JSON-serialisable dict with exactly the keys `RESULT_KEYS`: `dataset` (str),
    `split` (str), `n_examples` (int, the rows scored), `test_error_dense` and
    `test_error_conditional` (floats in [0, 1]),
    `ranks` (ints), `threshold` (the floats used; None for a calibrated layer with no
    active unit, whose threshold is +inf), `estimator` (str), per-layer float lists
    `density`, `recall` and `computed_fraction`, and `theoretical_speedup` (float).
    With `capacities`, also `CAPACITY_KEYS`: ``capacities`` (the ints used) and
    ``test_error_capacity``.

  Raises:
    ValueError: on bad ranks (naming the layer), thresholds, recall, estimator, batch size,
      capacities or an empty test split.

  References:
    Davis & Arel, "Low-Rank Approximations for Conditional Feedforward Computation in Deep
    Neural Networks", arXiv:1312.4461, 2013.
  """
  n_layers = len(model.layers)
  ranks = check_ranks(ranks, model)
  thresholds = _check_thresholds(threshold, n_layers)
  check_estimator_name(estimator)
  if split not in SPLITS:
    raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}.")
  recall = _checks.check_fraction(recall, "recall")
  caps: Any = check_capacities(capacities, model)
  capacity_quantile = _checks.check_fraction(capacity_quantile, "capacity_quantile")
  batch_size = _checks.as_static_int(batch_size, "batch_size")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1.")
  if len(split_arrays(dataset, split)[0]) == 0:
    raise ValueError(f"{dataset.name}: the {split} split is empty.")

  model = nnx.clone(model)
  model.eval()
  needs_rows = estimator in NEEDS_INPUTS or thresholds is None or caps == "auto"
  train_x = jnp.asarray(calibration_subset(dataset, calibration_rows, seed)) if needs_rows else None
  fit_estimators(model, train_x, estimator=estimator, ranks=ranks, recall=recall, seed=seed)
  if thresholds is None:
    assert train_x is not None
    model.calibrate(train_x, recall=recall)
  else:
    model.set_thresholds(thresholds)
  if caps == "auto":
    assert train_x is not None
    caps = selection_capacities(model, train_x, quantile=capacity_quantile)
  if caps is not None:
    model.set_capacities(caps)
  return evaluate_prepared(model, dataset, estimator=estimator, batch_size=batch_size, split=split)


RESULTS_LEGEND = (
  "legend: err = error rate of the dense / conditional network; recall, computed = per"
  " hidden layer; speed-up (FLOP model) = dense / conditional multiply-adds, a model, not"
  " a measured time (`lrcc-jax bench` measures)."
)


def format_results(rows: Sequence[dict[str, Any]], *, label: str | None = None) -> str:
  """A human-readable table of `evaluate_model` results, one row each, with a legend.

  Args:
    rows: results; with `label`, each row's ``row[label]`` names it in a first column.
    label: the key of a name column (e.g. ``"setting"`` in the demo), or None.
  """
  header = [
    "split",
    "examples",
    "err dense",
    "err cond",
    "ranks",
    "recall",
    "computed",
    "speed-up (FLOP model)",
  ]
  right = [False, True, True, True, False, False, False, True]
  if label is not None:
    header, right = [label, *header], [False, *right]
  lines = []
  for row in rows:
    cells = [
      row.get("split", "test"),
      str(row["n_examples"]),
      f"{row['test_error_dense']:.4f}",
      f"{row['test_error_conditional']:.4f}",
      "/".join(str(r) for r in row["ranks"]),
      "/".join(f"{r:.3f}" for r in row["recall"]),
      "/".join(f"{c:.3f}" for c in row["computed_fraction"]),
      f"{row['theoretical_speedup']:.2f}x",
    ]
    lines.append([str(row[label]), *cells] if label is not None else cells)
  return format_table(header, lines, right=right, legend=(RESULTS_LEGEND,))
