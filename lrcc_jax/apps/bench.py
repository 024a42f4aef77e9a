"""Latency benchmarks: dense jit against the compute-skipping `packed_dense`.

Protocol: both sides are jitted, compiled and warmed up outside the
timed region, `pack` runs once beforehand, every call ends in `block_until_ready`, the two
sides are interleaved, and each figure is the median of `repeats` repeats. Ratios are
reported next to the FLOP model's figure, with the device, jax version and thread count.
"""

from __future__ import annotations

import dataclasses
import functools
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

from lrcc_jax import _native, _policy
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
    # the "auto" strategy's policy: a tuned file (`lrcc-jax tune`) or the shipped defaults
    "policy": _policy_record(),
  }


def _policy_record() -> dict:
  status = _policy.policy_status()
  status["policies"] = {k: dataclasses.asdict(p) for k, p in status["policies"].items()}
  return status


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
  steady stream of calls. The order of the thunks is shuffled in every repeat: in a fixed
  order the second of two identical programs ran up to 16% faster than the first (4096²,
  8 rows gathering, 2 cores), and one fixed sequence of shuffles, reused by every call,
  still favoured one of them by about 5% over a whole suite.
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
  order = np.random.default_rng()
  names = list(fns)
  for _ in range(repeats):
    for i in order.permutation(len(names)):
      name, fn = names[i], fns[names[i]]
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
  default; donating the module, ``donate_argnums=0``; and ``graph=False``), the module
  split once (`nnx.split`) and merged inside a `jax.jit` function, `packed_dense` on the
  layer's packed form under `jax.jit`, and the dense layer, as an `nnx.Linear` under the
  default `nnx.jit` and as a plain `jax.jit` product. With graph updates on and no
  donation, `nnx.jit` returns every variable of its module arguments as a fresh output,
  which costs a copy of all the module's arrays per call whatever the module computes; the
  `nnx.Linear` side shows that cost on a module with nothing of this library in it.
  ``graph=False`` avoids the copy but still walks the module in Python on every call:
  `module_graph_false_extra_ms` is that cost, a fixed one per call rather than one that
  grows with the work. It also counts the module's traces while its threshold changes
  three times (expected: 0).
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
  graphdef, state = nnx.split(layer)
  module_split = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, "skip"))
  packed = jax.block_until_ready(layer.packed())
  kernel, bias = layer.kernel[...], layer.bias[...]
  core_fn = jax.jit(lambda x, t: packed_dense(x, packed, threshold=t, capacity=cap))
  dense_fn = jax.jit(lambda x: jax.nn.relu(x @ kernel + bias[None]))
  for got in [fn(layer, x) for fn in (module_default, module_donated, module_tree)] + [
    module_split(state, x)
  ]:
    np.testing.assert_allclose(np.asarray(got), np.asarray(core_fn(x, 0.0)), rtol=1e-5, atol=1e-5)
  t = time_interleaved(
    {
      "dense": lambda: dense_fn(x),
      "packed_dense": lambda: core_fn(x, 0.0),
      "module_donated": lambda: module_donated(layer, x),
      "module_graph_false": lambda: module_tree(layer, x),
      "module_split": lambda: module_split(state, x),
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
    "module_graph_false_extra_ms": 1e3 * (t["module_graph_false"] - t["packed_dense"]),
    "module_split_over_packed_dense": t["module_split"] / t["packed_dense"],
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
        # The whole packed pytree over the dense layer stored in the same dtype (its
        # bias, like the packed bias, f32) plus the f32 estimator factors.
        "packed_over_dense_plus_factors_f32": _packed_over_dense(p32, width, rank),
        "packed_over_dense_plus_factors_bf16": _packed_over_dense(p16, width, rank),
      }
    )
  return rows


