"""The first hour of a new user: the command line's conventions, own data, read-only evaluate."""

import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lrcc_jax.apps import bench, cli

TINY = ["--hidden", "16,8,8", "--ranks", "4", "--batch-size", "16", "--no-progress"]

REPO = str(pathlib.Path(__file__).resolve().parents[2])  # the checkout under test, for subprocesses


def _main(argv):
  """Runs `cli.main` in-process; returns (status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = cli.main(argv)
  return status, out.getvalue(), err.getvalue()


def _images(rng, n):
  labels = rng.integers(0, 3, n)
  images = (rng.integers(0, 60, (n, 8, 8)) + 60 * labels[:, None, None]).astype(np.uint8)
  return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Two npz files: one pool of 150 (split here) and one with its own 100/50 splits."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  images, labels = _images(rng, 150)
  np.savez(root / "pool.npz", image=images, label=labels)
  (a, ya), (b, yb) = _images(rng, 100), _images(rng, 50)
  np.savez(root / "splits.npz", train_image=a, train_label=ya, test_image=b, test_label=yb)
  return root


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """A 3-layer run trained for 2 epochs (two checkpoint steps) on the pool npz."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  status, out, err = _main(
      ["train", "--dataset", f"npz:{data_dir / 'pool.npz'}", "--workdir", str(workdir),
       "--epochs", "2", "--threshold", "-0.05", *TINY]
  )
  assert status == 0, err
  return workdir


def _tree_hash(root: pathlib.Path) -> dict:
  """Every path under `root` with the SHA-256 of its bytes (directories: None)."""
  return {
      str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
      for p in sorted(root.rglob("*"))
  }


def _garble(step_dir: pathlib.Path) -> None:
  for p in sorted(q for q in step_dir.rglob("*") if q.is_file()):
    data = bytearray(p.read_bytes())
    for i in range(0, len(data), 7):
      data[i] ^= 0x5A
    p.write_bytes(bytes(data))


# --- one consistent command line --------------------------------------------------------


def test_negative_threshold_lists_and_one_rank_for_every_layer(run):
  status, out, err = _main(
      ["evaluate", "--workdir", str(run), "--threshold", "-0.1,-0.1,-0.05", "--ranks", "3"]
  )
  assert status == 0, err
  result = json.loads(out)
  assert result["threshold"] == pytest.approx([-0.1, -0.1, -0.05])
  assert result["ranks"] == [3, 3, 3]
  # A single negative number in exponent form is a value too.
  status, out, _ = _main(["evaluate", "--workdir", str(run), "--threshold", "-1e-2"])
  assert status == 0 and json.loads(out)["threshold"] == pytest.approx([-0.01] * 3)


def test_join_negative_values():
  assert cli.join_negative_values(["--threshold", "-0.1,-.2,3e-2", "--ranks", "5"]) == [
      "--threshold=-0.1,-.2,3e-2", "--ranks", "5"]
  assert cli.join_negative_values(["--no-progress", "--table"]) == ["--no-progress", "--table"]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_no_progress(command):
  parser = cli.build_parser(command)
  sub = next(a for a in parser._actions if a.dest == "command").choices[command]
  assert "--no-progress" in sub._option_string_actions


def test_every_registered_estimator_is_offered():
  import lrcc_jax as L

  parser = cli.build_parser("evaluate")
  sub = next(a for a in parser._actions if a.dest == "command").choices["evaluate"]
  assert tuple(sub._option_string_actions["--estimator"].choices) == L.ESTIMATORS


