import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrcc_jax as L
from lrcc_jax import packed_mlp
from helpers import np_chain_grads, np_estimate, np_masked_dense, np_unit_mask
from lrcc_jax import _native
from lrcc_jax._packed import auto_gathers
from lrcc_jax.nn import ConditionalDense, ConditionalMLP, EstimatorFactor


def _model(**kw):
  kw.setdefault("ranks", [6, 4])
  return ConditionalMLP(20, [16, 12], 5, rngs=nnx.Rngs(0), **kw)


def _x(rows=8, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((rows, 20)), jnp.float32)


def test_modes_agree_with_functional_core():
  m = _model(thresholds=[-0.1, 0.0], capacities=[5, None], block_sizes=[2, 1])
  x = _x()
  layer = m.layers[0]
  np.testing.assert_allclose(
      np.asarray(layer(x, "mask")),
      np.asarray(L.conditional_dense(x, layer.kernel[...], layer.bias[...], layer.estimator, threshold=-0.1, capacity=5, block_size=2)),
      rtol=1e-6,
  )
  dense = jax.nn.relu(x @ layer.kernel[...] + layer.bias[...][None])
  np.testing.assert_allclose(np.asarray(layer(x, "dense")), np.asarray(dense), rtol=1e-6)
  chex.assert_trees_all_close(m(x, mode="skip"), m(x, mode="mask"), atol=1e-5)
  packed = m.pack()
  chex.assert_trees_all_close(
      packed_mlp(x, packed, thresholds=m.thresholds, capacities=[5, None]), m(x, mode="mask"), atol=1e-5
  )


def test_full_rank_mask_mode_equals_dense_mode():
  m = _model(ranks=[16, 12])
  x = _x()
  chex.assert_trees_all_close(m(x, mode="mask"), m(x, mode="dense"), atol=1e-5)


def test_factors_are_not_trainable_and_refit_tracks_kernel():
  m = _model()
  params = nnx.state(m, nnx.Param)
  assert all("u" not in str(path[-1]) and "v" not in str(path[-1]) for path, _ in nnx.to_flat_state(params))
  factors = nnx.state(m, EstimatorFactor)
  assert len(nnx.to_flat_state(factors)) == 4
  layer = m.layers[1]
  layer.kernel[...] = layer.kernel[...] * 2.0
  m.refit()
  chex.assert_trees_all_close(layer.estimator, L.fit_svd(layer.kernel[...], 4), atol=1e-5)
  m.refit(_x(40), method="data_aware", ranks=[3, 2])
  assert m.ranks == (3, 2)


def test_return_activations_and_dropout():
  m = _model(dropout_rate=0.5)
  x = _x()
  m.eval()
  logits, acts = m(x, return_activations=True)
  chex.assert_shape(logits, (8, 5))
  assert [a.shape for a in acts] == [(8, 16), (8, 12)]
  assert all(float(a.min()) >= 0 for a in acts)
  m.train()
  assert not np.allclose(np.asarray(m(x)), np.asarray(logits))


def test_calibrate_reaches_recall_per_layer():
  m = _model(ranks=[2, 2])
  x = _x(200)
  thresholds = m.calibrate(x, recall=0.95)
  assert len(thresholds) == 2 and all(t < 0 for t in thresholds)
  h = x
  for layer in m.layers:
    s = L.estimator_stats(h, layer.kernel[...], layer.bias[...], layer.estimator, layer.threshold)
    assert float(s["recall"]) >= 0.95
    h = layer(h, "mask")


def test_bad_configuration_errors():
  with pytest.raises(ValueError, match="ranks has 3 entries but the model has 2"):
    _model(ranks=[1, 2, 3])
  with pytest.raises(ValueError, match=r"rank=17"):
    _model(ranks=[17, 2])
  with pytest.raises(ValueError, match="mode='fast'"):
    _model()(_x(), mode="fast")
  with pytest.raises(ValueError, match=r"capacity=9 is outside \[1, 8\]"):
    ConditionalDense(4, 16, rank=2, capacity=9, block_size=2, rngs=nnx.Rngs(0))


def test_jitted_mask_mode_traces_once():
  m = _model()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def f(m, x):
    return m(x, mode="mask")

  for seed in range(3):
    f(m, _x(seed=seed))


def test_threshold_changes_values_not_the_graph():
  m = _model(capacities=[5, None], block_sizes=[2, 1])
  x = _x()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def f(m, x):
    return m(x, mode="skip"), m.layers[0](x, "mask")

  outs = []
  for t in (0.0, -0.5, 1e3):
    m.set_thresholds(t)
    outs.append(f(m, x))
    chex.assert_trees_all_close(outs[-1][0], m(x, mode="mask"), atol=1e-5)
  assert float(jnp.abs(outs[0][1]).sum()) > 0 and float(jnp.abs(outs[2][1]).sum()) == 0
  m.calibrate(_x(50), recall=0.9)
  f(m, x)


