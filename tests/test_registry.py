"""The estimator registry, the shared argument checks and the cheap package import."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrcc_jax as L
from lrcc_jax import _checks
from lrcc_jax._layers import conditional_dense
from lrcc_jax._sparse import sparse_linear, sparse_packed_dense
from lrcc_jax.nn import ConditionalDense


def _layer(n_in=12, n_out=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  kernel = jax.random.normal(k1, (n_in, n_out))
  bias = 0.1 * jax.random.normal(k2, (n_out,))
  x = jax.random.normal(k3, (64, n_in))
  return kernel, bias, x


def test_names_and_export():
  assert L.ESTIMATORS == ("svd", "data_aware", "trained")
  assert L.fit_estimator is L._registry.fit_estimator


def test_each_name_is_its_fit():
  kernel, bias, x = _layer()
  chex.assert_trees_all_close(L.fit_estimator("svd", kernel, 3), L.fit_svd(kernel, 3))
  chex.assert_trees_all_close(L.fit_estimator("data_aware", kernel, 3, x), L.fit_data_aware(kernel, 3, x))
  chex.assert_trees_all_close(
      L.fit_estimator("trained", kernel, 3, x, bias=bias, recall=0.9, seed=1, steps=4),
      L.fit_trained(kernel, bias, 3, x, recall=0.9, seed=1, steps=4),
  )


def test_errors_name_what_is_valid():
  kernel, _, x = _layer()
  with pytest.raises(ValueError, match=r"estimator 'pca' is not one of svd, data_aware, trained"):
    L.fit_estimator("pca", kernel, 3)
  with pytest.raises(ValueError, match=r"estimator a ndarray of shape \(3,\)"):
    L.fit_estimator(np.zeros(3), kernel, 3)
  with pytest.raises(ValueError, match=r"'data_aware' needs calibration inputs"):
    L.fit_estimator("data_aware", kernel, 3)
  with pytest.raises(ValueError, match=r"'svd' takes no options, got \['steps'\]"):
    L.fit_estimator("svd", kernel, 3, x, steps=3)


@pytest.mark.parametrize("method", L.ESTIMATORS)
def test_module_refit_and_set_estimator(method):
  layer = ConditionalDense(12, 8, rank=2, rngs=nnx.Rngs(0))
  _, _, x = _layer()
  layer.refit(x, method=method, rank=3, **({"steps": 2} if method == "trained" else {}))
  assert layer.rank == 3 and layer.u[...].shape == (12, 3)
  with pytest.raises(ValueError, match=r"estimator u has shape \(5, 2\)"):
    layer.set_estimator(L.LowRankEstimator(jnp.ones((5, 2)), jnp.ones((2, 8))))


def test_per_layer():
  assert _checks.per_layer(3, 2, "ranks") == [3, 3]
  assert _checks.per_layer((1, 2), 2, "ranks") == [1, 2]
  assert _checks.per_layer(np.array([1.0, 2.0]), 2, "t") == [1.0, 2.0]
  assert _checks.per_layer("auto", 2, "capacities") == ["auto", "auto"]
  with pytest.raises(ValueError, match=r"ranks has 3 entries but the model has 2 hidden layers"):
    _checks.per_layer([1, 2, 3], 2, "ranks")


def test_a_wrong_kind_is_named_by_type_and_shape_never_printed_whole():
  kernel, bias, x = _layer()
  with pytest.raises(ValueError) as err:
    L.fit_trained(kernel, bias, np.arange(1000.0), x)
  message = str(err.value)
  assert "rank must be a static Python int" in message and "shape (1000,)" in message
  assert len(message) < 200 and "999" not in message


def test_bias_of_the_wrong_shape_names_both_shapes():
  kernel, bias, x = _layer()
  est = L.fit_svd(kernel, 3)
  bad = jnp.zeros((7,))
  with pytest.raises(ValueError, match=r"bias has shape \(7,\) but the kernel \(12, 8\) needs \(8,\)"):
    conditional_dense(x, kernel, bad, est)
  with pytest.raises(ValueError, match=r"bias has shape \(7,\) but the kernel \(12, 8\) needs \(8,\)"):
    L.pack(kernel, bad, est)
  packed = L.pack(kernel, bias, est, block_size=2)._replace(bias=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"bias has shape \(3, 2\) but the packed layer needs \(4, 2\)"):
    L.packed_dense(x, packed)
  with pytest.raises(ValueError, match=r"bias has shape \(3, 2\) but the packed layer needs \(4, 2\)"):
    sparse_packed_dense(x, packed, capacity=2)
  rows = sparse_packed_dense(x, L.pack(kernel, bias, est), capacity=4)
  with pytest.raises(ValueError, match=r"bias has shape \(7,\) but the kernel \(8, 5\) needs \(5,\)"):
    sparse_linear(rows, jnp.ones((8, 5)), bad)


def test_network_costs_is_the_chained_flop_model():
  costs = L.network_costs([10, 8, 6], [2, 3], [0.5, 0.25], num_classes=4)
  assert costs == [
      L.LayerCost(10, 8, 2, 0.5, 1.0), L.LayerCost(8, 6, 3, 0.25, 0.5),
      L.LayerCost(6, 4, None, 1.0, 0.25),
  ]
  measured = L.network_costs([10, 8], [2], [0.5], [0.9], num_classes=4, head_input_fraction=0.3)
  assert measured[0].input_fraction == 0.9 and measured[1].input_fraction == 0.3
  with pytest.raises(ValueError, match="one rank, computed fraction"):
    L.network_costs([10, 8, 6], [2], [0.5, 0.5])


def test_importing_the_package_does_not_load_jax():
  code = "import sys, lrcc_jax; assert 'jax' not in sys.modules; lrcc_jax.ESTIMATORS; assert 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                 env={**os.environ, "PYTHONPATH": os.getcwd()})
  assert set(L.__all__) <= set(dir(L))
  for name in L.__all__:
    assert getattr(L, name) is not None
