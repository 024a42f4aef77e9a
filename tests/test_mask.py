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
from lrcc_jax import _mask, _native

needs_native = pytest.mark.skipif(not _native.available(), reason="native library not built")

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


ALGORITHMS = ["top_k", "bisection", pytest.param("native", marks=needs_native)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(score_rows())
def test_block_selection_at_ties_thresholds_and_non_finite_scores(algorithm, case):
  """Guards `>` (not `>=`) at the threshold, NaN counted above it and ranked first under a
  capacity, +0.0 above -0.0 and lower-index-first ties at the capacity boundary, for the
  three selection algorithms (run eagerly: forcing the bisection on short rows is only slow
  to compile under jit)."""
  scores, threshold, capacity = case
  event(f"nan in scores: {bool(np.isnan(scores).any())}")
  kernel = "native" if algorithm == "native" else "xla"
  with pytest.MonkeyPatch.context() as mp:
    _force_algorithm(mp, algorithm)
    got = np.asarray(_mask.block_selection(jnp.asarray(scores), threshold, capacity, kernel=kernel))
  np.testing.assert_array_equal(got, np_block_mask(scores, threshold, capacity, 1))


@pytest.mark.parametrize("capacity", [1, 37, 200])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_block_selection_at_real_sizes_with_massive_ties(algorithm, capacity):
  """Guards the three algorithms at the size where `block_selection` picks the bisection
  (128 rows x 256 blocks): scores in 7 values plus NaN/±inf, ties straddle every boundary."""
  rng = np.random.default_rng(capacity)
  scores = rng.integers(-3, 4, (128, 256)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.01] = np.nan
  scores[rng.random(scores.shape) < 0.01] = np.inf
  scores[rng.random(scores.shape) < 0.01] = -np.inf
  kernel = "native" if algorithm == "native" else "xla"
  with pytest.MonkeyPatch.context() as mp:
    if algorithm == "top_k":
      _force_algorithm(mp, "top_k")
    select = jax.jit(lambda s: _mask.block_selection(s, 0.0, capacity, kernel=kernel))
    got = np.asarray(select(jnp.asarray(scores)))
  np.testing.assert_array_equal(got, np_block_mask(scores, 0.0, capacity, 1))


@needs_native
@settings(deadline=None)
@given(score_rows())
def test_native_top_blocks_are_top_ks_indices_ascending(case):
  """Guards `top_blocks(kernel="native")` against `lax.top_k` + sort: the same indices, in
  ascending order, with NaN first, ties to the lower index and -0.0 below +0.0."""
  scores, _, capacity = case
  s = jnp.asarray(scores)
  got = np.asarray(_mask.top_blocks(s, capacity, kernel="native"))
  np.testing.assert_array_equal(got, np.asarray(_mask.top_blocks(s, capacity)))
  assert got.dtype == np.int32 and np.all(np.diff(got, axis=-1) > 0)


@needs_native
@pytest.mark.parametrize("n, capacity", [(256, 26), (1000, 999), (1024, 1024), (8192, 819)])
def test_native_top_blocks_at_real_sizes_leading_axes_and_vmap(n, capacity):
  """Guards the native selection at real widths with ties everywhere (a tail past the last
  32 keys at 1000, the whole row at k = n), over leading axes and under vmap and jit."""
  rng = np.random.default_rng(n)
  scores = rng.integers(-3, 4, (2, 3, n)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.01] = np.nan
  s = jnp.asarray(scores)
  want = np.asarray(_mask.top_blocks(s, capacity))
  native = lambda s: _mask.top_blocks(s, capacity, kernel="native")
  np.testing.assert_array_equal(np.asarray(jax.jit(native)(s)), want)
  np.testing.assert_array_equal(np.asarray(jax.vmap(native)(s)), want)
  np.testing.assert_array_equal(np.asarray(jax.vmap(jax.vmap(native))(s)), want)
  with pytest.raises(ValueError, match="kernel='gpu' must be 'native' or 'xla'"):
    _mask.top_blocks(s, capacity, kernel="gpu")


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


# --- The dense fallback's epilogue (`masked_relu`), native (`csrc/select.cc`) and XLA. ---



def _np_masked_relu(z, scores, bias, threshold, capacity):
  block_size = z.shape[-1] // scores.shape[-1]
  keep = np.repeat(np_block_mask(scores, threshold, capacity, 1), block_size, axis=-1)
  v = z.astype(np.float32) + bias.astype(np.float32)
  return np.where(keep, np.where(np.isnan(v), v, np.maximum(v, 0)), 0).astype(np.float32)


@st.composite
def epilogue_cases(draw):
  scores, threshold, capacity = draw(score_rows())
  block_size = draw(st.sampled_from([1, 4]))
  capacity = draw(st.sampled_from([None, capacity, scores.shape[1]]))
  rows, n_blocks = scores.shape
  z = draw(st.lists(st.sampled_from([-1.5, -0.0, 0.0, 0.25, 3.0, np.nan]),
                    min_size=rows * n_blocks * block_size, max_size=rows * n_blocks * block_size))
  z = np.array(z, np.float32).reshape(rows, n_blocks * block_size)
  bias = np.linspace(-1, 1, n_blocks * block_size, dtype=np.float32)
  return z, scores, bias, threshold, capacity


@needs_native
@given(epilogue_cases())
def test_native_epilogue_equals_xla_and_numpy_at_ties_thresholds_and_nan(case):
  """Guards the native selection (bisection with early stop, ties to the lower index, NaN
  ranked first and selected, `>` at the threshold, capacity None / binding / n_blocks) and
  the bias + ReLU + mask pass, against the XLA form and numpy."""
  z, scores, bias, threshold, capacity = case
  args = (jnp.asarray(z), jnp.asarray(scores), jnp.asarray(bias), threshold, capacity)
  got = np.asarray(_mask.masked_relu(*args, kernel="native"))
  want = np.asarray(_mask.masked_relu(*args, kernel="xla"))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, _np_masked_relu(z, scores, bias, threshold, capacity))


