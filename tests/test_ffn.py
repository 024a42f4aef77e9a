"""Conditional FFNs (`conditional_ffn`, `pack_ffn`, `packed_ffn`), randomized fits, `ConditionalFFN`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reference_mask, selection_margin
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_packed import _eqns, _primitive_names

import lrcc_jax as L
from lrcc_jax._ffn import ffn_gathers

ACTS = ["relu", "relu2", "gated"]  # gated = ReLU-gated: relu(x W_in + b_in) * (x W_up + b_up)


def _ffn(seed, d, d_ff, d_out, rank, gated):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a.astype(np.float32))
  p = {
      "w_in": f32(rng.standard_normal((d, d_ff)) / np.sqrt(d)),
      "b_in": f32(0.1 * rng.standard_normal(d_ff)),
      "w_out": f32(rng.standard_normal((d_ff, d_out)) / np.sqrt(d_ff)),
      "b_out": f32(0.1 * rng.standard_normal(d_out)),
  }
  if gated:
    p["w_up"] = f32(rng.standard_normal((d, d_ff)) / np.sqrt(d))
    p["b_up"] = f32(0.1 * rng.standard_normal(d_ff))
  return p, L.fit_svd(p["w_in"], rank)


def _gate_kw(p):
  return {k: p[k] for k in ("w_up", "b_up") if k in p}


def reference_ffn(x, p, mask, activation):
  """The contract in float64 numpy, from a given mask."""
  f = lambda a: np.asarray(a, np.float64)
  x = f(x)
  z = x @ f(p["w_in"]) + f(p["b_in"])
  h = np.maximum(z, 0.0)
  if activation == "relu2":
    h = h * h
  if "w_up" in p:
    h = h * (x @ f(p["w_up"]) + f(p["b_up"]))
  return np.where(mask, h, 0.0) @ f(p["w_out"]) + f(p["b_out"])


@st.composite
def ffn_cases(draw):
  d = draw(st.integers(1, 12))
  block_size = draw(st.sampled_from([1, 2, 4]))
  n_blocks = draw(st.integers(1, 8))
  d_ff = n_blocks * block_size
  d_out = draw(st.integers(1, 6))
  rank = draw(st.integers(1, min(d, d_ff)))
  capacity = draw(st.one_of(st.none(), st.integers(1, n_blocks)))
  threshold = draw(st.sampled_from([0.0, -0.2, 0.3]))
  batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  act = draw(st.sampled_from(ACTS))
  strategy = draw(st.sampled_from(["auto", "gather", "dense"]))
  seed = draw(st.integers(0, 2**31 - 1))
  return d, d_ff, d_out, rank, block_size, capacity, threshold, batch, act, strategy, seed


@settings(max_examples=30)
@given(ffn_cases())
def test_conditional_and_packed_ffn_equal_numpy_reference(case):
  d, d_ff, d_out, rank, bs, capacity, threshold, batch, act, strategy, seed = case
  p, est = _ffn(seed, d, d_ff, d_out, rank, act == "gated")
  activation = "relu" if act == "gated" else act
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(batch + (d,)), jnp.float32)
  z_hat = np.asarray(x, np.float64) @ np.asarray(est.u, np.float64) @ np.asarray(est.v, np.float64)
  z_hat = z_hat + np.asarray(p["b_in"], np.float64)
  assume(selection_margin(z_hat, threshold, capacity, bs) > 1e-3)
  mask = reference_mask(z_hat, threshold, capacity, bs)
  want = reference_ffn(x, p, mask, activation)
  kw = {"threshold": threshold, "capacity": capacity, "activation": activation}
  # jitted: one compile per example instead of one per eager op (keeps the test fast)
  cond = jax.jit(lambda x, p, est: L.conditional_ffn(x, **p, est=est, block_size=bs, **kw))
  got = cond(x, p, est)
  chex.assert_shape(got, batch + (d_out,))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  packed = L.pack_ffn(p["w_in"], p["b_in"], p["w_out"], p["b_out"], est, block_size=bs, **_gate_kw(p))
  got_p = jax.jit(lambda x, pk: L.packed_ffn(x, pk, strategy=strategy, **kw))(x, packed)
  chex.assert_shape(got_p, batch + (d_out,))
  np.testing.assert_allclose(np.asarray(got_p), want, rtol=1e-4, atol=1e-4)


def test_mask_equals_conditional_dense_mask_and_skips_units():
  """Zeroing w_out's rows of masked units changes nothing; masked units never reach y."""
  p, est = _ffn(3, 8, 32, 5, 3, False)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 8)), jnp.float32)
  kw = {"threshold": 0.05, "capacity": 3, "block_size": 4}
  h = L.conditional_dense(x, p["w_in"], p["b_in"], est, **kw)  # M ⊙ relu(z)
  want = h @ p["w_out"] + p["b_out"][None]
  got = L.conditional_ffn(x, p["w_in"], p["b_in"], p["w_out"], p["b_out"], est, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.all((np.asarray(h) != 0).reshape(4, 8, 4).any(-1).sum(-1) <= 3)


def test_pack_layout_stacks_gate_rows_per_block():
  p, est = _ffn(0, 5, 12, 3, 2, True)
  pk = L.pack_ffn(p["w_in"], p["b_in"], p["w_out"], p["b_out"], est, block_size=4, **_gate_kw(p))
  chex.assert_shape([pk.w_in, pk.b_in, pk.w_out, pk.b_out], [(3, 8, 5), (3, 8), (3, 4, 3), (3,)])
  assert pk.gated and (pk.block_size, pk.n_blocks, pk.d_model, pk.d_ff) == (4, 3, 5, 12)
  for blk in range(3):
    for j in range(4):
      u = 4 * blk + j
      np.testing.assert_array_equal(np.asarray(pk.w_in[blk, j]), np.asarray(p["w_in"][:, u]))
      np.testing.assert_array_equal(np.asarray(pk.w_in[blk, 4 + j]), np.asarray(p["w_up"][:, u]))
      np.testing.assert_array_equal(np.asarray(pk.w_out[blk, j]), np.asarray(p["w_out"][u]))
  np.testing.assert_array_equal(np.asarray(pk.gate_bias()), np.asarray(p["b_in"]))
  plain = L.pack_ffn(p["w_in"], p["b_in"], p["w_out"], p["b_out"], est, block_size=4)
  assert not plain.gated and plain.w_in.shape == (3, 4, 5)


def test_ffn_errors_name_shapes_and_values():
  p, est = _ffn(0, 6, 12, 4, 2, True)
  w_in, b_in, w_out, b_out = p["w_in"], p["b_in"], p["w_out"], p["b_out"]
  x = jnp.zeros((2, 6))
  f = L.conditional_ffn
  with pytest.raises(ValueError, match=r"x has shape \(2, 7\).*n_in=6"):
    f(jnp.zeros((2, 7)), w_in, b_in, w_out, b_out, est)
  with pytest.raises(ValueError, match=r"w_out has shape \(11, 4\).*\(12, d_out\)"):
    f(x, w_in, b_in, w_out[:11], b_out, est)
  with pytest.raises(ValueError, match=r"bias has shape \(3,\)"):
    f(x, w_in, b_in, w_out, b_out[:3], est)
  with pytest.raises(ValueError, match="activation='gelu'"):
    f(x, w_in, b_in, w_out, b_out, est, activation="gelu")
  with pytest.raises(ValueError, match=r"both w_up and b_up.*b_up=None"):
    f(x, w_in, b_in, w_out, b_out, est, w_up=p["w_up"])
  with pytest.raises(ValueError, match=r"w_up \(6, 11\)"):
    f(x, w_in, b_in, w_out, b_out, est, w_up=p["w_up"][:, :11], b_up=p["b_up"])
  with pytest.raises(ValueError, match="block_size=5 must be a positive divisor of n_out=12"):
    f(x, w_in, b_in, w_out, b_out, est, block_size=5)
  with pytest.raises(ValueError, match=r"capacity=7 is outside \[1, 6\]"):
    f(x, w_in, b_in, w_out, b_out, est, block_size=2, capacity=7)
  with pytest.raises(ValueError, match=r"estimator v has shape"):
    f(x, w_in, b_in, w_out, b_out, L.fit_svd(w_in[:, :6], 2))
  with pytest.raises(ValueError, match="block_size=5"):
    L.pack_ffn(w_in, b_in, w_out, b_out, est, block_size=5)
  with pytest.raises(ValueError, match="both w_up and b_up"):
    L.pack_ffn(w_in, b_in, w_out, b_out, est, b_up=p["b_up"])
  pk = L.pack_ffn(w_in, b_in, w_out, b_out, est, block_size=3)
  with pytest.raises(ValueError, match=r"x has shape \(7,\).*n_in=6"):
    L.packed_ffn(jnp.zeros((7,)), pk)
  with pytest.raises(ValueError, match=r"capacity=5 is outside \[1, 4\]"):
    L.packed_ffn(x, pk, capacity=5)
  with pytest.raises(ValueError, match="activation='tanh'"):
    L.packed_ffn(x, pk, activation="tanh")
  with pytest.raises(ValueError, match="strategy='fast'"):
    L.packed_ffn(x, pk, capacity=1, strategy="fast")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rows", [1, 3])
def test_gradients_treat_the_mask_as_constant(act, rows):
  """grad of packed_ffn (gather path) = grad of conditional_ffn = grad of a fixed-mask FFN."""
  p, est = _ffn(1, 8, 16, 3, 3, act == "gated")
  activation = "relu" if act == "gated" else act
  x = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 8)), jnp.float32)
  kw = {"threshold": -0.1, "capacity": 2}
  mask = L.unit_mask(L.estimate(x, est, p["b_in"]), -0.1, 2, 4)

  def loss_cond(x, p):
    return jnp.sum(L.conditional_ffn(x, **p, est=est, block_size=4, activation=activation, **kw) ** 2)

  def loss_packed(x, p):
    pk = L.pack_ffn(**p, est=est, block_size=4)
    return jnp.sum(L.packed_ffn(x, pk, activation=activation, strategy="gather", **kw) ** 2)

  def loss_fixed(x, p):
    z = x @ p["w_in"] + p["b_in"][None]
    h = jax.nn.relu(z) ** (2 if activation == "relu2" else 1)
    if "w_up" in p:
      h = h * (x @ p["w_up"] + p["b_up"][None])
    return jnp.sum((jnp.where(mask, h, 0.0) @ p["w_out"] + p["b_out"][None]) ** 2)

  want = jax.grad(loss_fixed, argnums=(0, 1))(x, p)
  for fn in (loss_cond, loss_packed):
    chex.assert_trees_all_close(jax.grad(fn, argnums=(0, 1))(x, p), want, rtol=1e-4, atol=1e-5)
  # units outside the mask get no gradient in w_in
  dead = ~np.asarray(mask).any(0)
  assert dead.any() and np.all(np.asarray(want[1]["w_in"])[:, dead] == 0)


