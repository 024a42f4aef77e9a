"""`lrcc-jax tune`: measure where gathering beats the dense product on this device.

For a grid of layer widths, block sizes, batch sizes and computed fractions it times
`packed_dense` with `strategy="gather"` against `strategy="dense"` (interleaved medians,
`bench.time_interleaved`), fits the crossover of the `Policy` of the gather kernel this
device runs (`_policy.gather_kernel`), and writes it to
`$LRCC_JAX_CACHE/policy-<device kind>-jax<version>.json`. The "auto" strategy then uses
it on this device kind with this jax (`lrcc_jax.policy_status()` says which file); other
platforms keep the shipped defaults.

The fit is conservative: one row gathers up to the largest measured fraction below which
every measured case won, several rows up to the largest `rows · fraction` (layers read)
below which every measured case won. The byte and small-fraction limits of the shipped
CPU policy are not fitted (left off), so tune on the shapes you serve.
"""

from __future__ import annotations

import datetime
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from lrcc_jax import _policy
from lrcc_jax._packed import packed_dense
from lrcc_jax.apps import bench


def measure(
  widths: Sequence[int],
  block_sizes: Sequence[int],
  batches: Sequence[int],
  fractions: Sequence[float],
  *,
  rank: int = 16,
  repeats: int = 5,
  progress: bool = True,
) -> list[dict]:
  """Dense vs gather timings, one dict per (width, block size, batch, fraction)."""
  grid = [(w, b, n, f) for w in widths for b in block_sizes for n in batches for f in fractions]
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(total=len(grid), desc="tune", file=sys.stderr)
  rows = []
  platform = _policy.current_platform()
  for width in widths:
    for block_size in block_sizes:
      k_w, k_b, k_x = jax.random.split(jax.random.key(width * 131 + block_size), 3)
      _, _, _, packed, _ = bench._random_layer(k_w, k_b, width, min(rank, width), block_size)  # pylint: disable=protected-access
      n_blocks = width // block_size
      kernel = _policy.gather_kernel(platform, block_size, width, packed.weight.dtype, jnp.float32)
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
          t = bench.time_interleaved(fns, repeats=repeats)
          rows.append(
            {
              "width": width,
              "block_size": block_size,
              "batch": batch,
              "capacity": cap,
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


def _largest_winning(points: list[tuple[float, bool]]) -> float:
  """The largest measured value v with every point at or below v winning (0 if none)."""
  best = 0.0
  for value, _ in sorted(points):
    if all(win for v, win in points if v <= value):
      best = value
  return best


def fit(rows: list[dict], platform: str, kind: str) -> list[_policy.Policy]:
  """One tuned policy per gather kernel measured."""
  policies = []
  for kernel in dict.fromkeys(r["kernel"] for r in rows):
    mine = [r for r in rows if r["kernel"] == kernel]
    one = [(r["fraction"], r["speedup"] >= 1.0) for r in mine if r["batch"] == 1]
    many = [(r["batch"] * r["fraction"], r["speedup"] >= 1.0) for r in mine if r["batch"] > 1]
    policies.append(
      _policy.Policy(
        platform=platform if platform in _policy.PLATFORMS else "cuda",
        kernel="pallas" if kernel in ("triton", "mosaic") else kernel,
        max_fraction_one_row=_largest_winning(one),
        max_gathered_layers=_largest_winning(many),
        device_kind=kind,
        weight_dtype="float32",
        source=(
          f"tuned by lrcc-jax tune on {kind}, {datetime.date.today().isoformat()},"
          f" {len(mine)} cases"
        ),
      )
    )
  return policies


def run(
  widths: Sequence[int] = (1024, 4096),
  block_sizes: Sequence[int] = (1, 16),
  batches: Sequence[int] = (1, 2, 4, 8, 16),
  fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5),
  *,
  repeats: int = 5,
  progress: bool = True,
) -> tuple[Path, list[_policy.Policy], list[dict]]:
  """Measures, fits and writes the current device's policy file; returns its path."""
  kind = _policy.device_kind()
  rows = measure(widths, block_sizes, batches, fractions, repeats=repeats, progress=progress)
  policies = fit(rows, _policy.current_platform(), kind)
  path = _policy.policy_path(kind)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(_policy.policy_to_json(policies, kind))
  tmp.replace(path)
  _policy.forget_tuned()
  return path, policies, rows


def run_command(args) -> int:
  path, policies, rows = run(
    args.widths,
    args.block_sizes,
    args.batches,
    args.fractions,
    repeats=args.repeats,
    progress=not args.no_progress,
  )
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
      f"{p.platform}/{p.kernel}: one row up to {p.max_fraction_one_row:.3f} of the blocks,"
      f" several rows up to {p.max_gathered_layers:.3f} layers read"
    )
  print(f"wrote {path}")
  return 0


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t]


def add_arguments(parser) -> None:
  from lrcc_jax.apps.cli import int_list  # pylint: disable=g-import-not-at-top

  parser.add_argument(
    "--widths", type=int_list, default=[1024, 4096], help="layer widths (default 1024,4096)"
  )
  parser.add_argument(
    "--block-sizes", type=int_list, default=[1, 16], help="block sizes (default 1,16)"
  )
  parser.add_argument(
    "--batches", type=int_list, default=[1, 2, 4, 8, 16], help="batch sizes (default 1,2,4,8,16)"
  )
  parser.add_argument(
    "--fractions",
    type=_floats,
    default=[0.05, 0.1, 0.25, 0.5],
    help="computed fractions (default 0.05,0.1,0.25,0.5)",
  )
  parser.add_argument(
    "--repeats", type=int, default=5, help="interleaved repeats; the median is kept (default 5)"
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
