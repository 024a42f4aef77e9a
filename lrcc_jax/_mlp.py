"""Whole-network skip-mode inference of a packed ReLU MLP (the functional core).

`packed_mlp` chains packed hidden layers and a dense classifier head. It chooses, from
static shapes only, between keeping activations sparse between layers (`SparseRows`, input
sparsity) and running `packed_dense` layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _fused, _policy
from lrcc_jax._estimator import add_bias
from lrcc_jax._packed import PackedDense, packed_dense
from lrcc_jax._policy import Policies
from lrcc_jax._sparse import NATIVE_MIN_RUN, SparseRows, densify, sparse_linear, sparse_packed_dense

Array = jax.Array


class PackedMLP(NamedTuple):
  """A `ConditionalMLP` packed for inference: hidden layers plus the dense classifier."""

  layers: tuple[PackedDense, ...]
  head_kernel: Array
  head_bias: Array


ChainPath = Literal["sparse", "layerwise", "dense"]


def chain_path(
  platform: str,
  rows: int,
  layers: Sequence[tuple[tuple[int, ...], jnp.dtype]],
  capacities: Sequence[int | None],
  dtype: jnp.dtype,
  policy: Policies = None,
  ranks: Sequence[int] | None = None,
) -> ChainPath:
  """`packed_mlp`'s "auto" on `platform`, from static shapes: the one chain decision.

  - "sparse" (activations as `SparseRows`) when every layer has a capacity and either every
    layer runs the fused CPU kernel (`_fused.runs`, with the previous layer's
    `capacity · block_size` active inputs) or gathering pays for every layer under the tile
    product's policy (`_policy.plan_chain`);
  - else "layerwise" when some layer skips (its `packed_dense` gathers or runs fused);
  - else "dense": no layer can skip profitably, so every layer runs its dense product
    (and the mask), with no per-layer decision left to make.

  `ranks` (the estimators' ranks, one per layer) enter `_fused.runs`; without them the
  estimator is taken as free.
  """
  plans = [
    _policy.plan_layer(platform, "auto", rows, c, shape, w_dtype, dtype, policy)
    for (shape, w_dtype), c in zip(layers, capacities)
  ]
  fused, m = [], layers[0][0][2] if layers else 0
  ranks = [0] * len(layers) if ranks is None else ranks
  for (shape, w_dtype), c, plan, r in zip(layers, capacities, plans, ranks):
    fused.append(
      c is not None and _fused.runs(plan, platform, rows, c, shape, w_dtype, dtype, m, r)
    )
    m = shape[1] * c if c is not None else shape[0] * shape[1]
  if all(c is not None for c in capacities) and (
    all(fused)
    or _policy.plan_chain(platform, rows, layers, capacities, dtype, NATIVE_MIN_RUN, policy)
  ):
    return "sparse"
  if any(fused) or any(plan.gather for plan in plans):
    return "layerwise"
  return "dense"


def sparse_chain_pays(
  rows: int,
  packed: PackedMLP,
  capacities: Sequence[int | None],
  dtype: jnp.dtype = jnp.float32,
  *,
  platform: str | None = None,
  policy: Policies = None,
) -> bool:
  """Whether `packed_mlp`'s "auto" keeps activations sparse for `rows` rows of `dtype`.

  `chain_path(...) == "sparse"` on `platform` (default: the current device's).
  """
  return auto_path(rows, packed, capacities, dtype, platform=platform, policy=policy) == "sparse"


def auto_path(
  rows: int,
  packed: PackedMLP,
  capacities: Sequence[int | None],
  dtype: jnp.dtype = jnp.float32,
  *,
  platform: str | None = None,
  policy: Policies = None,
) -> ChainPath:
  """`chain_path` of a packed network on `platform` (default: the current device's)."""
  platform = _policy.current_platform() if platform is None else platform
  layers = [(l.weight.shape, l.weight.dtype) for l in packed.layers]
  ranks = [l.u.shape[1] for l in packed.layers]
  return chain_path(platform, rows, layers, capacities, dtype, policy, ranks)


def packed_mlp(
  x: Array,
  packed: PackedMLP,
  *,
  thresholds: Sequence[float | Array],
  capacities: Sequence[int | None],
  return_activations: bool = False,
  strategy: Literal["auto", "sparse", "layerwise", "dense"] = "auto",
  policy: Policies = None,
) -> Array | tuple[Array, list[Array]]:
  """Skip-mode inference of a packed `ConditionalMLP`.

  ``"sparse"`` keeps every hidden activation as `SparseRows` (indices, values), so each
  layer reads only the estimator rows and weights of its active inputs (input sparsity,
  `sparse_packed_dense`); it needs a capacity on every hidden layer. ``"layerwise"`` runs
  `packed_dense` layer by layer on dense activations. ``"auto"`` picks ``"sparse"`` when
  every layer has a capacity and skipping pays at this batch size, ``"layerwise"`` when
  some layer skips, else ``"dense"`` (every layer's dense product and mask): `chain_path`
  decides from static shapes. All
  give the same values. The choice, like the layers' kernels, belongs to the platform the
  program is lowered for (`_policy.dispatch`).

  Args:
    x: (rows, n_in) inputs (or (n_in,)).
    packed: output of `ConditionalMLP.pack`.
    thresholds: one per hidden layer.
    capacities: one per hidden layer (blocks per row), None for no cap.
    return_activations: also return the dense hidden activations.
    strategy: "auto", "sparse" or "layerwise".
    policy: optional `Policy` (or one per platform) for every layer's decision and kernel.

  Returns:
    Logits, and optionally the list of hidden activations.
  """
  if not len(thresholds) == len(capacities) == len(packed.layers):
    raise ValueError(
      f"{len(packed.layers)} layers need as many thresholds and capacities, got"
      f" {len(thresholds)} and {len(capacities)}."
    )
  if strategy not in ("auto", "sparse", "layerwise", "dense"):
    raise ValueError(f"strategy={strategy!r} must be 'auto', 'sparse', 'layerwise' or 'dense'.")
  rows = math.prod(x.shape[:-1])
  sparse_ok = all(c is not None for c in capacities)
  if strategy == "sparse" and not sparse_ok:
    raise ValueError(f"strategy='sparse' needs a capacity on every layer, got {list(capacities)}.")
  if strategy == "auto":
    layers = [(l.weight.shape, l.weight.dtype) for l in packed.layers]
    ranks = [l.u.shape[1] for l in packed.layers]
    return _policy.dispatch(
      lambda platform: chain_path(platform, rows, layers, capacities, x.dtype, policy, ranks),
      lambda path, x, packed, thresholds: _run_mlp(
        x, packed, thresholds, capacities, return_activations, path, policy
      ),
      (x, packed, list(thresholds)),
    )
  return _run_mlp(x, packed, thresholds, capacities, return_activations, strategy, policy)


def _run_mlp(
  x: Array,
  packed: PackedMLP,
  thresholds: Sequence[float | Array],
  capacities: Sequence[int | None],
  return_activations: bool,
  path: str,
  policy: Policies,
) -> Array | tuple[Array, list[Array]]:
  """`packed_mlp` with its path decided: sparse chain, layer by layer, or all dense."""
  acts = []
  if path == "sparse":
    lead = x.shape[:-1]
    sp: Array | SparseRows = jnp.reshape(x, (-1, x.shape[-1]))
    for layer, t, c in zip(packed.layers, thresholds, capacities):
      assert c is not None  # the sparse chain needs a capacity on every layer
      sp = sparse_packed_dense(sp, layer, threshold=t, capacity=c, policy=policy)
      if return_activations:
        acts.append(jnp.reshape(densify(sp, layer.n_out), lead + (layer.n_out,)))
    assert isinstance(sp, SparseRows)
    logits = jnp.reshape(sparse_linear(sp, packed.head_kernel, packed.head_bias), lead + (-1,))
    return (logits, acts) if return_activations else logits

  h = x
  for layer, t, c in zip(packed.layers, thresholds, capacities):
    if path == "dense":
      h = packed_dense(h, layer, threshold=t, capacity=c, strategy="dense", policy=policy)
    else:
      h = packed_dense(h, layer, threshold=t, capacity=c, policy=policy)
    acts.append(h)
  logits = add_bias(h @ packed.head_kernel, packed.head_bias)
  return (logits, acts) if return_activations else logits
