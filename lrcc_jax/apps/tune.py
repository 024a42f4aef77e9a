"""`lrcc-jax tune`: measure where gathering beats the dense product on this device.

For a grid of layer widths, block sizes, batch sizes and computed fractions it times
`packed_dense` with `strategy="gather"` against `strategy="dense"` (interleaved medians,
`bench.time_interleaved`), fits the crossover of the `Policy` of the gather kernel this
device runs (`_policy.gather_kernel`), and writes it to
`$LRCC_JAX_CACHE/policy-<device kind>-jax<version>.json`. The "auto" strategy then uses
it on this device kind with this jax (`lrcc_jax.policy_status()` says which file); other
platforms keep the shipped defaults.

The fit starts from the shipped default for the kernel and searches the policy's limits
over the values measured: the fractions of `gather_pays` (`max_fraction_one_row`,
`small_block_max_fraction_one_row`, `max_gathered_layers`, `small_fraction`,
`small_fraction_max_rows`), the row limit of small blocks (`small_block_max_rows`), the
native kernel's shared mode (`max_union_fraction`, `shared_max_fraction`) and, on CPU,
how far the fused kernel replaces the dense fallback (`fused_max_layers`,
`fused_small_fraction`; past `_fused.MAX_ROWS` rows it is timed on its own). It keeps the
candidate that loses the least time against the better strategy of each measured case
(sum of log time ratios), judged by the decision "auto" makes under it
(`_policy.batch_mode`, then `_fused.replaces_dense`). The default's own values are
candidates and win ties, so on the measured grid the tuned policy is never worse than the
shipped one; the byte limits are kept from the default. The
default grid is `lrcc-jax bench --suite full`'s (widths 1024-4096, blocks of 1 and 16,
batches 1-128, 5-50% computed, rank 64): tune on the shapes you serve.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lrcc_jax import _fused, _policy
from lrcc_jax._packed import auto_gathers, packed_dense
from lrcc_jax.apps import bench


def measure(
  widths: Sequence[int],
  block_sizes: Sequence[int],
  batches: Sequence[int],
  fractions: Sequence[float],
  *,
  rank: int = 64,
  repeats: int = 5,
  progress: bool = True,
) -> list[dict]:
  """Dense vs gather timings, one dict per (width, block size, batch, fraction)."""
  grid = [(w, b, n, f) for w in widths for b in block_sizes for n in batches for f in fractions]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=len(grid), desc="tune", file=sys.stderr, disable=None)
  rows = []
  platform = _policy.current_platform()
  for width in widths:
    for block_size in block_sizes:
      k_w, k_b, k_x = jax.random.split(jax.random.key(width * 131 + block_size), 3)
      _, _, _, packed, _ = bench._random_layer(k_w, k_b, width, min(rank, width), block_size)  # pylint: disable=protected-access
      n_blocks = width // block_size
      kernel = _policy.gather_kernel(platform, block_size, width, packed.weight.dtype, jnp.float32)
      # A policy that never gathers but lets the fused kernel replace every dense fallback:
      # under it "auto" gathers exactly where the fused kernel's own limits allow.
      never: dict[str, Any] = {field: 0 for field in _FRACTION_FIELDS}
      fused_only = dataclasses.replace(
        _policy.default_policy(_policy._policy_platform(platform), kernel, packed.weight.dtype),  # pylint: disable=protected-access
        **never,
        fused_max_layers=math.inf,
        fused_small_fraction=math.inf,
      )
      for batch in batches:
        x = jax.random.normal(k_x, (batch, width), jnp.float32)
        for frac in fractions:
          cap = bench.capacity_blocks(frac, width, block_size)
          fns = {
            strategy: functools.partial(
              jax.jit(functools.partial(packed_dense, capacity=cap, strategy=strategy)), x, packed
            )
            for strategy in ("gather", "dense")
          }
          eligible = auto_gathers(packed, batch, cap, platform=platform, policy=fused_only)
          if eligible and batch > _fused.MAX_ROWS:  # "gather" runs the tile kernel there
            fns["fused"] = functools.partial(
              jax.jit(functools.partial(packed_dense, capacity=cap, policy=fused_only)), x, packed
            )
          t = bench.time_interleaved(fns, repeats=repeats)
          rows.append(
            {
              "fused_eligible": eligible,
              "fused_ms": 1e3 * t.get("fused", t["gather"]),
              "width": width,
              "block_size": block_size,
              "batch": batch,
              "capacity": cap,
              "n_blocks": n_blocks,
              "block_bytes": block_size * width * packed.weight.dtype.itemsize,
              "fraction": cap / n_blocks,
              "kernel": kernel,
              "gather_ms": 1e3 * t["gather"],
              "dense_ms": 1e3 * t["dense"],
              "speedup": t["dense"] / t["gather"],
            }
          )
          if bar is not None:
            bar.update()
  if bar is not None:
    bar.close()
  return rows


def _loss(policy: _policy.Policy, rows: list[dict]) -> float:
  """Time lost against the better strategy of each row: sum of log(chosen / best), with
  "chosen" the strategy "auto" picks under `policy`: `_policy.batch_mode`, or the fused
  kernel where the row is eligible and `_fused.replaces_dense` lets it replace dense.
  Up to `_fused.MAX_ROWS` rows the gathered time is the fused kernel's (`fused_ms` equals
  `gather_ms` there); past it the fused kernel is timed on its own."""
  total = 0.0
  for r in rows:
    mode = _policy.batch_mode(policy, r["batch"], r["capacity"], r["n_blocks"], r["block_bytes"])
    eligible = r.get("fused_eligible", False)
    fused = eligible and _fused.replaces_dense(r["batch"], r["capacity"], r["n_blocks"], policy)
    fused_ms = r.get("fused_ms", r["gather_ms"])
    if mode != "dense":
      chosen = r["gather_ms"]
    else:
      chosen = fused_ms if fused else r["dense_ms"]
    best = min(r["gather_ms"], r["dense_ms"], fused_ms if eligible else math.inf)
    total += math.log(chosen / best)
  return total


def _search(
  base: _policy.Policy, rows: list[dict], grid: dict[str, list]
) -> tuple[_policy.Policy, float]:
  """The candidate with the least `_loss`; `base` (listed first) wins ties."""
  best, best_loss = base, _loss(base, rows)
  for values in itertools.product(*grid.values()):
    candidate = dataclasses.replace(best, **dict(zip(grid, values)))
    loss = _loss(candidate, rows)
    if loss < best_loss - 1e-12:
      best, best_loss = candidate, loss
  return best, best_loss


def fit(rows: list[dict], platform: str, kind: str) -> list[_policy.Policy]:
  """One tuned policy per gather kernel measured (see the module docstring)."""
  policies = []
  plat = platform if platform in _policy.PLATFORMS else "cuda"
  for kernel in dict.fromkeys(r["kernel"] for r in rows):
    mine = [r for r in rows if r["kernel"] == kernel]
    name = "pallas" if kernel in ("triton", "mosaic") else kernel
    base = _policy.default_policy(plat, name, jnp.float32)
    base = dataclasses.replace(
      base,
      platform=plat,
      kernel=name,
      device_kind=kind,
      weight_dtype="float32",
      source=(
        f"tuned by lrcc-jax tune on {kind}, {datetime.date.today().isoformat()}, {len(mine)} cases"
      ),
    )
    one = [r for r in mine if r["batch"] == 1]
    many = [r for r in mine if r["batch"] > 1]
    fractions = sorted({r["fraction"] for r in mine})
    # One row: only the one-row fractions decide (beyond the byte limits, kept).
    tuned, _ = _search(
      base,
      one,
      {
        "max_fraction_one_row": [base.max_fraction_one_row, 0.0, *fractions],
        "small_block_max_fraction_one_row": [
          base.small_block_max_fraction_one_row,
          1.0,
          *fractions,
        ],
      },
    )
    # Several rows: the layers read, and the small-fraction rule.
    tuned, _ = _search(
      tuned,
      many,
      {
        "max_gathered_layers": [
          tuned.max_gathered_layers,
          0.0,
          *sorted({r["batch"] * r["fraction"] for r in many}),
        ],
        "small_fraction": [tuned.small_fraction, 0.0, *fractions],
        "small_fraction_max_rows": [
          tuned.small_fraction_max_rows,
          0,
          *sorted({r["batch"] for r in many}),
        ],
      },
    )
    batches = sorted({r["batch"] for r in many})
    tuned, _ = _search(
      tuned, many, {"small_block_max_rows": [tuned.small_block_max_rows, 1, *batches]}
    )
    if tuned.shared_min_rows > 0:  # the native kernel's shared mode
      tuned, _ = _search(
        tuned,
        many,
        {
          "max_union_fraction": [
            tuned.max_union_fraction,
            0.0,
            *sorted({_policy.union_fraction(r["batch"], r["fraction"]) for r in many}),
          ],
          "shared_max_fraction": [tuned.shared_max_fraction, 0.0, *fractions],
        },
      )
    if tuned.fused_max_layers > 0:  # the fused CPU kernel in place of the dense fallback
      tuned, _ = _search(
        tuned,
        mine,
        {
          "fused_max_layers": [
            tuned.fused_max_layers,
            0.0,
            *sorted({r["batch"] * r["fraction"] for r in mine}),
          ],
          "fused_small_fraction": [tuned.fused_small_fraction, 0.0, *fractions],
        },
      )
    policies.append(tuned)
  return policies


# The policy fields that say where gathering pays (zeroed: a policy that never gathers).
_FRACTION_FIELDS = (
  "max_fraction_one_row",
  "small_block_max_fraction_one_row",
  "max_gathered_layers",
  "small_fraction",
  "small_fraction_max_rows",
  "max_union_fraction",
  "shared_max_fraction",
)

WIDTHS, BLOCK_SIZES, BATCHES = (1024, 2048, 4096), (1, 16), (1, 2, 4, 8, 16, 32, 64, 128)
FRACTIONS = (0.05, 0.1, 0.25, 0.5)
DEFAULT_GRID: dict[str, tuple] = {
  "widths": WIDTHS,
  "block_sizes": BLOCK_SIZES,
  "batches": BATCHES,
  "fractions": FRACTIONS,
}
# `--quick`: a tiny grid for tests and a first look (seconds, not minutes).
QUICK_GRID: dict[str, tuple] = {
  "widths": (256,),
  "block_sizes": (16,),
  "batches": (1, 2),
  "fractions": (0.25, 0.5),
}


def run(
  widths: Sequence[int] = WIDTHS,
  block_sizes: Sequence[int] = BLOCK_SIZES,
  batches: Sequence[int] = BATCHES,
  fractions: Sequence[float] = FRACTIONS,
  *,
  rank: int = 64,
  repeats: int = 5,
  progress: bool = True,
) -> tuple[Path, list[_policy.Policy], list[dict]]:
  """Measures, fits and writes the current device's policy file; returns its path."""
  kind = _policy.device_kind()
  rows = measure(
    widths, block_sizes, batches, fractions, rank=rank, repeats=repeats, progress=progress
  )
  policies = fit(rows, _policy.current_platform(), kind)
  path = _policy.policy_path(kind)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(_policy.policy_to_json(policies, kind))
  tmp.replace(path)
  _policy.forget_tuned()
  return path, policies, rows


