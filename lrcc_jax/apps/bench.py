"""Latency benchmarks: dense jit against the compute-skipping `packed_dense`.

Protocol: both sides are jitted, compiled and warmed up outside the
timed region, `pack` runs once beforehand, every call ends in `block_until_ready`, the two
sides are interleaved, and each figure is the median of `repeats` repeats. Ratios are
reported next to the FLOP model's figure, with the device, jax version and thread count.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from lrcc_jax import _native
from lrcc_jax._estimator import estimate, fit_svd
from lrcc_jax._flops import LayerCost, network_costs, theoretical_speedup
from lrcc_jax._layers import masked_dense, unit_mask
from lrcc_jax._packed import auto_gathers, pack, packed_dense
from lrcc_jax.apps.table import format_table as _format_table

DEFAULT_OUT = "runs/bench"
"""Where ``lrcc-jax bench`` writes unless ``--out`` says otherwise (never the committed
``experiments/results/`` by default: a casual run must not overwrite the reference figures)."""

LEGEND: tuple[str, ...] = (
  "cap: units computed per row (capacity, as a share of the layer); path: gather = the"
  " skip kernel ran, dense+mask = it fell back to the dense product.",
  "speedup: dense jit time / skip time, measured here; model: the FLOP model's speed-up"
  " (multiply-adds, not a time); achieved: speedup / model.",
  "varied x: measured speed-up at batch 1 on 16 different inputs in turn (the gathered"
  " rows then come from memory, not cache); blank for batch > 1.",
)


def environment() -> dict:
  """Where the figures were measured."""
  dev = jax.devices()[0]
  return {
    "device_kind": dev.device_kind,
    "platform": dev.platform,
    "jax_version": jax.__version__,
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "machine": platform.machine(),
    "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
    # whether the skip paths ran the native CPU kernel (`lrcc_jax._native`) or pure XLA
    "native_cpu_kernel": _native.status() if dev.platform == "cpu" else None,
  }


def latency_mode() -> bool:
  """Runs jitted CPU calls on the calling thread (`jax_cpu_enable_async_dispatch=False`).

  With asynchronous dispatch every call hands its work to another thread and
  `block_until_ready` waits for it; on the 2-core VM the figures were taken on that
  hand-off costs about 40 µs per call (a jitted `x + 1` on 4096 floats: 43 µs async,
  4 µs sync), which is a large share of a 0.2 ms skip-mode call. Batch-1 inference that
  waits on each result gains nothing from async dispatch, so `lrcc-jax bench` measures
  both sides this way unless `--async-dispatch` is given; `environment()` records it.

  The flag is read when the CPU client starts, so this only takes effect before the
  first computation. Returns whether it did.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def _random_layer(k_w: jax.Array, k_b: jax.Array, width: int, rank: int, block_size: int):
  """A random `width`² ReLU layer: kernel, bias, SVD estimator, packed form, dense jit."""
  kernel = jax.random.normal(k_w, (width, width), jnp.float32) / np.sqrt(width)
  bias = 0.01 * jax.random.normal(k_b, (width,), jnp.float32)
  est = fit_svd(kernel, rank)
  packed = jax.block_until_ready(pack(kernel, bias, est, block_size=block_size))
  dense_fn = jax.jit(lambda x: jax.nn.relu(x @ kernel + bias[None]))
  return kernel, bias, est, packed, dense_fn


def capacity_blocks(fraction: float, width: int, block_size: int) -> int:
  """Blocks per row that compute `fraction` of a `width`-wide layer (at least one)."""
  return max(1, round(fraction * width / block_size))


def time_interleaved(
  fns: Mapping[str, Callable[[], Any]], *, repeats: int = 9, calls: int | None = None
) -> dict[str, float]:
  """Median seconds per call of each thunk, with the thunks interleaved in every repeat.

  `calls` per repeat defaults to enough calls for about 20 ms of the slowest thunk. Each
  block of calls starts with one untimed call: right after a dense product has streamed
  its weights, the first call of the next thunk pays for the switch (the caches and
  worker threads the previous thunk left behind), which is not a cost of that thunk in a
  steady stream of calls.
  """
  slowest = 0.0
  for fn in fns.values():  # compile + warm up
    fn().block_until_ready()
    start = time.perf_counter()
    fn().block_until_ready()
    slowest = max(slowest, time.perf_counter() - start)
  if calls is None:
    calls = int(min(50, max(3, 0.02 / max(slowest, 1e-6))))
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      fn().block_until_ready()  # untimed: the switch from the previous thunk is not its cost
      start = time.perf_counter()
      for _ in range(calls):
        fn().block_until_ready()
      samples[name].append((time.perf_counter() - start) / calls)
  return {name: float(np.median(s)) for name, s in samples.items()}


def _setting(
  width: int, rank: int, batch: int, frac: float, block_size: int, cap: int, gathered: bool
) -> dict[str, Any]:
  """The fields that say what a one-layer benchmark row measured (layer and full suites)."""
  return {
    "width": width,
    "rank": rank,
    "batch": batch,
    "capacity_fraction": frac,
    "block_size": block_size,
    "capacity": cap,
    "computed_fraction": cap * block_size / width,
    "path": "gather" if gathered else "dense+mask",
  }


