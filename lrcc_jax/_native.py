"""An optional native XLA:CPU kernel for the tile product of input-sparse layers.

With `m` active inputs in runs of `b_in` and `k` selected blocks of `b_out` outputs, a
sparse layer needs `z[r, o, j] = Σ_i Σ_t W[out[r, o] b_out + j, start[r, i] + t] ·
x[r, i b_in + t]`: `k b_out · m / b_in` runs of `b_in` contiguous floats. XLA:CPU
materialises that gather element by element and reduces it afterwards; 100-200 µs per
4096-wide layer at 10% with blocks of 16, against 20-30 µs for `csrc/tile_product.cc`,
which reads every run once, four weight rows at a time, with a software prefetch
(scratch measurement, 16 input sets, same process).

The kernel is compiled on first use with the system C++ compiler against the XLA FFI
headers that jaxlib ships (`jax.ffi.include_dir()`), cached under
`$LRCC_JAX_CACHE` (default `~/.cache/lrcc_jax`), and registered as the FFI target
`lrcc_tile_product` for the CPU platform. Where there is no compiler, or the build fails,
or `LRCC_JAX_NATIVE=0`, `available()` is False and callers use the pure-XLA product,
which gives the same values; `status()` says which and why.

`tile_product` is differentiable (its JVP is the XLA product's) and batches under `vmap`
(batched weights fall back to XLA; other batch axes fold into rows).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TARGET = "lrcc_tile_product"
# The same kernel reading bf16 weights (f32 inputs, outputs and accumulation).
TARGET_BF16 = "lrcc_tile_product_bf16"
_TARGETS = {jnp.dtype(jnp.float32): TARGET, jnp.dtype(jnp.bfloat16): TARGET_BF16}
# The shared (block-major) mode: each block of the union of the rows' selections is read
# once for all the (row, block) pairs that selected it; values bit-identical to the above.
TARGET_SHARED = "lrcc_tile_product_shared"
TARGET_SHARED_BF16 = "lrcc_tile_product_bf16_shared"
_SHARED_TARGETS = {
  jnp.dtype(jnp.float32): TARGET_SHARED,
  jnp.dtype(jnp.bfloat16): TARGET_SHARED_BF16,
}
# The dense fallback's epilogue (`csrc/select.cc`, called by `_mask.masked_relu`).
MASKED_RELU = "lrcc_masked_relu"
# The same epilogue computing the estimate's block scores itself from x, U and V.
ESTIMATED_MASKED_RELU = "lrcc_estimated_masked_relu"
# The capacity's selection alone (`csrc/select.cc`, called by `_mask.top_blocks`).
TOP_BLOCKS = "lrcc_top_blocks"
# Every FFI target of the library: name -> exported handler symbol. All sources in
# `csrc/` are compiled into one shared library; adding a kernel is a new `.cc` file
# and a line here.
SYMBOLS = {
  TARGET: "LrccTileProduct",
  TARGET_BF16: "LrccTileProductBf16",
  TARGET_SHARED: "LrccTileProductShared",
  TARGET_SHARED_BF16: "LrccTileProductSharedBf16",
  "lrcc_ffn_rows_product": "LrccFfnRowsProduct",  # csrc/ffn.cc, used by `_ffn`
  "lrcc_ffn_rows_product_bf16": "LrccFfnRowsProductBf16",
  MASKED_RELU: "LrccMaskedRelu",
  ESTIMATED_MASKED_RELU: "LrccEstimatedMaskedRelu",
  TOP_BLOCKS: "LrccTopBlocks",
  # csrc/fused_layer.cc: one whole conditional layer per call (`_fused`).
  "lrcc_fused_layer": "LrccFusedLayer",
  "lrcc_fused_layer_bf16": "LrccFusedLayerBf16",
  "lrcc_fused_sparse_layer": "LrccFusedSparseLayer",
  "lrcc_fused_sparse_layer_bf16": "LrccFusedSparseLayerBf16",
}
_CSRC = pathlib.Path(__file__).with_name("csrc")
_SOURCES = tuple(sorted(_CSRC.glob("*.cc")))
_HEADERS = tuple(sorted(_CSRC.glob("*.h")))  # in the build key: an edit must rebuild
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-march=native")
_status = {"available": False, "reason": "not built yet"}


def status() -> dict:
  """Whether the native kernel is in use, and why not if it is not (for bench records)."""
  available()
  return dict(_status)


def _cpu_tag() -> str:
  """Identifies the CPU, since `-march=native` code is only valid on the same model."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  picked = {l.split(":")[0].strip(): l for l in lines if l.startswith(("model name", "flags"))}
  return "\n".join(sorted(picked.values()))


def _build_key() -> str:
  """Names the library by everything it is built from: sources and headers, jax's version
  (its FFI headers), the flags and the CPU, so a change to any of them rebuilds."""
  source = b"".join(path.name.encode() + path.read_bytes() for path in _SOURCES + _HEADERS)
  return hashlib.sha256(
    source + jax.__version__.encode() + " ".join(_FLAGS).encode() + _cpu_tag().encode()
  ).hexdigest()[:16]