def _packed_over_dense(packed, width: int, rank: int) -> float:
  """Bytes of a packed square layer over its dense weights in the same dtype plus factors."""
  packed_bytes = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(packed))
  dense = width * width * packed.weight.dtype.itemsize + 4 * width + 4 * 2 * rank * width
  return packed_bytes / dense


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
  tuned = "skip_default_ms" in rows[0]
  header = ["width", "bs", "batch", "cap", "path", "dense ms", "mask ms", "skip ms"]
  header += ["skip speedup", "mask speedup", "model"]
  if tuned:
    header += ["default path", "default speedup"]
  lines = []
  for r in rows:
    line = [
      str(r["width"]),
      str(r["block_size"]),
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
    if tuned:
      line += [r["default_path"], f"{r['default_speedup']:.2f}x"]
    lines.append(line)
  legend = (
    LEGEND[0],
    "skip / mask speedup: dense jit time / time of packed_dense (skip, the auto strategy) or"
    " of the dense product then the mask (mask), measured here; model: the FLOP model, not a"
    " time; default: skip under the shipped default policy, timed in the same run.",
  )
  right = [True, True, True, True, False] + [True] * 6 + ([False, True] if tuned else [])
  return _format_table(header, lines, right=right, legend=legend)


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


# The floor targets of `--suite full` (dense jit time / `packed_dense` time, "auto"): the
# fallback costs the dense product plus the estimator, whose r (n_in + n_out) multiply-adds
# per row are 12.5% of a 1024-wide layer's at rank 64, 6% of a 2048-wide one's and 3% of a
# 4096-wide one's.
FLOOR_TARGETS = ((1024, 0.85), (2048, 0.92), (4096, 0.95))


def floor_target(width: int) -> float:
  """The smallest acceptable `skip_speedup` at `width` (the widest target below it)."""
  return max((t for w, t in FLOOR_TARGETS if w <= width), default=FLOOR_TARGETS[0][1])


def bench_suite(
  widths: Sequence[int] = (1024, 2048, 4096),
  batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
  fractions: Sequence[float] = (0.05, 0.10, 0.25, 0.50),
  *,
  rank: int = 64,
  block_sizes: Sequence[int] = (1, 16),
  repeats: int = 7,
  compare_default: bool = False,
  progress: bool = True,
) -> list[dict]:
  """Single layers: dense jit vs mask (dense product, then mask) vs skip (`packed_dense`).

  A capacity fraction `f` selects `round(f · width / block_size)` blocks per row. "skip" is
  the "auto" strategy under the policy in use (`environment()["policy"]`: a tuned file or
  the shipped defaults). With `compare_default` and a tuned policy in use, "skip_default"
  (the same layer under the shipped default policy) is timed in the same interleaved run.
  """
  from lrcc_jax._layers import conditional_dense

  tuned = bool(_policy.tuned_policies()) and compare_default
  rows = []
  grid = [(w, bs, b, f) for w in widths for bs in block_sizes for b in batches for f in fractions]
  bar = None
  if progress:
    import tqdm

    bar = tqdm.tqdm(total=len(grid), desc="bench", file=sys.stderr, disable=None)
  platform = _policy.current_platform()
  for width, block_size in itertools.product(widths, block_sizes):
    k_w, k_b, k_x = jax.random.split(jax.random.key(width), 3)
    kernel, bias, est, packed, dense_fn = _random_layer(k_w, k_b, width, rank, block_size)
    gather_kernel = _policy.gather_kernel(
      platform, block_size, width, packed.weight.dtype, jnp.float32
    )
    default = _policy.default_policy(
      _policy._policy_platform(platform),  # pylint: disable=protected-access
      gather_kernel,
      packed.weight.dtype,
    )
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
        fns: dict[str, Callable[[], Any]] = {
          "dense": lambda: dense_fn(x),
          "mask": lambda: mask_fn(x),
          "skip": lambda: skip_fn(x),
        }
        if tuned:
          default_fn = jax.jit(
            lambda x, cap=cap: packed_dense(x, packed, capacity=cap, policy=default)
          )
          fns["skip_default"] = lambda: default_fn(x)
        t = time_interleaved(fns, repeats=repeats)
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
          "floor_target": floor_target(width),
        }
        if tuned:
          default_gathers = auto_gathers(packed, batch, cap, policy=default)
          row["default_path"] = "gather" if default_gathers else "dense+mask"
          row["skip_default_ms"] = 1e3 * t["skip_default"]
          row["default_speedup"] = t["dense"] / t["skip_default"]
          row["tuned_over_default"] = t["skip_default"] / t["skip"]
        if batch == 1:
          row["memory"] = memory_report(width, width, rank, packed, skip_fn, x)
        rows.append(row)
        if bar is not None:
          bar.update()
  if bar is not None:
    bar.close()
  return rows


def suite_summary(rows: list[dict]) -> list[dict]:
  """Per (width, block size): the floor (smallest skip speed-up) overall and on the dense
  fallback, where it occurred, the target, and (with a tuned policy compared) the tuned
  policy's smallest and geometric-mean time ratio against the shipped defaults."""
  out = []
  for width, bs in dict.fromkeys((r["width"], r["block_size"]) for r in rows):
    sel = [r for r in rows if r["width"] == width and r["block_size"] == bs]
    low = min(sel, key=lambda r: r["skip_speedup"])
    fall = [r for r in sel if r["path"] == "dense+mask"]
    entry: dict[str, Any] = {
      "width": width,
      "block_size": bs,
      "min_skip_speedup": low["skip_speedup"],
      "min_at": {"batch": low["batch"], "capacity_fraction": low["capacity_fraction"]},
      "min_fallback_speedup": min((r["skip_speedup"] for r in fall), default=None),
      "floor_target": floor_target(width),
      "meets_target": low["skip_speedup"] >= floor_target(width),
    }
    if "tuned_over_default" in sel[0]:
      ratios = [r["tuned_over_default"] for r in sel]
      entry["min_tuned_over_default"] = min(ratios)
      entry["geomean_tuned_over_default"] = float(np.exp(np.mean(np.log(ratios))))
    out.append(entry)
  return out


