"""End-to-end tests of lrcc_jax.apps.train and lrcc_jax.apps.checkpoint on a tiny npz dataset."""

import json
import logging
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lrcc_jax
from helpers import write_quadrant_npz
from lrcc_jax.apps import checkpoint, train

N_CLASSES = 4


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> pathlib.Path:
  """320 learnable 8x8 images: a class-specific bright quadrant plus noise."""
  return write_quadrant_npz(tmp_path_factory.mktemp("data") / "tiny.npz", 80, seed=0)


@pytest.fixture(scope="module")
def config(npz_path) -> train.TrainConfig:
  return train.TrainConfig(
      dataset=f"npz:{npz_path}", hidden_sizes=(32, 16), batch_size=32, epochs=2,
      learning_rate=2e-2, l1=1e-3, dropout_rate=0.1, refit_every=3,
  )


def params_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def factors_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, lrcc_jax.nn.EstimatorFactor)))


@pytest.fixture(scope="module")
def reference_3_epochs(config, tmp_path_factory):
  """An uninterrupted 3-epoch run: (workdir, summary, model)."""
  workdir = tmp_path_factory.mktemp("ref3")
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 3})
  summary = train.train_and_evaluate(cfg, workdir, progress=False)
  model, _ = train.load_model(workdir)
  return workdir, summary, model


def read_epochs(workdir) -> list[int]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["epoch"] for line in lines]


def test_config_json_round_trip(config):
  d = json.loads(json.dumps(config.to_dict()))
  assert train.TrainConfig.from_dict(d) == config
  cfg = train.TrainConfig(hidden_sizes=(8, 4), ranks=(2, 1), l1=(1e-3, 2e-3))
  assert train.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="bogus"):
    train.TrainConfig.from_dict({"bogus": 1})
  with pytest.raises(ValueError, match="protocol"):
    train.TrainConfig(protocol="sometimes")


def test_loss_is_cross_entropy_plus_l1_by_hand(config):
  cfg = train.TrainConfig.from_dict(
      {**config.to_dict(), "dropout_rate": 0.0, "l1": [0.01, 0.03]}
  )
  model = train.create_model(cfg, 64, N_CLASSES)
  optimizer = nnx.Optimizer(model, train.make_optimizer(cfg, 8), wrt=nnx.Param)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, N_CLASSES, (16,)).astype(np.int32)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params_of(model))
  h = images.reshape(16, -1).astype(np.float64) / 255.0
  l1_term = 0.0
  for i, lam in enumerate(cfg.l1_per_layer):
    h = np.maximum(h @ p["layers"][i]["kernel"] + p["layers"][i]["bias"], 0.0)
    l1_term += lam * np.abs(h).sum(-1).mean()
  logits = h @ p["head"]["kernel"] + p["head"]["bias"]
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  ce = -log_probs[np.arange(16), labels].mean()
  assert l1_term > 0.05 * ce  # the penalty matters in this comparison

  model.train()
  graphdef, state = nnx.split((model, optimizer))
  state = jax.tree.map(jnp.copy, state)  # train_step donates its state; the model stays readable
  _, metrics = train.train_step(graphdef, state, images, labels, l1=cfg.l1_per_layer)
  np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), ce + l1_term, rtol=1e-5)
  model.eval()
  loss, aux = train.compute_loss(model, images, labels, cfg.l1_per_layer)
  np.testing.assert_allclose(float(loss), ce + l1_term, rtol=1e-5)
  np.testing.assert_allclose(float(aux["l1"]), l1_term, rtol=1e-5)


def test_optimizer_never_trains_estimator_factors(config):
  model = train.create_model(config, 64, N_CLASSES)
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, 8), wrt=nnx.Param)
  before_f, before_p = factors_of(model), params_of(model)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  images = np.full((32, 8, 8, 1), 200, np.uint8)
  labels = np.zeros((32,), np.int32)
  for _ in range(3):
    state, _ = train.train_step(graphdef, state, images, labels, l1=config.l1_per_layer)
  nnx.update((model, optimizer), state)
  chex.assert_trees_all_equal(factors_of(model), before_f)
  assert not np.allclose(params_of(model)["layers"][0]["kernel"], before_p["layers"][0]["kernel"])


def test_same_seed_gives_identical_params(config, tmp_path):
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 1})
  s1 = train.train_and_evaluate(cfg, tmp_path / "a", progress=False)
  s2 = train.train_and_evaluate(cfg, tmp_path / "b", progress=False)
  m1, _ = train.load_model(tmp_path / "a")
  m2, _ = train.load_model(tmp_path / "b")
  chex.assert_trees_all_equal(params_of(m1), params_of(m2))
  assert s1["train_loss"] == s2["train_loss"]
  m3, _ = train.load_model(tmp_path / "a")
  fresh = train.create_model(cfg, 64, N_CLASSES)
  assert not np.allclose(params_of(m3)["head"]["kernel"], params_of(fresh)["head"]["kernel"])


