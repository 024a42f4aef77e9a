"""End-to-end tests of the ``lrcc-jax`` command line on a tiny npz dataset."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lrcc_jax.apps import cli
from lrcc_jax.apps.data import load_dataset
from lrcc_jax.apps.evaluate import RESULT_KEYS, evaluate_model
from lrcc_jax.apps.train import TrainConfig, load_model

TINY = ["--epochs", "1", "--hidden", "16,8", "--ranks", "4,2", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  """150 8x8 images of 3 classes that differ in brightness (learnable in one epoch)."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 150)
  images = (rng.integers(0, 60, (150, 8, 8)) + 60 * labels[:, None, None]).astype(np.uint8)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, image=images, label=labels)
  return f"npz:{path}"


def _main(argv):
  """Runs `cli.main` in-process; returns (status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = cli.main(argv)
  return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(npz, tmp_path_factory):
  """A workdir trained for one epoch through ``lrcc-jax train``, and its JSON summary."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  status, out, _ = _main(
      ["train", "--dataset", npz, "--workdir", str(workdir), "--l1", "1e-4,1e-5", "--seed", "3", *TINY]
  )
  assert status == 0
  return workdir, json.loads(out)


CLI_KEYS = {"step", "damaged_steps"}  # what `evaluate` adds: the checkpoint it scored


def _check_result(result, n_layers=2, n_examples=30):
  assert set(RESULT_KEYS) <= set(result) and set(result) - set(RESULT_KEYS) <= CLI_KEYS
  assert result["n_examples"] == n_examples  # test split: 20% of 150, stratified
  for key in ("test_error_dense", "test_error_conditional"):
    assert 0.0 <= result[key] <= 1.0
  for key in ("density", "recall", "computed_fraction"):
    assert len(result[key]) == n_layers and all(0.0 <= v <= 1.0 for v in result[key])
  assert result["theoretical_speedup"] > 0


def test_train_writes_run_and_prints_summary(run):
  workdir, summary = run
  assert summary["epoch"] == 1 and 0.0 <= summary["test_error_dense"] <= 1.0
  config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
  assert config.hidden_sizes == (16, 8) and config.ranks == (4, 2) and config.l1 == (1e-4, 1e-5)
  assert config.seed == 3 and config.epochs == 1 and config.batch_size == 16
  # Unset flags keep TrainConfig's defaults.
  assert config.learning_rate == TrainConfig().learning_rate
  assert config.protocol == TrainConfig().protocol
  assert (workdir / "metrics.jsonl").read_text().count("\n") == 1


def test_evaluate_prints_one_json_object(run, npz):
  workdir, _ = run
  status, out, _ = _main(
      ["evaluate", "--workdir", str(workdir), "--dataset", npz, "--ranks", "3,2", "--threshold", "-0.05"]
  )
  assert status == 0
  result = json.loads(out)  # the whole of stdout is one JSON object
  _check_result(result)
  assert result["ranks"] == [3, 2] and result["threshold"] == pytest.approx([-0.05, -0.05])
  assert result["dataset"] == npz and result["estimator"] == "svd"
  assert result["split"] == "test" and result["step"] == 1 and result["damaged_steps"] == []
  # Same numbers as the library on the run's own split (the split is seeded by the run).
  model, config = load_model(workdir)
  ds = load_dataset(npz, seed=config.seed)
  library = evaluate_model(model, ds, ranks=[3, 2], threshold=-0.05)
  assert {k: v for k, v in result.items() if k not in CLI_KEYS} == library


def test_console_script_evaluates_calibrated(run):
  workdir, _ = run
  script = pathlib.Path(sys.executable).with_name("lrcc-jax")
  cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lrcc_jax.apps.cli"]
  proc = subprocess.run(
      [*cmd, "evaluate", "--workdir", str(workdir), "--threshold", "calibrated", "--recall", "0.9",
       "--estimator", "data_aware"],
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  _check_result(result)
  assert result["estimator"] == "data_aware" and result["ranks"] == [4, 2]
  assert all(t is not None and t < 1.0 for t in result["threshold"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--workdir", "W", "--ranks", "5,x"], "argument --ranks: expected comma-separated positive integers, got '5,x'"),
        (["evaluate", "--workdir", "W", "--threshold", "low"], "argument --threshold"),
        (["evaluate", "--workdir", "W", "--recall", "1.5"], "argument --recall"),
        (["evaluate", "--workdir", "W", "--estimator", "pca"], "argument --estimator: invalid choice"),
        (["train", "--workdir", "W"], "the following arguments are required: --dataset"),
        (["train", "--dataset", "mnist5k", "--workdir", "W", "--protocol", "fast"], "argument --protocol"),
        (["train", "--dataset", "mnist5k", "--workdir", "W", "--hidden", "16,0"], "argument --hidden"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_through_argparse(argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "usage: lrcc-jax" in err


def test_library_errors_print_a_clean_message(run, npz, tmp_path):
  workdir, _ = run
  cases = [
      (["train", "--dataset", "nope", "--workdir", str(tmp_path / "x"), *TINY], "Unknown dataset 'nope'"),
      (["evaluate", "--workdir", str(tmp_path / "missing")], "does not exist"),
      (["evaluate", "--workdir", str(workdir), "--ranks", "3,99"], "ranks[1] (hidden layer 2): rank=99"),
      (["evaluate", "--workdir", str(workdir), "--ranks", "3,2,1"], "has 3 entries but the model has 2"),
      (["evaluate", "--workdir", str(workdir), "--dataset", f"{npz}.nothere"], f"--dataset {npz}.nothere: no such file"),
  ]
  for argv, message in cases:
    status, out, err = _main(argv)
    assert status == 2 and out == ""
    assert err.startswith("lrcc-jax: error: ") and message in err, err


def test_demo_table_and_json(npz, tmp_path, monkeypatch):
  monkeypatch.setattr(
      cli, "demo_config",
      lambda **kw: TrainConfig(dataset=npz, hidden_sizes=(16, 8), ranks=(4, 2), batch_size=16, **kw),
  )
  status, out, _ = _main(["demo", "--workdir", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"])
  assert status == 0
  rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
  assert [r["setting"] for r in rows] == [label for label, _ in cli.DEMO_SETTINGS]
  for row in rows:
    _check_result({k: v for k, v in row.items() if k != "setting"})
    assert f"{row['theoretical_speedup']:.2f}x" in out
  assert rows[1]["threshold"] != rows[0]["threshold"]
  assert out.splitlines()[1].startswith("setting")


def test_a_new_subcommand_is_one_entry(monkeypatch, capsys):
  seen = {}

  def add(parser):
    parser.add_argument("--size", type=int, default=1)

  def run_bench(args):
    seen["size"] = args.size
    return 0

  monkeypatch.setitem(cli.COMMANDS, "bench", cli.Command("benchmark", add, run_bench))
  assert cli.main(["bench", "--size", "4"]) == 0 and seen == {"size": 4}
