"""Multi-process training on one machine: 2 processes x 2 CPU devices vs 1 process x 4.

The two processes are real ``lrcc-jax train`` runs joined by ``jax.distributed`` over
127.0.0.1 (Gloo CPU collectives). A data-parallel step over the same 4-device mesh sees the
same global batch whichever process owns a device, so the parameters must agree with a
single-process run up to the order of the gradient all-reduce's additions.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import lrcc_jax
from helpers import write_quadrant_npz
from lrcc_jax.apps import cli, distributed, train

N_CLASSES = 4
DEVICES_PER_PROCESS = 2
# Bounds every two-process launch; a healthy one takes seconds (plus a loaded machine's
# imports and compiles).
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> pathlib.Path:
  """256 learnable 8x8 images: a class-specific bright quadrant plus noise."""
  return write_quadrant_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 64, seed=1)


@pytest.fixture(scope="module")
def config(npz_path) -> train.TrainConfig:
  # in_loop: the step runs in mask mode and subspace_refit runs every 3 steps, besides
  # the epoch-end SVD, so both refits run on the replicated state of two processes.
  return train.TrainConfig(
      dataset=f"npz:{npz_path}", hidden_sizes=(32, 16), batch_size=32, epochs=2,
      learning_rate=2e-2, l1=1e-3, dropout_rate=0.1, protocol="in_loop", refit_every=3,
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _subprocess_env(devices: int) -> dict[str, str]:
  """This environment with `devices` CPU devices, importing this checkout's lrcc_jax."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  root = str(pathlib.Path(lrcc_jax.__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
  return env


def _train_argv(config: train.TrainConfig, workdir: pathlib.Path) -> list[str]:
  return [
      "train", "--dataset", config.dataset, "--workdir", str(workdir),
      "--hidden", ",".join(map(str, config.hidden_sizes)), "--batch-size", str(config.batch_size),
      "--epochs", str(config.epochs), "--lr", str(config.learning_rate), "--l1", str(config.l1),
      "--dropout", str(config.dropout_rate), "--protocol", config.protocol,
      "--refit-every", str(config.refit_every), "--no-progress",
  ]


def launch_two_processes(
    config: train.TrainConfig,
    workdir: pathlib.Path,
    cache: pathlib.Path,
    meanwhile: Callable[[], Any] = lambda: None,
) -> tuple[list[dict], Any]:
  """Runs ``lrcc-jax train`` as processes 0 and 1, and `meanwhile()` here.

  Both are killed when either fails, `meanwhile` raises or the time runs out. `cache` is
  a persistent compilation cache shared by the launches: most of a launch is compiling
  (many small eager programs during initialisation), so a second launch takes about
  half as long.

  Returns:
    Each process's JSON summary, and what `meanwhile` returned.
  """
  env = _subprocess_env(DEVICES_PER_PROCESS)
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [workdir.parent / f"{workdir.name}.process{i}.log" for i in range(2)]
  procs = []
  try:
    for i in range(2):
      argv = [
          sys.executable, "-m", "lrcc_jax.apps.cli", *_train_argv(config, workdir),
          "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
      ]
      with logs[i].open("w") as err:
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    extra = meanwhile()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    outs = [p.communicate()[0] for p in procs]
  status = [p.returncode for p in procs]
  assert status == [0, 0], f"exit status {status}; stderr tails:\n" + "\n".join(
      f"--- process {i}\n" + "\n".join(log.read_text().splitlines()[-15:])
      for i, log in enumerate(logs)
  )
  return [json.loads(out) for out in outs], extra


def params_and_factors(model) -> dict:
  return jax.tree.map(
      np.asarray,
      nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, lrcc_jax.nn.EstimatorFactor))),
  )


def losses(workdir: pathlib.Path) -> list[float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["train_loss"] for line in lines]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def runs(config, compilation_cache, tmp_path_factory):
  """The two-process run, and while it runs, the same config in this process over 4 of
  its (fake) CPU devices: ``((workdir, summaries), (workdir, summary))``."""
  two_dir = tmp_path_factory.mktemp("two") / "run"
  one_dir = tmp_path_factory.mktemp("one") / "run"
  mesh = train.make_data_mesh(config.batch_size, 2 * DEVICES_PER_PROCESS)
  summaries, one = launch_two_processes(
      config, two_dir, compilation_cache,
      meanwhile=lambda: train.train_and_evaluate(config, one_dir, progress=False, mesh=mesh),
  )
  return (two_dir, summaries), (one_dir, one)


