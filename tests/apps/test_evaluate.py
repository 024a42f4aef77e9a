import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrcc_jax as L
from lrcc_jax.apps.data import Dataset, normalize
from lrcc_jax.apps.evaluate import RESULT_KEYS, calibration_subset, evaluate_model
from lrcc_jax import packed_mlp
from lrcc_jax.nn import ConditionalMLP, EstimatorFactor

RESULT_FIELDS = {
    "dataset", "split", "n_examples", "test_error_dense", "test_error_conditional", "ranks", "threshold",
    "estimator", "density", "recall", "computed_fraction", "theoretical_speedup",
}


def _dataset(seed=0, n_train=120, n_test=37):
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 4, (n,)).astype(np.int32)
  return Dataset("synthetic", images(n_train), labels(n_train), images(n_test), labels(n_test), 4)


def _model(ranks=(3, 2)):
  return ConditionalMLP(36, [32, 16], 4, ranks=list(ranks), rngs=nnx.Rngs(0))


def _prepared(model, ranks, thresholds):
  """A clone with the estimator refitted by SVD and thresholds set, as evaluate does."""
  m = nnx.clone(model)
  m.refit(ranks=list(ranks))
  m.set_thresholds(list(thresholds))
  return m


def test_result_keys_types_and_json():
  ds = _dataset()
  result = evaluate_model(_model(), ds, batch_size=10)
  assert set(result) == RESULT_FIELDS == set(RESULT_KEYS)
  json.dumps(result, allow_nan=False)
  assert result["dataset"] == "synthetic" and result["n_examples"] == 37
  assert result["split"] == "test"
  assert result["ranks"] == [3, 2] and result["threshold"] == [0.0, 0.0]
  assert result["estimator"] == "svd"
  for key in ("density", "recall", "computed_fraction"):
    assert len(result[key]) == 2
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result[key])
  for key in ("test_error_dense", "test_error_conditional", "theoretical_speedup"):
    assert type(result[key]) is float
  assert all(type(r) is int for r in result["ranks"])


def test_full_rank_at_zero_threshold_matches_dense():
  result = evaluate_model(_model(), _dataset(), ranks=[32, 16], threshold=0.0, batch_size=8)
  assert result["test_error_conditional"] == result["test_error_dense"]
  assert result["recall"] == [1.0, 1.0]
  np.testing.assert_allclose(result["computed_fraction"], result["density"], atol=1e-3)


def test_batching_does_not_change_the_counts():
  model, ds = _model(), _dataset()
  small = evaluate_model(model, ds, threshold=-0.1, batch_size=5)  # padded last batch
  whole = evaluate_model(model, ds, threshold=-0.1, batch_size=1000)
  assert small == whole  # exact counts, whatever the batching


def test_stats_agree_with_estimator_stats_on_conditional_inputs():
  model, ds = _model(), _dataset()
  ranks, thresholds = (4, 3), (-0.05, 0.02)
  result = evaluate_model(model, ds, ranks=ranks, threshold=thresholds, batch_size=16)
  assert result["threshold"] == pytest.approx(list(thresholds))
  m = _prepared(model, ranks, thresholds)
  x = jnp.asarray(normalize(ds.test_images))
  inputs = m.layer_inputs(x, mode="mask")
  _, dense_acts = m(x, mode="dense", return_activations=True)
  for i, layer in enumerate(m.layers):
    s = L.estimator_stats(inputs[i], layer.kernel[...], layer.bias[...], layer.estimator, layer.threshold)
    assert result["recall"][i] == pytest.approx(float(s["recall"]), rel=1e-6)
    assert result["computed_fraction"][i] == pytest.approx(float(s["computed_fraction"]), rel=1e-6)
    assert result["density"][i] == pytest.approx(float(jnp.mean(dense_acts[i] > 0)), rel=1e-6)
  errors = lambda logits: float(np.mean(np.argmax(np.asarray(logits), -1) != ds.test_labels))
  assert result["test_error_dense"] == pytest.approx(errors(m(x, mode="dense")))
  assert result["test_error_conditional"] == pytest.approx(errors(m(x, mode="mask")))


def test_theoretical_speedup_by_hand():
  model, ds = _model(), _dataset()
  result = evaluate_model(model, ds, ranks=[5, 2], threshold=0.0)
  m = _prepared(model, (5, 2), (0.0, 0.0))
  x = jnp.asarray(normalize(ds.test_images))
  _, acts = packed_mlp(x, m.pack(), thresholds=m.thresholds, capacities=[None, None], return_activations=True)
  c_in2 = float(jnp.mean(acts[0] != 0))
  c_head = float(jnp.mean(acts[1] != 0))
  c1, c2 = result["computed_fraction"]
  dense = 36 * 32 + 32 * 16 + 16 * 4
  cond = (5 * (36 + 32) + c1 * 36 * 32) + (2 * (c_in2 * 32 + 16) + c_in2 * c2 * 32 * 16) + c_head * 16 * 4
  assert result["theoretical_speedup"] == pytest.approx(dense / cond, rel=1e-6)


def test_calibrated_thresholds_reach_recall_on_training_rows_only():
  model, ds = _model(), _dataset()
  result = evaluate_model(model, ds, threshold="calibrated", recall=0.9, calibration_rows=50)
  m = _prepared(model, (3, 2), result["threshold"])
  h = jnp.asarray(calibration_subset(ds, 50))
  assert h.shape == (50, 36)
  for layer in m.layers:
    s = L.estimator_stats(h, layer.kernel[...], layer.bias[...], layer.estimator, layer.threshold)
    assert s["recall"] >= np.float32(0.9)  # recall is a float32 ratio
    h = layer(h, "mask")
  # The test split plays no part in the calibration.
  other = _dataset()._replace(test_images=_dataset(seed=5).test_images)
  again = evaluate_model(model, other, threshold="calibrated", recall=0.9, calibration_rows=50)
  assert again["threshold"] == result["threshold"]


def test_data_aware_estimator_and_model_left_unchanged():
  model, ds = _model(), _dataset()
  weights = lambda m: nnx.to_flat_state(nnx.state(m, (nnx.Param, EstimatorFactor)))
  before = [np.asarray(v[...]) for _, v in weights(model)]
  result = evaluate_model(model, ds, ranks=2, estimator="data_aware", threshold="calibrated")
  assert result["estimator"] == "data_aware" and result["ranks"] == [2, 2]
  assert model.ranks == (3, 2) and model.thresholds == (0.0, 0.0)
  after = [np.asarray(v[...]) for _, v in weights(model)]
  assert len(before) == len(after) == 10
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ranks=[3]), r"has 1 entries but the model has 2"),
        (dict(ranks=[3, 17]), r"ranks\[1\] \(hidden layer 2\): rank=17 is out of range"),
        (dict(ranks=[0, 2]), r"ranks\[0\].*rank=0"),
        (dict(threshold="auto"), r"threshold='auto'"),
        (dict(threshold=[0.0]), r"threshold has 1 entries"),
        (dict(estimator="pca"), r"estimator 'pca' is not one of svd, data_aware, trained"),
        (dict(recall=1.5), r"recall=1.5"),
        (dict(calibration_rows=0, threshold="calibrated"), r"calibration_rows=0"),
        (dict(batch_size=0), r"batch_size=0"),
    ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    evaluate_model(_model(), _dataset(), **kwargs)