def test_train_log_has_no_bar_redraws(data_dir, tmp_path):
  """Without --no-progress, into a file: one line per epoch, no carriage returns."""
  log = tmp_path / "log.txt"
  with log.open("w") as f:
    proc = subprocess.run(
        [sys.executable, "-m", "lrcc_jax.apps.cli", "train", "--dataset",
         f"npz:{data_dir / 'pool.npz'}", "--workdir", str(tmp_path / "w"), "--epochs", "1",
         "--hidden", "8", "--batch-size", "32"],
        stdout=subprocess.PIPE, stderr=f, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )
  text = log.read_text()
  assert proc.returncode == 0, text
  assert "\r" not in text and "epoch 1/1" not in text  # no bar, not even a final one
  assert text.count("epoch 1: loss") == 1  # the epoch's one line


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--help"],
        ["evaluate", "--workdir", "W", "--ranks", "5,x"],
        ["train", "--dataset", "mnist5k", "--workdir", "W", "--hidden", "16,0"],
        ["evaluate", "--workdir", "/nonexistent/run"],
        ["train", "--dataset", "nope", "--workdir", "W"],
    ],
)
def test_help_and_argument_errors_answer_before_jax_loads(argv):
  code = (
      "import sys\nfrom lrcc_jax.apps import cli\n"
      f"try:\n  status = cli.main({argv!r})\nexcept SystemExit as e:\n  status = e.code\n"
      "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)[:5]\n"
      "sys.exit(status)\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert "AssertionError" not in proc.stderr, proc.stderr
  assert proc.returncode in (0, 2), proc.stderr


# --- evaluation on the user's data ------------------------------------------------------


def test_split_all_scores_every_example(run, data_dir):
  status, out, err = _main(["evaluate", "--workdir", str(run), "--split", "all"])
  assert status == 0, err
  result = json.loads(out)
  assert result["split"] == "all" and result["n_examples"] == 150 and result["step"] == 2
  status, out, _ = _main(["evaluate", "--workdir", str(run)])
  assert json.loads(out)["split"] == "test" and json.loads(out)["n_examples"] == 30


def test_npz_with_its_own_splits_is_used_as_given(run, data_dir):
  npz = f"npz:{data_dir / 'splits.npz'}"
  for split, n in (("test", 50), ("all", 150)):
    status, out, err = _main(["evaluate", "--workdir", str(run), "--dataset", npz, "--split", split])
    assert status == 0, err
    assert json.loads(out)["n_examples"] == n


# --- read-only evaluate ------------------------------------------------------------------


def test_evaluate_never_changes_the_workdir(run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  _garble(workdir / "checkpoints" / "2")
  before = _tree_hash(workdir)
  status, out, err = _main(["evaluate", "--workdir", str(workdir)])
  assert status == 0, err
  assert _tree_hash(workdir) == before  # byte for byte, nothing moved, nothing added
  assert not (tmp_path / "w" / "checkpoints_corrupt").exists()
  result = json.loads(out)
  assert result["step"] == 1 and result["damaged_steps"] == [2]
  assert "checkpoint step 2 is damaged" in err and "Scoring step 1" in err


def test_evaluate_with_no_intact_step_names_it_and_the_recovery(run, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  for step in ("1", "2"):
    _garble(workdir / "checkpoints" / step)
  before = _tree_hash(workdir)
  status, out, err = _main(["evaluate", "--workdir", str(workdir)])
  assert status == 2 and out == ""
  assert "step 2:" in err and "step 1:" in err and "lrcc-jax train --workdir" in err
  assert _tree_hash(workdir) == before


# --- tables that explain themselves -------------------------------------------------------


def test_evaluate_table_labels_the_model_speedup(run):
  status, out, _ = _main(["evaluate", "--workdir", str(run), "--table"])
  assert status == 0
  assert "speed-up (FLOP model)" in out and "a model, not a measured time" in out
  with pytest.raises(json.JSONDecodeError):
    json.loads(out)


def test_bench_writes_a_png_for_every_suite_and_not_into_results(tmp_path, monkeypatch):
  rows = [{"batch": b, "capacity_fraction": f, "path": "gather", "dense_ms": 1.0, "skip_ms": 0.5,
           "measured_speedup": 2.0, "flop_model_speedup": 3.0, "fraction_of_model": 2 / 3,
           "varied_input_speedup": 1.5 if b == 1 else None}
          for b in (1, 8) for f in (0.05, 0.1)]
  monkeypatch.setattr(bench, "bench_layer", lambda **kw: rows)
  monkeypatch.setattr(bench, "bench_mlp", lambda *a, **kw: [dict(r, batch=r["batch"]) for r in rows[:2]])
  monkeypatch.setattr(bench, "random_mlp", lambda *a, **kw: None)
  sides = ("dense", "packed_dense", "module_donated", "module_graph_false", "module_split",
           "module_default", "nnx_linear_default")
  module_row = {**{f"{k}_ms": 1.0 for k in sides}, "width": 64, "batch": 1,
                "module_donated_over_packed_dense": 1.0, "module_graph_false_over_packed_dense": 1.0,
                "module_graph_false_extra_ms": 0.0, "module_split_over_packed_dense": 1.0,
                "retraces_over_three_threshold_changes": 0}
  monkeypatch.setattr(bench, "bench_module", lambda **kw: module_row)
  storage_row = {"batch": 1, "width": 64, "capacity_fraction": 0.1, "dense_f32_ms": 1.0, "skip_f32_ms": 0.5,
                 "skip_bf16_ms": 0.4, "path_f32": "gather", "path_bf16": "gather",
                 "bf16_speedup_over_f32_storage": 1.25, "bf16_speedup_over_dense": 2.5}
  monkeypatch.setattr(bench, "bench_storage", lambda **kw: [storage_row])
  ffn_row = {"variant": "relu", "dense_ms": 1.0, "skip_ms": 0.2, "skip_speedup": 5.0,
             "skip_varied_speedup": 5.0, "flop_model_speedup": 8.0}
  monkeypatch.setattr(bench, "bench_ffn", lambda *a, **kw: [ffn_row])
  monkeypatch.setattr(bench, "bench_randomized_fit", lambda *a, **kw: {
      "shape": [64, 64], "randomized_s": 0.1, "exact_s": 1.0, "error_excess": 0.001})
  monkeypatch.setattr(bench, "bench_randomized_fit_trained", lambda *a, **kw: {
      "shape": [64, 64], "randomized_s": 0.1, "exact_s": 1.0, "error_excess": 0.001,
      "exact_relative_error": 0.9})
  monkeypatch.chdir(tmp_path)
  for suite in ("layer", "mlp", "module", "storage", "ffn"):
    status, out, err = _main(["bench", "--suite", suite, "--no-progress"])
    assert status == 0, err
    png = tmp_path / "runs" / "bench" / f"bench_{suite}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "runs" / "bench" / f"bench_{suite}.json").exists()
  assert not (tmp_path / "experiments").exists()
  table = bench.format_table(rows)
  for word in ("model:", "achieved:", "varied x:", "measured"):
    assert word in table


# --- bad input gets the contract's answer --------------------------------------------------


def test_failed_train_leaves_no_workdir(tmp_path, data_dir):
  status, _, err = _main(["train", "--dataset", "nope", "--workdir", str(tmp_path / "a")])
  assert status == 2 and "Unknown dataset 'nope'" in err
  missing = f"npz:{tmp_path / 'missing.npz'}"
  status, _, err = _main(["train", "--dataset", missing, "--workdir", str(tmp_path / "b")])
  assert status == 2 and f"--dataset {missing}: no such file" in err
  # The library too: a dataset that fails to load leaves nothing behind.
  from lrcc_jax.apps import train

  with pytest.raises(ValueError):
    train.train_and_evaluate(train.TrainConfig(dataset="nope"), tmp_path / "c", progress=False)
  assert not any((tmp_path / d).exists() for d in "abc")