@needs_native
@pytest.mark.parametrize("capacity", [1, 3, 51, 500, 999])
@pytest.mark.parametrize("width", [1024, 1000])
def test_native_epilogue_at_real_sizes_with_massive_ties(width, capacity):
  """Guards the bisection's exact stop and the tie pass on 1024- and 1000-wide rows (a tail
  past the last 32 keys) whose scores take a few values (ties straddle the boundary), are
  all distinct (the early stop), or differ only below their keys' high 16 bits (the search
  among the low halves)."""
  rng = np.random.default_rng(capacity + width)
  few = rng.integers(-3, 4, (6, width)).astype(np.float32)
  few[rng.random(few.shape) < 0.01] = np.nan
  distinct = rng.standard_normal((6, width)).astype(np.float32)
  # keys sharing their high 16 bits (1 + a multiple of 2^-20): the bisection's second
  # stage over the low halves, with ties among them in the second array
  near = (1.0 + rng.integers(0, 4096, (6, width)) * 2.0**-20).astype(np.float32)
  near_ties = (1.0 + rng.integers(0, 6, (6, width)) * 2.0**-20).astype(np.float32)
  for scores in (few, distinct, near, near_ties, np.zeros((2, width), np.float32) + 1.0):
    z = rng.standard_normal(scores.shape).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    got = jax.jit(lambda z, s, b: _mask.masked_relu(z, s, b, 0.0, capacity, kernel="native"))(z, scores, bias)
    np.testing.assert_array_equal(np.asarray(got), _np_masked_relu(z, scores, bias, 0.0, capacity))


