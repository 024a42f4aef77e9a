"""Which kernel each skipping path lowers to, per platform, found in the lowered StableHLO.

`python -m lrcc_jax.apps.lowering_table` traces every public skipping path once on tiny
shapes, lowers it for ("cpu",), ("cuda",), ("tpu",) and all three at once (no device
needed: lowering is compilation's first half), and prints a Markdown table of the kernels
found in the text, with any control flow left in it:

- ``native FFI``: a native CPU gather kernel's custom call (`lrcc_tile_product`, ...);
- ``native epilogue``: the dense fallback's native CPU epilogue (`lrcc_masked_relu`,
  `lrcc_estimated_masked_relu`);
- ``native selection``: the capacity's native CPU selection (`lrcc_top_blocks`);
- ``Pallas Triton``: ``__gpu$xla.gpu.triton``; ``Pallas Mosaic TPU``: ``tpu_custom_call``;
  ``Pallas Mosaic GPU``: ``mosaic_gpu`` (none expected);
- ``XLA gather``: a ``stablehlo.gather`` reading a packed weight;
- ``dense``: no gather kernel (the dense-and-mask path, with or without the epilogue).

`tests/test_lowering.py` asserts on the same findings.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrcc_jax import _native

PLATFORM_SETS = (("cpu",), ("cuda",), ("tpu",), ("cpu", "cuda", "tpu"))
# The dense fallback's native epilogues (scores given, or computed from x, U and V).
_EPILOGUES = (_native.MASKED_RELU, _native.ESTIMATED_MASKED_RELU)
# Each kernel's custom-call target names (any of them marks the kernel as present).
KERNEL_MARKERS = {
  "native FFI": tuple(t for t in _native.SYMBOLS if t not in (*_EPILOGUES, _native.TOP_BLOCKS)),
  "native epilogue": _EPILOGUES,
  "native selection": (_native.TOP_BLOCKS,),
  "Pallas Triton": ("__gpu$xla.gpu.triton",),
  "Pallas Mosaic TPU": ("tpu_custom_call",),
  "Pallas Mosaic GPU": ("mosaic_gpu",),
}
CONTROL_FLOW = ("stablehlo.case", "stablehlo.if", "stablehlo.while")


class Path(NamedTuple):
  """One public skipping path: a function, its example input, its packed weights' shapes."""

  name: str
  fn: Callable
  x: jax.Array
  weight_shapes: tuple[tuple[int, ...], ...]


def _layers(widths: list[int], block_size: int, seed: int = 0):
  import lrcc_jax as L  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  layers = []
  for n_in, n_out in itertools.pairwise(widths):
    w = jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n_out) / 8, jnp.float32)
    layers.append(L.pack(w, b, L.fit_svd(w, 4), block_size=block_size))
  return layers