def test_jit_vmap_and_leading_dims_agree():
  p, est = _ffn(5, 8, 32, 4, 4, True)
  pk = L.pack_ffn(**p, est=est, block_size=4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8)), jnp.float32)
  f = lambda x: L.packed_ffn(x, pk, capacity=2, activation="relu2", strategy="gather")
  ref = f(x)
  chex.assert_trees_all_close(jax.jit(f)(x), ref, atol=1e-6)
  chex.assert_trees_all_close(jax.vmap(jax.vmap(f))(x), ref, atol=1e-6)
  chex.assert_trees_all_close(f(x[0, 0]), ref[0, 0], atol=1e-6)
  g = lambda x: L.conditional_ffn(x, **p, est=est, capacity=2, block_size=4, activation="relu2")
  chex.assert_trees_all_close(jax.vmap(g)(x), ref, atol=1e-5)


@pytest.mark.parametrize("strategy", ["gather", "dense", "auto"])
@pytest.mark.parametrize("rows", [1, 4])
def test_packed_ffn_is_cond_free_and_reads_only_selected_rows(strategy, rows):
  p, est = _ffn(5, 16, 64, 8, 4, True)
  pk = L.pack_ffn(**p, est=est, block_size=4)
  x = jnp.ones((rows, 16))
  jaxpr = jax.make_jaxpr(lambda x: L.packed_ffn(x, pk, threshold=0.1, capacity=2, strategy=strategy))(x).jaxpr
  prims = _primitive_names(jaxpr)
  assert not {q for q in prims if q in ("cond", "while") or "callback" in q}
  eqns = list(_eqns(jaxpr))
  # the gather path reads w_in/w_up and w_out only through gathers (or the native kernel)
  readers = {e.primitive.name for e in eqns for v in e.invars if getattr(v, "aval", None) is not None
             and v.aval.shape in (pk.w_in.shape, pk.w_out.shape)}
  gathered = strategy == "gather" or (strategy == "auto" and ffn_gathers(pk, rows, 2))
  if gathered:
    assert readers <= {"gather", "ffi_call", "custom_jvp_call", "custom_vmap_call", "pjit"}, readers
    assert readers & {"gather", "ffi_call", "custom_vmap_call"}
  else:
    assert "dot_general" in readers or "reshape" in readers