@needs_native
def test_native_epilogue_gradients_vmap_and_traced_threshold():
  """Guards the native call's JVP (the XLA form's), its batching rule (rows folded, or the
  XLA form for a batched bias) and a traced threshold."""
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((3, 4, 32)), jnp.float32)
  s = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)

  def loss(kernel, z, b, t):
    return jnp.sum(_mask.masked_relu(z, s[0], b, t, 3, kernel=kernel) ** 2)

  for argnums in (1, 2):
    got = jax.grad(loss, argnums=argnums)("native", z[0], b[0], 0.1)
    want = jax.grad(loss, argnums=argnums)("xla", z[0], b[0], 0.1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  for in_axes in ((0, 0, None), (0, None, None), (0, 0, 0)):
    f = lambda kernel: jax.jit(jax.vmap(
        lambda z, s, b: _mask.masked_relu(z, s, b, 0.2, 3, kernel=kernel), in_axes=in_axes))
    bb = b if in_axes[2] == 0 else b[0]
    ss = s if in_axes[1] == 0 else s[0]
    np.testing.assert_array_equal(np.asarray(f("native")(z, ss, bb)), np.asarray(f("xla")(z, ss, bb)))
  t = jax.jit(lambda t: _mask.masked_relu(z[0], s[0], b[0], t, 3, kernel="native"))
  np.testing.assert_array_equal(np.asarray(t(0.5)), np.asarray(_mask.masked_relu(z[0], s[0], b[0], 0.5, 3)))


# --- The epilogue that computes the estimate itself (`estimated_masked_relu`). ---


def _integer_layer(rng, rows, n_in, rank, n_out, low=-2, high=3):
  """Small-integer x, U, V, bias: every sum is exact, so any summation order gives the same
  estimate, ties included, and the native and XLA masks must agree bit for bit."""
  draw = lambda *shape: jnp.asarray(rng.integers(low, high, shape), jnp.float32)
  return draw(rows, n_in), draw(n_in, rank), draw(rank, n_out), draw(n_out)


@needs_native
@settings(deadline=None, max_examples=40)
@given(
  rows=st.integers(1, 9),
  n_in=st.integers(1, 70),
  rank=st.integers(1, 70),
  n_blocks=st.integers(1, 40),
  block_size=st.sampled_from([1, 3, 16, 32]),
  capacity=st.integers(1, 40) | st.none(),
  threshold=st.sampled_from([-1e9, 0.0, 2.0]),
  seed=st.integers(0, 2**16),
)
def test_estimated_epilogue_equals_the_xla_form_and_numpy(
  rows, n_in, rank, n_blocks, block_size, capacity, threshold, seed
):
  """Guards the native estimate (ranks and widths off multiples of 16 and 64, rows off
  multiples of four: the padded U, the 16-wide and scalar column tails, the 1-3 row
  groups), its block scores (scalar, and 16 lanes at a time for blocks of 16 and 32) and
  the selection against the XLA form and numpy."""
  rng = np.random.default_rng(seed)
  n_out = n_blocks * block_size
  capacity = None if capacity is None else min(capacity, n_blocks)
  x, u, v, bias = _integer_layer(rng, rows, n_in, rank, n_out)
  z = jnp.asarray(rng.standard_normal((rows, n_out)), jnp.float32)
  args = (z, x, u, v, bias, threshold, capacity, block_size)
  got = np.asarray(jax.jit(_mask.estimated_masked_relu, static_argnums=(6, 7), static_argnames="kernel")(*args, kernel="native"))
  np.testing.assert_array_equal(got, np.asarray(_mask.estimated_masked_relu(*args, kernel="xla")))
  scores = (np.asarray(x) @ np.asarray(u)) @ np.asarray(v) + np.asarray(bias)
  scores = scores.reshape(rows, n_blocks, block_size).max(-1)
  want = _np_masked_relu(np.asarray(z), scores, np.asarray(bias), threshold, capacity)
  np.testing.assert_array_equal(got, want)


@needs_native
@pytest.mark.parametrize("rows, n, rank, block_size", [(3, 1024, 40, 16), (129, 1024, 64, 1)])
def test_estimated_epilogue_at_real_sizes(rows, n, rank, block_size):
  """Guards the native call at real sizes: one chunk of rows on the calling thread (3 rows),
  and chunks of four-row groups split over the pool (129 rows: a last group of one)."""
  rng = np.random.default_rng(rows)
  x, u, v, bias = _integer_layer(rng, rows, n, rank, n)
  z = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
  for capacity in (None, 7, n // block_size // 3):
    args = (z, x, u, v, bias, 0.0, capacity, block_size)
    got = jax.jit(_mask.estimated_masked_relu, static_argnums=(6, 7), static_argnames="kernel")(*args, kernel="native")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_mask.estimated_masked_relu(*args, kernel="xla")))


