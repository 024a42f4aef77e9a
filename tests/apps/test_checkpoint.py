"""Integrity checks of lrcc_jax.apps.checkpoint, each damage caught by its own check.

Every test damages only one thing, so a check that is switched off lets the damaged step
through (or fails differently) and the test names which check that was.
"""

import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from lrcc_jax.apps import checkpoint

LOGGER = "lrcc_jax.apps.checkpoint"


def _two_steps(directory):
  """Steps 1 and 2 of one tree structure with different values; returns the trees."""
  trees = {
      s: {"w": jnp.arange(24.0).reshape(4, 6) * s, "b": jnp.full((6,), float(s), jnp.float32)}
      for s in (1, 2)
  }
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  for s, tree in trees.items():
    ckpt.save(s, tree, {"epoch": s})
  ckpt.close()
  return trees


def _restore(directory, like, caplog):
  ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    got = ckpt.restore_latest(like)
  ckpt.close()
  return got


def _array_files(step_dir):
  """The OCDBT data files of the `state` item (the arrays' bytes), largest first."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, sorted(step_dir.rglob("*"))
  return sorted(files, key=lambda p: -p.stat().st_size)


def test_flipped_byte_in_an_array_file_is_caught_by_its_hash(tmp_path, caplog):
  """Guards the per-file hash: one byte of one array file changes, the manifest is intact."""
  directory = tmp_path / "ck"
  trees = _two_steps(directory)
  manifest = (directory / "2" / checkpoint.MANIFEST).read_text()
  victim = _array_files(directory / "2")[0]
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  assert (directory / "2" / checkpoint.MANIFEST).read_text() == manifest  # untouched

  with pytest.raises(ValueError, match="does not match its hash"):
    checkpoint.verify_manifest(directory / "2")
  tree, meta = _restore(directory, trees[1], caplog)
  rel = victim.relative_to(directory / "2")
  assert f"Skipping damaged checkpoint step 2 (ValueError: file {rel} does not match its hash)" in caplog.text
  assert meta == {"epoch": 1}
  np.testing.assert_array_equal(tree["w"], trees[1]["w"])
  assert (tmp_path / "ck_corrupt" / "2").is_dir()


def test_consistently_rewritten_manifest_over_other_data_is_caught_by_the_tree_digest(tmp_path, caplog):
  """Guards the tree digest: step 2's arrays are replaced by valid arrays of the same
  structure (step 1's), and its manifest is rewritten to match them, so every file hash
  checks out and orbax decodes the arrays; only the digest saved with step 2 disagrees.
  """
  directory = tmp_path / "ck"
  trees = _two_steps(directory)
  step2 = directory / "2"
  shutil.rmtree(step2 / "state")
  shutil.copytree(directory / "1" / "state", step2 / "state")
  checkpoint.write_manifest(step2)
  checkpoint.verify_manifest(step2)  # the file hashes are consistent: no complaint here
  files = json.loads((step2 / checkpoint.MANIFEST).read_text())["files"]
  assert any(k.startswith("state/") for k in files)

  tree, meta = _restore(directory, trees[1], caplog)
  assert (
      "Skipping damaged checkpoint step 2 (ValueError: the arrays do not match the digest"
      " written with them)" in caplog.text
  )
  assert meta == {"epoch": 1}
  np.testing.assert_array_equal(tree["b"], trees[1]["b"])
  assert (tmp_path / "ck_corrupt" / "2").is_dir()


def test_undamaged_steps_restore_without_warnings(tmp_path, caplog):
  """Guards against checks that reject good steps: the newest intact step comes back."""
  directory = tmp_path / "ck"
  trees = _two_steps(directory)
  tree, meta = _restore(directory, trees[2], caplog)
  assert meta == {"epoch": 2} and "Skipping" not in caplog.text
  np.testing.assert_array_equal(tree["w"], trees[2]["w"])
