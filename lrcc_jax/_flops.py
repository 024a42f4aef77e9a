"""The FLOP model behind the theoretical speed-up."""

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


def network_costs(
  widths: Sequence[int],
  ranks: Sequence[int | None],
  computed_fractions: Sequence[float],
  input_fractions: Sequence[float] | None = None,
  *,
  num_classes: int | None = None,
  head_input_fraction: float | None = None,
) -> list[LayerCost]:
  r"""The FLOP model of a conditional MLP: one `LayerCost` per hidden layer, then the head.

  Evaluation, rank selection and the benchmarks all cost a network this way, so the rule
  for what each layer's `c_in` is lives in one place.

  Args:
    widths: ``(n_in, h_1, …, h_L)``: the input width and the hidden layers' widths.
    ranks: the estimator rank of every hidden layer (None: always computed).
    computed_fractions: `c_l`, the computed fraction of every hidden layer.
    input_fractions: `c_in` of every hidden layer (the nonzero fraction of its input).
      None takes 1 for the first layer and, for the others, the previous layer's
      computed fraction: a unit that is not computed is zero, so that is an upper bound.
    num_classes: the classifier's width; None leaves the head out.
    head_input_fraction: the head's `c_in`; None takes the last computed fraction.

  Returns:
    ``L`` layers, plus the head (rank None, always computed) when `num_classes` is given.

  Raises:
    ValueError: if the per-layer sequences do not all have ``len(widths) - 1`` entries.
  """
  n = len(widths) - 1
  computed = [float(c) for c in computed_fractions]
  if input_fractions is None:
    input_fractions = [1.0, *computed[:-1]]
  if n < 1 or not len(ranks) == len(computed) == len(input_fractions) == n:
    raise ValueError(
      f"network_costs needs one rank, computed fraction and input fraction per hidden"
      f" layer ({n} from widths={tuple(widths)}), got {len(ranks)}, {len(computed)} and"
      f" {len(input_fractions)}."
    )
  costs = [
    LayerCost(int(a), int(b), None if r is None else int(r), c, float(c_in))
    for a, b, r, c, c_in in zip(widths, widths[1:], ranks, computed, input_fractions)
  ]
  if num_classes is not None:
    head_in = computed[-1] if head_input_fraction is None else float(head_input_fraction)
    costs.append(LayerCost(int(widths[-1]), int(num_classes), None, 1.0, head_in))
  return costs