def test_skip_mode_reads_the_packed_copy_without_transposing():
  layer = ConditionalDense(20, 32, rank=4, capacity=2, block_size=8, rngs=nnx.Rngs(0))
  x = _x(1)
  jaxpr = str(jax.make_jaxpr(lambda x: layer(x, "skip"))(x))
  transposed = [l.split("=")[0] for l in jaxpr.splitlines() if "transpose[" in l]
  assert not [t for t in transposed if "[20,32]" in t or "[32,20]" in t], transposed  # only x moves
  # The copy is derived state: stale after a kernel update until refit/repack.
  layer.kernel[...] = layer.kernel[...] + 1.0
  assert not np.allclose(np.asarray(layer.packed_weight[...][0, 0]), np.asarray(layer.kernel[...][:, 0]))
  layer.refit()
  np.testing.assert_array_equal(np.asarray(layer.packed_weight[...][0, 0]), np.asarray(layer.kernel[...][:, 0]))
  chex.assert_trees_all_close(layer(x, "skip"), layer(x, "mask"), atol=1e-5)


def test_dtype_and_initializers_like_nnx_linear():
  layer = ConditionalDense(
      8, 16, rank=2, dtype=jnp.bfloat16, param_dtype=jnp.float32,
      kernel_init=nnx.initializers.ones, bias_init=nnx.initializers.constant(0.5), rngs=nnx.Rngs(0),
  )
  assert layer.kernel[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.5)
  y = layer(jnp.ones((2, 8)), "dense")
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), 8.5)


def test_docstring_examples_run():
  import doctest

  from lrcc_jax.nn import _modules

  result = doctest.testmod(_modules, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 2 and result.failed == 0


def test_assigning_a_threshold_sets_the_variable():
  layer = _model().layers[0]
  var = layer.threshold
  layer.threshold = -0.25
  assert layer.threshold is var and float(layer.threshold[...]) == -0.25


def _biased_model(**kw):
  """A `ConditionalMLP` whose hidden layers have nonzero random biases (init gives zeros)."""
  m = ConditionalMLP(20, [32, 16], 5, ranks=[6, 4], thresholds=[-0.05, 0.0], rngs=nnx.Rngs(7), **kw)
  rng = np.random.default_rng(8)
  for layer in m.layers:
    layer.bias[...] = jnp.asarray(0.3 * rng.standard_normal(layer.bias[...].shape), jnp.float32)
  m.head.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
  return m


def _reference_masks(m, x):
  """Each hidden layer's mask from the numpy reference, layer by layer (float64)."""
  masks, h = [], np.asarray(x, np.float64)
  for layer in m.layers:
    est = layer.estimator
    threshold = float(layer.threshold[...])
    mask = np_unit_mask(np_estimate(h, est.u, est.v, layer.bias[...]), threshold, layer.capacity, layer.block_size)
    masks.append(mask)
    h = np_masked_dense(h, layer.kernel[...], layer.bias[...], mask)
  return masks, h


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("mode", ["skip", "mask"])
def test_modes_equal_numpy_reference_with_biases_where_auto_gathers(mode, rows):
  """Guards the modules' skip and mask modes against the reference with nonzero biases,
  at batch sizes where skip's "auto" really gathers (not the dense fallback)."""
  m = _biased_model(capacities=[2, 2], block_sizes=[2, 1])
  x = _x(rows)
  if mode == "skip" and _native.active():
    assert all(auto_gathers(layer.pack(), rows, layer.capacity) for layer in m.layers)
  masks, h = _reference_masks(m, x)
  want = h @ np.asarray(m.head.kernel[...], np.float64) + np.asarray(m.head.bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(m(x, mode=mode)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("mode", ["skip", "mask"])
def test_mode_gradients_equal_numpy_reference(mode, rows):
  """Guards gradients through the modules' skip and mask modes: every hidden kernel and
  nonzero bias and the head get the masked reference's gradients (computed units only)."""
  m = _biased_model(capacities=[2, 2], block_sizes=[2, 1])
  x = _x(rows)
  cot = jnp.asarray(np.random.default_rng(9).standard_normal((rows, 5)), jnp.float32)
  grads = nnx.grad(lambda m: jnp.sum(cot * m(x, mode=mode)))(m)
  masks, h = _reference_masks(m, x)
  head_w = np.asarray(m.head.kernel[...], np.float64)
  layers = [(l.kernel[...], l.bias[...]) for l in m.layers]
  rx, ref, _ = np_chain_grads(x, layers, masks, np.asarray(cot, np.float64) @ head_w.T)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads.head.kernel[...]), h.T @ np.asarray(cot, np.float64), **tol)
  for i, (rw, rb) in enumerate(ref):
    g = grads.layers[i]
    np.testing.assert_allclose(np.asarray(g.kernel[...]), rw, **tol)
    np.testing.assert_allclose(np.asarray(g.bias[...]), rb, **tol)
    assert np.any(rw) and np.any(rb)
