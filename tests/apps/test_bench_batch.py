"""`lrcc-jax bench --suite batch` at toy sizes: plumbing, overlap statistic, cached weights."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lrcc_jax.apps import bench


def test_run_batch_reports_both_row_kinds_and_caches_the_trained_weights(tmp_path):
  kw = dict(batches=(1, 4), rank=4, block_size=4, repeats=1, width=32, train_steps=2)
  path = bench.run_batch(tmp_path / "out", cache_dir=tmp_path / "cache", **kw)
  rows = json.loads(path.read_text())["rows"]
  assert [(r["rows"], r["batch"]) for r in rows] == [
    ("real", 1),
    ("real", 4),
    ("random", 1),
    ("random", 4),
  ]
  for r in rows:
    assert all(1 / r["batch"] - 1e-9 <= o <= 1 for o in r["overlap"])
    assert r["shared_ms"] > 0 and r["per_row_ms"] > 0 and r["dense_ms"] > 0
    assert set(r["policy_mode"]) <= {"per_row", "shared", "dense"}
  assert [r["overlap"] for r in rows if r["batch"] == 1] == [[1.0] * 4] * 2
  cached = list((tmp_path / "cache").glob("digit_mlp_*.npz"))
  assert not list((tmp_path / "out").glob("*.npz"))  # work files stay out of the results
  assert len(cached) == 1
  a, _, info_a = bench.digit_mlp(32, rank=4, block_size=4, steps=2, cache=cached[0])
  b, _, info_b = bench.digit_mlp(32, rank=4, block_size=4, steps=2, cache=cached[0])
  assert info_a == info_b and len(info_a["density"]) == 4
  np.testing.assert_array_equal(a.layers[2].kernel[...], b.layers[2].kernel[...])


def test_overlap_is_one_over_rows_for_identical_rows():
  model = bench.random_mlp(32, 2, 4, 2, block_size=4)
  model.eval()
  packed = model.pack()
  x = jnp.tile(jnp.asarray(np.random.default_rng(0).standard_normal((1, 32)), jnp.float32), (4, 1))
  stats = bench.selection_overlap(packed, x, model.thresholds, [2, 2])
  assert [s["overlap"] for s in stats] == [0.25, 0.25]
  assert [s["union_blocks"] for s in stats] == [2, 2]
  assert stats[0]["independent_union_fraction"] == pytest.approx(1 - 0.75**4)


def test_cli_passes_the_batch_options(tmp_path, monkeypatch):
  from lrcc_jax.apps import cli

  seen = {}

  def fake(out, **kw):
    seen.update(kw, out=out)
    return out / "bench_batch.json"

  monkeypatch.setattr(bench, "run_batch", fake)
  argv = ["bench", "--suite", "batch", "--rows", "real", "--batches", "8", "--train-steps", "3"]
  assert cli.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
  assert (
    seen["rows_kinds"] == ["real"] and list(seen["batches"]) == [8] and seen["train_steps"] == 3
  )


def test_unknown_row_kind_is_refused(tmp_path):
  with pytest.raises(ValueError, match="rows='fake'"):
    bench.run_batch(tmp_path, rows_kinds=["fake"])
