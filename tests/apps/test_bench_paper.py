"""`lrcc-jax bench --suite paper` end to end at one epoch: every chain runs and is timed."""

import pytest

from lrcc_jax import _mlp
from lrcc_jax.apps import bench


def test_paper_suite_times_every_chain_on_real_digits(tmp_path):
  (row,) = bench.bench_paper((1e-3,), workdir=tmp_path, epochs=1, repeats=1)
  assert len(row["capacities"]) == 3
  assert all(0 < f <= 1 for f in row["capacity_fraction"])
  assert row["auto_path"] in _mlp.ChainPath.__args__
  assert row["dense_ms"] > 0  # the plain dense jit network: the baseline
  for name in ("layerwise", "sparse", "dense_path", "auto"):
    assert row[f"{name}_speedup"] == pytest.approx(row["dense_ms"] / row[f"{name}_ms"])
  assert list(tmp_path.iterdir())  # the training run went to the workdir
