"""The strategy policy as data: CPU defaults equal the measured constants; one decision."""

import dataclasses
import itertools

import jax.numpy as jnp
import pytest

import lrcc_jax as L
from lrcc_jax import _fused, _native, _packed, _policy


def _old_skip_pays(rows, capacity, n_blocks, block_bytes, native):
  """The predicate `skip_pays` was before policies, from `_packed`'s constants."""
  if capacity is None:
    return False
  if native:
    fraction = capacity / n_blocks
    small = block_bytes < _packed.NATIVE_MIN_BATCHED_BLOCK_BYTES
    if small and rows > _packed.NATIVE_SMALL_BLOCK_MAX_ROWS:
      return False
    if rows == 1:
      return fraction <= 0.6
    return rows * fraction <= _packed.NATIVE_MAX_GATHERED_LAYERS or (
        fraction <= _packed.NATIVE_SMALL_FRACTION and rows <= _packed.NATIVE_SMALL_FRACTION_MAX_ROWS
    )
  if rows * capacity * block_bytes > _packed.MAX_GATHER_BYTES:
    return False
  if rows == 1:
    return capacity <= _packed.MAX_GATHER_FRACTION_ONE_ROW * n_blocks
  if rows > 2 and block_bytes < _packed.MIN_BATCHED_BLOCK_BYTES:
    return False
  return rows * capacity <= _packed.MAX_GATHER_FRACTION * n_blocks


def test_cpu_defaults_decide_as_the_measured_constants():
  grid = itertools.product(
      [1, 2, 3, 4, 8, 16, 17, 64, 65, 128],  # rows
      [None, 1, 5, 13, 26, 64, 102, 128, 153, 154, 200, 256],  # capacity of 256 blocks
      [1024 * 4, 4096 * 4, 8192 * 4, 16 * 1024 * 4, 16 * 4096 * 4, 32 * 8192 * 4],  # block bytes
      [True, False],
  )
  for rows, cap, bb, native in grid:
    policy = _policy.CPU_NATIVE if native else _policy.CPU_XLA
    assert _policy.gather_pays(policy, rows, cap, 256, bb) == _old_skip_pays(rows, cap, 256, bb, native), (
        rows, cap, bb, native)


def test_policy_validates_and_is_frozen():
  with pytest.raises(ValueError, match="platform"):
    _policy.Policy("gpu", "xla", max_fraction_one_row=0.1, max_gathered_layers=0.1)
  with pytest.raises(ValueError, match="kernel"):
    _policy.Policy("cpu", "cuda", max_fraction_one_row=0.1, max_gathered_layers=0.1)
  with pytest.raises(AttributeError):
    _policy.CPU_XLA.max_gathered_layers = 1.0  # pylint: disable=assignment-from-no-return
  assert "unmeasured" in _policy.TPU_PALLAS.source and "unmeasured" in _policy.CUDA_PALLAS.source


def test_kernels_per_platform(monkeypatch):
  f32 = jnp.float32
  assert _policy.gather_kernel("tpu", 16, 256, f32, f32) == "mosaic"
  assert _policy.gather_kernel("tpu", 4, 256, f32, f32) == "xla"
  assert _policy.gather_kernel("cuda", 1, 256, f32, f32) == "triton"
  assert _policy.gather_kernel("cpu", 16, 256, jnp.bfloat16, f32) == ("native" if _native.available() else "xla")
  assert _policy.gather_kernel("cpu", 16, 256, jnp.float16, f32) == "xla"
  monkeypatch.setenv("LRCC_JAX_PALLAS", "0")
  assert _policy.gather_kernel("tpu", 16, 256, f32, f32) == "xla"
  assert _policy.gather_kernel("cuda", 16, 256, f32, f32) == "xla"


def test_auto_predicates_are_the_policy_decision():
  w = jnp.ones((64, 64)) / 8
  p = L.pack(w, jnp.zeros(64), L.fit_svd(w, 2), block_size=4)
  for rows, cap in itertools.product([1, 2, 8, 64], [1, 4, 8, 16]):
    for platform in ("cpu", "cuda", "tpu"):
      plan = _policy.plan_layer(platform, "auto", rows, cap, p.weight.shape, p.weight.dtype, jnp.float32)
      # the policy's plan, or the fused kernel where it replaces the dense fallback (CPU:
      # at most one layer of per-row gathers up to 8 rows, or 1 of 16 blocks (6.25%, under
      # the shipped 10.1%) at any of these row counts)
      fused = _fused.upgrade(plan, "auto", platform, rows, cap, p.weight.shape, p.weight.dtype, jnp.float32, 2)
      want = plan.gather or (fused.kernel == "fused" and ((rows <= 8 and rows * cap <= 16) or cap == 1))
      assert fused.gather == want
      assert _packed.auto_gathers(p, rows, cap, platform=platform) == want
      if platform != "cpu":
        assert want == plan.gather
      policy = _policy.policy_for(platform, plan.kernel, p.weight.dtype)
      assert plan.gather == _policy.gather_pays(policy, rows, cap, 16, _packed.block_bytes(p))


