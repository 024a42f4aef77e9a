"""Where skipping pays, per platform, as data; and the kernel each platform runs.

A skipping layer can compute its selected blocks (gather them, then multiply) or compute
densely and mask. Which is faster depends on the hardware, the kernel that gathers and
the weights' dtype, so the crossover is a `Policy`: one frozen record per (platform,
device kind, weight dtype, kernel). `gather_pays` is the one decision function; every
caller (`packed_dense`, the sparse chain of `packed_mlp`, the NNX modules through them,
`lrcc-jax bench` and the sweep) asks it through `plan_layer` / `plan_chain`.

The platform is the one the program is *lowered* for, not `jax.default_backend()`:
`dispatch` traces one branch per platform (`_switch.platform_switch`), each with that
platform's policy and kernel, and lowering keeps only the target's branch, so one traced
program lowers for ("cpu",), ("cuda",), ("tpu",) or all three, and a single-platform
lowering holds no conditional. Kernels by platform:

- cpu: the native FFI kernel (`_native`) for f32, else XLA's gather;
- cuda: the Triton kernel `_pallas.gathered_matvec_gpu` where `gpu_tile` fits;
- tpu: the Mosaic kernel `_pallas.gathered_matvec_tpu` where `tpu_tile` fits;
- anything else, or `LRCC_JAX_PALLAS=0`, or a policy with `kernel="xla"`: XLA's gather.

Shipped defaults: the CPU policies are the constants measured on XLA:CPU (see
`_packed`); the GPU and TPU ones are derived from byte counts and are unmeasured
(`Policy.source` says so). `lrcc-jax tune` measures the current device and stores a
policy that `current_policies` then prefers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lrcc_jax import _native, _pallas, _switch

PLATFORMS = ("cpu", "cuda", "tpu")
KERNELS = ("native", "xla", "pallas")
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Policy:
  """The crossover between gathering the selected blocks and a dense product.

  For `rows` rows each computing `capacity` of `n_blocks` blocks of `block_bytes` bytes,
  with `f = capacity / n_blocks`, gathering pays (`gather_pays`) when

  - the gathered bytes `rows · capacity · block_bytes` are at most `max_gather_bytes`
    (past it the gathers thrash the cache), and
  - blocks are at least `min_batched_block_bytes` once there are more than
    `small_block_max_rows` rows (many small per-row gathers lose), and
  - one row: `f <= max_fraction_one_row`, and `f <= small_block_max_fraction_one_row`
    for blocks under `min_batched_block_bytes` (hundreds of tiny gathers cost more per
    byte than tens of large ones); several: the rows together read at most
    `max_gathered_layers` layers (`rows · f`), or each row reads at most `small_fraction`
    of the layer and there are at most `small_fraction_max_rows` rows (past a few rows a
    dense product is bound by flops, so a small fraction keeps paying longer).

  Attributes:
    platform: "cpu", "cuda" or "tpu": the lowering platform it applies to.
    kernel: the gather kernel it was measured with: "native" (CPU FFI), "xla" (XLA's
      gather) or "pallas" (the GPU/TPU kernels). A policy passed to a skipping function
      also *selects* this kernel on its platform (e.g. `kernel="xla"` turns the Pallas
      kernel off, like `LRCC_JAX_PALLAS=0`).
    device_kind: `jax.Device.device_kind` it was measured on, or "any".
    weight_dtype: weight dtype name it applies to, or "any".
    source: where the numbers come from (measured, derived, tuned file).
    shared_min_rows: from this many rows on, the native kernel runs its shared
      (block-major) mode, which reads each block of the union of the rows' selections
      once for all of them (`batch_mode`); 0: never (kernels without that mode).
    max_union_fraction: in the shared mode gathering also pays while the union of
      independent rows' selections, `1 - (1 - f)^rows` of the layer in expectation, is
      at most this fraction. Rows drawn from the same data select overlapping blocks,
      so their union is smaller: the bound is the pessimistic case.
    shared_max_fraction: in the shared mode, with blocks of at least
      `min_batched_block_bytes` and at most `small_fraction_max_rows` rows, gathering
      also pays while each row computes at most this fraction of the layer, whatever the
      union: the shared kernel then reads at most the layer once and does `f` of the
      dense flops, and past a few rows the dense product is bound by flops.
    fused_max_layers: where this policy falls back to dense, the fused CPU kernel
      (`_fused.replaces_dense`) still runs while the rows' per-row gathers add up to at
      most this many layers (`rows · capacity / n_blocks`; up to `_fused.MAX_ROWS` rows);
      0: never (the policy's decision stands).
    fused_small_fraction: ...and, up to `_fused.MAX_REPLACE_ROWS` rows, while each row
      computes at most this fraction of the layer: past a few rows the dense product is
      bound by its flops, and the fused kernel does `f` of them; 0: never.
  """

  platform: str
  kernel: str
  max_fraction_one_row: float
  max_gathered_layers: float
  small_fraction: float = 0.0
  small_fraction_max_rows: int = 0
  max_gather_bytes: int | None = None
  min_batched_block_bytes: int = 0
  small_block_max_rows: int = 2
  device_kind: str = "any"
  weight_dtype: str = "any"
  source: str = "default"
  shared_min_rows: int = 0
  max_union_fraction: float = 0.0
  small_block_max_fraction_one_row: float = 1.0
  shared_max_fraction: float = 0.0
  fused_max_layers: float = 0.0
  fused_small_fraction: float = 0.0

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f"Policy.platform={self.platform!r} must be one of {PLATFORMS}.")
    if self.kernel not in KERNELS:
      raise ValueError(f"Policy.kernel={self.kernel!r} must be one of {KERNELS}.")


# CPU, native kernel: the `_packed.NATIVE_*` measurements (it streams each selected block
# once on every core; one row pays up to 60% of the blocks). Any weight dtype the kernel
# runs (`_native.usable` decides which). Single-unit blocks (4-16 KiB at 1024-4096 wide)
# lose against the dense fallback (native epilogue) past 16 rows even at 5% (`lrcc-jax
# bench --suite full` and `tune`, 2 cores: 0.83-0.89x at 64 rows of 2048/4096, 0.5-0.8x at
# 32-128 rows) while blocks of 16 (64 KiB and more) keep winning there (64 rows x 5%:
# 1.4-1.6x): hence the small-block row limit. One row of single units of 1024 also lost at
# 50% (0.39-0.78x; 25%: 0.96-1.05x); `small_block_max_fraction_one_row` can express that,
# but it stays off here until a quiet-machine run confirms it (measured under load).
# `lrcc-jax tune` on this machine (192 cases, after the dense fallback's estimate went
# native) then moved two limits, and `bench --suite full --compare-default` confirmed
# them in one interleaved run: single units gather past one row only through the fused
# kernel (16 rows at 5%: 1.20-2.04x of dense jit densely against 0.75-1.87x gathered, at
# 1024-4096 wide), and blocks of 16 at 5-10% keep gathering up to 128 rows (1.20-2.52x
# against 0.85-1.04x for the fallback).
CPU_NATIVE = Policy(
  "cpu",
  "native",
  max_fraction_one_row=0.6,
  max_gathered_layers=0.6,
  small_fraction=0.06,
  small_fraction_max_rows=128,
  min_batched_block_bytes=32 * 2**10,
  small_block_max_rows=1,
  source="measured on XLA:CPU, 2 cores",
  # Shared mode (`batch_mode`): one 4096 layer, 26 of 256 blocks of 16 per row, 8
  # independent rows (union 56% of the layer): 0.13-0.25 ms against 0.3-0.46 ms per row
  # with sparse inputs, 1.7-3.7 ms against 7.7-10.7 ms dense with dense inputs. The 4-layer
  # 4096 MLP chain at 8 rows: 3.6-3.8x dense with independent rows, 4.5-7.3x with real
  # digits; at 16 rows (union 80%) the policy falls back to dense (`lrcc-jax bench --suite
  # batch`, 2 cores under a load of 7-13: noisy).
  shared_min_rows=2,
  max_union_fraction=0.6,
  # One 2048/4096 layer in blocks of 16, 16-64 rows, one interleaved run on 2 cores: 10%
  # per row gathered in the shared mode at 1.35-2.55x of dense jit against 1.0-2.4x for
  # the dense fallback, with unions of 81-100%; 25% lost (0.75-1.77x against 1.1-2.2x).
  # `lrcc-jax bench --suite full` covers these settings.
  shared_max_fraction=0.12,
  # `_fused.replaces_dense`'s measurements: up to one layer of per-row gathers, and at
  # most 10% per row up to 128 rows. The latter set by `lrcc-jax tune` on 2 cores once the
  # fused kernel ran the eight-row estimate (`csrc/estimate.h`); `lrcc-jax bench --suite
  # full --compare-default` against 6%: the 10 cells it changes (single units at 10%,
  # 16-128 rows, 1024-4096 wide) ran 1.10-1.74x faster (1024 at 64 rows 0.79 -> 0.98x of
  # dense jit, 2048 at 64 rows 0.91 -> 1.12x). 0.101 keeps the suite's `round(0.1 · 2048)`
  # = 205 units in.
  fused_max_layers=1.0,
  fused_small_fraction=0.101,
)
# CPU, XLA gathers: the `_packed.MAX_GATHER_*` measurements.
CPU_XLA = Policy(
  "cpu",
  "xla",
  max_fraction_one_row=0.4,
  max_gathered_layers=0.25,
  max_gather_bytes=32 * 2**20,
  min_batched_block_bytes=64 * 2**10,
  source="measured on XLA:CPU, 2 cores",
)
# GPU/TPU: derived from byte counts, unmeasured. Batch-1 layers are bound by HBM bytes; the
# Pallas kernels read each selected block once at full bandwidth, so they pay while the
# rows together read less than the layer, less a margin for the estimator and the per-block
# launch/step overhead (half a layer). XLA's gather materialises the gathered blocks (read +
# write + read: 3x the bytes), hence a third of that.
_UNMEASURED = "derived from byte counts, unmeasured"
CUDA_PALLAS = Policy(
  "cuda", "pallas", max_fraction_one_row=0.5, max_gathered_layers=0.5, source=_UNMEASURED
)
CUDA_XLA = Policy(
  "cuda", "xla", max_fraction_one_row=0.15, max_gathered_layers=0.15, source=_UNMEASURED
)
TPU_PALLAS = Policy(
  "tpu", "pallas", max_fraction_one_row=0.5, max_gathered_layers=0.5, source=_UNMEASURED
)
TPU_XLA = Policy(
  "tpu", "xla", max_fraction_one_row=0.15, max_gathered_layers=0.15, source=_UNMEASURED
)
DEFAULTS = (CPU_NATIVE, CPU_XLA, CUDA_PALLAS, CUDA_XLA, TPU_PALLAS, TPU_XLA)

Policies = Policy | Sequence[Policy] | None


def gather_pays(
  policy: Policy, rows: int, capacity: int | None, n_blocks: int, block_bytes: int
) -> bool:
  """The decision: whether gathering `capacity` of `n_blocks` blocks per row beats dense."""
  if capacity is None:
    return False
  fraction = capacity / n_blocks
  if (
    policy.max_gather_bytes is not None and rows * capacity * block_bytes > policy.max_gather_bytes
  ):
    return False
  if rows > policy.small_block_max_rows and block_bytes < policy.min_batched_block_bytes:
    return False
  if rows == 1:
    small = block_bytes < policy.min_batched_block_bytes
    limit = min(policy.max_fraction_one_row, policy.small_block_max_fraction_one_row)
    return fraction <= (limit if small else policy.max_fraction_one_row)
  return rows * fraction <= policy.max_gathered_layers or (
    fraction <= policy.small_fraction and rows <= policy.small_fraction_max_rows
  )


def union_fraction(rows: int, fraction: float) -> float:
  """Expected share of the blocks selected by at least one of `rows` independent rows."""
  return 1.0 - (1.0 - fraction) ** rows


def batch_mode(
  policy: Policy, rows: int, capacity: int | None, n_blocks: int, block_bytes: int
) -> str:
  """How a batch computes its selected blocks: "per_row", "shared" or "dense".

  "per_row" gathers every (row, block) pair on its own, so a block selected by several
  rows is read once per row; "shared" (the native kernel's block-major mode, from
  `policy.shared_min_rows` rows on) reads each block of the union of the rows'
  selections once for all the rows that selected it; "dense" computes every block and
  masks. Same values in all three. The batch gathers where `gather_pays` says so, or, in
  the shared mode, while the expected union of independent rows (`union_fraction`) is at
  most `policy.max_union_fraction` of the layer: rows from real data overlap, so their
  union is smaller still; or, for large blocks and up to `policy.small_fraction_max_rows`
  rows, while each row computes at most `policy.shared_max_fraction` of the layer
  (the shared read is at most one layer; the flops are a fraction). Blocks smaller than
  `policy.min_batched_block_bytes` never gather past `policy.small_block_max_rows` rows,
  in either mode. Static shapes only.
  """
  if capacity is None:
    return "dense"
  if rows > policy.small_block_max_rows and block_bytes < policy.min_batched_block_bytes:
    return "dense"
  shared = policy.shared_min_rows > 0 and rows >= policy.shared_min_rows
  if gather_pays(policy, rows, capacity, n_blocks, block_bytes):
    return "shared" if shared else "per_row"
  if shared and union_fraction(rows, capacity / n_blocks) <= policy.max_union_fraction:
    return "shared"
  if (
    shared
    and block_bytes >= policy.min_batched_block_bytes
    and rows <= policy.small_fraction_max_rows
    and capacity / n_blocks <= policy.shared_max_fraction
  ):
    return "shared"
  return "dense"


def native_shared(rows: int, weight_dtype: jnp.dtype, policy: Policies = None) -> bool:
  """Whether the native CPU kernel runs its shared mode for a batch of `rows` rows.

  Asked where the kernel is staged (only in CPU branches), with the policy `batch_mode`
  planned with; the mode does not change values, only the order of the reads.
  """
  pol = policy_for("cpu", "native", weight_dtype, policy)
  return pol.shared_min_rows > 0 and rows >= pol.shared_min_rows


# --- Which kernel a platform runs. ---


def _as_tuple(policy: Policies) -> tuple[Policy, ...]:
  if policy is None:
    return ()
  if isinstance(policy, Policy):
    return (policy,)
  return tuple(policy)


def _requested(platform: str, policies: tuple[Policy, ...]) -> Policy | None:
  for p in policies:
    if p.platform == platform:
      return p
  return None


def gather_kernel(
  platform: str,
  block_size: int,
  n_in: int,
  weight_dtype: jnp.dtype,
  x_dtype: jnp.dtype,
  policy: Policies = None,
) -> str:
  """The kernel that gathers (rows, k) blocks of this layer on `platform`.

  "native" on CPU for f32 (`_native.usable`); the Pallas kernels "triton" on CUDA and
  "mosaic" on TPU where the shapes fit (`_pallas.gpu_tile` / `_pallas.tpu_tile`) unless
  `LRCC_JAX_PALLAS=0` or the caller's
  policy for the platform says `kernel="xla"`; "xla" otherwise.
  """
  asked = _requested(platform, _as_tuple(policy))
  if asked is not None and asked.kernel == "xla":
    return "xla"
  if platform == "cpu":
    return "native" if _native.usable(weight_dtype, x_dtype) else "xla"
  if not _pallas.enabled():
    return "xla"
  if platform == "cuda" and _pallas.gpu_tile(block_size, n_in) is not None:
    return "triton"
  if platform == "tpu" and _pallas.tpu_tile(block_size, n_in, weight_dtype) is not None:
    return "mosaic"
  return "xla"


def tile_kernel(
  platform: str, b_in: int, weight_dtype: jnp.dtype, values_dtype: jnp.dtype, min_run: int
) -> str:
  """The kernel of the sparse chain's tile product on `platform`: "native" or "xla"."""
  if platform == "cpu" and b_in >= min_run and _native.usable(weight_dtype, values_dtype):
    return "native"
  return "xla"


def policy_for(
  platform: str, kernel: str, weight_dtype: jnp.dtype, policy: Policies = None
) -> Policy:
  """The policy deciding for `kernel` on `platform`: the caller's, a tuned one, a default.

  `kernel` is a `gather_kernel` name ("triton" and "mosaic" are the "pallas" policies).

  A caller's policy for the platform wins. Then a tuned policy (`lrcc-jax tune`) for the
  current device, when `platform` is the current device's and its kernel and weight dtype
  match. Then the shipped default for (platform, kernel) ("native" falls back to the XLA
  one when it is not f32).
  """
  asked = _requested(platform, _as_tuple(policy))
  if asked is not None:
    return asked
  kernel = "pallas" if kernel in ("triton", "mosaic") else kernel
  dtype = jnp.dtype(weight_dtype).name
  for p in tuned_policies():
    if p.platform == platform and p.kernel == kernel and p.weight_dtype in ("any", dtype):
      return p
  return default_policy(platform, kernel, weight_dtype)


def default_policy(platform: str, kernel: str, weight_dtype: jnp.dtype) -> Policy:
  """The shipped default for (platform, kernel, weight dtype), ignoring tuned files."""
  kernel = "pallas" if kernel in ("triton", "mosaic") else kernel
  dtype = jnp.dtype(weight_dtype).name
  for p in DEFAULTS:
    if p.platform == platform and p.kernel == kernel and p.weight_dtype in ("any", dtype):
      return p
  return next(p for p in DEFAULTS if p.platform == platform and p.kernel == "xla")


def _policy_platform(platform: str) -> str:
  """Platforms without policies of their own (ROCm, "default") use CUDA's."""
  return platform if platform in PLATFORMS else "cuda"


def epilogue_kernel(platform: str, x_dtype: jnp.dtype) -> str:
  """The dense fallback's epilogue (`_mask.masked_relu`) and the gathers' selection
  (`_mask.top_blocks`) on `platform`: "native" or "xla".

  The native ones (`csrc/select.cc`) on CPU for f32 products when the library is built;
  XLA's ops elsewhere.
  """
  if platform == "cpu" and _native.usable(jnp.float32, x_dtype):
    return "native"
  return "xla"


class Plan(NamedTuple):
  """What one platform's branch of a skipping layer does."""

  gather: bool
  kernel: str  # the gather kernel (meaningless when not gathering)
  policy: Policy | None
  # The dense fallback's epilogue kernel, and the gather path's selection kernel
  # (`_mask.top_blocks`): "native" on CPU where `epilogue_kernel` says so.
  epilogue: str = "xla"

  @property
  def key(self) -> tuple[bool, str | None, str]:
    """What the branch computes: equal keys stage the same code."""
    return (self.gather, self.kernel if self.gather else None, self.epilogue)


def plan_layer(
  platform: str,
  strategy: str,
  rows: int,
  capacity: int | None,
  weight_shape: tuple[int, ...],
  weight_dtype: jnp.dtype,
  x_dtype: jnp.dtype,
  policy: Policies = None,
) -> Plan:
  """`packed_dense`'s choice on `platform`: gather or dense, and with which kernel."""
  n_blocks, block_size, n_in = weight_shape
  kernel = gather_kernel(platform, block_size, n_in, weight_dtype, x_dtype, policy)
  epilogue = epilogue_kernel(platform, x_dtype)
  if capacity is None or strategy == "dense":
    return Plan(False, kernel, None, epilogue)
  if strategy == "gather":
    return Plan(True, kernel, None, epilogue)
  pol = policy_for(_policy_platform(platform), kernel, weight_dtype, policy)
  bytes_ = block_size * n_in * jnp.dtype(weight_dtype).itemsize
  return Plan(batch_mode(pol, rows, capacity, n_blocks, bytes_) != "dense", kernel, pol, epilogue)


def plan_chain(
  platform: str,
  rows: int,
  layers: Sequence[tuple[tuple[int, ...], jnp.dtype]],
  capacities: Sequence[int | None],
  dtype: jnp.dtype,
  min_run: int,
  policy: Policies = None,
) -> bool:
  """`packed_mlp`'s "auto" on `platform`: keep activations sparse between layers?

  Every layer needs a capacity, and gathering must pay for each under the tile product's
  policy: the native one on CPU when every layer's tiles run the native kernel (runs of
  `min_run` or more, f32), the platform's XLA one otherwise.
  """
  if any(c is None for c in capacities):
    return False
  kernels = {tile_kernel(platform, shape[1], w_dtype, dtype, min_run) for shape, w_dtype in layers}
  kernel = "native" if kernels == {"native"} else "xla"
  for (shape, w_dtype), c in zip(layers, capacities):
    pol = policy_for(_policy_platform(platform), kernel, w_dtype, policy)
    bytes_ = shape[1] * shape[2] * jnp.dtype(w_dtype).itemsize
    if batch_mode(pol, rows, c, shape[0], bytes_) == "dense":
      return False
  return True


def current_platform() -> str:
  """The lowering-platform name of the default backend: "cpu", "cuda", "rocm" or "tpu"."""
  backend = jax.default_backend()
  if backend == "gpu":
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"
  return backend


def dispatch(
  plan_of: Callable[[str], Any],
  run: Callable[..., Any],
  args: Sequence[Any],
  key: Callable[[Any], Any] = lambda p: p,
) -> Any:
  """`run(plan_of(platform), *args)` for the platform the program is lowered for.

  Platforms whose plans have equal `key`s share one branch; when every platform plans
  the same, no switch is staged at all. Otherwise `_switch.platform_switch` stages one
  branch per plan, resolved at lowering: a single-platform lowering holds that branch's
  ops and no conditional; a multi-platform one a `case` on the platform. Other platforms
  (ROCm, ...) run `plan_of("default")`. `run` must read traced values only through `args`.
  An eager call (no traced argument) runs op by op on the default device: that device's
  plan, without a switch.
  """
  plans = {p: plan_of(p) for p in (*PLATFORMS, "default")}
  groups: dict[Any, list[str]] = {}
  for p, plan in plans.items():
    groups.setdefault(key(plan), []).append(p)
  if len(groups) == 1:
    return run(plans["cpu"], *args)
  if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
    # Eager call: it runs op by op on the default device, so that platform's plan.
    return run(plans.get(current_platform(), plans["default"]), *args)
  branches, platforms = [], []
  for members in groups.values():
    branches.append(lambda *a, plan=plans[members[0]]: run(plan, *a))
    # The default's branch also serves the named platforms grouped with it.
    platforms.append(None if "default" in members else tuple(members))
  return _switch.platform_switch(branches, tuple(platforms), *args)


# --- Tuned policies (`lrcc-jax tune`). ---

_status: dict[str, Any] = {"tuned": None, "reason": "not looked up yet"}
_tuned_cache: dict[tuple[str, str], tuple[Policy, ...]] = {}


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LRCC_JAX_CACHE", pathlib.Path.home() / ".cache" / "lrcc_jax"))


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower() or "unknown"


def device_kind() -> str:
  return jax.devices()[0].device_kind


def policy_path(kind: str | None = None) -> pathlib.Path:
  """The tuned-policy file of a device kind (default: the current device) and this jax."""
  kind = device_kind() if kind is None else kind
  return cache_dir() / f"policy-{_slug(kind)}-jax{jax.__version__}.json"


def policy_to_json(policies: Sequence[Policy], kind: str) -> str:
  return json.dumps(
    {
      "format": _FORMAT,
      "device_kind": kind,
      "jax": jax.__version__,
      "policies": [dataclasses.asdict(p) for p in policies],
    },
    indent=1,
  )


def load_policy_file(path: pathlib.Path, kind: str) -> tuple[Policy, ...]:
  """The policies of a tuned file for `kind`; raises ValueError if corrupt or foreign."""
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"{path} is unreadable: {err}") from err
  if not isinstance(data, dict) or data.get("format") != _FORMAT:
    raise ValueError(f"{path} is not an lrcc-jax policy file of format {_FORMAT}.")
  if data.get("device_kind") != kind or data.get("jax") != jax.__version__:
    raise ValueError(
      f"{path} was tuned for {data.get('device_kind')!r} with jax {data.get('jax')}, not"
      f" {kind!r} with jax {jax.__version__}."
    )
  try:
    return tuple(Policy(**p) for p in data["policies"])
  except (KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{path} holds a malformed policy: {err}") from err


def tuned_policies() -> tuple[Policy, ...]:
  """The current device's tuned policies, if `lrcc-jax tune` wrote a valid file.

  A corrupt or foreign file warns once and is ignored (the shipped defaults apply).
  `LRCC_JAX_TUNED=0` ignores tuned files altogether.
  """
  if os.environ.get("LRCC_JAX_TUNED", "1") == "0":
    _status.update(tuned=None, reason="tuned policies disabled by LRCC_JAX_TUNED=0")
    return ()
  kind = device_kind()
  path = policy_path(kind)
  key = (str(path), kind)
  if key in _tuned_cache:
    return _tuned_cache[key]
  found: tuple[Policy, ...] = ()
  if not path.exists():
    _status.update(tuned=None, reason=f"no tuned policy at {path}: shipped defaults")
  else:
    try:
      found = load_policy_file(path, kind)
      _status.update(tuned=str(path), reason=f"tuned policy for {kind!r} from {path}")
    except ValueError as err:
      warnings.warn(
        f"lrcc_jax: ignoring the tuned policy, using the shipped defaults: {err}", stacklevel=2
      )
      _status.update(tuned=None, reason=f"ignored {path}: {err}")
  _tuned_cache[key] = found
  return found


def forget_tuned() -> None:
  """Drops the cached tuned policies (after `lrcc-jax tune` wrote a new file)."""
  _tuned_cache.clear()


def policy_status() -> dict:
  """Which policy the "auto" strategy uses on the current device, and why.

  Returns a dict: `platform`, `device_kind`, `tuned` (the file in use or None),
  `reason`, and `policies`: the policy per gather kernel of this platform.
  """
  tuned = tuned_policies()
  platform = current_platform()
  plat = platform if platform in PLATFORMS else "cuda"
  kernels = ("native", "xla") if plat == "cpu" else ("pallas", "xla")
  return {
    "platform": platform,
    "device_kind": device_kind(),
    "tuned": _status["tuned"],
    "reason": _status["reason"],
    "pallas": _pallas.enabled(),
    "policies": {k: policy_for(plat, k, jnp.float32) for k in kernels},
    "n_tuned": len(tuned),
  }


def export_checks() -> list:
  """`jax.export` safety checks to lift for programs with the project's kernels.

  The CPU FFI kernel (`_native.TARGET`) and Triton's custom call carry no compatibility
  guarantee, so `jax.export` refuses them unless told, e.g.
  `jax.export.export(f, platforms=("cpu", "cuda", "tpu"), disabled_checks=export_checks())`.
  (Mosaic TPU's custom call is on jax's own list.) An exported program is only valid with
  the same lrcc-jax and jax versions.
  """
  targets = (*_native.SYMBOLS, "__gpu$xla.gpu.triton")
  return [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
