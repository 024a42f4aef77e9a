import pytest

import lrcc_jax as L


def test_layer_flops_formula():
  dense, cond = L.layer_flops(L.LayerCost(100, 50, 5, computed_fraction=0.2, input_fraction=0.5))
  assert dense == 5000
  assert cond == 5 * (0.5 * 100 + 50) + 0.5 * 0.2 * 5000
  assert L.layer_flops(L.LayerCost(100, 10, None, 1.0, 0.25)) == (1000, 250)


def test_network_speedup_sums_before_dividing():
  layers = [L.LayerCost(784, 1000, 50, 0.2), L.LayerCost(1000, 10, None, 1.0, 0.2)]
  dense = 784 * 1000 + 1000 * 10
  cond = 50 * (784 + 1000) + 0.2 * 784 * 1000 + 0.2 * 1000 * 10
  assert L.theoretical_speedup(layers) == pytest.approx(dense / cond)
  assert L.theoretical_speedup([L.LayerCost(10, 10, None)]) == 1.0
  with pytest.raises(ValueError):
    L.theoretical_speedup([])
