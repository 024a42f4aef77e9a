"""The gather paths' selection on CPU: XLA's `top_k` against the native one, whole calls.

    .venv/bin/python experiments/selection_ab.py --out experiments/results

Times, in one interleaved run per cell, dense jit, the skipping call with the capacity's
selection in XLA ops (`top_k`, then a sort) and the same call with the native selection
(`_mask.top_blocks(kernel="native")`, what CPU lowerings run). The XLA side is traced
with `_policy.epilogue_kernel` patched to "xla": on these gather paths that field picks
the selection only (the dense fallback's epilogue is not on them), so the two programs
differ in the selection alone; their outputs are checked equal first. Cells: `packed_dense`
past the fused kernel's 8 rows (the tile kernel's gathers, blocks of 16) and `packed_ffn`
at batch 1 (single units, ReLU², d_ff = 4 d, rank d / 8). Writes `selection_ab.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import lrcc_jax as L
from lrcc_jax import _policy
from lrcc_jax.apps.bench import capacity_blocks, environment, time_interleaved


@contextlib.contextmanager
def xla_selection() -> Iterator[None]:
  """Traces inside this block select with XLA's `top_k` on every platform."""
  original = _policy.epilogue_kernel
  _policy.epilogue_kernel = lambda platform, x_dtype: "xla"
  try:
    yield
  finally:
    _policy.epilogue_kernel = original


Cell = tuple[dict, jax.Array, Callable, Callable]


def layer_cells(rng: np.random.Generator) -> Iterator[Cell]:
  for width, rows, frac in [(2048, 16, 0.1), (2048, 64, 0.1), (2048, 128, 0.05),
                            (4096, 16, 0.1), (4096, 64, 0.05), (4096, 64, 0.1), (4096, 128, 0.1)]:
    w = jnp.asarray(rng.standard_normal((width, width)) / np.sqrt(width), jnp.float32)
    b = jnp.asarray(rng.standard_normal(width) * 0.01, jnp.float32)
    p = L.pack(w, b, L.fit_svd(w, 64), block_size=16)
    x = jnp.asarray(rng.standard_normal((rows, width)), jnp.float32)
    cap = capacity_blocks(frac, width, 16)
    case = {"kind": "packed_dense", "width": width, "block_size": 16, "rows": rows,
            "capacity_fraction": frac}
    yield (case, x, lambda x, w=w, b=b: jax.nn.relu(x @ w + b),
           lambda x, p=p, cap=cap: L.packed_dense(x, p, capacity=cap))


def ffn_cells(rng: np.random.Generator) -> Iterator[Cell]:
  for d in (256, 512, 1024, 2048):
    d_ff = 4 * d
    w_in = jnp.asarray(rng.standard_normal((d, d_ff)) / np.sqrt(d), jnp.float32)
    b_in = jnp.asarray(rng.standard_normal(d_ff) * 0.1, jnp.float32)
    w_out = jnp.asarray(rng.standard_normal((d_ff, d)) / np.sqrt(d_ff), jnp.float32)
    b_out = jnp.zeros(d, jnp.float32)
    p = L.pack_ffn(w_in, b_in, w_out, b_out, L.fit_svd(w_in, d // 8), block_size=1)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    k = round(0.1 * d_ff)

    def dense(x, w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out):
      return jnp.maximum(x @ w_in + b_in, 0) ** 2 @ w_out + b_out

    case = {"kind": "packed_ffn", "d_model": d, "d_ff": d_ff, "rows": 1, "capacity_fraction": 0.1}
    yield case, x, dense, lambda x, p=p, k=k: L.packed_ffn(x, p, capacity=k, activation="relu2")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/selection_ab")
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  print("cell                                   dense ms  top_k ms  native ms  native/top_k")
  for case, x, dense, skip in [*layer_cells(rng), *ffn_cells(rng)]:
    dense_fn, native_fn = jax.jit(dense), jax.jit(skip)
    xla_fn = jax.jit(lambda x, skip=skip: skip(x))
    with xla_selection():
      want = np.asarray(xla_fn(x))  # traced (and compiled) here, with XLA's selection
    np.testing.assert_allclose(np.asarray(native_fn(x)), want, rtol=1e-5, atol=1e-5)
    jax.block_until_ready(dense_fn(x))
    t = time_interleaved(
      {"dense": lambda: dense_fn(x), "top_k": lambda: xla_fn(x), "native": lambda: native_fn(x)},
      repeats=args.repeats,
    )
    row = {**case, **{f"{k}_ms": 1e3 * v for k, v in t.items()},
           "top_k_speedup": t["dense"] / t["top_k"], "native_speedup": t["dense"] / t["native"],
           "native_over_top_k": t["top_k"] / t["native"]}
    rows.append(row)
    name = " ".join(f"{k}={v}" for k, v in case.items() if k != "kind")
    print(f"{case['kind']:12s} {name:26s} {row['dense_ms']:8.3f} {row['top_k_ms']:9.3f}"
          f" {row['native_ms']:10.3f} {row['native_over_top_k']:12.2f}x", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "selection_ab.json"
  path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1) + "\n")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