def paths(width: int = 256) -> list[Path]:
  """The public skipping paths on tiny `width`-wide f32 layers, at batch 1."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import lrcc_jax as L  # pylint: disable=g-import-not-at-top
  from lrcc_jax import nn  # pylint: disable=g-import-not-at-top

  x = jnp.ones((1, width), jnp.float32)
  (p16,) = _layers([width, width], 16)
  (p1,) = _layers([width, width], 1)
  chain = _layers([width, width, width], 16)
  mlp = L.PackedMLP(tuple(chain), jnp.ones((width, 10), jnp.float32), jnp.zeros((10,), jnp.float32))
  caps16 = (2, 2)  # of 16 blocks: 12.5%
  model = nn.ConditionalMLP(
    width, [width, width], 10, ranks=4, capacities=2, block_sizes=16, rngs=nnx.Rngs(0)
  )

  def chain_fn(x):
    h = L.sparse_packed_dense(x, chain[0], capacity=2)
    return L.densify(L.sparse_packed_dense(h, chain[1], capacity=2), width)

  shape16, shape1 = p16.weight.shape, p1.weight.shape
  return [
    Path(
      "packed_dense gather bs=16",
      lambda x: L.packed_dense(x, p16, capacity=2, strategy="gather"),
      x,
      (shape16,),
    ),
    Path(
      "packed_dense gather bs=1",
      lambda x: L.packed_dense(x, p1, capacity=32, strategy="gather"),
      x,
      (shape1,),
    ),
    Path("packed_dense auto bs=16", lambda x: L.packed_dense(x, p16, capacity=2), x, (shape16,)),
    Path(
      "packed_dense gather bs=16, 16 rows",
      lambda x: L.packed_dense(x, p16, capacity=2, strategy="gather"),
      jnp.ones((16, width)),
      (shape16,),
    ),
    Path(
      "packed_dense auto, 64 rows",
      lambda x: L.packed_dense(x, p16, capacity=8),
      jnp.ones((64, width)),
      (shape16,),
    ),
    Path("sparse_packed_dense chain bs=16", chain_fn, x, (shape16, (16, 16, width // 16, 16))),
    Path(
      "packed_mlp auto bs=16",
      lambda x: L.packed_mlp(x, mlp, thresholds=(0.0, 0.0), capacities=caps16),
      x,
      (shape16,),
    ),
    Path("nn.ConditionalMLP skip bs=16", lambda x: model(x, mode="skip"), x, (shape16,)),
  ]


def lowered_text(fn: Callable, x: jax.Array, platforms: tuple[str, ...]) -> str:
  """StableHLO of `fn(x)` lowered for `platforms` (no device of those kinds needed)."""
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.jit(fn).trace(spec).lower(lowering_platforms=platforms).as_text()


def _gathers_weight(text: str, weight_shapes) -> bool:
  for shape in weight_shapes:
    ty = "tensor<" + "x".join(str(d) for d in shape) + "xf32>"
    if re.search(r"stablehlo\.gather\"?\(%[\w#]+, [^)]*\) .*: \(" + re.escape(ty), text):
      return True
    if re.search(r"\"stablehlo\.gather\"\(.*\n?.*: \(" + re.escape(ty), text):
      return True
  return False


def kernels_in(text: str, weight_shapes) -> list[str]:
  """The kernels found in a lowered program (see the module docstring)."""
  found = [name for name, markers in KERNEL_MARKERS.items() if any(m in text for m in markers)]
  if _gathers_weight(text, weight_shapes):
    found.append("XLA gather")
  if not set(found) - {"native epilogue", "native selection"}:
    found.insert(0, "dense")
  return found


def control_flow_in(text: str) -> list[str]:
  return [op for op in CONTROL_FLOW if op in text]


@contextlib.contextmanager
def pallas_env(value: str | None) -> Iterator[None]:
  """Temporarily sets `LRCC_JAX_PALLAS` (None: unset)."""
  old = os.environ.get("LRCC_JAX_PALLAS")
  if value is None:
    os.environ.pop("LRCC_JAX_PALLAS", None)
  else:
    os.environ["LRCC_JAX_PALLAS"] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("LRCC_JAX_PALLAS", None)
    else:
      os.environ["LRCC_JAX_PALLAS"] = old


def table(pallas: bool = True) -> list[dict]:
  """One row per (path, platform set): the kernels and control flow found."""
  rows = []
  with pallas_env(None if pallas else "0"):
    for path in paths():
      traced = jax.jit(path.fn).trace(jax.ShapeDtypeStruct(path.x.shape, path.x.dtype))
      for platforms in PLATFORM_SETS:
        text = traced.lower(lowering_platforms=platforms).as_text()
        rows.append(
          {
            "path": path.name,
            "platforms": ",".join(platforms),
            "kernels": kernels_in(text, path.weight_shapes),
            "control_flow": control_flow_in(text),
          }
        )
  return rows


def markdown(rows: list[dict]) -> str:
  names = list(dict.fromkeys(r["path"] for r in rows))
  sets = [",".join(p) for p in PLATFORM_SETS]
  cell = {(r["path"], r["platforms"]): r for r in rows}
  out = ["| path | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
  for name in names:
    cells = []
    for s in sets:
      r = cell[(name, s)]
      text = " + ".join(r["kernels"])
      if r["control_flow"]:
        text += " (" + ", ".join(op.split(".")[1] for op in r["control_flow"]) + ")"
      cells.append(text)
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  print(
    f"jax {jax.__version__}; lowered from {jax.default_backend()}; f32 layers 256 wide, batch 1"
    " unless named\n"
  )
  print("Pallas kernels on (default):\n")
  print(markdown(table(pallas=True)))
  if "--no-escape-hatch" not in argv:
    print("\nLRCC_JAX_PALLAS=0:\n")
    print(markdown(table(pallas=False)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