def bench_layer(
  width: int = 4096,
  rank: int = 64,
  batches: Sequence[int] = (1, 8, 64),
  fractions: Sequence[float] = (0.05, 0.10, 0.25),
  *,
  block_size: int = 1,
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """One `width`×`width` f32 ReLU layer: dense jit vs `packed_dense` at fixed capacities.

  A capacity fraction `f` selects `round(f · width / block_size)` blocks per row. At
  batch 1 the skip side is also timed on a stream of 16 different inputs
  (`varied_input_speedup`): with one fixed input its gathered rows (10% of 4096²: 6.7 MB)
  stay in the last-level cache between calls while the dense weights (67 MB) cannot.
  """
  k_w, k_b, k_x = jax.random.split(jax.random.key(seed), 3)
  k_v = jax.random.fold_in(k_x, 1)
  kernel, bias, est, packed, dense_fn = _random_layer(k_w, k_b, width, rank, block_size)
  rows = []
  for batch in batches:
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    for frac in fractions:
      cap = capacity_blocks(frac, width, block_size)
      computed = cap * block_size / width
      skip_fn = jax.jit(lambda x, cap=cap: packed_dense(x, packed, capacity=cap))
      mask = unit_mask(estimate(x, est, bias), 0.0, cap, block_size)
      np.testing.assert_allclose(  # the timed path computes the contract's values
        np.asarray(skip_fn(x)),
        np.asarray(masked_dense(x, kernel, bias, mask)),
        rtol=1e-4,
        atol=1e-4,
      )
      gathered = auto_gathers(packed, batch, cap)
      fns = {"dense": lambda: dense_fn(x), "skip": lambda: skip_fn(x)}
      if batch == 1:  # new inputs select new rows, which then come from memory, not cache
        stream = itertools.cycle(list(jax.random.normal(k_v, (16, 1, width), jnp.float32)))
        fns["skip_varied"] = lambda: skip_fn(next(stream))
      t = time_interleaved(fns, repeats=repeats)
      flop_ratio = (
        theoretical_speedup([LayerCost(width, width, rank, computed)]) if gathered else 1.0
      )
      measured = t["dense"] / t["skip"]
      rows.append(
        {
          **_setting(width, rank, batch, frac, block_size, cap, gathered),
          "dense_ms": 1e3 * t["dense"],
          "skip_ms": 1e3 * t["skip"],
          "measured_speedup": measured,
          "flop_model_speedup": flop_ratio,
          "fraction_of_model": measured / flop_ratio,
          "varied_input_speedup": t["dense"] / t["skip_varied"] if batch == 1 else None,
        }
      )
  return rows


def bench_module(
  width: int = 4096,
  rank: int = 64,
  fraction: float = 0.10,
  *,
  block_size: int = 16,
  batch: int = 1,
  repeats: int = 9,
  seed: int = 0,
) -> dict:
  """The NNX layer in skip mode against `packed_dense` on the same packed weights.

  Times, interleaved: a `ConditionalDense` in skip mode under `nnx.jit` three ways (the
  default; donating the module, ``donate_argnums=0``; and ``graph=False``), `packed_dense`
  on the layer's packed form under `jax.jit`, and the dense layer, as an `nnx.Linear` under
  the default `nnx.jit` and as a plain `jax.jit` product. With graph updates on and no
  donation, `nnx.jit` returns every variable of its module arguments as a fresh output,
  which costs a copy of all the module's arrays per call whatever the module computes; the
  `nnx.Linear` side shows that cost on a module with nothing of this library in it. It
  also counts the module's traces while its threshold changes three times (expected: 0).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from lrcc_jax.nn import ConditionalDense  # pylint: disable=g-import-not-at-top

  cap = capacity_blocks(fraction, width, block_size)
  layer = ConditionalDense(
    width, width, rank=rank, capacity=cap, block_size=block_size, rngs=nnx.Rngs(seed)
  )
  layer.bias[...] = 0.01 * jax.random.normal(jax.random.key(seed + 1), (width,))
  layer.repack()
  linear = nnx.Linear(width, width, rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed + 2), (batch, width), jnp.float32)
  traces = []

  def skip(layer, x):
    traces.append(1)
    return layer(x, "skip")

  module_default = nnx.jit(skip)
  module_donated = nnx.jit(skip, donate_argnums=0)
  module_tree = nnx.jit(skip, graph=False, graph_updates=False)
  linear_default = nnx.jit(lambda m, x: jax.nn.relu(m(x)))
  packed = jax.block_until_ready(layer.packed())
  kernel, bias = layer.kernel[...], layer.bias[...]
  core_fn = jax.jit(lambda x, t: packed_dense(x, packed, threshold=t, capacity=cap))
  dense_fn = jax.jit(lambda x: jax.nn.relu(x @ kernel + bias[None]))
  for fn in (module_default, module_donated, module_tree):
    np.testing.assert_allclose(
      np.asarray(fn(layer, x)), np.asarray(core_fn(x, 0.0)), rtol=1e-5, atol=1e-5
    )
  t = time_interleaved(
    {
      "dense": lambda: dense_fn(x),
      "packed_dense": lambda: core_fn(x, 0.0),
      "module_donated": lambda: module_donated(layer, x),
      "module_graph_false": lambda: module_tree(layer, x),
      "module_default": lambda: module_default(layer, x),
      "nnx_linear_default": lambda: linear_default(linear, x),
    },
    repeats=repeats,
  )
  n_traces = len(traces)
  for threshold in (-0.1, 0.05, 0.2):
    layer.threshold[...] = threshold
    for fn in (module_default, module_donated, module_tree):
      fn(layer, x).block_until_ready()
  ms = {f"{k}_ms": 1e3 * v for k, v in t.items()}
  return {
    "width": width,
    "rank": rank,
    "batch": batch,
    "block_size": block_size,
    "capacity": cap,
    "capacity_fraction": cap * block_size / width,
    **ms,
    "module_donated_over_packed_dense": t["module_donated"] / t["packed_dense"],
    "module_graph_false_over_packed_dense": t["module_graph_false"] / t["packed_dense"],
    "module_default_over_packed_dense": t["module_default"] / t["packed_dense"],
    "module_donated_speedup_over_dense": t["dense"] / t["module_donated"],
    "retraces_over_three_threshold_changes": len(traces) - n_traces,
  }


def bench_storage(
  width: int = 4096,
  rank: int = 64,
  fraction: float = 0.10,
  *,
  block_size: int = 16,
  batches: Sequence[int] = (1, 8),
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """bf16 against f32 weight storage in `packed_dense` ("auto"), with dense f32 jit.

  bf16 storage halves the weight bytes a gather reads; on the CPU the native kernel
  widens them to f32 as it reads, so activations and sums stay f32. Where "auto" takes the
  dense fallback, the bf16 weights are widened once per call before the f32 product.
  """
  k_w, k_b, k_x = jax.random.split(jax.random.key(seed), 3)
  kernel, bias, est, p32, dense_fn = _random_layer(k_w, k_b, width, rank, block_size)
  p16 = jax.block_until_ready(pack(kernel, bias, est, block_size=block_size, dtype=jnp.bfloat16))
  cap = capacity_blocks(fraction, width, block_size)
  rows = []
  for batch in batches:
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    f32_fn = jax.jit(lambda x: packed_dense(x, p32, capacity=cap))
    bf16_fn = jax.jit(lambda x: packed_dense(x, p16, capacity=cap))
    t = time_interleaved(
      {"dense": lambda: dense_fn(x), "f32": lambda: f32_fn(x), "bf16": lambda: bf16_fn(x)},
      repeats=repeats,
    )
    rows.append(
      {
        "width": width,
        "rank": rank,
        "batch": batch,
        "block_size": block_size,
        "capacity": cap,
        "capacity_fraction": cap * block_size / width,
        "path_f32": "gather" if auto_gathers(p32, batch, cap) else "dense+mask",
        "path_bf16": "gather" if auto_gathers(p16, batch, cap, jnp.float32) else "dense+mask",
        "dense_f32_ms": 1e3 * t["dense"],
        "skip_f32_ms": 1e3 * t["f32"],
        "skip_bf16_ms": 1e3 * t["bf16"],
        "bf16_speedup_over_f32_storage": t["f32"] / t["bf16"],
        "bf16_speedup_over_dense": t["dense"] / t["bf16"],
        "weight_bytes_f32": int(p32.weight.nbytes),
        "weight_bytes_bf16": int(p16.weight.nbytes),
      }
    )
  return rows


def format_table(rows: list[dict]) -> str:
  """The ``--suite layer`` table, with a legend of its columns."""
  header = [
    "batch",
    "cap",
    "path",
    "dense ms",
    "skip ms",
    "speedup",
    "model",
    "achieved",
    "varied x",
  ]
  lines = [
    [
      str(r["batch"]),
      f"{r['capacity_fraction']:.0%}",
      r["path"],
      f"{r['dense_ms']:.3f}",
      f"{r['skip_ms']:.3f}",
      f"{r['measured_speedup']:.2f}x",
      f"{r['flop_model_speedup']:.2f}x",
      f"{r['fraction_of_model']:.0%}",
      f"{r['varied_input_speedup']:.2f}x" if r.get("varied_input_speedup") else "",
    ]
    for r in rows
  ]
  return _format_table(header, lines, right=[True, True, False] + [True] * 6, legend=LEGEND)


def format_mlp_table(rows: list[dict]) -> str:
  """The ``--suite mlp`` table, with a legend."""
  header = ["batch", "dense ms", "skip ms", "speedup (measured)", "model (FLOP)", "achieved"]
  lines = [
    [
      str(r["batch"]),
      f"{r['dense_ms']:.3f}",
      f"{r['skip_ms']:.3f}",
      f"{r['measured_speedup']:.2f}x",
      f"{r['flop_model_speedup']:.2f}x",
      f"{r['fraction_of_model']:.0%}",
    ]
    for r in rows
  ]
  return _format_table(header, lines, right=[True] * 6, legend=LEGEND[1:2])


def format_suite_table(rows: list[dict]) -> str:
  """The ``--suite full`` table, with a legend."""
  header = [
    "width",
    "batch",
    "cap",
    "path",
    "dense ms",
    "mask ms",
    "skip ms",
    "skip speedup",
    "mask speedup",
    "model",
  ]
  lines = [
    [
      str(r["width"]),
      str(r["batch"]),
      f"{r['capacity_fraction']:.0%}",
      r["path"],
      f"{r['dense_ms']:.3f}",
      f"{r['mask_ms']:.3f}",
      f"{r['skip_ms']:.3f}",
      f"{r['skip_speedup']:.2f}x",
      f"{r['mask_speedup']:.2f}x",
      f"{r['flop_model_speedup']:.2f}x",
    ]
    for r in rows
  ]
  legend = (
    LEGEND[0],
    "skip / mask speedup: dense jit time / time of packed_dense (skip) or of the dense"
    " product then the mask (mask), measured here; model: the FLOP model, not a time.",
  )
  return _format_table(header, lines, right=[True, True, True, False] + [True] * 6, legend=legend)


def write_results(name: str, payload: dict, out_dir: str | os.PathLike = DEFAULT_OUT) -> Path:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2) + "\n")
  return path


def random_mlp(
  width: int,
  depth: int,
  rank: int,
  capacity: int,
  *,
  block_size: int = 1,
  num_classes: int = 10,
  seed: int = 0,
):
  """A `depth`-layer `width`-wide ConditionalMLP with random weights, for latency only.

  `capacity` counts blocks of `block_size` units per layer.
  """
  from flax import nnx

  from lrcc_jax.nn import ConditionalMLP

  return ConditionalMLP(
    width,
    [width] * depth,
    num_classes,
    ranks=rank,
    capacities=capacity,
    block_sizes=block_size,
    rngs=nnx.Rngs(seed),
  )


def bench_mlp(
  model,
  batches: Sequence[int] = (1,),
  *,
  repeats: int = 9,
  seed: int = 0,
  x_pool: np.ndarray | None = None,
) -> list[dict]:
  """A whole `ConditionalMLP`: dense jit vs skip mode (`packed_mlp`, "auto" strategy).

  Both sides see the same inputs: rows of `x_pool` when given (real data), else Gaussian.
  The FLOP-model figure uses the computed fractions measured on those inputs.
  """
  from lrcc_jax import packed_mlp

  model.eval()
  packed = jax.block_until_ready(model.pack())
  thresholds, capacities = model.thresholds, [l.capacity for l in model.layers]
  kernels = [(l.kernel[...], l.bias[...]) for l in model.layers]
  head = (model.head.kernel[...], model.head.bias[...])

  def dense(x):
    for k, b in kernels:
      x = jax.nn.relu(x @ k + b[None])
    return x @ head[0] + head[1][None]

  dense_fn = jax.jit(dense)
  rows = []
  rng = np.random.default_rng(seed)
  n_in = kernels[0][0].shape[0]
  for batch in batches:
    if x_pool is not None:
      x = jnp.asarray(x_pool[rng.choice(len(x_pool), batch, replace=False)])
    else:
      x = jnp.asarray(rng.standard_normal((batch, n_in)), jnp.float32)
    skip_fn = jax.jit(lambda x: packed_mlp(x, packed, thresholds=thresholds, capacities=capacities))
    _, acts = packed_mlp(
      x, packed, thresholds=thresholds, capacities=capacities, return_activations=True
    )
    ref = model(x, mode="mask")
    np.testing.assert_allclose(np.asarray(skip_fn(x)), np.asarray(ref), rtol=1e-3, atol=1e-3)
    t = time_interleaved(
      {"dense": lambda: dense_fn(x), "skip": lambda: skip_fn(x)}, repeats=repeats
    )
    fractions = [float(jnp.mean(a != 0)) for a in acts]
    computed = [  # a layer that falls back to the dense product computes all of it
      min(1.0, c * l.block_size / l.kernel.shape[1]) if auto_gathers(pl, batch, c) else 1.0
      for c, l, pl in zip(capacities, model.layers, packed.layers)
    ]
    widths = [n_in] + [int(k.shape[1]) for k, _ in kernels]
    flop = theoretical_speedup(
      network_costs(widths, model.ranks, computed, num_classes=int(head[0].shape[1]))
    )
    measured = t["dense"] / t["skip"]
    rows.append(
      {
        "batch": batch,
        "widths": [n_in] + [k.shape[1] for k, _ in kernels],
        "ranks": list(model.ranks),
        "capacities": capacities,
        "computed_fraction": computed,
        "nonzero_fraction": fractions,
        "dense_ms": 1e3 * t["dense"],
        "skip_ms": 1e3 * t["skip"],
        "measured_speedup": measured,
        "flop_model_speedup": flop,
        "fraction_of_model": measured / flop,
      }
    )
  return rows


def memory_report(width_in: int, width_out: int, rank: int, packed, skip_fn, x) -> dict:
  """Bytes of the dense parameters, of the packed form, and XLA's temporaries for skip."""
  dense_bytes = 4 * (width_in * width_out + width_out)
  packed_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(packed))
  factor_bytes = 4 * rank * (width_in + width_out)
  compiled = skip_fn.lower(x).compile()
  analysis = compiled.memory_analysis()
  temp = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else None
  return {
    "dense_param_bytes": dense_bytes,
    "packed_bytes": packed_bytes,
    "packed_over_dense_plus_factors": packed_bytes / (dense_bytes + factor_bytes),
    "skip_temp_bytes": temp,
  }