def test_training_learns_and_writes_run_files(reference_3_epochs):
  workdir, summary, _ = reference_3_epochs
  assert summary["epoch"] == 3 and summary["step"] == 3 * 8
  assert summary["test_error_dense"] < 0.1
  assert len(summary["density"]) == 2 and all(0 < d <= 1 for d in summary["density"])
  assert read_epochs(workdir) == [1, 2, 3]
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  for key in ("epoch", "step", "train_loss", "train_acc", "test_error_dense", "density", "seconds"):
    assert key in record
  assert json.loads((workdir / "config.json").read_text())["hidden_sizes"] == [32, 16]


def test_load_model_restores_trained_params(reference_3_epochs, config):
  workdir, summary, model = reference_3_epochs
  ds = lrcc_jax.apps.data.load_dataset(config.dataset, seed=config.seed)
  result = train.evaluate_split(model, ds.test_images, ds.test_labels)
  assert result["error"] == summary["test_error_dense"]
  np.testing.assert_allclose(result["density"], summary["density"], rtol=1e-6)
  assert model.dropout.deterministic  # returned in evaluation mode
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(nnx.state(model)))
  with pytest.raises(FileNotFoundError, match="train"):
    train.load_model(workdir / "nothing_here")


def test_resume_matches_uninterrupted_run(reference_3_epochs, config, tmp_path):
  _, ref_summary, ref_model = reference_3_epochs
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 3})
  first = train.train_and_evaluate(cfg, tmp_path, progress=False, stop_after_epochs=1)
  assert first["epoch"] == 1 and read_epochs(tmp_path) == [1]
  # A metrics line from an epoch whose checkpoint never landed must not survive.
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"epoch": 2, "step": 16, "stale": True}) + "\n")
  summary = train.train_and_evaluate(cfg, tmp_path, progress=False)
  assert read_epochs(tmp_path) == [1, 2, 3]
  model, _ = train.load_model(tmp_path)
  chex.assert_trees_all_equal(params_of(model), params_of(ref_model))
  assert summary["train_loss"] == ref_summary["train_loss"]
  # Resuming a finished run trains nothing and keeps the metrics.
  again = train.train_and_evaluate(cfg, tmp_path, progress=False)
  assert again["epoch"] == 3 and read_epochs(tmp_path) == [1, 2, 3]


def _damage(step_dir: pathlib.Path, how: str) -> None:
  files = sorted(p for p in step_dir.rglob("*") if p.is_file())
  assert files
  for p in files:
    if how == "garble":
      data = bytearray(p.read_bytes())
      for i in range(0, len(data), 7):
        data[i] ^= 0x5A
      p.write_bytes(bytes(data))
    elif how == "delete" and (p.parent.name == "d" or p.name.startswith("manifest")):
      p.unlink()


@pytest.mark.parametrize("how", ["garble", "delete"])
def test_damaged_latest_checkpoint_is_skipped(reference_3_epochs, config, tmp_path, how, caplog):
  _, _, ref_model = reference_3_epochs
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 3})
  train.train_and_evaluate(cfg, tmp_path, progress=False, stop_after_epochs=2)
  ckpt_dir = tmp_path / "checkpoints"
  _damage(ckpt_dir / "2", how)
  # An unfinished orbax write is not a step and is never read.
  (ckpt_dir / "5.orbax-checkpoint-tmp-1234").mkdir()
  with caplog.at_level(logging.WARNING, logger="lrcc_jax.apps.checkpoint"):
    summary = train.train_and_evaluate(cfg, tmp_path, progress=False)
  assert "Skipping damaged checkpoint step 2" in caplog.text
  assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
  assert summary["epoch"] == 3 and read_epochs(tmp_path) == [1, 2, 3]
  model, _ = train.load_model(tmp_path)
  # Epoch 2 was retrained from checkpoint 1, so the run matches an uninterrupted one.
  chex.assert_trees_all_equal(params_of(model), params_of(ref_model))


def test_no_usable_checkpoint_starts_from_scratch(config, tmp_path, caplog):
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 1})
  ref = train.train_and_evaluate(cfg, tmp_path / "ref", progress=False)
  train.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  _damage(tmp_path / "run" / "checkpoints" / "1", "garble")
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    train.load_model(tmp_path / "run")
  with caplog.at_level(logging.WARNING, logger="lrcc_jax.apps.checkpoint"):
    summary = train.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  assert summary["train_loss"] == ref["train_loss"]
  assert read_epochs(tmp_path / "run") == [1]


def test_config_mismatch_on_resume_raises(config, tmp_path):
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 1})
  train.train_and_evaluate(cfg, tmp_path, progress=False)
  other = train.TrainConfig.from_dict({**cfg.to_dict(), "hidden_sizes": [16, 16], "seed": 3})
  with pytest.raises(ValueError, match=r"hidden_sizes.*seed"):
    train.train_and_evaluate(other, tmp_path, progress=False)
  # More epochs is a legitimate resume.
  longer = train.TrainConfig.from_dict({**cfg.to_dict(), "epochs": 2})
  assert train.train_and_evaluate(longer, tmp_path, progress=False)["epoch"] == 2