@pytest.fixture(scope="module")
def two_process_run(runs) -> tuple[pathlib.Path, list[dict]]:
  return runs[0]


@pytest.fixture(scope="module")
def single_process_run(runs) -> tuple[pathlib.Path, dict]:
  return runs[1]


def test_two_processes_match_one_process_of_four_devices(two_process_run, single_process_run):
  two_dir, summaries = two_process_run
  one_dir, one = single_process_run
  # Every process computes the same global metrics; process 0 alone wrote the run files.
  without_time = [{k: v for k, v in s.items() if k != "seconds"} for s in summaries]
  assert without_time[0] == without_time[1]
  assert summaries[0]["epoch"] == 2 and summaries[0]["step"] == one["step"] > 0
  assert sorted(p.name for p in two_dir.iterdir() if p.is_file()) == [
      "config.json", "metrics.jsonl", "model.json"
  ]
  np.testing.assert_allclose(losses(two_dir), losses(one_dir), rtol=1e-5)
  assert summaries[0]["test_error_dense"] == one["test_error_dense"]
  two_model, _ = train.load_model(two_dir)
  one_model, _ = train.load_model(one_dir)
  chex.assert_trees_all_close(
      params_and_factors(two_model), params_and_factors(one_model), rtol=1e-5, atol=1e-5
  )


def test_two_process_checkpoint_evaluates_in_one_process(two_process_run, capsys):
  two_dir, summaries = two_process_run
  capsys.readouterr()
  assert cli.main(["evaluate", "--workdir", str(two_dir)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["test_error_dense"] == summaries[0]["test_error_dense"]


def test_resume_after_both_processes_die(config, two_process_run, compilation_cache, tmp_path):
  """Killed after writing step 2 but before sealing it: the restart redoes epoch 2."""
  two_dir, summaries = two_process_run
  workdir = tmp_path / "run"
  shutil.copytree(two_dir, workdir)
  (workdir / "checkpoints" / "2" / "lrcc_manifest.json").unlink()
  resumed, _ = launch_two_processes(config, workdir, compilation_cache)
  assert (workdir / "checkpoints_corrupt" / "2").is_dir()
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
  assert resumed[0]["train_loss"] == summaries[0]["train_loss"]
  model, _ = train.load_model(workdir)
  reference, _ = train.load_model(two_dir)
  chex.assert_trees_all_equal(params_and_factors(model), params_and_factors(reference))


# --------------------------------------------------------------------------- initialize


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
          "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, None),  # salloc shell, not srun
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
        ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ],
)
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def test_initialize_calls_jax_only_when_asked_or_detected(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  assert not distributed.initialize(environ={})  # a plain machine: single-process
  assert not distributed.initialize(num_processes=1, environ=slurm)  # explicit opt-out
  assert calls == []
  assert distributed.initialize(environ=slurm)
  assert distributed.initialize("10.0.0.1:1234", 4, 3, environ={})
  assert calls == [
      {"coordinator_address": None, "num_processes": None, "process_id": None},
      {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
  ]
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("10.0.0.1:1234", 2, 2, environ={})


_CHECK_SCRIPT = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from lrcc_jax.apps import checkpoint
checkpoint._check_same_in_all_processes(b"same", "equal values")
try:
  checkpoint._check_same_in_all_processes(bytes([int(sys.argv[2])]), "differing values")
except RuntimeError as err:
  print("raised:", err)
"""


def test_replica_check_fails_when_processes_differ(tmp_path):
  """The check behind every save: equal bytes pass, different bytes raise in both."""
  env = _subprocess_env(1)
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _CHECK_SCRIPT, coordinator, str(i)], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-2000:]
    assert f"raised: differing values (process {i})." in out, (out, err[-2000:])


def test_train_flags_reach_the_run_not_the_config():
  args = cli.build_parser().parse_args([
      "train", "--dataset", "mnist5k", "--workdir", "w", "--stop-after", "1",
      "--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1",
  ])
  assert (args.stop_after, args.coordinator, args.num_processes, args.process_id) == (
      1, "10.0.0.1:1234", 2, 1
  )
  assert cli._train_config(args) == train.TrainConfig(dataset="mnist5k")
