import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrcc_jax as L
from lrcc_jax._rank_select import RankSelection, select_ranks
from lrcc_jax.nn import ConditionalMLP


def _model_and_rows(seed=0, n=256, n_in=16, hidden=(24, 20), true_rank=2):
  """A small MLP whose hidden kernels have exact rank `true_rank`, and structured rows."""
  rng = np.random.default_rng(seed)
  model = ConditionalMLP(n_in, hidden, 3, ranks=1, rngs=nnx.Rngs(seed))
  widths = (n_in, *hidden)
  for layer, a, b in zip(model.layers, widths, widths[1:]):
    k = rng.standard_normal((a, true_rank)) @ rng.standard_normal((true_rank, b)) / np.sqrt(a)
    layer.kernel[...] = jnp.asarray(k, jnp.float32)
    layer.bias[...] = jnp.asarray(-0.1 + 0.05 * rng.standard_normal(b), jnp.float32)
  x = np.maximum(rng.standard_normal((n, 4)) @ rng.standard_normal((4, n_in)), 0)
  return model, jnp.asarray(x, jnp.float32)


def _snapshot(model):
  return (
      model.settings(),
      [(np.asarray(l.u[...]), np.asarray(l.v[...])) for l in model.layers],
  )


def test_picks_the_cheapest_rank_when_a_low_rank_suffices():
  model, x = _model_and_rows()
  sel = select_ranks(model, x, candidates=(2, 8, 16))
  assert isinstance(sel, RankSelection)
  # The kernels have rank 2: a rank-2 estimate is exact, so the higher ranks compute the
  # same units and only add estimator work.
  assert sel.ranks == (2, 2)
  for rows, rank in zip(sel.table, sel.ranks):
    assert set(rows) == {2, 8, 16}
    assert rows[rank].flops < rows[16].flops
    assert rows[rank].flops == min(r.flops for r in rows.values())
  max_rank = [
      L.LayerCost(*c[:2], 16, t[16].computed_fraction, t[16].input_fraction)
      for c, t in zip(sel.costs, sel.table)
  ] + [sel.costs[-1]]
  assert sel.speedup > L.theoretical_speedup(max_rank)


@pytest.mark.parametrize("method", ["svd", "data_aware", "trained"])
def test_valid_ranks_and_recall_on_calibration_rows(method):
  model, x = _model_and_rows(seed=1, true_rank=6)
  kwargs = dict(fit_kwargs=dict(steps=20)) if method == "trained" else {}
  sel = select_ranks(model, x, recall=0.95, candidates=(1, 3, 30, 6), method=method, **kwargs)
  assert len(sel.ranks) == len(sel.thresholds) == len(sel.table) == 2
  assert len(sel.costs) == 3 and sel.costs[-1].rank is None
  for rank, rows, layer in zip(sel.ranks, sel.table, model.layers):
    assert rank in (1, 3, 6) and rank <= min(layer.kernel.shape)
    assert 30 not in rows  # out of range for a (16, 24) / (24, 20) kernel: skipped
    for cand in rows.values():
      assert cand.recall >= 0.95
      assert 0.0 <= cand.computed_fraction <= 1.0
  assert sel.costs[0].input_fraction == 1.0
  assert sel.speedup > 0


def test_never_touches_the_model():
  model, x = _model_and_rows(seed=2)
  before = _snapshot(model)
  sel = select_ranks(model, x, candidates=(2, 4), method="data_aware")
  after = _snapshot(model)
  assert before[0] == after[0]
  chex.assert_trees_all_equal(before[1], after[1])

  for layer, est, t in zip(model.layers, sel.estimators, sel.thresholds):
    layer.set_estimator(est)
    layer.threshold = t
  assert model.ranks == sel.ranks
  np.testing.assert_allclose(model.thresholds, sel.thresholds)
  # The applied network meets the recall target on the calibration rows, layer by layer,
  # on the inputs of the conditional layers before it.
  for layer, h in zip(model.layers, model.layer_inputs(x, mode="mask")):
    stats = L.estimator_stats(h, layer.kernel[...], layer.bias[...], layer.estimator, layer.threshold)
    assert float(stats["recall"]) >= 0.99


def test_leading_dims_are_rows():
  model, x = _model_and_rows(seed=3)
  a = select_ranks(model, x, candidates=(2, 4))
  b = select_ranks(model, jnp.reshape(x, (4, -1, x.shape[-1])), candidates=(2, 4))
  assert a.ranks == b.ranks
  np.testing.assert_allclose(a.thresholds, b.thresholds)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(recall=0.0), r"recall=0.0"),
        (dict(method="pca"), r"estimator 'pca' is not one of svd, data_aware, trained"),
        (dict(candidates=()), r"at least one rank"),
        (dict(candidates=(50, 100)), r"hidden layer 1 \(16, 24\).*none of"),
        (dict(candidates=(2.5,)), r"static Python int"),
        (dict(fit_kwargs=dict(steps=3)), r"fit_kwargs only apply"),
    ],
)
def test_value_errors(kwargs, match):
  model, x = _model_and_rows()
  with pytest.raises(ValueError, match=match):
    select_ranks(model, x, **kwargs)


def test_wrong_width():
  model, x = _model_and_rows()
  with pytest.raises(ValueError, match=r"x has shape \(256, 15\)"):
    select_ranks(model, x[:, :15])