def bench_suite(
  widths: Sequence[int] = (1024, 4096, 8192),
  batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
  fractions: Sequence[float] = (0.05, 0.10, 0.25, 0.50),
  *,
  rank: int = 64,
  block_size: int = 1,
  repeats: int = 7,
  progress: bool = True,
) -> list[dict]:
  """Single layers: dense jit vs mask (dense product, then mask) vs skip (`packed_dense`).

  A capacity fraction `f` selects `round(f · width / block_size)` blocks per row.
  """
  from lrcc_jax._layers import conditional_dense

  rows = []
  grid = [(w, b, f) for w in widths for b in batches for f in fractions]
  bar = None
  if progress:
    import tqdm

    bar = tqdm.tqdm(total=len(grid), desc="bench", file=sys.stderr, disable=None)
  for width in widths:
    k_w, k_b, k_x = jax.random.split(jax.random.key(width), 3)
    kernel, bias, est, packed, dense_fn = _random_layer(k_w, k_b, width, rank, block_size)
    for batch in batches:
      x = jax.random.normal(k_x, (batch, width), jnp.float32)
      for frac in fractions:
        cap = capacity_blocks(frac, width, block_size)
        computed = cap * block_size / width
        skip_fn = jax.jit(lambda x, cap=cap: packed_dense(x, packed, capacity=cap))
        mask_fn = jax.jit(
          lambda x, cap=cap: conditional_dense(
            x, kernel, bias, est, capacity=cap, block_size=block_size
          )
        )
        t = time_interleaved(
          {"dense": lambda: dense_fn(x), "mask": lambda: mask_fn(x), "skip": lambda: skip_fn(x)},
          repeats=repeats,
        )
        gathered = auto_gathers(packed, batch, cap)
        model = theoretical_speedup([LayerCost(width, width, rank, computed)])
        row: dict[str, Any] = {
          **_setting(width, rank, batch, frac, block_size, cap, gathered),
          "dense_ms": 1e3 * t["dense"],
          "mask_ms": 1e3 * t["mask"],
          "skip_ms": 1e3 * t["skip"],
          "skip_speedup": t["dense"] / t["skip"],
          "mask_speedup": t["dense"] / t["mask"],
          "flop_model_speedup": model,
          "fraction_of_model": t["dense"] / t["skip"] / model,
        }
        if batch == 1:
          row["memory"] = memory_report(width, width, rank, packed, skip_fn, x)
        rows.append(row)
        if bar is not None:
          bar.update()
  if bar is not None:
    bar.close()
  return rows