def test_no_recompilation_on_repeated_calls():
  p, est = _ffn(6, 12, 24, 5, 4, False)
  pk = L.pack_ffn(**p, est=est, block_size=2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, pk, t):
    return L.packed_ffn(x, pk, threshold=t, capacity=3, activation="relu2")

  rng = np.random.default_rng(0)
  for i in range(4):
    f(jnp.asarray(rng.standard_normal((1, 12)), jnp.float32), pk, jnp.float32(0.1 * i))


def test_bf16_storage_error_is_bounded():
  p, est = _ffn(7, 32, 64, 16, 8, True)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32)), jnp.float32)
  ref = L.packed_ffn(x, L.pack_ffn(**p, est=est, block_size=8), capacity=3, strategy="gather")
  pk = L.pack_ffn(**p, est=est, block_size=8, dtype=jnp.bfloat16)
  assert pk.w_in.dtype == pk.w_out.dtype == jnp.bfloat16
  got = L.packed_ffn(x, pk, capacity=3, strategy="gather")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0.05, atol=0.05)


def _lower(platform, gated, strategy):
  p, est = _ffn(8, 64, 256, 64, 8, gated)
  pk = L.pack_ffn(**p, est=est, block_size=16)
  f = lambda x, pk: L.packed_ffn(x, pk, capacity=2, activation="relu2", strategy=strategy)
  specs = (jax.ShapeDtypeStruct((1, 64), jnp.float32), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pk))
  return jax.jit(f).trace(*specs).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_lowers_for_accelerators_with_xla_gathers(platform, strategy, monkeypatch):
  """With the native kernel out of the way (as on a GPU/TPU backend), both paths lower."""
  from lrcc_jax import _native

  monkeypatch.setattr(_native, "usable", lambda *dtypes: False)
  text = _lower(platform, True, strategy)
  assert "lrcc_tile_product" not in text
  assert ("gather" in text) == (strategy == "gather")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_default_lowering_has_no_cpu_kernel_target(platform):
  from lrcc_jax import _native

  text = _lower(platform, False, "gather")
  assert _native.TARGET not in text and "lrcc_ffn_rows_product" not in text


