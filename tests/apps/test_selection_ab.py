"""`experiments/selection_ab.py` end to end on tiny cells: both programs run and agree."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from lrcc_jax import _native, _policy

REPO = pathlib.Path(__file__).resolve().parents[2]


def _script():
  spec = importlib.util.spec_from_file_location("selection_ab", REPO / "experiments" / "selection_ab.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(not _native.available(), reason="native library not built")
def test_selection_ab_times_both_selections_and_restores_the_policy(tmp_path, monkeypatch):
  """Guards the experiment's one trick: the XLA side really lowers `top_k` and the native
  side `lrcc_top_blocks`, and the patched `epilogue_kernel` is restored afterwards."""
  ab = _script()
  import jax
  import jax.numpy as jnp
  import numpy as np

  import lrcc_jax as L

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)
  p = L.pack(w, jnp.zeros(64), L.fit_svd(w, 4), block_size=16)
  x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  skip = lambda x: L.packed_dense(x, p, capacity=1, strategy="gather")  # noqa: E731
  with ab.xla_selection():  # a function of its own: jit caches traces per function
    old = jax.jit(lambda x: skip(x)).lower(x).as_text()
  new = jax.jit(skip).lower(x).as_text()
  assert "lrcc_top_blocks" in new and "lrcc_top_blocks" not in old
  assert _policy.epilogue_kernel("cpu", jnp.float32) == "native"

  case = {"kind": "packed_dense", "width": 64, "rows": 16}
  monkeypatch.setattr(ab, "layer_cells", lambda rng: iter([(case, x, lambda x: x @ w, skip)]))
  monkeypatch.setattr(ab, "ffn_cells", lambda rng: iter([]))
  assert ab.main(["--out", str(tmp_path), "--repeats", "1"]) == 0
  (row,) = json.loads((tmp_path / "selection_ab.json").read_text())["rows"]
  assert row["native_over_top_k"] == pytest.approx(row["top_k_ms"] / row["native_ms"])
