"""End-to-end tests of `lrcc-jax sweep` (lrcc_jax.apps.sweep) and the experiment configs."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lrcc_jax.apps import cli, evaluate, sweep
from lrcc_jax.apps.train import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "experiments" / "configs"
CONTRACT_ROW_KEYS = {
    "dataset", "estimator", "ranks", "threshold", "test_error_dense", "test_error_conditional",
    "density", "recall", "computed_fraction", "theoretical_speedup", "measured_speedup_batch1",
}

TINY_CONFIG = """
from lrcc_jax.apps.sweep import SweepConfig
from lrcc_jax.apps.train import TrainConfig


def get_config():
  return TrainConfig(
      dataset="npz:{npz}", hidden_sizes=(24, 12), batch_size=32, epochs=3,
      learning_rate=2e-2, l1=1e-3, dropout_rate=0.1, refit_every=3,
  )


def get_sweep_config():
  return SweepConfig(
      ranks=((1,), (3,), (6, 4), ("full",)), quick_ranks=(1, -1),
      estimators=("svd", "data_aware"), calibration_rows=200, bench_repeats=1,
  )
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> pathlib.Path:
  """A config file for 320 learnable 8x8 images in 4 classes (a bright quadrant each)."""
  root = tmp_path_factory.mktemp("tiny")
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 80)
  images = rng.integers(0, 90, (len(labels), 8, 8)).astype(np.uint8)
  for c in range(4):
    r, q = divmod(c, 2)
    images[labels == c, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 150
  np.savez(root / "tiny.npz", image=images, label=labels)
  path = root / "tiny_config.py"
  path.write_text(TINY_CONFIG.format(npz=root / "tiny.npz"))
  return path


@pytest.fixture(scope="module")
def quick_run(tiny_config, tmp_path_factory):
  """``lrcc-jax sweep --quick`` on the tiny config: (exit status, stdout, out dir, workdir)."""
  import contextlib
  import io

  root = tmp_path_factory.mktemp("sweep")
  out, workdir = root / "results", root / "runs"
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    status = cli.main([
        "sweep", "--config", str(tiny_config), "--workdir", str(workdir), "--out", str(out),
        "--quick", "--no-progress",
    ])
  return status, buf.getvalue(), out, workdir


def test_quick_sweep_writes_every_row_and_plot(quick_run):
  status, stdout, out, workdir = quick_run
  assert status == 0
  payload = json.loads((out / "sweep_npz_tiny_quick.json").read_text())
  assert set(payload) >= {"environment", "config", "rows", "train", "seconds"}
  assert payload["environment"]["jax_version"] and payload["config"]["quick"] is True
  assert payload["config"]["train"]["epochs"] == 1
  rows = payload["rows"]
  estimators = ["svd", "data_aware"]
  # protocols x estimators x quick rank settings (3/3 and full = 24/12) x thresholds.
  assert len(rows) == 2 * len(estimators) * 2 * 2
  assert {(r["protocol"], r["estimator"], tuple(r["ranks"]), r["threshold"]) for r in rows} == {
      (p, e, ranks, t)
      for p in ("dense", "in_loop") for e in estimators
      for ranks in ((3, 3), (24, 12)) for t in (0.0, "calibrated")
  }
  for row in rows:
    assert CONTRACT_ROW_KEYS <= set(row) and set(sweep.EXTRA_KEYS) <= set(row)
    assert set(row) == set(sweep.ROW_KEYS) | set(sweep.EXTRA_KEYS)
    assert row["dataset"].startswith("npz:")
    for key in ("density", "recall", "computed_fraction", "capacities", "thresholds"):
      assert len(row[key]) == 2, key
    assert all(1 <= c <= w for c, w in zip(row["capacities"], (24, 12)))
    for key in ("theoretical_speedup", "measured_speedup_batch1", "dense_ms_batch1", "skip_ms_batch1"):
      assert math.isfinite(row[key]) and row[key] > 0, key
    assert 0.0 <= row["test_error_capacity"] <= 1.0
    assert row["skip_strategy"] in ("sparse", "layerwise", "dense")
  for row in rows:
    if row["ranks"] == [24, 12] and row["threshold"] == 0.0 and row["estimator"] != "trained":
      # Full rank at threshold 0: the estimate is exact, so nothing changes.
      assert row["recall"] == [1.0, 1.0]
      assert row["test_error_conditional"] == row["test_error_dense"]
    if row["threshold"] == "calibrated":
      assert all(t is None or t <= 1e3 for t in row["thresholds"])
  for suffix in ("error", "recall", "speedup"):
    png = out / f"sweep_npz_tiny_quick_{suffix}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(payload["files"]) == sorted(
      f"sweep_npz_tiny_quick_{s}.png" for s in ("error", "recall", "speedup")
  )
  lines = stdout.splitlines()
  assert lines[1].split()[:3] == ["protocol", "estimator", "ranks"]
  assert sum(line.startswith(("dense ", "in_loop ")) for line in lines) == len(rows)
  assert (workdir / "quick_dense" / "metrics.jsonl").exists()
  assert (workdir / "quick_in_loop" / "metrics.jsonl").exists()