# --- randomized fits ---------------------------------------------------------------------


def _structured(seed, n, m, decay=lambda i: 1.0 / (1.0 + i)):
  """(n, m) matrix with singular values decay(0), decay(1), ... and random singular vectors."""
  rng = np.random.default_rng(seed)
  k = min(n, m)
  p, _ = np.linalg.qr(rng.standard_normal((n, k)))
  q, _ = np.linalg.qr(rng.standard_normal((m, k)))
  return jnp.asarray((p * decay(np.arange(k))) @ q.T, jnp.float32)


@pytest.mark.parametrize("decay", [lambda i: 1.0 / (1.0 + i), lambda i: np.exp(-i / 16.0)])
def test_randomized_svd_is_within_one_percent_of_exact(decay):
  w = _structured(0, 192, 512, decay)
  err = lambda e: float(jnp.linalg.norm(w - e.u @ e.v))
  exact = L.fit_svd(w, 16)
  fast = L.fit_svd(w, 16, method="randomized")
  chex.assert_shape([fast.u, fast.v], [(192, 16), (16, 512)])
  assert err(exact) <= err(fast) * (1 + 1e-4)  # Eckart–Young: nothing beats the exact fit
  assert err(fast) <= 1.01 * err(exact), (err(fast), err(exact))
  # without power iterations or oversampling the sketch is visibly worse: the test can fail
  crude = L.fit_svd(w, 16, method="randomized", oversample=0, power_iters=0)
  assert err(crude) > 1.01 * err(exact)
  # different seeds, same quality; jit composes
  other = jax.jit(lambda w: L.fit_svd(w, 16, method="randomized", seed=3))(w)
  assert err(other) <= 1.01 * err(exact)