def plot_suite(rows: list[dict], path: str | os.PathLike) -> None:
  """Speed-up of skip over dense against batch size, one panel per width."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  widths = sorted({r["width"] for r in rows})
  fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False)
  for ax, width in zip(axes[0], widths):
    for frac in sorted({r["capacity_fraction"] for r in rows}):
      sel = [r for r in rows if r["width"] == width and r["capacity_fraction"] == frac]
      ax.plot(
        [r["batch"] for r in sel], [r["skip_speedup"] for r in sel], "o-", label=f"skip, {frac:.0%}"
      )
    mask = [r for r in rows if r["width"] == width and r["capacity_fraction"] == 0.1]
    ax.plot(
      [r["batch"] for r in mask],
      [r["mask_speedup"] for r in mask],
      "k--",
      label="mask after dense, 10%",
    )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(f"{width}x{width} layer, rank {rows[0]['rank']}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speed-up over dense jit")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_speedups(rows: list[dict], path: str | os.PathLike, title: str) -> None:
  """Measured and FLOP-model speed-up against batch size (``--suite layer`` and ``mlp``).

  One line per capacity fraction (rows without one, the MLP's, form a single line).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5.5, 4), layout="constrained")
  ax = fig.subplots()
  groups = sorted({r.get("capacity_fraction") for r in rows}, key=lambda f: (f is None, f))
  for i, frac in enumerate(groups):
    sel = sorted((r for r in rows if r.get("capacity_fraction") == frac), key=lambda r: r["batch"])
    tag = "" if frac is None else f", {frac:.0%} computed"
    batches = [r["batch"] for r in sel]
    ax.plot(
      batches, [r["measured_speedup"] for r in sel], "o-", color=f"C{i}", label=f"measured{tag}"
    )
    ax.plot(
      batches,
      [r["flop_model_speedup"] for r in sel],
      "--",
      color=f"C{i}",
      alpha=0.6,
      label=f"FLOP model{tag}",
    )
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("batch size")
  ax.set_ylabel("speed-up over dense jit")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)