def run_command(args) -> int:
  grid = dict(QUICK_GRID if args.quick else DEFAULT_GRID)
  for key in grid:
    if getattr(args, key) is not None:
      grid[key] = getattr(args, key)
  repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
  rank = args.rank if args.rank is not None else (16 if args.quick else 64)
  path, policies, rows = run(**grid, rank=rank, repeats=repeats, progress=not args.no_progress)
  print(
    f"{'width':>6} {'bs':>3} {'batch':>5} {'frac':>6} {'kernel':>7} {'dense ms':>9}"
    f" {'gather ms':>9} {'x':>6}"
  )
  for r in rows:
    print(
      f"{r['width']:>6} {r['block_size']:>3} {r['batch']:>5} {r['fraction']:>6.3f} {r['kernel']:>7}"
      f" {r['dense_ms']:>9.3f} {r['gather_ms']:>9.3f} {r['speedup']:>6.2f}"
    )
  for p in policies:
    print(
      f"{p.platform}/{p.kernel}: one row up to {p.max_fraction_one_row:.3f} of the blocks;"
      f" several rows up to {p.max_gathered_layers:.3f} layers read, or up to"
      f" {p.small_fraction:.3f} of the blocks at up to {p.small_fraction_max_rows} rows"
    )
  print(f"wrote {path}")
  return 0


def add_arguments(parser) -> None:
  from lrcc_jax.apps.cli import float_list, int_list, positive_int  # pylint: disable=g-import-not-at-top

  def grid(key: str) -> str:
    return ",".join(str(v) for v in DEFAULT_GRID[key])

  parser.add_argument(
    "--widths", type=int_list, default=None, help=f"layer widths (default {grid('widths')})"
  )
  parser.add_argument(
    "--block-sizes",
    type=int_list,
    default=None,
    help=f"block sizes (default {grid('block_sizes')})",
  )
  parser.add_argument(
    "--batches", type=int_list, default=None, help=f"batch sizes (default {grid('batches')})"
  )
  parser.add_argument(
    "--fractions",
    type=float_list,
    default=None,
    help=f"computed fractions (default {grid('fractions')})",
  )
  parser.add_argument(
    "--rank", type=positive_int, default=None, help="estimator rank (default 64; --quick 16)"
  )
  parser.add_argument(
    "--repeats",
    type=positive_int,
    default=None,
    help="interleaved repeats; the median is kept (default 5; --quick 2)",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a tiny grid (one 256-wide layer, batches 1-2) for tests; explicit options win",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