def test_randomized_data_aware_is_within_one_percent_of_exact():
  w = _structured(1, 64, 256)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((512, 64)) * np.linspace(0.1, 2.0, 64), jnp.float32)
  obj = lambda e: float(jnp.linalg.norm(x @ (w - e.u @ e.v)))
  exact = L.fit_data_aware(w, 8, x)
  fast = L.fit_data_aware(w, 8, x, method="randomized")
  assert obj(fast) <= 1.01 * obj(exact), (obj(fast), obj(exact))
  # the data-aware objective is what it optimises: better on x than the plain SVD
  assert obj(fast) < obj(L.fit_svd(w, 8, method="randomized"))


def test_fit_method_errors():
  w = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="method='fast' must be 'exact' or 'randomized'"):
    L.fit_svd(w, 2, method="fast")
  with pytest.raises(ValueError, match="method='qr'"):
    L.fit_data_aware(w, 2, jnp.ones((8, 4)), method="qr")
  with pytest.raises(ValueError, match="oversample=-1"):
    L.fit_svd(w, 2, method="randomized", oversample=-1)


def test_cholesky_orth_is_orthonormal_on_ill_conditioned_input():
  from lrcc_jax._estimator import cholesky_orth

  a = jnp.asarray(np.random.default_rng(0).standard_normal((300, 12)) * np.logspace(0, -4, 12), jnp.float32)
  q = cholesky_orth(a)
  np.testing.assert_allclose(np.asarray(q.T @ q), np.eye(12), atol=1e-4)
  # same column space: projecting a onto q loses nothing
  np.testing.assert_allclose(np.asarray(q @ (q.T @ a)), np.asarray(a), atol=1e-4)


# --- ConditionalFFN ----------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_module_modes_agree_and_match_the_functional_core(act):
  from flax import nnx

  from lrcc_jax.nn import ConditionalFFN

  m = ConditionalFFN(16, 64, rank=4, activation="relu" if act == "gated" else act, gated=act == "gated",
                     capacity=3, block_size=4, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 16)), jnp.float32)
  w = m._weights()
  mask = m(x, "mask")
  want = L.conditional_ffn(x, **w, est=m.estimator, capacity=3, block_size=4, activation=m.activation)
  chex.assert_trees_all_close(mask, want, atol=1e-6)
  m.pack()
  chex.assert_trees_all_close(m(x, "skip"), mask, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x, "skip"))(m, x), mask, rtol=1e-4, atol=1e-5)
  # with no cap and a threshold far below every estimate, mask = dense
  m.capacity = None
  m.threshold[...] = jnp.float32(-1e9)
  chex.assert_trees_all_close(m(x, "mask"), m(x, "dense"), atol=1e-5)
  with pytest.raises(ValueError, match="mode='fast'"):
    m(x, "fast")