def _build(cache: pathlib.Path, compiler: str) -> pathlib.Path:
  lib = cache / f"lrcc_kernels-{_build_key()}.so"
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    out = pathlib.Path(tmp) / lib.name
    sources = [str(path) for path in _SOURCES]
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", *sources, "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(out, lib)  # atomic: concurrent builders (test workers) never see half a file
  return lib


@functools.cache
def available() -> bool:
  """Builds, loads and registers the kernel once per process; False if it cannot."""
  if os.environ.get("LRCC_JAX_NATIVE", "1") == "0":
    _status.update(available=False, reason="disabled by LRCC_JAX_NATIVE=0")
    return False
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    _status.update(available=False, reason="no C++ compiler (g++ or $CXX) on PATH")
    return False
  cache = pathlib.Path(
    os.environ.get("LRCC_JAX_CACHE", pathlib.Path.home() / ".cache" / "lrcc_jax")
  )
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build(cache, compiler)))
    for target, symbol in SYMBOLS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except Exception as err:  # pylint: disable=broad-except  # optional: any failure means XLA
    _status.update(available=False, reason=f"build failed: {type(err).__name__}: {err}")
    return False
  _status.update(available=True, reason=f"built with {compiler}")
  return True


def active() -> bool:
  """The kernel is built and the default backend (where `jit` compiles) is the CPU.

  Only a report of the current device (bench records, `skip_pays`'s default); kernel
  choices follow the lowering platform (`_policy`).
  """
  return jax.default_backend() == "cpu" and available()


def usable(weight_dtype: jnp.dtype, *dtypes: jnp.dtype) -> bool:
  """The kernel runs f32 or bf16 weights against f32 activations, and is built.

  With bf16 weights each weight is widened to f32 (exactly: a bf16 is the high half of an
  f32) and every product and sum is f32, so the result differs from the f32 kernel on the
  f32-rounded weights only by that rounding: |z_bf16 - z_f32| <= 2^-8 Σ |w x| per output.

  Whether the program runs on a CPU is the lowering platform's business: callers stage the
  kernel in the "cpu" branch of `_policy.dispatch` only, so it appears in CPU lowerings
  and nowhere else, whatever `jax.default_backend()` is.
  """
  return (
    jnp.dtype(weight_dtype) in _TARGETS
    and all(jnp.dtype(d) == jnp.float32 for d in dtypes)
    and available()
  )


@functools.cache
def _product(b_in: int, xla_product: Callable, shared: bool = False) -> Callable:
  """`tile_product` for one static run length and mode, with its JVP and batching rules."""
  targets = _SHARED_TARGETS if shared else _TARGETS

  @jax.custom_batching.custom_vmap
  def call(weight, out_blocks, starts, values):
    rows, k = out_blocks.shape
    out = jax.ShapeDtypeStruct((rows, k, weight.shape[1]), jnp.float32)
    target = targets[jnp.dtype(weight.dtype)]
    return jax.ffi.ffi_call(target, out)(weight, out_blocks, starts, values, b_in=np.int64(b_in))

  @call.def_vmap
  def _vmap(axis_size, in_batched, weight, out_blocks, starts, values):
    if in_batched[0]:  # a batch of weights: no single kernel call covers it
      fallback = functools.partial(xla_product, b_in=b_in)
      in_axes = (0, *(0 if b else None for b in in_batched[1:]))
      return jax.vmap(fallback, in_axes=in_axes)(weight, out_blocks, starts, values), True
    args = [
      a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, b in zip((out_blocks, starts, values), in_batched[1:])
    ]
    rows = args[0].shape[1]
    flat = [jnp.reshape(a, (axis_size * rows,) + a.shape[2:]) for a in args]
    z = call(weight, *flat)
    return jnp.reshape(z, (axis_size, rows) + z.shape[1:]), True

  @jax.custom_jvp
  def product(weight, out_blocks, starts, values):
    return call(weight, out_blocks, starts, values)

  @product.defjvp
  def _jvp(primals, tangents):
    weight, out_blocks, starts, values = primals
    dw, _, _, dv = tangents
    z = product(*primals)
    _, dz = jax.jvp(
      lambda w, v: xla_product(w, out_blocks, starts, v, b_in=b_in), (weight, values), (dw, dv)
    )
    return z, dz

  return product


def tile_product(
  weight: Array,
  out_blocks: Array,
  starts: Array,
  values: Array,
  b_in: int,
  xla_product: Callable,
  *,
  shared: bool = False,
) -> Array:
  """(rows, k, b_out) products of the native kernel.

  `xla_product(weight, out_blocks, starts, values, b_in=...)` computes the same values in
  XLA; it supplies the JVP and the batched-weight fallback.

  `shared` (static) picks the block-major schedule: the kernel sorts the (row, block)
  pairs by block and streams each block of the union of the rows' selections once for
  every pair that selected it, instead of once per pair. Each output is summed by the same
  code in the same order, so both modes give bit-identical values; with `rows` rows that
  select `u` distinct blocks between them, the weight bytes read drop from `rows · k` to
  `u` blocks (`_policy.batch_mode` decides when).
  """
  return _product(b_in, xla_product, bool(shared))(
    weight, out_blocks.astype(jnp.int32), starts.astype(jnp.int32), values
  )