@needs_native
def test_estimated_epilogue_nan_estimate_gradients_and_vmap():
  """Guards a NaN in the estimate (its block is scored NaN, ranked first and kept), the JVP
  (the primal's own mask), the batching rule (rows folded; the XLA form for a batched
  bias) and a traced threshold."""
  rng = np.random.default_rng(3)
  x, u, v, bias = _integer_layer(rng, 6, 40, 20, 48)
  x = x.at[2, 5].set(jnp.nan)  # row 2's estimate is NaN everywhere: all blocks tie first
  z = jnp.asarray(rng.standard_normal((6, 48)), jnp.float32)
  call = lambda kernel, z, b, t=0.0, x=x: _mask.estimated_masked_relu(z, x, u, v, b, t, 2, 4, kernel=kernel)
  got, want = np.asarray(call("native", z, bias)), np.asarray(call("xla", z, bias))
  np.testing.assert_array_equal(got, want)
  # NaN scores pass the threshold and tie: the capacity's 2 blocks are the lowest two
  first = np.asarray(z[2, :8] + bias[:8])
  np.testing.assert_array_equal(got[2], np.concatenate([np.maximum(first, 0), np.zeros(40)]))
  for argnums in (1, 2):
    loss = lambda kernel, z, b: jnp.sum(call(kernel, z, b) ** 2)
    g_native = jax.grad(loss, argnums=argnums)("native", z, bias)
    g_xla = jax.grad(loss, argnums=argnums)("xla", z, bias)
    np.testing.assert_allclose(np.asarray(g_native), np.asarray(g_xla), rtol=1e-6)
  zz = jnp.stack([z, -z])
  xx = jnp.stack([x, x[::-1]])
  for in_axes, bb in (((0, None, 0), bias), ((0, 0, 0), jnp.stack([bias, -bias]))):
    f = lambda kernel: jax.jit(jax.vmap(lambda z, b, x: call(kernel, z, b, 0.0, x), in_axes=in_axes))
    np.testing.assert_array_equal(np.asarray(f("native")(zz, bb, xx)), np.asarray(f("xla")(zz, bb, xx)))
  t = jax.jit(lambda t: call("native", z, bias, t))
  np.testing.assert_array_equal(np.asarray(t(3.0)), np.asarray(call("xla", z, bias, 3.0)))


@needs_native
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("column", [0, 5, 21, 31])
def test_estimated_epilogue_nan_unit_scores_its_block_nan(block_size, column):
  """Guards the vectorised block maxima: one NaN unit of the estimate (a NaN in one column
  of V), in any lane and either half of a 32-unit block, makes its block's score NaN, which
  ranks first under a binding capacity; the kept block's epilogue (16 lanes at a time)
  keeps a NaN of the product."""
  rng = np.random.default_rng(column)
  n_out = 4 * block_size
  x, u, v, bias = _integer_layer(rng, 5, 24, 8, n_out)
  column = column % block_size + 2 * block_size  # a unit of block 2
  v = v.at[:, column].set(jnp.nan)
  z = jnp.asarray(rng.standard_normal((5, n_out)), jnp.float32)
  z = z.at[1, column ^ 1].set(jnp.nan)  # a NaN product in the kept block stays NaN
  args = (z, x, u, v, bias, 0.0, 1, block_size)
  native = jax.jit(_mask.estimated_masked_relu, static_argnums=(6, 7), static_argnames="kernel")
  got = np.asarray(native(*args, kernel="native"))
  np.testing.assert_array_equal(got, np.asarray(_mask.estimated_masked_relu(*args, kernel="xla")))
  block = slice(2 * block_size, 3 * block_size)
  want = np.zeros((5, n_out), np.float32)
  want[:, block] = np.maximum(np.asarray(z)[:, block] + np.asarray(bias)[block], 0)
  np.testing.assert_array_equal(got, want)


@needs_native
def test_gathers_past_eight_rows_select_natively_under_grad_jit_and_vmap():
  """Guards the native selection inside `packed_dense`'s tile-kernel gathers (16 rows): it
  is in the program, and the gradient (through the kept blocks only) and vmap agree with
  the dense path's, which selects with XLA's ops."""
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)
  p = L.pack(w, jnp.asarray(rng.standard_normal(64) / 4, jnp.float32), L.fit_svd(w, 4), block_size=16)
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  gather = lambda x: L.packed_dense(x, p, capacity=2, strategy="gather")
  dense = lambda x: L.packed_dense(x, p, capacity=2, strategy="dense")
  assert "lrcc_top_blocks" in jax.jit(gather).lower(x).as_text()
  np.testing.assert_allclose(np.asarray(jax.jit(gather)(x)), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x: jnp.sum(f(x) ** 2)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss(gather)))(x)),
                             np.asarray(jax.grad(loss(dense))(x)), rtol=1e-4, atol=1e-5)
  rows = jax.vmap(lambda r: gather(r[None])[0])(x)  # one row each: the fused kernel
  np.testing.assert_allclose(np.asarray(rows), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)