def test_in_loop_protocol_refits_factors(config, tmp_path, monkeypatch):
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "protocol": "in_loop", "epochs": 1})
  calls = []
  real_refit, real_subspace = train.refit_step, train.subspace_refit_step
  monkeypatch.setattr(train, "refit_step", lambda g, s: calls.append("svd") or real_refit(g, s))
  monkeypatch.setattr(
      train, "subspace_refit_step", lambda g, s: calls.append("sub") or real_subspace(g, s)
  )
  summary = train.train_and_evaluate(cfg, tmp_path, progress=False)
  # In-loop refits at steps 0, 3 and 6 of the 8-step epoch, then the exact epoch-end fit.
  assert calls == ["sub", "sub", "sub", "svd"]
  assert np.isfinite(summary["test_error_conditional"])
  model, _ = train.load_model(tmp_path)
  for layer in model.layers:
    est = lrcc_jax.fit_svd(layer.kernel[...], layer.rank)
    np.testing.assert_allclose(layer.u[...] @ layer.v[...], est.u @ est.v, atol=1e-5)

  # Factors go stale while training in mask mode, and a refit makes them current again.
  optimizer = nnx.Optimizer(model, train.make_optimizer(cfg, 8), wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(32, dtype=np.int32) % N_CLASSES
  for _ in range(3):
    state, _ = train.train_step(graphdef, state, images, labels, l1=cfg.l1_per_layer, mode="mask")
  nnx.update((model, optimizer), state)
  layer = model.layers[0]
  stale = lrcc_jax.fit_svd(layer.kernel[...], layer.rank)
  assert not np.allclose(layer.u[...] @ layer.v[...], stale.u @ stale.v, atol=1e-6)
  nnx.update((model, optimizer), real_refit(graphdef, state))
  np.testing.assert_allclose(layer.u[...] @ layer.v[...], stale.u @ stale.v, atol=1e-5)


def test_data_parallel_matches_single_device(config, tmp_path):
  assert jax.device_count() == 8
  mesh8 = train.make_data_mesh(config.batch_size, 8)
  mesh1 = train.make_data_mesh(config.batch_size, 1)
  assert mesh8.devices.size == 8 and mesh1.devices.size == 1
  cfg = train.TrainConfig.from_dict({**config.to_dict(), "epochs": 1})
  s8 = train.train_and_evaluate(cfg, tmp_path / "d8", progress=False, mesh=mesh8)
  s1 = train.train_and_evaluate(cfg, tmp_path / "d1", progress=False, mesh=mesh1)
  m8, _ = train.load_model(tmp_path / "d8")
  m1, _ = train.load_model(tmp_path / "d1")
  chex.assert_trees_all_close(params_of(m8), params_of(m1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s8["train_loss"], s1["train_loss"], rtol=1e-5)

  # The batch is split over the 8 devices; the updated state stays replicated.
  model = train.create_model(cfg, 64, N_CLASSES)
  optimizer = nnx.Optimizer(model, train.make_optimizer(cfg, 8), wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  state = train._replicate(mesh8, state)
  images = train._shard_batch(mesh8, np.zeros((32, 8, 8, 1), np.uint8))
  assert len(images.addressable_shards) == 8
  assert images.addressable_shards[0].data.shape == (4, 8, 8, 1)
  labels = train._shard_batch(mesh8, np.zeros((32,), np.int32))
  state, _ = train.train_step(graphdef, state, images, labels, l1=cfg.l1_per_layer)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))


def test_batch_size_must_divide_over_devices(config, tmp_path):
  with pytest.raises(ValueError, match="divisible"):
    train.make_data_mesh(30, 8)
  assert train.make_data_mesh(30).devices.size == 6  # the largest count that divides
  mesh3 = jax.make_mesh(
      (3,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:3]
  )
  with pytest.raises(ValueError, match="divisible"):
    train.train_and_evaluate(config, tmp_path, progress=False, mesh=mesh3)


def test_checkpointer_round_trip_with_prng_keys(tmp_path):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(3), "n": jnp.uint32(7)}
  ckpt = checkpoint.Checkpointer(tmp_path / "ck", max_to_keep=2)
  ckpt.save(1, tree, {"epoch": 1})
  ckpt.wait_until_finished()
  restored, meta = ckpt.restore_latest(tree)
  ckpt.close()
  assert meta == {"epoch": 1}
  np.testing.assert_array_equal(restored["w"], tree["w"])
  np.testing.assert_array_equal(
      jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"])
  )


def test_train_step_donates_its_state(config):
  model = train.create_model(config, 64, N_CLASSES)
  optimizer = nnx.Optimizer(model, train.make_optimizer(config, 8), wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  state = jax.tree.map(jnp.copy, state)
  old = jax.tree.leaves(state)
  images = np.full((32, 8, 8, 1), 200, np.uint8)
  new, _ = train.train_step(graphdef, state, images, np.zeros((32,), np.int32), l1=config.l1_per_layer)
  assert sum(leaf.is_deleted() for leaf in old) >= len(old) // 2
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new))