def test_rerun_resumes_instead_of_retraining(quick_run, tiny_config, tmp_path):
  _, _, _, workdir = quick_run
  metrics = workdir / "quick_dense" / "metrics.jsonl"
  before = metrics.read_text()
  config, cfg_sweep = sweep.load_config(tiny_config)
  small = dataclasses.replace(
      cfg_sweep, protocols=("dense",), estimators=("svd",), thresholds=(0.0,), quick_ranks=(0,)
  )
  result = sweep.run_sweep(config, small, workdir, tmp_path, quick=True, progress=False, name="again")
  assert metrics.read_text() == before
  assert len(result["rows"]) == 1 and (tmp_path / "sweep_again.json").exists()


def test_trained_estimator_rows(tiny_config, tmp_path):
  config, cfg_sweep = sweep.load_config(tiny_config)
  small = dataclasses.replace(
      cfg_sweep, protocols=("dense",), estimators=("trained",), thresholds=("calibrated",),
      quick_ranks=(-1,),
  )
  result = sweep.run_sweep(config, small, tmp_path / "runs", None, quick=True, progress=False)
  (row,) = result["rows"]
  assert row["estimator"] == "trained" and row["ranks"] == [24, 12]
  assert result["files"] == []
  assert min(row["recall"]) > 0.5 and 0.0 <= row["test_error_capacity"] <= 1.0


def test_resolve_ranks_and_config_errors(tmp_path):
  assert sweep.resolve_ranks((5,), (784, 1000, 600, 400)) == (5, 5, 5)
  assert sweep.resolve_ranks(("full",), (784, 1000, 600, 400)) == (784, 600, 400)
  assert sweep.resolve_ranks((900, 50, "full"), (784, 1000, 600, 400)) == (784, 50, 400)
  with pytest.raises(ValueError, match="rank setting has 2 entries but the model has 3 hidden layers"):
    sweep.resolve_ranks((1, 2), (784, 1000, 600, 400))
  with pytest.raises(ValueError, match="positive int or 'full'"):
    sweep.SweepConfig(ranks=((0,),))
  with pytest.raises(ValueError, match="'calibrated'"):
    sweep.SweepConfig(thresholds=("auto",))
  with pytest.raises(ValueError, match="protocols"):
    sweep.SweepConfig(protocols=("sometimes",))
  assert sweep.SweepConfig().quick().ranks == ((2,), ("full",))
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  assert cli.main(["sweep", "--config", str(bad), "--out", str(tmp_path)]) == 2
  assert cli.main(["sweep", "--config", str(tmp_path / "missing.py")]) == 2


def _tiny(config: TrainConfig, cfg_sweep: sweep.SweepConfig, data_dir) -> tuple:
  config = dataclasses.replace(
      config, hidden_sizes=(16, 8), batch_size=16, epochs=1, data_dir=str(data_dir)
  )
  cfg_sweep = dataclasses.replace(
      cfg_sweep, protocols=("dense",), estimators=("svd",), thresholds=(0.0,),
      ranks=((2,),), calibration_rows=32, bench_repeats=1,
  )
  return config, cfg_sweep


@pytest.mark.parametrize(
    "name, dataset, hidden, n_in",
    [
        ("mnist", "mnist", (1000, 600, 400), 784),
        ("svhn_gray", "svhn_cropped_gray", (2000, 1000, 500), 1024),
        ("svhn_rgb", "svhn_cropped", (2000, 1000, 500), 3072),
    ],
)
def test_tfds_configs_run_under_mock_data(name, dataset, hidden, n_in, tmp_path):
  path = CONFIGS / f"{name}.py"
  module = sweep.load_config_module(path)
  assert f"lrcc-jax sweep --config experiments/configs/{name}.py" in module.__doc__
  assert "Expected result" in module.__doc__
  config, cfg_sweep = sweep.load_config(path)
  assert config.dataset == dataset and config.hidden_sizes == hidden
  assert set(cfg_sweep.protocols) == {"dense", "in_loop"}
  assert {"svd", "data_aware"} <= set(cfg_sweep.estimators)
  assert len(cfg_sweep.ranks) >= 6 and cfg_sweep.ranks[-1] == ("full",)
  full = sweep.resolve_ranks(("full",), (n_in, *hidden))
  assert cfg_sweep.calibration_rows >= full[0]  # data-aware fits at full rank need the rows
  config, cfg_sweep = _tiny(config, cfg_sweep, tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=48):
    result = sweep.run_sweep(config, cfg_sweep, tmp_path / "runs", tmp_path / "out", progress=False)
  (row,) = result["rows"]
  assert row["dataset"] == dataset and row["ranks"] == [2, 2]
  assert CONTRACT_ROW_KEYS <= set(row)
  assert (tmp_path / "out" / f"sweep_{dataset}.json").exists()


def test_mnist5k_config_is_the_paper_scale_net():
  module = sweep.load_config_module(CONFIGS / "mnist5k.py")
  assert "lrcc-jax sweep --config experiments/configs/mnist5k.py" in module.__doc__
  config, cfg_sweep = sweep.load_config(CONFIGS / "mnist5k.py")
  assert config.dataset == "mnist5k" and config.hidden_sizes == (1000, 600, 400)
  settings = [sweep.resolve_ranks(s, (784, 1000, 600, 400)) for s in cfg_sweep.ranks]
  assert settings[0] == (2, 2, 2) and settings[-1] == (784, 600, 400) and len(settings) >= 6
  assert set(cfg_sweep.thresholds) == {0.0, "calibrated"}
