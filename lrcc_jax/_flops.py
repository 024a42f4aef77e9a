"""The FLOP model behind the theoretical speed-up (docs/design.md, "FLOP model")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class LayerCost(NamedTuple):
  """One layer of the FLOP model.

  Attributes:
    n_in: input width.
    n_out: output width.
    rank: estimator rank, or None for a layer that is always computed (the classifier).
    computed_fraction: `c`, the fraction of this layer's units computed.
    input_fraction: `c_in`, the fraction of nonzero inputs (1 for the image).
  """

  n_in: int
  n_out: int
  rank: int | None
  computed_fraction: float = 1.0
  input_fraction: float = 1.0


def layer_flops(layer: LayerCost) -> tuple[float, float]:
  r"""(dense, conditional) multiply-adds of one layer, per example.

  `dense = n_in n_out`; `conditional = r (c_in n_in + n_out) + c_in c n_in n_out`. The
  estimator reads only the active inputs' rows of `U`; the exact product only active
  inputs and computed outputs. A layer with `rank=None` costs `c_in n_in n_out`.
  """
  n_in, n_out, rank, c, c_in = layer
  dense = float(n_in * n_out)
  if rank is None:
    return dense, c_in * dense
  return dense, rank * (c_in * n_in + n_out) + c_in * c * dense


def theoretical_speedup(layers: Sequence[LayerCost]) -> float:
  r"""Network speed-up of the FLOP model: `Σ dense / Σ conditional` over `layers`."""
  if not layers:
    raise ValueError("theoretical_speedup needs at least one layer.")
  dense, cond = zip(*(layer_flops(l) for l in layers))
  return sum(dense) / sum(cond)
