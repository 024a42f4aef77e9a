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

from lrcc_jax._estimator import add_bias
from lrcc_jax._packed import PackedDense, block_bytes, packed_dense, skip_pays
from lrcc_jax._sparse import densify, native_tiles, sparse_linear, sparse_packed_dense

Array = jax.Array


class PackedMLP(NamedTuple):
  """A `ConditionalMLP` packed for inference: hidden layers plus the dense classifier."""

  layers: tuple[PackedDense, ...]
  head_kernel: Array
  head_bias: Array


def sparse_chain_pays(
    rows: int, packed: PackedMLP, capacities: Sequence[int | None], dtype: jnp.dtype = jnp.float32
) -> bool:
  """Whether `packed_mlp`'s "auto" keeps activations sparse for `rows` rows of `dtype`.

  Every layer needs a capacity that passes `skip_pays`. Its native-kernel limits apply only
  when every layer's tiles run the kernel (`native_tiles`: f32 on CPU, runs of 2 or more).
  """
  if any(c is None for c in capacities):
    return False
  native = all(native_tiles(l.block_size, l.weight.dtype, dtype) for l in packed.layers)
  return all(
      skip_pays(rows, c, l.weight.shape[0], block_bytes=block_bytes(l), native=native)
      for l, c in zip(packed.layers, capacities)
  )


def packed_mlp(
    x: Array,
    packed: PackedMLP,
    *,
    thresholds: Sequence[float],
    capacities: Sequence[int | None],
    return_activations: bool = False,
    strategy: Literal["auto", "sparse", "layerwise"] = "auto",
) -> Array | tuple[Array, list[Array]]:
  """Skip-mode inference of a packed `ConditionalMLP`.

  ``"sparse"`` keeps every hidden activation as `SparseRows` (indices, values), so each
  layer reads only the estimator rows and weights of its active inputs (input sparsity,
  `sparse_packed_dense`); it needs a capacity on every hidden layer. ``"layerwise"`` runs
  `packed_dense` layer by layer on dense activations. ``"auto"`` picks ``"sparse"`` when
  every layer has a capacity and gathering pays at this batch size (`skip_pays`), else
  ``"layerwise"`` (whose layers fall back to dense products at large batches). All give
  the same values.

  Args:
    x: (rows, n_in) inputs (or (n_in,)).
    packed: output of `ConditionalMLP.pack`.
    thresholds: one per hidden layer.
    capacities: one per hidden layer (blocks per row), None for no cap.
    return_activations: also return the dense hidden activations.
    strategy: "auto", "sparse" or "layerwise".

  Returns:
    Logits, and optionally the list of hidden activations.
  """
  if not len(thresholds) == len(capacities) == len(packed.layers):
    raise ValueError(
        f"{len(packed.layers)} layers need as many thresholds and capacities, got"
        f" {len(thresholds)} and {len(capacities)}."
    )
  if strategy not in ("auto", "sparse", "layerwise"):
    raise ValueError(f"strategy={strategy!r} must be 'auto', 'sparse' or 'layerwise'.")
  rows = math.prod(x.shape[:-1])
  sparse_ok = all(c is not None for c in capacities)
  if strategy == "sparse" and not sparse_ok:
    raise ValueError(f"strategy='sparse' needs a capacity on every layer, got {list(capacities)}.")
  if strategy == "auto":
    strategy = "sparse" if sparse_chain_pays(rows, packed, capacities, x.dtype) else "layerwise"

  acts = []
  if strategy == "sparse":
    lead = x.shape[:-1]
    h = jnp.reshape(x, (-1, x.shape[-1]))
    for layer, t, c in zip(packed.layers, thresholds, capacities):
      h = sparse_packed_dense(h, layer, threshold=t, capacity=c)
      if return_activations:
        acts.append(jnp.reshape(densify(h, layer.n_out), lead + (layer.n_out,)))
    logits = jnp.reshape(sparse_linear(h, packed.head_kernel, packed.head_bias), lead + (-1,))
    return (logits, acts) if return_activations else logits

  h = x
  for layer, t, c in zip(packed.layers, thresholds, capacities):
    h = packed_dense(h, layer, threshold=t, capacity=c)
    acts.append(h)
  logits = add_bias(h @ packed.head_kernel, packed.head_bias)
  return (logits, acts) if return_activations else logits