def format_summary_table(summary: list[dict]) -> str:
  """The floor of ``--suite full``: the smallest speed-up per width and block size."""
  tuned = any("min_tuned_over_default" in s for s in summary)
  header = ["width", "bs", "min skip x", "at batch, cap", "min fallback x", "target", "met"]
  if tuned:
    header += ["tuned/default min", "geomean"]
  lines = []
  for s in summary:
    fb = s["min_fallback_speedup"]
    line = [
      str(s["width"]),
      str(s["block_size"]),
      f"{s['min_skip_speedup']:.2f}x",
      f"{s['min_at']['batch']}, {s['min_at']['capacity_fraction']:.0%}",
      "-" if fb is None else f"{fb:.2f}x",
      f"{s['floor_target']:.2f}x",
      "yes" if s["meets_target"] else "NO",
    ]
    if tuned:
      line += [f"{s['min_tuned_over_default']:.2f}x", f"{s['geomean_tuned_over_default']:.2f}x"]
    lines.append(line)
  legend = (
    "min skip x: the smallest dense jit time / packed_dense time over batches and capacities;"
    " min fallback x: the same over the cells where auto fell back to dense+mask; target: the"
    " floor the estimator's cost allows; tuned/default: skip time under the shipped default"
    " policy / under the tuned one (>= 1: the tuned policy is no worse).",
  )
  return _format_table(
    header,
    lines,
    right=[True, True, True, False, True, True, False] + [True] * (len(header) - 7),
    legend=legend,
  )


