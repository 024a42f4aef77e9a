"""The native XLA:CPU tile-product kernel against numpy, XLA, and under jit/grad/vmap."""

import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lrcc_jax as L
from lrcc_jax import _native, _packed, _sparse

needs_native = pytest.mark.skipif(
    not _native.available(), reason=f"native kernel unavailable: {_native.status()['reason']}"
)


def test_builds_wherever_a_compiler_exists():
  if shutil.which("g++") or os.environ.get("CXX"):
    assert _native.available(), _native.status()


def _case(rng, n_blocks, b_out, n_in, b_in, k, runs, rows):
  w = rng.standard_normal((n_blocks, b_out, n_in)).astype(np.float32)
  out = np.stack([np.sort(rng.choice(n_blocks, k, replace=False)) for _ in range(rows)]).astype(np.int32)
  starts = np.stack(
      [np.sort(rng.choice(n_in // b_in, runs, replace=False)) * b_in for _ in range(rows)]
  ).astype(np.int32)
  values = rng.standard_normal((rows, runs * b_in)).astype(np.float32)
  return w, out, starts, values


def _numpy_product(w, out, starts, values, b_in):
  rows, k = out.shape
  z = np.zeros((rows, k, w.shape[1]), np.float64)
  for r in range(rows):
    cols = (starts[r][:, None] + np.arange(b_in)).reshape(-1)
    for o in range(k):
      z[r, o] = w[out[r, o]][:, cols].astype(np.float64) @ values[r]
  return z


def _native_fn(b_in):
  return lambda w, o, s, v: _native.tile_product(w, o, s, v, b_in, _sparse._xla_tile_product)


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    b_out=st.integers(1, 9),
    b_in=st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64, 5]),
    n_tiles=st.integers(1, 6),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_numpy_and_xla(b_out, b_in, n_tiles, rows, seed):
  rng = np.random.default_rng(seed)
  n_in_tiles = n_tiles + int(rng.integers(0, 3))
  n_blocks = int(rng.integers(1, 6))
  k = int(rng.integers(1, n_blocks + 1))
  w, out, starts, values = _case(rng, n_blocks, b_out, n_in_tiles * b_in, b_in, k, n_tiles, rows)
  got = jax.jit(_native_fn(b_in))(w, out, starts, values)
  np.testing.assert_allclose(got, _numpy_product(w, out, starts, values, b_in), rtol=1e-4, atol=1e-4)
  xla = _sparse._xla_tile_product(jnp.asarray(w), out, starts, values, b_in=b_in)
  np.testing.assert_allclose(got, xla, rtol=1e-4, atol=1e-4)


@needs_native
@settings(max_examples=15, deadline=None)
@given(
    b_out=st.integers(1, 9),
    b_in=st.sampled_from([1, 3, 4, 16, 64]),
    n_tiles=st.integers(1, 5),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_bf16_weights_match_numpy_within_the_widening_bound(b_out, b_in, n_tiles, rows, seed):
  """bf16 weights widen exactly to f32: the result is the f32 product of the rounded weights."""
  rng = np.random.default_rng(seed)
  n_blocks = int(rng.integers(1, 6))
  k = int(rng.integers(1, n_blocks + 1))
  w, out, starts, values = _case(rng, n_blocks, b_out, (n_tiles + 1) * b_in, b_in, k, n_tiles, rows)
  w16 = jnp.asarray(w, jnp.bfloat16)
  fn = jax.jit(_native_fn(b_in))
  assert "lrcc_tile_product_bf16" in fn.lower(w16, out, starts, values).as_text()
  got = np.asarray(fn(w16, out, starts, values))
  rounded = np.asarray(w16.astype(jnp.float32))
  np.testing.assert_allclose(got, _numpy_product(rounded, out, starts, values, b_in), rtol=1e-4, atol=1e-4)
  # Against the unrounded f32 weights: within the documented bound 2^-8 Σ|w x|.
  exact = _numpy_product(w, out, starts, values, b_in)
  bound = 2.0**-8 * _numpy_product(np.abs(w), out, starts, np.abs(values), b_in) + 1e-5
  assert np.all(np.abs(got - exact) <= bound)


@needs_native
def test_bf16_packed_dense_runs_the_kernel_and_halves_the_bytes():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(128) / 10, jnp.float32)
  est = L.fit_svd(kernel, 8)
  p16 = L.pack(kernel, bias, est, block_size=16, dtype=jnp.bfloat16)
  assert p16.weight.dtype == jnp.bfloat16 and p16.weight.nbytes * 2 == kernel.nbytes
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
  fn = jax.jit(lambda x: L.packed_dense(x, p16, threshold=-0.1, capacity=3, strategy="gather"))
  text = fn.lower(x).as_text()  # small layers run the fused kernel (`_fused.runs`)
  assert "lrcc_tile_product_bf16" in text or "lrcc_fused_layer_bf16" in text
  rounded = kernel.astype(jnp.bfloat16).astype(jnp.float32)
  mask = L.unit_mask(L.estimate(x, est, bias), -0.1, 3, 16)
  np.testing.assert_allclose(fn(x), L.masked_dense(x, rounded, bias, mask), rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda x: fn(x).sum())(x)
  ref = jax.grad(lambda x: L.masked_dense(x, rounded, bias, mask).sum())(x)
  np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("n_in", [7, 48, 100])
def test_one_long_run_is_the_gathered_matvec(n_in):
  """The dense-input form (one run of n_in, with a tail that is not a multiple of 16)."""
  rng = np.random.default_rng(n_in)
  w = jnp.asarray(rng.standard_normal((6, 4, n_in)), jnp.float32)
  idx = jnp.asarray([[0, 2, 5], [1, 3, 4]], jnp.int32)
  x = jnp.asarray(rng.standard_normal((2, n_in)), jnp.float32)
  got = jax.jit(_packed.gathered_matvec)(w, idx, x)
  ref = np.einsum("rkbi,ri->rkb", np.asarray(w)[np.asarray(idx)], np.asarray(x))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, _packed._xla_gathered_matvec(w, idx, x), rtol=1e-5, atol=1e-5)


