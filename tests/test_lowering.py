"""Every public skipping path, lowered from CPU for CPU, CUDA, TPU and all three at once.

No accelerator is needed: lowering is the first half of compilation. The kernels are found
in the StableHLO text (`lrcc_jax.apps.lowering_table`); `pytest -s` prints the table.
"""

import jax
import jax.numpy as jnp
import pytest

import lrcc_jax as L
from lrcc_jax import _native, _policy
from lrcc_jax.apps import lowering_table as T

NATIVE = "native FFI" if _native.available() else "XLA gather"
PALLAS = {"cuda": "Pallas Triton", "tpu": "Pallas Mosaic TPU"}
FOREIGN = {"cpu": ("Pallas Triton", "Pallas Mosaic TPU"),
           "cuda": ("native FFI", "native epilogue", "native selection", "Pallas Mosaic TPU"),
           "tpu": ("native FFI", "native epilogue", "native selection", "Pallas Triton")}


@pytest.fixture(scope="module")
def table():
  rows = {(r["path"], r["platforms"]): r for r in T.table(pallas=True)}
  print("\n" + T.markdown(list(rows.values())))
  return rows


def _expected(path: str, platform: str) -> str:
  if "64 rows" in path:
    return "dense"
  if platform == "cpu":
    return NATIVE
  if platform == "tpu" and "bs=1" in path and "bs=16" not in path:
    return "XLA gather"  # single-unit blocks: below Mosaic's 8-row tiles
  return PALLAS[platform]


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_each_platform_lowers_its_own_kernel_and_no_conditional(table, platform):
  for name in dict.fromkeys(p for p, _ in table):
    row = table[(name, platform)]
    assert _expected(name, platform) in row["kernels"], (name, row)
    assert not set(FOREIGN[platform]) & set(row["kernels"]), (name, row)
    assert not row["control_flow"], (name, row)  # the platform switch is resolved at lowering


def test_the_dense_fallback_runs_the_native_epilogue_only_on_cpu(table):
  """The dense fallback's selection + bias + ReLU + mask kernel (`csrc/select.cc`) is a CPU
  kernel: it is in the CPU lowering of a falling-back layer and in no other."""
  row = table[("packed_dense auto, 64 rows", "cpu")]
  assert ("native epilogue" in row["kernels"]) == _native.available(), row
  for platform in ("cuda", "tpu"):
    assert table[("packed_dense auto, 64 rows", platform)]["kernels"] == ["dense"]


def test_gathers_past_eight_rows_select_natively_only_on_cpu(table):
  """Past the fused kernel's 8 rows the tile kernel gathers, and the capacity's selection is
  `csrc/select.cc`'s (`lrcc_top_blocks`) in the CPU lowering only."""
  row = table[("packed_dense gather bs=16, 16 rows", "cpu")]
  assert ("native selection" in row["kernels"]) == _native.available(), row
  for platform in ("cuda", "tpu"):
    assert "native selection" not in table[("packed_dense gather bs=16, 16 rows", platform)]["kernels"]


def test_one_program_lowers_for_all_platforms_at_once(table):
  for name in dict.fromkeys(p for p, _ in table):
    kernels = table[(name, "cpu,cuda,tpu")]["kernels"]
    for platform in ("cpu", "cuda", "tpu"):
      assert _expected(name, platform) in kernels, (name, platform, kernels)


def _layer(block_size=16, width=256):
  return T._layers([width, width], block_size)[0]  # pylint: disable=protected-access


def _kernels(fn, x, platforms, weight_shapes):
  return T.kernels_in(T.lowered_text(fn, x, platforms), weight_shapes)


def test_escape_hatch_env_selects_the_xla_gather(monkeypatch):
  p = _layer()
  fn = lambda x: L.packed_dense(x, p, capacity=2, strategy="gather")
  x = jnp.ones((1, 256))
  monkeypatch.setenv("LRCC_JAX_PALLAS", "0")
  for platform in ("cuda", "tpu"):
    assert _kernels(fn, x, (platform,), (p.weight.shape,)) == ["XLA gather"]


def test_policy_keyword_selects_the_kernel_per_platform():
  p = _layer()
  xla_tpu = _policy.Policy("tpu", "xla", max_fraction_one_row=0.5, max_gathered_layers=0.5)
  fn = lambda x: L.packed_dense(x, p, capacity=2, strategy="gather", policy=xla_tpu)
  x = jnp.ones((1, 256))
  assert _kernels(fn, x, ("tpu",), (p.weight.shape,)) == ["XLA gather"]
  assert _kernels(fn, x, ("cuda",), (p.weight.shape,)) == ["Pallas Triton"]  # other platforms keep theirs


def test_auto_decides_per_lowering_platform():
  """A policy that never gathers on TPU: the TPU lowering is dense, the others gather."""
  p = _layer()
  never = _policy.Policy("tpu", "pallas", max_fraction_one_row=0.0, max_gathered_layers=0.0)
  fn = lambda x: L.packed_dense(x, p, capacity=2, policy=never)
  x = jnp.ones((1, 256))
  assert _kernels(fn, x, ("tpu",), (p.weight.shape,)) == ["dense"]
  assert _kernels(fn, x, ("cuda",), (p.weight.shape,)) == ["Pallas Triton"]


def test_multi_platform_export_allows_the_cpu_kernel():
  p = _layer()
  fn = jax.jit(lambda x: L.packed_dense(x, p, capacity=2))
  spec = jax.ShapeDtypeStruct((1, 256), jnp.float32)
  checks = _policy.export_checks()
  exp = jax.export.export(fn, platforms=("cpu", "cuda", "tpu"), disabled_checks=checks)(spec)
  assert exp.platforms == ("cpu", "cuda", "tpu")
  got = exp.call(jnp.ones((1, 256)))  # runs the CPU branch here
  want = L.packed_dense(jnp.ones((1, 256)), p, capacity=2, strategy="dense")
  assert jnp.allclose(got, want, atol=1e-5)


def test_gradient_programs_lower_everywhere_without_conditionals():
  """Derivatives come from the portable default branch: no kernel, no switch, any platforms."""
  p = _layer()
  grad = jax.grad(lambda x: jnp.sum(L.packed_dense(x, p, capacity=2) ** 2))
  x = jnp.ones((1, 256))
  for platforms in (("cpu",), ("tpu",), ("cpu", "cuda", "tpu")):
    text = T.lowered_text(grad, x, platforms)
    if len(platforms) == 1:
      assert not T.control_flow_in(text), platforms
  want = jax.grad(lambda x: jnp.sum(L.packed_dense(x, p, capacity=2, strategy="dense") ** 2))(x)
  assert jnp.allclose(grad(x), want, atol=1e-5)