def plot_suite(rows: list[dict], path: str | os.PathLike) -> None:
  """The floor: skip speed-up against batch, one panel per (block size, width), one line
  per capacity, with the width's target dashed."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  widths = sorted({r["width"] for r in rows})
  sizes = sorted({r["block_size"] for r in rows})
  fig = Figure(figsize=(4.5 * len(widths), 3.6 * len(sizes)), layout="constrained")
  axes = fig.subplots(len(sizes), len(widths), squeeze=False)
  for (i, bs), (j, width) in itertools.product(enumerate(sizes), enumerate(widths)):
    ax = axes[i][j]
    cell = [r for r in rows if r["width"] == width and r["block_size"] == bs]
    for c, frac in enumerate(sorted({r["capacity_fraction"] for r in cell})):
      sel = sorted((r for r in cell if r["capacity_fraction"] == frac), key=lambda r: r["batch"])
      ax.plot(
        [r["batch"] for r in sel],
        [r["skip_speedup"] for r in sel],
        "o-",
        color=f"C{c}",
        ms=3,
        label=f"{frac:.0%}",
      )
      fb = [r for r in sel if r["path"] == "dense+mask"]
      ax.plot([r["batch"] for r in fb], [r["skip_speedup"] for r in fb], "x", color=f"C{c}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(floor_target(width), color="red", ls="--", lw=0.8, label="target")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(f"{width}², blocks of {bs}, rank {cell[0]['rank']}", fontsize=9)
    ax.set_xlabel("batch size")
    ax.set_ylabel("dense jit / packed_dense (x: fell back)")
    ax.legend(fontsize=6, title="computed", title_fontsize=6)
  fig.savefig(path, dpi=100)


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
    # Training runs are work files, not results: they stay under runs/, whatever --out is.
    rows = bench_paper(workdir=Path("runs") / "bench_paper", repeats=args.repeats)
    for r in rows:
      print(
        f"l1 {r['l1']:g}: capacities {r['capacities']}"
        f" ({', '.join(f'{f:.0%}' for f in r['capacity_fraction'])});"
        f" dense {r['dense_ms']:.3f} ms; layerwise {r['layerwise_speedup']:.2f}x,"
        f" sparse {r['sparse_speedup']:.2f}x, dense path {r['dense_path_speedup']:.2f}x,"
        f" auto ({r['auto_path']}) {r['auto_speedup']:.2f}x"
      )
    path = write_results("bench_paper", {"environment": env, "rows": rows}, out)
  elif args.suite == "ffn":
    path = run_ffn(out, repeats=args.repeats, rank=args.rank)
  elif args.suite == "batch":
    path = run_batch(
      out,
      rows_kinds=getattr(args, "rows", None) or BATCH_ROWS,
      batches=args.batches or (1, 2, 4, 8, 16),
      rank=args.rank,
      block_size=args.block_size,
      repeats=args.repeats,
      train_steps=getattr(args, "train_steps", 40),
    )
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
    sides = (
      "dense",
      "packed_dense",
      "module_donated",
      "module_graph_false",
      "module_split",
      "module_default",
      "nnx_linear_default",
    )
    rows = []
    for width in args.widths or (256, 4096):
      row = bench_module(
        width=width, rank=args.rank, block_size=args.block_size, repeats=args.repeats
      )
      rows.append(row)
      print(f"{width} wide:")
      for k in sides:
        print(f"{k:>20}: {row[k + '_ms']:9.3f} ms")
      print(
        f"module (donated) / packed_dense: {row['module_donated_over_packed_dense']:.2f}x;"
        f" (graph=False) {row['module_graph_false_over_packed_dense']:.2f}x,"
        f" {row['module_graph_false_extra_ms']:+.3f} ms per call;"
        f" split + jax.jit {row['module_split_over_packed_dense']:.2f}x;"
        f" retraces on 3 threshold changes: {row['retraces_over_three_threshold_changes']}"
      )
    path = write_results("bench_module", {"environment": env, "rows": rows}, out)
    row = max(rows, key=lambda r: r["width"])
    plot_times(
      {k.replace("_", " "): row[k + "_ms"] for k in sides},
      out / "bench_module.png",
      f"{row['width']}² ConditionalDense, skip mode, batch {row['batch']}",
    )
  else:
    rows = bench_suite(
      widths=args.widths or (1024, 2048, 4096),
      batches=args.batches or (1, 2, 4, 8, 16, 32, 64, 128),
      fractions=args.fractions or (0.05, 0.10, 0.25, 0.50),
      rank=args.rank,
      block_sizes=args.block_sizes or (1, 16),
      repeats=args.repeats,
      compare_default=args.compare_default,
      progress=progress,
    )
    summary = suite_summary(rows)
    print(format_suite_table(rows))
    print(format_summary_table(summary))
    payload = {"environment": env, "summary": summary, "rows": rows}
    path = write_results("bench_suite", payload, out)
    plot_suite(rows, out / "bench_suite.png")
  plot = path.with_suffix(".png")  # every suite but "paper" draws one
  print(f"wrote {path} and {plot}" if plot.exists() else f"wrote {path}")
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


def bench_ffn_widths(
  widths: Sequence[int] = (128, 256, 512, 1024),
  *,
  fractions: Sequence[float] = (0.1, 0.25),
  block_size: int = 1,
  activation: str = "relu2",
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """Batch-1 FFN at small widths (d_ff = 4 d): where gathering stops paying.

  Dense jit against `packed_ffn` with the gathers forced and with "auto" (which runs an
  FFN below `_ffn.MIN_GATHER_WEIGHT_BYTES` densely), interleaved; rank `d // 8`, the
  threshold at -inf so each row computes exactly its capacity.
  """
  from lrcc_jax._ffn import ffn_gathers, ffn_weight_bytes, pack_ffn, packed_ffn

  rows = []
  key = jax.random.key(seed)
  for d in widths:
    d_ff = 4 * d
    p = _random_ffn(jax.random.fold_in(key, d), d, d_ff, False)
    est = fit_svd(p["w_in"], max(1, d // 8), method="randomized")
    packed = jax.block_until_ready(pack_ffn(**p, est=est, block_size=block_size))
    dense_fn = _dense_ffn(p, activation)
    x = jax.random.normal(jax.random.fold_in(key, 2), (1, d), jnp.float32)
    for frac in fractions:
      cap = capacity_blocks(frac, d_ff, block_size)

      def skip(strategy, cap=cap, packed=packed):
        return jax.jit(
          lambda x: packed_ffn(
            x,
            packed,
            threshold=-jnp.inf,
            capacity=cap,
            activation=cast(Any, activation),
            strategy=strategy,
          )
        )

      compiled: dict[str, Callable] = {
        "dense": dense_fn,
        "gather": skip("gather"),
        "auto": skip("auto"),
      }
      t = time_interleaved(
        {name: functools.partial(f, x) for name, f in compiled.items()}, repeats=repeats
      )
      rows.append(
        {
          "d_model": d,
          "d_ff": d_ff,
          "rank": max(1, d // 8),
          "block_size": block_size,
          "activation": activation,
          "capacity": cap,
          "computed_fraction": cap * block_size / d_ff,
          "weight_mb": ffn_weight_bytes(packed) / 2**20,
          "auto_path": "gather" if ffn_gathers(packed, 1, cap) else "dense+mask",
          **{f"{name}_ms": 1e3 * v for name, v in t.items()},
          "gather_speedup": t["dense"] / t["gather"],
          "auto_speedup": t["dense"] / t["auto"],
        }
      )
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

  out: dict[str, Any] = {"shape": [n_in, n_out], "rank": rank, "spectrum": "1/(1+i)"}
  return out | _time_fits(w, rank, repeats, exact)


def _time_fits(w: jax.Array, rank: int, repeats: int, exact: bool = True) -> dict:
  """`fit_svd(method="randomized")` over `repeats` seeds (median time after a compile, the
  largest error) and, once, the exact fit: times, Frobenius errors `‖W − UV‖_F`, and the
  randomized error's excess over the exact one."""

  def err(e):
    return float(jnp.linalg.norm(w - e.u @ e.v))

  jax.block_until_ready(fit_svd(w, rank, method="randomized"))  # compile
  times, errors = [], []
  for i in range(repeats):
    start = time.perf_counter()
    fast = jax.block_until_ready(fit_svd(w, rank, method="randomized", seed=i))
    times.append(time.perf_counter() - start)
    errors.append(err(fast))
  out: dict[str, Any] = {"randomized_s": float(np.median(times)), "randomized_error": max(errors)}
  if exact:
    start = time.perf_counter()
    ex = jax.block_until_ready(fit_svd(w, rank))
    out.update(exact_s=time.perf_counter() - start, exact_error=err(ex))
    out["error_excess"] = out["randomized_error"] / out["exact_error"] - 1.0
  return out


