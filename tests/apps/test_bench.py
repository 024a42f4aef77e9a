import json

import pytest

from lrcc_jax import _native
from lrcc_jax.apps import bench, cli
from lrcc_jax._packed import skip_pays


def test_bench_full_suite_end_to_end(tmp_path, capsys):
  assert cli.main(["bench", "--suite", "full", "--widths", "64", "--batches", "1,4", "--block-sizes", "16",
                   "--repeats", "1", "--rank", "8", "--out", str(tmp_path), "--no-progress"]) == 0
  payload = json.loads((tmp_path / "bench_suite.json").read_text())
  assert payload["environment"]["jax_version"]
  # JAX had started before the command ran, so the dispatch mode stayed as it was.
  assert payload["environment"]["cpu_async_dispatch"] is True
  rows = payload["rows"]
  assert len(rows) == 2 * 4
  for r in rows:
    assert r["dense_ms"] > 0 and r["skip_ms"] > 0 and r["mask_ms"] > 0
    assert r["block_size"] == 16 and r["capacity"] == max(1, round(r["capacity_fraction"] * 4))
    assert r["computed_fraction"] == r["capacity"] * 16 / 64
    # the policy's gathers, or the fused kernel where the rows' gathers add up to at most
    # one layer of 4 blocks (`_fused.replaces_dense`)
    fused = _native.available() and r["batch"] * r["capacity"] <= 4
    assert r["path"] == ("gather" if skip_pays(r["batch"], r["capacity"], 4) or fused else "dense+mask")
  mem = [r["memory"] for r in rows if r["batch"] == 1]
  assert all(m["packed_over_dense_plus_factors"] <= 1.1 for m in mem)
  assert (tmp_path / "bench_suite.png").stat().st_size > 0
  assert "wrote" in capsys.readouterr().out
  (summary,) = payload["summary"]
  assert summary["min_skip_speedup"] == min(r["skip_speedup"] for r in rows)
  assert summary["floor_target"] == 0.85 and summary["block_size"] == 16
  assert "policies" in payload["environment"]["policy"]


def test_bench_full_compares_a_tuned_policy_with_the_defaults(tmp_path, monkeypatch):
  """Guards `--compare-default`: with a tuned policy in use (here one that never gathers),
  each row also times the shipped default, whose path follows the default policy."""
  import dataclasses

  from lrcc_jax import _policy

  monkeypatch.setenv("LRCC_JAX_CACHE", str(tmp_path))
  monkeypatch.delenv("LRCC_JAX_TUNED", raising=False)
  kind = _policy.device_kind()
  never = [dataclasses.replace(p, max_fraction_one_row=0.0, max_gathered_layers=0.0, small_fraction=0.0,
                               fused_max_layers=0.0, device_kind=kind, source="test")
           for p in (_policy.CPU_NATIVE, _policy.CPU_XLA)]
  _policy.policy_path(kind).write_text(_policy.policy_to_json(never, kind))
  _policy.forget_tuned()
  try:
    rows = bench.bench_suite([64], [1], [0.25], rank=8, block_sizes=[16], repeats=1,
                             compare_default=True, progress=False)
    summary = bench.suite_summary(rows)
  finally:
    _policy.forget_tuned()
  (r,) = rows
  assert r["path"] == "dense+mask" and r["default_path"] == "gather"
  assert r["tuned_over_default"] == pytest.approx(r["skip_default_ms"] / r["skip_ms"])
  assert summary[0]["min_tuned_over_default"] == r["tuned_over_default"]
  assert "default path" in bench.format_suite_table(rows)


def test_bench_mlp_checks_values_and_reports_model(tmp_path):
  model = bench.random_mlp(32, 2, 4, 4)
  rows = bench.bench_mlp(model, (1,), repeats=1)
  assert rows[0]["flop_model_speedup"] > 1.0
  assert rows[0]["computed_fraction"] == [4 / 32, 4 / 32]


def test_bench_mlp_counts_a_dense_fallback_as_fully_computed():
  model = bench.random_mlp(32, 2, 4, 2, block_size=4)  # 2 of 8 blocks per row
  rows = bench.bench_mlp(model, (1, 8), repeats=1)
  assert rows[0]["computed_fraction"] == [8 / 32, 8 / 32] and rows[0]["flop_model_speedup"] > 1.0
  assert rows[1]["computed_fraction"] == [1.0, 1.0]  # 8 rows x 2 blocks > half the layer


def test_latency_mode_is_refused_once_jax_has_started():
  import jax.numpy as jnp

  jnp.ones(1).block_until_ready()
  assert bench.latency_mode() is False


def test_time_interleaved_rejects_nothing_and_returns_medians():
  import jax.numpy as jnp

  t = bench.time_interleaved({"a": lambda: jnp.ones(3)}, repeats=3, calls=2)
  assert set(t) == {"a"} and t["a"] > 0
  with pytest.raises(AttributeError):
    bench.time_interleaved({"a": lambda: 1}, repeats=1, calls=1)


def test_bench_command_times_with_synchronous_dispatch(tmp_path):
  import subprocess
  import sys

  cmd = [
    sys.executable,
    "-m",
    "lrcc_jax.apps.cli",
    "bench",
    "--suite",
    "full",
    "--widths",
    "64",
    "--batches",
    "1",
    "--repeats",
    "1",
    "--rank",
    "4",
    "--out",
    str(tmp_path),
    "--no-progress",
  ]
  subprocess.run(cmd, check=True, capture_output=True, timeout=300)
  env = json.loads((tmp_path / "bench_suite.json").read_text())["environment"]
  assert env["cpu_async_dispatch"] is False
  subprocess.run([*cmd, "--async-dispatch"], check=True, capture_output=True, timeout=300)
  assert (
    json.loads((tmp_path / "bench_suite.json").read_text())["environment"]["cpu_async_dispatch"]
    is True
  )


def test_storage_rows_report_packed_memory_per_dtype():
  (row,) = bench.bench_storage(width=64, rank=4, block_size=16, batches=(1,), repeats=1)
  assert row["weight_bytes_bf16"] * 2 == row["weight_bytes_f32"] == 64 * 64 * 4
  for dtype in ("f32", "bf16"):  # one copy of the weights: no hidden second layout
    assert 0.99 < row[f"packed_over_dense_plus_factors_{dtype}"] <= 1.1


def test_bench_module_suite_end_to_end_at_two_widths(tmp_path, capsys):
  """Guards the module suite: every way of calling the layer gives `packed_dense`'s values
  (checked inside), one row per width, the graph=False overhead is the difference of the
  two times, and no threshold change retraces."""
  assert cli.main(["bench", "--suite", "module", "--widths", "64,128", "--rank", "8",
                   "--block-size", "16", "--repeats", "1", "--out", str(tmp_path),
                   "--no-progress"]) == 0
  rows = json.loads((tmp_path / "bench_module.json").read_text())["rows"]
  assert [r["width"] for r in rows] == [64, 128]
  for r in rows:
    assert r["retraces_over_three_threshold_changes"] == 0
    assert r["module_graph_false_extra_ms"] == pytest.approx(r["module_graph_false_ms"] - r["packed_dense_ms"])
    assert r["module_split_over_packed_dense"] == pytest.approx(r["module_split_ms"] / r["packed_dense_ms"])
  assert (tmp_path / "bench_module.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert "64 wide:" in out and "128 wide:" in out and "split + jax.jit" in out
