"""Block selection (`lrcc_jax._mask`, `unit_mask`) against the numpy reference, at its edges.

Every property here builds its edge cases instead of filtering them out: scores equal to
the threshold, ties at the capacity boundary, NaN and ±inf in single blocks, ±0.0, and
both selection algorithms (`top_k` + scatter, and the bisection used for large rows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lrcc_jax as L
from helpers import int_layers, np_block_mask, np_estimate, np_unit_mask, scaled_examples
from lrcc_jax import _mask

# Few distinct values, so every row has ties, values equal to the thresholds below, NaN
# and infinities in single entries, both signed zeros, and neighbours one float32 ulp
# apart (the bisection's integer keys must order them too).
_ULP_UP = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
_ULP_DOWN = float(np.nextafter(np.float32(-1.0), np.float32(-2.0)))
POOL = [-np.inf, -2.0, _ULP_DOWN, -1.0, -0.0, 0.0, 1.0, 1.0, _ULP_UP, 2.0, np.inf, np.nan]


@st.composite
def score_rows(draw):
  n = draw(st.sampled_from([3, 8]))  # few shapes: each costs compilations
  rows = draw(st.sampled_from([1, 4]))
  vals = draw(st.lists(st.sampled_from(POOL), min_size=rows * n, max_size=rows * n))
  capacity = draw(st.integers(1, n))
  threshold = draw(st.sampled_from([-np.inf, -1.0, 0.0, 1.0]))
  return np.array(vals, np.float32).reshape(rows, n), threshold, capacity


def _force_algorithm(mp, algorithm):
  """Make `block_selection` take `algorithm` whatever the size of its scores."""
  if algorithm == "bisection":
    mp.setattr(_mask, "BISECT_MIN_WIDTH", 1)
    mp.setattr(_mask, "BISECT_MIN_SCORES", 1)
  else:
    mp.setattr(_mask, "BISECT_MIN_WIDTH", 10**9)


@pytest.mark.parametrize("algorithm", ["top_k", "bisection"])
@given(score_rows())
def test_block_selection_at_ties_thresholds_and_non_finite_scores(algorithm, case):
  """Guards `>` (not `>=`) at the threshold, NaN counted above it and ranked first under a
  capacity, +0.0 above -0.0 and lower-index-first ties at the capacity boundary, for both
  selection algorithms (run eagerly: forcing the bisection on short rows is only slow to
  compile under jit)."""
  scores, threshold, capacity = case
  event(f"nan in scores: {bool(np.isnan(scores).any())}")
  with pytest.MonkeyPatch.context() as mp:
    _force_algorithm(mp, algorithm)
    got = np.asarray(_mask.block_selection(jnp.asarray(scores), threshold, capacity))
  np.testing.assert_array_equal(got, np_block_mask(scores, threshold, capacity, 1))


@pytest.mark.parametrize("capacity", [1, 37, 200])
@pytest.mark.parametrize("algorithm", ["top_k", "bisection"])
def test_block_selection_at_real_sizes_with_massive_ties(algorithm, capacity):
  """Guards both algorithms at the size where `block_selection` picks the bisection
  (128 rows x 256 blocks): scores in 7 values plus NaN/±inf, ties straddle every boundary."""
  rng = np.random.default_rng(capacity)
  scores = rng.integers(-3, 4, (128, 256)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.01] = np.nan
  scores[rng.random(scores.shape) < 0.01] = np.inf
  scores[rng.random(scores.shape) < 0.01] = -np.inf
  with pytest.MonkeyPatch.context() as mp:
    if algorithm == "top_k":
      _force_algorithm(mp, "top_k")
    got = np.asarray(jax.jit(lambda s: _mask.block_selection(s, 0.0, capacity))(jnp.asarray(scores)))
  np.testing.assert_array_equal(got, np_block_mask(scores, 0.0, capacity, 1))


def test_bisection_is_what_large_rows_use():
  """Guards the size rule itself, so the real-size test above really runs the bisection."""
  assert 256 >= _mask.BISECT_MIN_WIDTH and 128 * 256 >= _mask.BISECT_MIN_SCORES
  jaxpr = str(jax.make_jaxpr(lambda s: _mask.block_selection(s, 0.0, 3))(jnp.zeros((128, 256))))
  assert "top_k" not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda s: _mask.block_selection(s, 0.0, 3))(jnp.zeros((4, 256))))
  assert "top_k" in jaxpr


def test_nan_block_ranks_first_under_a_binding_capacity():
  """Guards NaN ranked first (not last): one NaN block among finite ones is always kept,
  and it takes its place at the capacity boundary, by index, against +inf."""
  scores = jnp.array([[5.0, np.nan, 7.0, 1.0], [np.inf, 3.0, 2.0, np.nan]], jnp.float32)
  got = np.asarray(_mask.block_selection(scores, 0.0, 1))
  np.testing.assert_array_equal(got, [[False, True, False, False], [True, False, False, False]])
  got = np.asarray(_mask.block_selection(scores, 0.0, 2))
  np.testing.assert_array_equal(got, [[False, True, True, False], [True, False, False, True]])


def test_score_equal_to_threshold_is_not_selected():
  """Guards the strict `>`: a block scoring exactly the threshold is skipped."""
  scores = jnp.array([[0.5, 0.25, 0.75]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(_mask.block_selection(scores, 0.5, None)), [[False, False, True]])
  np.testing.assert_array_equal(np.asarray(_mask.block_selection(scores, 0.5, 2)), [[False, False, True]])


@settings(max_examples=scaled_examples(1.0))
@given(int_layers(binding=False))
def test_unit_mask_equals_numpy_reference_on_integer_layers(layer):
  """Guards the whole mask pipeline (block max with NaN, threshold, capacity, expansion) on
  estimates that hit the threshold and tie exactly."""
  z_hat = L.estimate(jnp.asarray(layer.x), layer.est, jnp.asarray(layer.b))
  np.testing.assert_array_equal(
      np.asarray(z_hat), np_estimate(layer.x, layer.u, layer.v, layer.b).astype(np.float32)
  )
  got = L.unit_mask(z_hat, layer.threshold, layer.capacity, layer.block_size)
  np.testing.assert_array_equal(np.asarray(got), np_unit_mask(z_hat, layer.threshold, layer.capacity, layer.block_size))


def test_unit_mask_defaults_are_threshold_zero_no_capacity_single_units():
  """Guards `unit_mask`'s defaults (the paper's rule: compute the units estimated > 0)."""
  z_hat = jnp.array([[0.5, -0.5, 0.0, 2.0], [np.nan, 0.25, -1.0, 0.0]], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(L.unit_mask(z_hat)), [[True, False, False, True], [True, True, False, False]]
  )