def bench_randomized_fit_trained(
  n_in: int = 2048,
  n_out: int = 8192,
  rank: int = 64,
  *,
  steps: int = 300,
  repeats: int = 3,
  cache: str | os.PathLike | None = None,
  seed: int = 0,
) -> dict:
  """`bench_randomized_fit` on a trained layer: the (n_in, n_out) middle layer of a
  784-n_in-n_out-10 ReLU MLP trained `steps` Adam steps on mnist5k (`_train_digit_weights`).

  A trained layer's spectrum is a few outliers over a flat bulk (a random init moved by
  training), unlike the decaying synthetic one: the randomized range finder then misses
  more of the top subspace, but the residual `‖W − UV‖_F` is dominated by the bulk. Both
  the error excess and `exact_error / ‖W‖_F` are reported. The trained kernel is a work
  file cached at `cache` (``.npy``), so a rerun does not retrain.
  """
  path = Path(cache) if cache is not None else None
  if path is not None and path.exists():
    w_np = np.load(path, allow_pickle=False)
    info = None
  else:
    layers, _, info = _train_digit_weights([n_in, n_out], 2, steps, 128, 1e-4, 1e-3, seed)
    w_np = layers[1][0]
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.save(path, w_np)
  w = jnp.asarray(w_np)
  fits = _time_fits(w, rank, repeats)
  return {
    "shape": [n_in, n_out],
    "rank": rank,
    "layer": f"mnist5k 784-{n_in}-{n_out}-10, {steps} Adam steps, hidden layer 2",
    "trained": info,
    **fits,
    "exact_relative_error": fits["exact_error"] / float(jnp.linalg.norm(w)),
    "seeds": repeats,
  }