def test_cpu_native_decisions_at_key_shapes():
  """Guards each comparison of `gather_pays` under the shipped native CPU policy at the
  shapes `lrcc-jax bench --suite full` measures (256 blocks of 16 x 4096 f32 unless said):
  flipping any `<=` / `>` or dropping a rule changes one of these."""
  p, bb = _policy.CPU_NATIVE, 16 * 4096 * 4
  one, layers = p.max_fraction_one_row, p.max_gathered_layers
  assert _policy.gather_pays(p, 1, 26, 256, bb)  # batch 1, 10%: the big batch-1 win
  assert _policy.gather_pays(p, 1, round(one * 1000), 1000, bb)  # at the one-row limit
  assert not _policy.gather_pays(p, 1, round(one * 1000) + 1, 1000, bb)  # just past it
  assert not _policy.gather_pays(p, 1, None, 256, bb)  # no capacity: nothing to gather
  n = 1000
  at = round(layers * n / 2)  # 2 rows reading exactly `layers` layers
  assert _policy.gather_pays(p, 2, at, n, bb) and not _policy.gather_pays(p, 2, at + 1, n, bb)
  small = int(p.small_fraction * n)  # the small-fraction rule, up to its row limit
  if small and small * p.small_fraction_max_rows > layers * n:
    assert _policy.gather_pays(p, p.small_fraction_max_rows, small, n, bb)
    assert not _policy.gather_pays(p, p.small_fraction_max_rows + 1, small, n, bb)
    assert not _policy.gather_pays(p, p.small_fraction_max_rows, small + 1, n, bb)
  assert not _policy.gather_pays(p, 128, 128, 256, bb)  # 128 rows x 50%: dense
  # Single units (16 KiB at 4096 wide): one row only; blocks of 16 keep gathering past.
  unit = 4096 * 4
  assert unit < p.min_batched_block_bytes <= 16 * 1024 * 4
  assert p.small_block_max_rows == 1
  assert _policy.gather_pays(p, 1, 205, 4096, unit) and not _policy.gather_pays(p, 2, 205, 4096, unit)
  assert _policy.gather_pays(p, 17, 13, 256, bb)
  assert _policy.gather_pays(p, 1, 128, 256, bb)  # one row x 50% of blocks of 16: gathers


def test_small_block_one_row_limit():
  """Guards the optional one-row limit for small blocks (off in the shipped defaults)."""
  import dataclasses

  p = dataclasses.replace(_policy.CPU_NATIVE, small_block_max_fraction_one_row=0.25)
  unit, big = 4096 * 4, 16 * 4096 * 4
  assert _policy.gather_pays(p, 1, 1024, 4096, unit) and not _policy.gather_pays(p, 1, 1025, 4096, unit)
  assert _policy.gather_pays(p, 1, 128, 256, big)  # large blocks keep max_fraction_one_row
  assert _policy.CPU_NATIVE.small_block_max_fraction_one_row == 1.0


def test_cpu_xla_decisions_at_key_shapes():
  """Guards the byte limits of the XLA-gather CPU policy: total gathered bytes (at the limit
  gathers, one block past it does not) and the smallest batched block (2 rows may gather
  small blocks, 3 may not)."""
  p = _policy.CPU_XLA
  bb = 16 * 4096 * 4  # 256 KiB blocks
  cap = p.max_gather_bytes // bb  # one row reading exactly the byte limit
  assert _policy.gather_pays(p, 1, cap, 100 * cap, bb)
  assert not _policy.gather_pays(p, 1, cap + 1, 100 * cap, bb)
  small = 4096 * 4  # single units of 4096: 16 KiB, below min_batched_block_bytes
  assert _policy.gather_pays(p, 2, 1, 4096, small)
  assert not _policy.gather_pays(p, 3, 1, 4096, small)
  assert _policy.gather_pays(p, 3, 1, 4096, p.min_batched_block_bytes)


def test_small_blocks_never_gather_past_their_row_limit_in_either_mode():
  """Guards `batch_mode`'s small-block row limit (16 rows here): single units of a 1024-wide
  layer (4 KiB) at 5% gather in the shared mode up to `small_block_max_rows` rows (the
  union is small) and fall back to dense past it; blocks of 16 (64 KiB) keep the shared
  mode."""
  pol = dataclasses.replace(_policy.CPU_NATIVE, small_block_max_rows=16)
  cap = 51  # 5% of 1024 single units
  limit = pol.small_block_max_rows
  assert _policy.batch_mode(pol, 4, cap, 1024, 4096) == "shared"
  assert _policy.batch_mode(pol, limit, cap // 2, 1024, 4096) != "dense"
  assert _policy.batch_mode(pol, limit + 1, cap // 2, 1024, 4096) == "dense"
  assert _policy.batch_mode(pol, limit + 1, 3, 64, 65536) == "shared"
