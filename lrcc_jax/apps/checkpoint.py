"""Orbax checkpoints that are verified before they are trusted.

Orbax writes each step atomically (into a temporary directory that is renamed when the
write is complete) and asynchronously. That protects against a crash *during* a save, but
not against a step directory damaged afterwards: a truncated or garbled data file in the
OCDBT store can fail to decode, or, worse, decode into wrong numbers. Two checks guard
against that:

1. Once orbax has finished a step, a manifest (``lrcc_manifest.json`` inside the step)
   records the SHA-256 of every file orbax wrote. A step is *complete* only when its
   manifest exists and every listed file is present with that hash. This check runs
   before orbax opens anything, so orbax never reads a damaged step (its failing reads
   would otherwise race with its own event loop shutdown).
2. The metadata item holds a SHA-256 digest of the tree's leaves (paths, dtypes, shapes,
   bytes), compared with what orbax restores.

`Checkpointer.restore_latest` walks the steps from the newest down and uses the first one
that passes both. Damaged or incomplete steps are moved aside into ``<directory>_corrupt/``
(never deleted, never loaded) and reported with one log line, except with
``read_only=True`` (evaluation), which leaves every file where it is and only reports; orbax's own
unfinished
``*.orbax-checkpoint-tmp-*`` directories are not steps and are never considered.

Multi-process runs (``jax.distributed.initialize``): every process calls `save` and
`restore_latest` in the same order with the same replicated tree. Orbax writes replicated
arrays once (from process 0) and synchronises the processes around each step; process 0
alone writes the manifests and moves damaged steps aside. Each save first checks that the
tree's digest is the same in every process, so a replica that drifted (e.g. a refit that
came out differently on one host) stops the run instead of being checkpointed; each
restore checks that all processes chose the same step. The directory must be one shared
filesystem path seen by every process.

JAX typed PRNG keys (e.g. the dropout stream of an NNX module) are stored as their raw
``key_data`` and re-wrapped on restore, because orbax stores plain arrays only.

Example::

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
  ckpt.save(epoch, tree, {"epoch": epoch, "step": step})
  restored = ckpt.restore_latest(abstract_tree)  # None when no usable step exists
  if restored is not None:
    tree, meta = restored
  ckpt.close()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any
logger = logging.getLogger(__name__)

_DIGEST_KEY = "tree_sha256"
MANIFEST = "lrcc_manifest.json"


def _file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: pathlib.Path) -> None:
  """Records the SHA-256 of every file of a finished step (atomically)."""
  files = {str(p.relative_to(step_dir)): _file_sha256(p) for p in _step_files(step_dir)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
  os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: pathlib.Path) -> None:
  """Raises ValueError unless `step_dir` matches its manifest file for file."""
  path = step_dir / MANIFEST
  if not path.is_file():
    raise ValueError(f"no {MANIFEST}: the step was never finished")
  try:
    files = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"unreadable {MANIFEST}: {err}") from err
  if not files:
    raise ValueError(f"{MANIFEST} lists no files")
  for rel, digest in files.items():
    f = step_dir / rel
    if not f.is_file():
      raise ValueError(f"missing file {rel}")
    if _file_sha256(f) != digest:
      raise ValueError(f"file {rel} does not match its hash")


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_value(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Multi-host: a replicated array holds the whole value in every local shard.
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def to_host(tree: PyTree) -> PyTree:
  """Copies a tree of replicated or local arrays to host numpy arrays.

  Typed PRNG keys become their uint32 key data.
  """
  tree = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
  return jax.tree.map(_host_value, tree)


def from_host(tree: PyTree, like: PyTree) -> PyTree:
  """Inverse of `to_host`: re-wraps key data wherever `like` holds a typed PRNG key."""

  def leaf(x, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
    return x

  return jax.tree.map(leaf, tree, like)


def _check_same_in_all_processes(value: bytes, message: str) -> None:
  """Raises RuntimeError unless every process passes the same `value` (multi-process).

  A collective over all processes, so every process must call it at the same point.
  """
  if jax.process_count() == 1:
    return
  try:
    multihost_utils.assert_equal(np.frombuffer(value, np.uint8), message)
  except AssertionError as err:
    raise RuntimeError(f"{message} (process {jax.process_index()}).") from err


def tree_digest(tree: PyTree) -> str:
  """SHA-256 of a host tree: every leaf's path, dtype, shape and bytes, in tree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