def test_module_skip_uses_the_cache_refreshed_by_pack_refit_and_calibrate(monkeypatch):
  from flax import nnx

  from lrcc_jax.nn import ConditionalFFN
  from lrcc_jax.nn import _ffn as ffn_mod

  m = ConditionalFFN(16, 64, rank=4, activation="relu2", capacity=4, block_size=4, rngs=nnx.Rngs(1))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((12, 16)), jnp.float32)
  packed = m.pack()
  calls = []
  real = ffn_mod.pack_ffn
  monkeypatch.setattr(ffn_mod, "pack_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
  for _ in range(3):
    m(x, "skip")
  assert calls == []  # no repacking per call
  assert all(a is b for a, b in zip(jax.tree.leaves(m.packed.get_value()), jax.tree.leaves(packed)))
  m.refit(x, method="data_aware", rank=8, fit="randomized")
  assert len(calls) == 1 and m.rank == 8 and m.packed.get_value().u.shape == (16, 8)
  chex.assert_trees_all_close(m(x, "skip"), m(x, "mask"), rtol=1e-4, atol=1e-5)
  t = m.calibrate(x, recall=0.9)
  assert len(calls) == 2 and float(t) == float(m.threshold[...])
  stats = L.estimator_stats(x, m.w_in[...], m.b_in[...], m.estimator, t)
  assert float(stats["recall"]) >= np.float32(0.9)
  with pytest.raises(ValueError, match="needs calibration inputs"):
    m.refit(method="data_aware")


def test_module_trains_in_mask_mode():
  import optax
  from flax import nnx

  from lrcc_jax.nn import ConditionalFFN

  m = ConditionalFFN(8, 32, rank=4, gated=True, capacity=4, block_size=2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 8)), jnp.float32)
  y = jnp.sin(x)

  @nnx.jit
  def step(m, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x, "mask") - y) ** 2))(m)
    opt.update(m, g)
    return loss

  u0 = m.u[...]
  losses = [float(step(m, opt)) for _ in range(30)]
  assert losses[-1] < 0.7 * losses[0]
  np.testing.assert_array_equal(np.asarray(m.u[...]), np.asarray(u0))  # the estimator is not trained


# --- benchmark -----------------------------------------------------------------------------


def test_ffn_flop_model():
  from lrcc_jax.apps.bench import ffn_flop_speedup

  # dense 2 d f; conditional r (d + f) + 2 c d f
  d, f, r, c = 2048, 8192, 64, 0.1
  assert ffn_flop_speedup(d, f, r, c, False) == pytest.approx(2 * d * f / (r * (d + f) + 2 * c * d * f))
  assert ffn_flop_speedup(d, f, r, c, True) == pytest.approx(3 * d * f / (r * (d + f) + 3 * c * d * f))


def test_run_ffn_writes_checked_rows(tmp_path, capsys):
  import json

  from lrcc_jax.apps import bench

  path = bench.run_ffn(
    tmp_path, repeats=1, rank=4, d_model=32, d_ff=256, widths=(16,), trained_fit_steps=3,
    cache_dir=tmp_path / "cache",
  )
  out = json.loads(path.read_text())
  assert [r["variant"] for r in out["rows"]] == ["relu", "relu2", "gated"]
  row = out["rows"][0]
  assert row["capacity"] == 2 and row["computed_fraction"] == pytest.approx(0.125)
  assert row["skip_ms"] > 0 and "composed_speedup" in row
  # a 64 KB FFN is below MIN_GATHER_WEIGHT_BYTES: "auto" computes it densely
  assert row["path"] == "dense+mask" and row["flop_model_speedup"] == 1.0
  assert [w["computed_fraction"] for w in out["widths"]] == pytest.approx([6 / 64, 16 / 64])
  for w in out["widths"]:
    assert (w["d_model"], w["d_ff"], w["auto_path"]) == (16, 64, "dense+mask")
    assert w["gather_ms"] > 0 and w["auto_speedup"] > 0
  fit = out["randomized_fit"]
  assert fit["shape"] == [32, 256] and -1e-3 <= fit["error_excess"] < 0.05
  trained = out["randomized_fit_trained"]
  assert trained["shape"] == [32, 256] and trained["trained"]["train_steps"] == 3
  assert -1e-3 <= trained["error_excess"] < 0.05
  assert 0 < trained["exact_relative_error"] < 1
  # the trained kernel is cached: a rerun reads it instead of retraining
  assert (tmp_path / "cache" / "trained_32x256_steps3.npy").exists()
  again = bench.bench_randomized_fit_trained(
    32, 256, 4, steps=3, cache=tmp_path / "cache" / "trained_32x256_steps3.npy"
  )
  assert again["trained"] is None and again["exact_error"] == pytest.approx(trained["exact_error"])
  assert out["environment"]["threads"] >= 1 and "jax_version" in out["environment"]
  assert "skip x" in capsys.readouterr().out