def run_ffn(
  out_dir: str | os.PathLike = "experiments/results",
  *,
  repeats: int = 9,
  rank: int = 64,
  fit: bool = True,
  exact_fit: bool = True,
  d_model: int = 2048,
  d_ff: int = 8192,
  widths: Sequence[int] = (128, 256, 512, 1024),
  trained_fit_steps: int = 300,
  cache_dir: str | os.PathLike = Path("runs") / "bench_ffn",
) -> Path:
  """`bench_ffn` (+ `bench_ffn_widths` at `widths`, + `bench_randomized_fit` at the
  `bench_ffn` shape, on the synthetic spectrum and, unless `trained_fit_steps` is 0, on a
  layer of that shape trained on digits, `bench_randomized_fit_trained`, its kernel cached
  in `cache_dir`): prints tables, writes `bench_ffn.json`."""
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
  payload: dict[str, Any] = {"environment": env, "rows": rows}
  if widths:
    payload["widths"] = wrows = bench_ffn_widths(widths, repeats=repeats)
    print(
      f"{'d_model':>7} {'d_ff':>6} {'MB':>6} {'computed':>8} {'dense ms':>9} {'gather ms':>9}"
      f" {'x':>6} {'auto ms':>8} {'x':>6} {'auto path':>10}"
    )
    for r in wrows:
      print(
        f"{r['d_model']:>7} {r['d_ff']:>6} {r['weight_mb']:>6.1f} {r['computed_fraction']:>8.2f}"
        f" {r['dense_ms']:>9.4f} {r['gather_ms']:>9.4f} {r['gather_speedup']:>6.2f}"
        f" {r['auto_ms']:>8.4f} {r['auto_speedup']:>6.2f} {r['auto_path']:>10}"
      )
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
    if trained_fit_steps:
      payload["randomized_fit_trained"] = t = bench_randomized_fit_trained(
        d_model,
        d_ff,
        rank,
        steps=trained_fit_steps,
        cache=Path(cache_dir) / f"trained_{d_model}x{d_ff}_steps{trained_fit_steps}.npy",
      )
      print(
        f"rank-{rank} fit of a trained {d_model}x{d_ff} layer: randomized"
        f" {t['randomized_s']:.3f} s, exact {t['exact_s']:.1f} s, error excess"
        f" {100 * t['error_excess']:.3f}% (exact error {100 * t['exact_relative_error']:.1f}%"
        " of the norm)"
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


# --- batches whose rows share their gathers (`_policy.batch_mode`) ------------------------

BATCH_ROWS = ("real", "random")
"""Row kinds of ``--suite batch``: ``real`` feeds held-out mnist5k digits to an MLP trained
on the other digits (rows from one distribution select overlapping blocks, as real
activations do); ``random`` feeds independent Gaussian rows to the random-weight MLP of
``--suite mlp`` (rows select nearly independent blocks: the pessimistic case)."""


def _train_digit_weights(
  width: int | Sequence[int], depth: int, steps: int, batch: int, l1: float, lr: float, seed: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, dict]:
  """A 784-`width`^depth-10 ReLU MLP trained briefly on mnist5k with an L1 activity penalty.

  `width` may instead list the hidden widths (`depth` is then ignored).

  Loss: `CE + l1 · Σ_l mean_batch ‖a_l‖₁` (the training objective of `apps/train.py`), Adam
  at `lr`, `steps` batches of `batch` training digits. Returns the (kernel, bias) layers
  (head last), the normalized test digits and a summary (density per layer, test error).
  """
  import optax

  from lrcc_jax.apps import data

  ds = data.load_dataset("mnist5k", seed=seed)
  x_train = data.normalize(ds.train_images)
  x_test = data.normalize(ds.test_images)
  hidden = [width] * depth if isinstance(width, int) else list(width)
  widths = [x_train.shape[1]] + hidden + [ds.num_classes]
  keys = jax.random.split(jax.random.key(seed), len(widths) - 1)
  params = [
    (jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a), jnp.zeros((b,), jnp.float32))
    for k, a, b in zip(keys, widths, widths[1:])
  ]

  def forward(params, x):
    acts = []
    for w, b in params[:-1]:
      x = jax.nn.relu(x @ w + b[None])
      acts.append(x)
    return x @ params[-1][0] + params[-1][1][None], acts

  def loss(params, x, y):
    logits, acts = forward(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l1 * sum(jnp.abs(a).sum(axis=-1).mean() for a in acts)

  opt = optax.adam(lr)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  rng = np.random.default_rng(seed)
  labels = jnp.asarray(ds.train_labels)
  for _ in range(steps):
    pick = rng.choice(len(x_train), batch, replace=False)
    params, state = step(params, state, jnp.asarray(x_train[pick]), labels[pick])
  logits, acts = jax.jit(forward)(params, jnp.asarray(x_test))
  info = {
    "dataset": "mnist5k",
    "train_steps": steps,
    "train_batch": batch,
    "l1": l1,
    "learning_rate": lr,
    "test_error": float(jnp.mean(jnp.argmax(logits, -1) != jnp.asarray(ds.test_labels))),
    "density": [float(jnp.mean(a > 0)) for a in acts],
  }
  layers = [(np.asarray(w), np.asarray(b)) for w, b in params]
  return layers, np.asarray(x_test), info


def digit_mlp(
  width: int = 4096,
  depth: int = 4,
  *,
  rank: int = 64,
  fraction: float = 0.1,
  block_size: int = 16,
  steps: int = 40,
  batch: int = 128,
  l1: float = 5e-4,
  lr: float = 1e-3,
  seed: int = 0,
  cache: str | os.PathLike | None = None,
):
  """A `ConditionalMLP` with weights trained on real digits (`_train_digit_weights`).

  Each hidden layer computes `fraction` of its units in blocks of `block_size`, with SVD
  estimators of rank `rank` and threshold 0. The trained weights are kept in `cache` (an
  ``.npz`` path) when given, so a rerun does not retrain. Returns the model, the test
  digits (rows for the benchmark) and the training summary.
  """
  from flax import nnx

  from lrcc_jax.nn import ConditionalMLP

  path = Path(cache) if cache is not None else None
  if path is not None and path.exists():
    saved = np.load(path, allow_pickle=False)
    n = (len(saved.files) - 2) // 2
    layers = [(saved[f"w{i}"], saved[f"b{i}"]) for i in range(n)]
    x_test, info = saved["x_test"], json.loads(str(saved["info"]))
  else:
    layers, x_test, info = _train_digit_weights(width, depth, steps, batch, l1, lr, seed)
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      arrays = {f"w{i}": w for i, (w, _) in enumerate(layers)}
      arrays.update({f"b{i}": b for i, (_, b) in enumerate(layers)})
      arrays.update(x_test=x_test, info=np.asarray(json.dumps(info)))
      np.savez(path, **cast(dict[str, Any], arrays))
  model = ConditionalMLP(
    layers[0][0].shape[0],
    [w.shape[1] for w, _ in layers[:-1]],
    layers[-1][0].shape[1],
    ranks=rank,
    capacities=capacity_blocks(fraction, width, block_size),
    block_sizes=block_size,
    rngs=nnx.Rngs(seed),
  )
  for layer, (w, b) in zip(model.layers, layers[:-1]):
    layer.kernel[...] = jnp.asarray(w)
    layer.bias[...] = jnp.asarray(b)
  model.head.kernel[...] = jnp.asarray(layers[-1][0])
  head_bias = model.head.bias
  assert head_bias is not None
  head_bias[...] = jnp.asarray(layers[-1][1])
  model.refit()
  return model, x_test, info


def selection_overlap(packed, x, thresholds, capacities) -> list[dict]:
  """How much the rows' selected blocks overlap, per hidden layer, on rows `x`.

  `overlap = |union| / (rows · k)`: 1 when the rows select disjoint blocks, `1 / rows` when
  they all select the same ones; the shared mode reads `|union|` blocks where the per-row
  mode reads `rows · k`. Also the union's share of the layer, next to its expectation for
  independent rows (`_policy.union_fraction`).
  """
  from lrcc_jax import _policy
  from lrcc_jax._sparse import sparse_packed_dense

  sp = x
  out = []
  for layer, t, c in zip(packed.layers, thresholds, capacities):
    sp = sparse_packed_dense(sp, layer, threshold=t, capacity=c)
    blocks = np.asarray(sp.indices[:, :: layer.block_size]) // layer.block_size
    rows, n_blocks = blocks.shape[0], layer.weight.shape[0]
    union = len(np.unique(blocks))
    out.append(
      {
        "union_blocks": union,
        "overlap": union / (rows * c),
        "union_fraction": union / n_blocks,
        "independent_union_fraction": _policy.union_fraction(rows, c / n_blocks),
      }
    )
  return out


def bench_batch(
  model,
  x_pool: np.ndarray | None,
  batches: Sequence[int] = (1, 2, 4, 8, 16),
  *,
  rows_kind: str = "real",
  repeats: int = 9,
  seed: int = 0,
) -> list[dict]:
  """Dense jit against the sparse chain with per-row and shared gathers, in one interleaved run.

  Four thunks per batch: ``dense`` (jitted dense network), ``auto`` (`packed_mlp` as
  shipped: the policy picks per-row, shared or dense), ``per_row`` and ``shared`` (the
  sparse chain forced, with the native kernel's mode forced by a policy override). Rows
  are drawn without replacement from `x_pool` (real data), or Gaussian when it is None.
  Each row reports the selection overlap (`selection_overlap`) next to the times.
  """
  from lrcc_jax import _policy, packed_mlp

  model.eval()
  packed = jax.block_until_ready(model.pack())
  thresholds, capacities = model.thresholds, [l.capacity for l in model.layers]
  kernels = [(l.kernel[...], l.bias[...]) for l in model.layers]
  head = (model.head.kernel[...], model.head.bias[...])
  base = _policy.policy_for("cpu", "native", jnp.float32)
  # Forced modes: both always gather (the sparse chain falls back to dense products where
  # its policy says gathering does not pay), one per row, one shared.
  per_row = dataclasses.replace(base, shared_min_rows=0, max_gathered_layers=1e9)
  shared = dataclasses.replace(
    base, shared_min_rows=1, max_gathered_layers=1e9, max_union_fraction=1.0
  )

  def dense(x):
    for k, b in kernels:
      x = jax.nn.relu(x @ k + b[None])
    return x @ head[0] + head[1][None]

  def chain(policy):
    return jax.jit(
      lambda x: packed_mlp(
        x, packed, thresholds=thresholds, capacities=capacities, strategy="sparse", policy=policy
      )
    )

  # Order matters: the thunk right after "dense" measured slower on a loaded machine
  # although the untimed first call refills the caches (batch 1, the same work: 17x dense
  # in that slot against 27-33x later in the round). "shared" takes that slot, so its
  # figures are the pessimistic ones; "auto" (the same program as "shared" or "per_row"
  # where it gathers) shows the gap.
  fns = {
    "dense": jax.jit(dense),
    "shared": chain(shared),
    "per_row": chain(per_row),
    "auto": jax.jit(lambda x: packed_mlp(x, packed, thresholds=thresholds, capacities=capacities)),
  }
  rng = np.random.default_rng(seed)
  n_in = kernels[0][0].shape[0]
  rows = []
  for batch in batches:
    if x_pool is not None:
      x = jnp.asarray(x_pool[rng.choice(len(x_pool), batch, replace=False)])
    else:
      x = jnp.asarray(rng.standard_normal((batch, n_in)), jnp.float32)
    ref = np.asarray(model(x, mode="mask"))
    outs = {name: np.asarray(fn(x)) for name, fn in fns.items() if name != "dense"}
    for name, got in outs.items():
      np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(outs["per_row"], outs["shared"])  # same sums, same order
    thunks: dict[str, Callable[[], Any]] = {n: functools.partial(f, x) for n, f in fns.items()}
    t = time_interleaved(thunks, repeats=repeats)
    overlap = selection_overlap(packed, x, thresholds, capacities)
    mode = [
      _policy.batch_mode(
        base, batch, c, l.weight.shape[0], l.weight.shape[1] * l.weight.shape[2] * 4
      )
      for c, l in zip(capacities, packed.layers)
    ]
    rows.append(
      {
        "rows": rows_kind,
        "batch": batch,
        "widths": [n_in] + [int(k.shape[1]) for k, _ in kernels],
        "capacities": capacities,
        "block_sizes": [l.block_size for l in model.layers],
        "policy_mode": mode,
        "overlap": [o["overlap"] for o in overlap],
        "mean_overlap": float(np.mean([o["overlap"] for o in overlap])),
        "union_fraction": [o["union_fraction"] for o in overlap],
        "independent_union_fraction": [o["independent_union_fraction"] for o in overlap],
        **{f"{name}_ms": 1e3 * s for name, s in t.items()},
        **{f"{name}_speedup": t["dense"] / t[name] for name in ("auto", "per_row", "shared")},
      }
    )
  return rows


def format_batch_table(rows: list[dict]) -> str:
  headers = (
    "rows",
    "batch",
    "overlap",
    "union",
    "dense ms",
    "per-row",
    "shared",
    "auto",
    "policy",
  )
  body = [
    (
      r["rows"],
      r["batch"],
      f"{r['mean_overlap']:.2f}",
      f"{np.mean(r['union_fraction']):.0%}",
      f"{r['dense_ms']:.2f}",
      f"{r['per_row_speedup']:.2f}x",
      f"{r['shared_speedup']:.2f}x",
      f"{r['auto_speedup']:.2f}x",
      ",".join(sorted(set(r["policy_mode"]))),
    )
    for r in rows
  ]
  legend = (
    "overlap: mean over layers of |union of the rows' selected blocks| / (rows * k);"
    " union: its share of the layer; per-row / shared: the sparse chain with each native"
    " gather mode forced; auto: packed_mlp as shipped (policy: its batch_mode per layer);"
    " speed-ups are dense jit time / time, one interleaved run."
  )
  return _format_table(headers, body) + "\n" + legend


def run_batch(
  out: Path,
  *,
  rows_kinds: Sequence[str] = BATCH_ROWS,
  batches: Sequence[int] = (1, 2, 4, 8, 16),
  rank: int = 64,
  block_size: int = 16,
  repeats: int = 9,
  width: int = 4096,
  train_steps: int = 40,
  cache_dir: str | os.PathLike = Path("runs") / "bench_batch",
) -> Path:
  """``lrcc-jax bench --suite batch``: both row kinds, one table and one JSON.

  The trained digit MLP's weights are a work file, cached in `cache_dir`, not in `out`.
  """
  rows, info = [], None
  for kind in rows_kinds:
    if kind == "real":
      model, x_test, info = digit_mlp(
        width,
        rank=rank,
        block_size=block_size,
        steps=train_steps,
        cache=Path(cache_dir) / f"digit_mlp_{width}x4_steps{train_steps}.npz",
      )
      rows += bench_batch(model, x_test, batches, rows_kind="real", repeats=repeats)
    elif kind == "random":
      model = random_mlp(
        width, 4, rank, capacity_blocks(0.1, width, block_size), block_size=block_size
      )
      rows += bench_batch(model, None, batches, rows_kind="random", repeats=repeats)
    else:
      raise ValueError(f"rows={kind!r} must be one of {', '.join(BATCH_ROWS)}.")
  print(format_batch_table(rows))
  if info is not None:
    print(f"trained digit MLP: {info}")
  path = write_results(
    "bench_batch", {"environment": environment(), "trained": info, "rows": rows}, out
  )
  plot_batch(
    rows,
    out / "bench_batch.png",
    f"4-layer {width} MLP, 10% per layer, blocks of {block_size}: real and random rows",
  )
  return path


def plot_batch(rows: list[dict], path: str | os.PathLike, title: str) -> None:
  """Speed-up over dense against batch size: one colour per row kind, one style per mode."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(5.5, 4), layout="constrained")
  ax = fig.subplots()
  for i, kind in enumerate(sorted({r["rows"] for r in rows})):
    sel = sorted((r for r in rows if r["rows"] == kind), key=lambda r: r["batch"])
    for mode, style in (("per_row", ":"), ("shared", "--"), ("auto", "o-")):
      ax.plot(
        [r["batch"] for r in sel],
        [r[f"{mode}_speedup"] for r in sel],
        style,
        color=f"C{i}",
        label=f"{kind} rows, {mode.replace('_', '-')}",
      )
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log", base=2)
  ax.set_xlabel("batch size")
  ax.set_ylabel("speed-up over dense jit")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)


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
    # "dense" is the plain dense jit network (the baseline); "dense_path" is `packed_mlp`'s
    # whole-chain dense strategy (dense products, estimator and masks).
    fns = {"dense": jax.jit(dense)}
    for strategy in ("layerwise", "sparse", "dense", "auto"):
      fns["dense_path" if strategy == "dense" else strategy] = jax.jit(
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
    for name in ("layerwise", "sparse", "dense_path", "auto"):
      row[f"{name}_ms"] = 1e3 * t[name]
      row[f"{name}_speedup"] = t["dense"] / t[name]
    rows.append(row)
  return rows