@needs_native
def test_grad_vmap_and_no_retrace():
  rng = np.random.default_rng(0)
  w, out, starts, values = (jnp.asarray(a) for a in _case(rng, 8, 4, 64, 8, 3, 4, 2))
  nat, xla = _native_fn(8), lambda w, o, s, v: _sparse._xla_tile_product(w, o, s, v, b_in=8)

  def loss(fn):
    return lambda w, v: jnp.sum(jnp.sin(fn(w, out, starts, v)))

  chex.assert_trees_all_close(
      jax.grad(loss(nat), (0, 1))(w, values), jax.grad(loss(xla), (0, 1))(w, values), atol=1e-5
  )
  vb = jnp.stack([values, 2 * values, values - 1])
  chex.assert_trees_all_close(
      jax.vmap(lambda v: nat(w, out, starts, v))(vb), jax.vmap(lambda v: xla(w, out, starts, v))(vb), atol=1e-5
  )
  wb = jnp.stack([w, -w])  # batched weights take the XLA product
  chex.assert_trees_all_close(
      jax.vmap(lambda w: nat(w, out, starts, values))(wb),
      jax.vmap(lambda w: xla(w, out, starts, values))(wb),
      atol=1e-5,
  )

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(w, o, s, v):
    return nat(w, o, s, v)

  for shift in range(3):
    np.testing.assert_allclose(f(w, out, starts, values + shift), xla(w, out, starts, values + shift), atol=1e-5)


@needs_native
def test_sparse_chain_uses_the_kernel_and_matches_the_xla_chain(monkeypatch):
  rng = np.random.default_rng(1)
  n, caps, bs = 64, (3, 2), 8
  layers = []
  for c in caps:
    w = jnp.asarray(rng.standard_normal((n, n)) / 8, jnp.float32)
    b = jnp.asarray(rng.standard_normal(n) / 8, jnp.float32)
    est = L.fit_svd(w, 6)
    layers.append(L.pack(w, b, est, block_size=bs))
  x = jnp.asarray(rng.standard_normal((2, n)), jnp.float32)

  def make_chain():  # a new function object each time: traces are cached per function
    def chain(x):
      h = x
      for p, c in zip(layers, caps):
        h = _sparse.sparse_packed_dense(h, p, capacity=c)
      return _sparse.densify(h, n)

    return chain

  assert "ffi_call" in str(jax.make_jaxpr(make_chain())(x))
  got = jax.jit(make_chain())(x)
  monkeypatch.setattr(_native, "usable", lambda *a: False)
  assert "ffi_call" not in str(jax.make_jaxpr(make_chain())(x))
  ref = jax.jit(make_chain())(x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "env, reason", [({"LRCC_JAX_NATIVE": "0"}, "disabled"), ({"CXX": "/nonexistent/c++"}, "build failed")]
)
def test_unavailable_kernel_falls_back_to_xla_with_a_reason(env, reason, tmp_path):
  code = (
      "import jax, jax.numpy as jnp, numpy as np\n"
      "from lrcc_jax import _native, _packed\n"
      "w = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 8)\n"
      "z = _packed.gathered_matvec(w, jnp.array([[1]]), jnp.ones((1, 8)))\n"
      "np.testing.assert_allclose(z, np.asarray(w)[1].sum(-1)[None, None])\n"
      "print(_native.status())\n"
  )
  outer = {k: v for k, v in os.environ.items() if k != "LRCC_JAX_NATIVE"}  # a run with it off
  full_env = {**outer, "LRCC_JAX_CACHE": str(tmp_path), **env}
  done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "'available': False" in done.stdout and reason in done.stdout


def test_build_key_changes_with_every_source_and_header(tmp_path, monkeypatch):
  """Guards the library's cache key: an edited header (included by several sources, not
  compiled itself) must rebuild the library like an edited source does."""
  from lrcc_jax import _native as native

  assert {p.name for p in native._HEADERS} >= {"topk.h"}
  src, hdr = tmp_path / "a.cc", tmp_path / "a.h"
  src.write_text("int f();")
  hdr.write_text("#define A 1")
  monkeypatch.setattr(native, "_SOURCES", (src,))
  monkeypatch.setattr(native, "_HEADERS", (hdr,))
  first = native._build_key()
  hdr.write_text("#define A 2")
  second = native._build_key()
  src.write_text("int g();")
  assert len({first, second, native._build_key()}) == 3