class Checkpointer:
  """A `ocp.CheckpointManager` whose restores skip incomplete or damaged steps.

  Each step holds two items: ``state`` (`ocp.args.StandardSave` of a host array tree)
  and ``meta`` (`ocp.args.JsonSave` of the caller's metadata plus the tree digest).

  Args:
    directory: where the step directories live; created if missing.
    max_to_keep: steps kept on disk. Keep at least 2 so that a damaged newest step
      still leaves one to fall back to.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._max_to_keep = max_to_keep
    self._unsealed: list[int] = []
    self._mgr = self._open()
    self.restored_step: int | None = None
    """The step the last `restore_latest` used (None: none was usable)."""
    self.damaged_steps: list[tuple[int, str]] = []
    """(step, reason) of every step the last `restore_latest` skipped, newest first."""

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, tree: PyTree, meta: dict) -> None:
    """Starts an asynchronous save of `tree` (any arrays) and JSON-able `meta` at `step`.

    The step becomes complete (restorable) when it is sealed with its manifest: at the
    next `save`, `wait_until_finished` or `close`. A previous save has had a whole epoch
    to finish by then, so waiting for it costs nothing in practice.
    """
    self._seal()
    host = to_host(tree)
    digest = tree_digest(host)
    _check_same_in_all_processes(
      bytes.fromhex(digest), f"step {step}: the replicated state differs between processes"
    )
    meta = {**meta, _DIGEST_KEY: digest}
    self._mgr.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)),
    )
    self._unsealed.append(step)

  def _seal(self) -> None:
    """Waits for orbax, then writes the manifests of the steps saved since the last seal."""
    self._mgr.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unsealed:
        step_dir = self.directory / str(step)
        if step_dir.is_dir():  # max_to_keep may already have removed it
          write_manifest(step_dir)
    self._unsealed = []

  def _restore(self, step: int, abstract_host: PyTree) -> tuple[PyTree, dict]:
    verify_manifest(self.directory / str(step))
    restored = self._mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_host), meta=ocp.args.JsonRestore()
      ),
    )
    tree, meta = restored["state"], dict(restored["meta"])
    tree = jax.tree.map(np.asarray, tree)
    if jax.tree.structure(tree) != jax.tree.structure(abstract_host):  # type: ignore[operator]
      raise ValueError("the restored tree does not have the expected structure")
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract_host)):
      if got.shape != want.shape or got.dtype != want.dtype:
        raise ValueError(f"leaf {got.shape} {got.dtype} != expected {want.shape} {want.dtype}")
    digest = meta.pop(_DIGEST_KEY, None)
    if digest is None or digest != tree_digest(tree):
      raise ValueError("the arrays do not match the digest written with them")
    return tree, meta

  def _quarantine(self, step: int) -> pathlib.Path:
    """Moves a damaged step out of the manager's directory; returns where it went."""
    dest_root = self.directory.with_name(self.directory.name + "_corrupt")
    dest_root.mkdir(parents=True, exist_ok=True)
    dest, i = dest_root / str(step), 0
    while dest.exists():
      i += 1
      dest = dest_root / f"{step}.{i}"
    shutil.move(str(self.directory / str(step)), str(dest))
    return dest

  def restore_latest(self, like: PyTree, *, read_only: bool = False) -> tuple[PyTree, dict] | None:
    """Restores the newest complete, undamaged step.

    Args:
      like: a tree of arrays with the structure, shapes and dtypes to restore, e.g.
        the freshly initialised state (typed PRNG keys allowed; their implementation
        is taken from these concrete keys).
      read_only: leave damaged steps where they are (and write nothing); for readers
        such as evaluation, which must not change a training run's directory.

    Returns:
      ``(tree, meta)`` with host numpy arrays (PRNG keys re-wrapped) and the saved
      metadata, or None when no step is usable. Damaged steps are moved to
      ``<directory>_corrupt/`` with a log line, so later saves can reuse their numbers
      (unless `read_only`). `restored_step` and `damaged_steps` say what happened.
    """
    self._seal()
    abstract_host = jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype),
      jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, like),
    )
    result = None
    self.restored_step, self.damaged_steps = None, []
    for step in reversed(self.all_steps()):
      try:
        tree, meta = self._restore(step, abstract_host)
      except Exception as err:  # orbax/tensorstore raise many types on damaged files.
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        self.damaged_steps.append((step, reason))
        continue
      result = (from_host(tree, like), meta)
      self.restored_step = step
      break
    # Also a barrier: no step is moved while another process may still be reading it.
    chosen = -1 if self.restored_step is None else self.restored_step
    _check_same_in_all_processes(
      np.int64(chosen).tobytes(), "the processes found different usable checkpoint steps"
    )
    for step, reason in self.damaged_steps:
      if read_only:
        logger.warning("Skipping damaged checkpoint step %d (%s); left in place.", step, reason)
      elif jax.process_index() == 0:
        dest = self._quarantine(step)
        logger.warning(
          "Skipping damaged checkpoint step %d (%s); moved it to %s.", step, reason, dest
        )
      else:
        logger.warning(
          "Skipping damaged checkpoint step %d (%s); process 0 moves it aside.", step, reason
        )
    if self.damaged_steps and not read_only:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lrcc_checkpoint_quarantine")
      self._mgr.close()
      self._mgr = self._open()
    return result

  def wait_until_finished(self) -> None:
    """Blocks until every save has been written and sealed."""
    self._seal()

  def close(self) -> None:
    self._seal()
    self._mgr.close()