def plot_times(bars: dict[str, float], path: str | os.PathLike, title: str) -> None:
  """Horizontal bars of milliseconds per call (``--suite module`` and ``storage``)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6, 0.45 * len(bars) + 1.2), layout="constrained")
  ax = fig.subplots()
  names = list(bars)
  ax.barh(names, [bars[n] for n in names], color=[f"C{i}" for i in range(len(names))])
  for i, n in enumerate(names):
    ax.text(bars[n], i, f" {bars[n]:.3g} ms", va="center", fontsize=7)
  ax.set_xscale("log")
  ax.invert_yaxis()
  ax.set_xlabel("ms per call (median of interleaved repeats; log scale)")
  ax.set_title(title, fontsize=9)
  fig.savefig(path, dpi=110)


def run_command(args) -> int:
  """`lrcc-jax bench`: run a suite, print its table, write its JSON and PNG to ``--out``."""
  out = Path(args.out or DEFAULT_OUT)
  env = environment()
  progress = getattr(args, "progress", not args.no_progress)
  if args.suite == "layer":
    rows = bench_layer(
      rank=args.rank,
      batches=args.batches or (1, 8, 64),
      block_size=args.block_size,
      repeats=args.repeats,
    )
    print(format_table(rows))
    path = write_results("bench_layer", {"environment": env, "rows": rows}, out)
    plot_speedups(
      rows,
      out / "bench_layer.png",
      f"4096x4096 layer, rank {args.rank}, blocks of {args.block_size}",
    )
  elif args.suite == "mlp":
    model = random_mlp(
      4096, 4, args.rank, capacity_blocks(0.1, 4096, args.block_size), block_size=args.block_size
    )
    rows = bench_mlp(model, args.batches or (1, 4, 64), repeats=args.repeats)
    print(format_mlp_table(rows))
    path = write_results("bench_mlp", {"environment": env, "rows": rows}, out)
    plot_speedups(rows, out / "bench_mlp.png", f"4-layer 4096 MLP, rank {args.rank}, 10% computed")
  elif args.suite == "paper":
    rows = bench_paper(workdir=out / "train", repeats=args.repeats)
    for r in rows:
      print(
        f"l1 {r['l1']:g}: capacities {r['capacities']}"
        f" ({', '.join(f'{f:.0%}' for f in r['capacity_fraction'])});"
        f" dense {r['dense_ms']:.3f} ms; layerwise {r['layerwise_speedup']:.2f}x,"
        f" sparse {r['sparse_speedup']:.2f}x, dense path {r['dense_speedup']:.2f}x,"
        f" auto ({r['auto_path']}) {r['auto_speedup']:.2f}x"
      )
    path = write_results("bench_paper", {"environment": env, "rows": rows}, out)
  elif args.suite == "ffn":
    path = run_ffn(out, repeats=args.repeats, rank=args.rank)
  elif args.suite == "storage":
    rows = bench_storage(
      rank=args.rank,
      block_size=args.block_size,
      batches=args.batches or (1, 8),
      repeats=args.repeats,
    )
    for r in rows:
      print(
        f"batch {r['batch']:>3}: dense f32 {r['dense_f32_ms']:.3f} ms, skip f32"
        f" {r['skip_f32_ms']:.3f} ms"
        f" ({r['path_f32']}), skip bf16 {r['skip_bf16_ms']:.3f} ms ({r['path_bf16']}):"
        f" bf16 {r['bf16_speedup_over_f32_storage']:.2f}x f32 storage,"
        f" {r['bf16_speedup_over_dense']:.2f}x dense"
      )
    path = write_results("bench_storage", {"environment": env, "rows": rows}, out)
    plot_times(
      {
        f"{name}, batch {r['batch']}": r[key]
        for r in rows
        for name, key in (
          ("dense f32", "dense_f32_ms"),
          ("skip, f32 weights", "skip_f32_ms"),
          ("skip, bf16 weights", "skip_bf16_ms"),
        )
      },
      out / "bench_storage.png",
      f"{rows[0]['width']}² layer, {rows[0]['capacity_fraction']:.0%} computed",
    )
  elif args.suite == "module":
    row = bench_module(rank=args.rank, block_size=args.block_size, repeats=args.repeats)
    for k in (
      "dense",
      "packed_dense",
      "module_donated",
      "module_graph_false",
      "module_default",
      "nnx_linear_default",
    ):
      print(f"{k:>20}: {row[k + '_ms']:9.3f} ms")
    print(
      f"module (donated) / packed_dense: {row['module_donated_over_packed_dense']:.2f}x;"
      f" (graph=False) {row['module_graph_false_over_packed_dense']:.2f}x;"
      f" retraces on 3 threshold changes: {row['retraces_over_three_threshold_changes']}"
    )
    path = write_results("bench_module", {"environment": env, "rows": [row]}, out)
    plot_times(
      {
        k.replace("_", " "): row[k + "_ms"]
        for k in (
          "dense",
          "packed_dense",
          "module_donated",
          "module_graph_false",
          "module_default",
          "nnx_linear_default",
        )
      },
      out / "bench_module.png",
      f"{row['width']}² ConditionalDense, skip mode, batch {row['batch']}",
    )
  else:
    rows = bench_suite(
      widths=args.widths or (1024, 4096, 8192),
      batches=args.batches or (1, 2, 4, 8, 16, 32, 64, 128),
      rank=args.rank,
      block_size=args.block_size,
      repeats=args.repeats,
      progress=progress,
    )
    print(format_suite_table(rows))
    path = write_results("bench_suite", {"environment": env, "rows": rows}, out)
    plot_suite(rows, out / "bench_suite.png")
  print(f"wrote {path} and {path.with_suffix('.png')}")
  return 0


# --- conditional transformer FFNs (`lrcc_jax.packed_ffn`) --------------------------------


def ffn_flop_speedup(d_model: int, d_ff: int, rank: int, computed: float, gated: bool) -> float:
  """FLOP-model speed-up of a conditional FFN: every projection computes `computed` of d_ff.

  Dense: `(g + 1) d d_ff`; conditional: `r (d + d_ff) + (g + 1) c d d_ff` (g = 2 gated, else 1).
  """
  costs = [LayerCost(d_model, d_ff, rank, computed), LayerCost(d_ff, d_model, None, 1.0, computed)]
  if gated:  # the gate projection costs what the input projection's exact part does
    costs.append(LayerCost(d_ff, d_model, None, 1.0, computed))
  return theoretical_speedup(costs)


def _random_ffn(key: jax.Array, d_model: int, d_ff: int, gated: bool) -> dict:
  ks = jax.random.split(key, 6)
  p = {
    "w_in": jax.random.normal(ks[0], (d_model, d_ff), jnp.float32) / np.sqrt(d_model),
    "b_in": 0.01 * jax.random.normal(ks[1], (d_ff,), jnp.float32),
    "w_out": jax.random.normal(ks[2], (d_ff, d_model), jnp.float32) / np.sqrt(d_ff),
    "b_out": 0.01 * jax.random.normal(ks[3], (d_model,), jnp.float32),
  }
  if gated:
    p["w_up"] = jax.random.normal(ks[4], (d_model, d_ff), jnp.float32) / np.sqrt(d_model)
    p["b_up"] = 0.01 * jax.random.normal(ks[5], (d_ff,), jnp.float32)
  return p


def _dense_ffn(p: dict, activation: str) -> Callable:
  from lrcc_jax._ffn import activate

  def f(x):
    up = x @ p["w_up"] + p["b_up"][None] if "w_up" in p else None
    return activate(x @ p["w_in"] + p["b_in"][None], up, activation) @ p["w_out"] + p["b_out"][None]

  return jax.jit(f)


def bench_ffn(
  d_model: int = 2048,
  d_ff: int = 8192,
  *,
  rank: int = 64,
  fraction: float = 0.10,
  block_size: int = 16,
  variants: Sequence[str] = ("relu", "relu2", "gated"),
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """Batch-1 FFN: dense jit vs `packed_ffn` computing `fraction` of the hidden units.

  Both sides jitted and warmed, `pack_ffn` outside the timed region, interleaved medians
  (`time_interleaved`). ``skip`` reuses one input; ``skip_varied`` cycles through 16, so
  the selected rows come from memory rather than from the cache a fixed input leaves
  them in. For ReLU, ``composed`` is the best chain of the pre-existing pieces:
  `sparse_packed_dense` (input projection, sparse output) then `sparse_linear` (rows of
  `w_out` for the active units).
  """
  from lrcc_jax._ffn import conditional_ffn, ffn_gathers, pack_ffn, packed_ffn
  from lrcc_jax._sparse import sparse_linear, sparse_packed_dense

  rows = []
  n_blocks = d_ff // block_size
  cap = capacity_blocks(fraction, d_ff, block_size)
  computed = cap * block_size / d_ff
  key = jax.random.key(seed)
  for variant in variants:
    gated = variant == "gated"
    activation = "relu2" if variant == "relu2" else "relu"
    p = _random_ffn(jax.random.fold_in(key, 1), d_model, d_ff, gated)
    est = fit_svd(p["w_in"], rank, method="randomized")
    packed = jax.block_until_ready(pack_ffn(**p, est=est, block_size=block_size))
    dense_fn = _dense_ffn(p, activation)
    skip_fn = jax.jit(
      lambda x, packed=packed, a=activation: packed_ffn(x, packed, capacity=cap, activation=a)
    )
    xs = list(jax.random.normal(jax.random.fold_in(key, 2), (16, 1, d_model), jnp.float32))
    x = xs[0]
    want = conditional_ffn(
      x, **p, est=est, capacity=cap, block_size=block_size, activation=cast(Any, activation)
    )
    np.testing.assert_allclose(np.asarray(skip_fn(x)), np.asarray(want), rtol=1e-3, atol=1e-3)
    stream = itertools.cycle(xs)
    fns = {
      "dense": lambda f=dense_fn, x=x: f(x),
      "skip": lambda f=skip_fn, x=x: f(x),
      "skip_varied": lambda f=skip_fn, s=stream: f(next(s)),
    }
    if variant == "relu":
      layer = pack(p["w_in"], p["b_in"], est, block_size=block_size)
      composed_fn = jax.jit(
        lambda x, layer=layer, p=p: sparse_linear(
          sparse_packed_dense(x, layer, capacity=cap), p["w_out"], p["b_out"]
        )
      )
      np.testing.assert_allclose(np.asarray(composed_fn(x)), np.asarray(want), rtol=1e-3, atol=1e-3)
      fns["composed"] = lambda f=composed_fn, x=x: f(x)
    t = time_interleaved(fns, repeats=repeats)
    flop = (
      ffn_flop_speedup(d_model, d_ff, rank, computed, gated) if ffn_gathers(packed, 1, cap) else 1.0
    )
    row = {
      "variant": variant,
      "d_model": d_model,
      "d_ff": d_ff,
      "rank": rank,
      "block_size": block_size,
      "capacity": cap,
      "n_blocks": n_blocks,
      "computed_fraction": computed,
      "path": "gather" if ffn_gathers(packed, 1, cap) else "dense+mask",
      **{f"{name}_ms": 1e3 * v for name, v in t.items()},
      "skip_speedup": t["dense"] / t["skip"],
      "skip_varied_speedup": t["dense"] / t["skip_varied"],
      "flop_model_speedup": flop,
    }
    if "composed" in t:
      row["composed_speedup"] = t["dense"] / t["composed"]
    rows.append(row)
  return rows


def bench_randomized_fit(
  n_in: int = 2048,
  n_out: int = 8192,
  rank: int = 64,
  *,
  repeats: int = 3,
  exact: bool = True,
  seed: int = 0,
) -> dict:
  """Rank-`rank` fit of an (n_in, n_out) matrix with singular values `1 / (1 + i)`.

  Times `fit_svd(method="randomized")` (median of `repeats`, after a compile) and,
  once, the exact `fit_svd`, and compares their Frobenius errors `‖W − UV‖_F`.
  """
  rng = np.random.default_rng(seed)
  k = min(n_in, n_out)
  p_, _ = np.linalg.qr(rng.standard_normal((n_in, k)))
  q_, _ = np.linalg.qr(rng.standard_normal((n_out, k)))
  w = jnp.asarray((p_ / (1.0 + np.arange(k))) @ q_.T, jnp.float32)

  def err(e):
    return float(jnp.linalg.norm(w - e.u @ e.v))

  jax.block_until_ready(fit_svd(w, rank, method="randomized"))  # compile
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    fast = jax.block_until_ready(fit_svd(w, rank, method="randomized", seed=i))
    times.append(time.perf_counter() - start)
  out = {
    "shape": [n_in, n_out],
    "rank": rank,
    "spectrum": "1/(1+i)",
    "randomized_s": float(np.median(times)),
    "randomized_error": err(fast),
  }
  if exact:
    start = time.perf_counter()
    ex = jax.block_until_ready(fit_svd(w, rank))
    out.update(exact_s=time.perf_counter() - start, exact_error=err(ex))
    out["error_excess"] = out["randomized_error"] / out["exact_error"] - 1.0
  return out


def run_ffn(
  out_dir: str | os.PathLike = "experiments/results",
  *,
  repeats: int = 9,
  rank: int = 64,
  fit: bool = True,
  exact_fit: bool = True,
  d_model: int = 2048,
  d_ff: int = 8192,
) -> Path:
  """`bench_ffn` (+ `bench_randomized_fit`, same shape): prints a table, writes `bench_ffn.json`."""
  env = environment()
  env["threads"] = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  )
  load = os.getloadavg() if hasattr(os, "getloadavg") else None  # other processes skew latencies
  rows = bench_ffn(d_model, d_ff, rank=rank, repeats=repeats)
  env["load_average_before_after"] = [load, os.getloadavg() if load is not None else None]
  print(
    f"{'variant':>8} {'dense ms':>9} {'skip ms':>8} {'skip x':>7} {'varied x':>8}"
    f" {'composed x':>10} {'model':>6}"
  )
  for r in rows:
    comp = f"{r['composed_speedup']:>9.2f}x" if "composed_speedup" in r else f"{'-':>10}"
    print(
      f"{r['variant']:>8} {r['dense_ms']:>9.3f} {r['skip_ms']:>8.3f} {r['skip_speedup']:>6.2f}x"
      f" {r['skip_varied_speedup']:>7.2f}x {comp} {r['flop_model_speedup']:>5.2f}x"
    )
  payload = {"environment": env, "rows": rows}
  if fit:
    payload["randomized_fit"] = f = bench_randomized_fit(d_model, d_ff, rank, exact=exact_fit)
    print(
      f"rank-{rank} fit of {f['shape'][0]}x{f['shape'][1]}: randomized {f['randomized_s']:.3f} s"
      + (
        f", exact {f['exact_s']:.1f} s, error excess {100 * f['error_excess']:.3f}%"
        if exact_fit
        else ""
      )
    )
  path = write_results("bench_ffn", payload, out_dir)
  plot_times(
    {
      f"{r['variant']}, {side}": r[key]
      for r in rows
      for side, key in (("dense", "dense_ms"), ("packed_ffn", "skip_ms"))
    },
    Path(out_dir) / "bench_ffn.png",
    f"FFN d={d_model}, d_ff={d_ff}, batch 1, rank {rank}",
  )
  return path


# --- the paper's network on real digits (``--suite paper``) --------------------------------


def paper_model(l1: float, workdir: str | os.PathLike, *, epochs: int = 4, rank: int = 25):
  """The 784-1000-600-400 net trained on mnist5k with an L1 penalty `l1`, with data-aware
  rank-`rank` estimators, thresholds calibrated to 99% recall and 99th-percentile
  capacities (the sweep's recipe). Returns (model, test images normalised)."""
  from lrcc_jax.apps import data, evaluate, train  # pylint: disable=g-import-not-at-top

  cfg = train.TrainConfig(
    dataset="mnist5k",
    hidden_sizes=(1000, 600, 400),
    dropout_rate=0.2,
    l1=l1,
    learning_rate=1e-3,
    batch_size=64,
    epochs=epochs,
    seed=0,
    refit_every=100,
  )
  run_dir = Path(workdir) / f"paper_l1_{l1:g}_e{epochs}"
  import contextlib  # pylint: disable=g-import-not-at-top

  with contextlib.redirect_stdout(sys.stderr):
    train.train_and_evaluate(cfg, run_dir, progress=False)
  model = train.load_model(run_dir)[0]
  model.eval()
  dataset = data.load_dataset("mnist5k", seed=0)
  calib = jnp.asarray(evaluate.calibration_subset(dataset, 1000, 0))
  evaluate.fit_estimators(
    model, calib, estimator="data_aware", ranks=[rank] * 3, recall=0.99, seed=0
  )
  model.set_capacities(None)
  model.calibrate(calib, recall=0.99)
  model.set_capacities(evaluate.selection_capacities(model, calib, quantile=0.99))
  return model, np.asarray(data.normalize(dataset.test_images), np.float32)


def bench_paper(
  l1s: Sequence[float] = (1e-4, 7e-4),
  *,
  workdir: str | os.PathLike = "runs/bench_paper",
  epochs: int = 4,
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """Batch-1 latency of the paper's network on real test digits, per L1 setting.

  Dense jit against `packed_mlp` with each strategy ("layerwise", "sparse", "dense" and
  "auto", whose choice `_mlp.auto_path` reports), interleaved in one process; 16 test
  digits in turn, so the selections change between calls as in a stream of inputs.
  """
  from lrcc_jax import packed_mlp  # pylint: disable=g-import-not-at-top
  from lrcc_jax._mlp import auto_path  # pylint: disable=g-import-not-at-top

  rows = []
  for l1 in l1s:
    model, x_test = paper_model(l1, workdir, epochs=epochs)
    packed = jax.block_until_ready(model.pack())
    thresholds, caps = model.thresholds, [l.capacity for l in model.layers]
    kernels = [(l.kernel[...], l.bias[...]) for l in model.layers]
    head = (model.head.kernel[...], model.head.bias[...])

    def dense(x, kernels=kernels, head=head):
      for k, b in kernels:
        x = jax.nn.relu(x @ k + b[None])
      return x @ head[0] + head[1][None]

    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(x_test[i : i + 1]) for i in rng.choice(len(x_test), 16, replace=False)]
    fns = {"dense": jax.jit(dense)}
    for strategy in ("layerwise", "sparse", "dense", "auto"):
      fns[strategy] = jax.jit(
        lambda x, s=strategy, packed=packed, t=thresholds, c=caps: packed_mlp(
          x, packed, thresholds=t, capacities=c, strategy=s
        )
      )
    ref = model(xs[0], mode="mask")
    for name, fn in fns.items():
      if name != "dense":
        np.testing.assert_allclose(np.asarray(fn(xs[0])), np.asarray(ref), rtol=1e-3, atol=1e-3)

    def stream(fn: Callable) -> Callable[[], Any]:
      inputs = itertools.cycle(xs)
      return lambda: fn(next(inputs))

    t = time_interleaved({name: stream(fn) for name, fn in fns.items()}, repeats=repeats)
    n_out = [int(k.shape[1]) for k, _ in kernels]
    row = {
      "l1": l1,
      "epochs": epochs,
      "capacities": caps,
      "capacity_fraction": [c * l.block_size / n for c, l, n in zip(caps, model.layers, n_out)],
      "auto_path": auto_path(1, packed, caps),
      "dense_ms": 1e3 * t["dense"],
    }
    for name in ("layerwise", "sparse", "dense", "auto"):
      row[f"{name}_ms"] = 1e3 * t[name]
      row[f"{name}_speedup"] = t["dense"] / t[name]
    rows.append(row)
  return rows
