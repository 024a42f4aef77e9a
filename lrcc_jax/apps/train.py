"""Training a `ConditionalMLP` with the L1 activation penalty, data-parallel, resumable.

The objective of Davis & Arel (2013) for a classifier with hidden activations
`a_1 … a_L` (after the ReLU, before dropout) on a batch of `B` examples:

.. math::

  \\mathcal{L} = \\frac{1}{B} \\sum_{i=1}^{B} \\mathrm{CE}(f(x_i), y_i)
      + \\sum_{l=1}^{L} \\lambda_l \\, \\frac{1}{B} \\sum_{i=1}^{B} \\lVert a_l(x_i) \\rVert_1

Two protocols:

- ``"dense"`` (the paper's (a)): train the ordinary network, then fit the low-rank
  estimators from the trained kernels (here at the end of every epoch, so each
  checkpoint holds factors that match its kernels).
- ``"in_loop"`` (b): the forward pass runs in ``"mask"`` mode, so the network trains
  with the estimator's mask in the loop (gradients flow through the computed units
  only). The factors are refitted by truncated SVD every ``refit_every`` steps, outside
  the jitted step, so the SVD's cost is amortised over ``refit_every`` steps.

Layout follows Flax's ``examples/mnist``: a module-level jitted `train_step` and
`eval_step`, and `train_and_evaluate(config, workdir)` which writes ``config.json``,
``metrics.jsonl`` (one line per epoch) and Orbax checkpoints (`lrcc_jax.apps.checkpoint`), and
resumes from the last complete checkpoint.

Data parallelism: a 1-D mesh ``("data",)`` over the devices, the batch sharded along it
and the state replicated. `jax.jit` propagates the shardings and XLA inserts the gradient
all-reduce itself. Multi-process (one process per host, `lrcc_jax.apps.distributed`,
``docs/multihost.md``): after ``jax.distributed.initialize()`` in every process,
`jax.devices()` lists the devices of all processes and the same code builds one global
mesh over all of them. Every process draws the same seeded batch order and gathers only
the rows of each global batch that its own devices hold (`_shard_rows`), so a step sees
the global batch of a single-process run over the same number of devices. The state is
replicated: every process runs the refits (the SVDs) on its own copy, and each checkpoint
save checks that all copies agree. Process 0 alone writes ``config.json``,
``model.json``, ``metrics.jsonl`` and the checkpoint manifests; orbax writes the
checkpoints (see `lrcc_jax.apps.checkpoint`).

Example (the default config; see `TrainConfig` for the measured result)::

  from lrcc_jax.apps import train
  summary = train.train_and_evaluate(train.TrainConfig(), "/tmp/lrcc_mnist5k")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lrcc_jax import _checks, nn
from lrcc_jax._estimator import subspace_refit
from lrcc_jax.apps import data
from lrcc_jax.apps.checkpoint import Checkpointer

Array = jax.Array
logger = logging.getLogger(__name__)

PROTOCOLS = ("dense", "in_loop")
# Fields that may change between a run and its resumption; all others define the model
# or its training trajectory and must match the stored config.json.
RESUMABLE_FIELDS = frozenset({"epochs", "data_dir"})
_EVAL_BATCH = 500


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run; stored as ``workdir/config.json``.

  Default result (mnist5k: 4,000 train / 1,000 test real digits; jax 0.10.2, 1 CPU
  device, 2 shared cores)::

    python -c "from lrcc_jax.apps import train; \
      print(train.train_and_evaluate(train.TrainConfig(), '/tmp/lrcc'))"

  reaches a dense test error of 3.3% (4.3% in mask mode at the default ranks, threshold
  0) with hidden-layer densities of 10.6%, 27.0% and 35.3%, in 12 epochs (744 steps,
  about 60 s of CPU time).

  Attributes:
    dataset: a `lrcc_jax.apps.data.load_dataset` name (``mnist5k``, ``mnist``, ``npz:PATH``…).
    data_dir: TFDS data directory, for the TFDS datasets.
    hidden_sizes: widths of the hidden ReLU layers.
    ranks: estimator rank per hidden layer; None uses `nn.default_rank`.
    dropout_rate: dropout after every hidden layer, during training.
    l1: the L1 activation penalty λ, one value or one per hidden layer.
    learning_rate: peak learning rate of Adam's warmup-cosine schedule.
    batch_size: global batch size (divided over the devices).
    epochs: epochs to train.
    seed: seeds the data split, the initialisation, dropout and the batch order.
    protocol: ``"dense"`` or ``"in_loop"`` (see the module docstring).
    refit_every: steps between estimator refits under ``"in_loop"``.
    threshold: estimator threshold of every layer (mask mode, evaluation).
  """

  dataset: str = "mnist5k"
  data_dir: str | None = None
  hidden_sizes: tuple[int, ...] = (1000, 600, 400)
  ranks: tuple[int, ...] | None = None
  dropout_rate: float = 0.2
  l1: float | tuple[float, ...] = 7e-4
  learning_rate: float = 1e-3
  batch_size: int = 64
  epochs: int = 12
  seed: int = 0
  protocol: str = "dense"
  refit_every: int = 100
  threshold: float = 0.0

  def __post_init__(self):
    # Normalise lists (e.g. from JSON or a CLI) to tuples, so configs compare and hash.
    for name in ("hidden_sizes", "ranks", "l1"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol={self.protocol!r} must be one of {PROTOCOLS}.")
    if self.batch_size < 1 or self.epochs < 0 or self.refit_every < 1:
      raise ValueError(
        f"batch_size={self.batch_size} and refit_every={self.refit_every} must be >= 1 "
        f"and epochs={self.epochs} >= 0."
      )
    n = len(self.hidden_sizes)
    for name in ("ranks", "l1"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != n:
        raise ValueError(f"{name}={value} needs one entry per hidden layer ({n}).")

  @property
  def l1_per_layer(self) -> tuple[float, ...]:
    """λ_l for every hidden layer."""
    return tuple(float(v) for v in _checks.per_layer(self.l1, len(self.hidden_sizes), "l1"))

  def to_dict(self) -> dict:
    """A JSON-able dict (tuples become lists); `from_dict` inverts it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    """Builds a config from `to_dict` output (lists become tuples); unknown keys raise."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown TrainConfig field(s) {unknown}; valid fields are {sorted(names)}.")
    return cls(**d)


def create_model(config: TrainConfig, num_features: int, num_classes: int) -> nn.ConditionalMLP:
  """The `ConditionalMLP` of `config`, initialised from ``nnx.Rngs(config.seed)``.

  The same Rngs seeds the dropout stream, whose state lives in the model (and in the
  checkpoints), so a resumed run draws the same dropout masks as an uninterrupted one.
  """
  return nn.ConditionalMLP(
    num_features,
    config.hidden_sizes,
    num_classes,
    ranks=config.ranks,
    thresholds=config.threshold,
    dropout_rate=config.dropout_rate,
    rngs=nnx.Rngs(config.seed),
  )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with a linear warmup (one epoch, at most 10% of training) and a cosine decay.

  The decay spans ``config.epochs * steps_per_epoch`` steps, down to 1% of the peak.
  Equal settings return the same transformation object: `nnx.Optimizer` keeps it in
  the static graph definition, so this lets the jitted steps hit their compile cache
  across runs (e.g. a resumed run in the same process).
  """
  return _adam_warmup_cosine(config.learning_rate, config.epochs, steps_per_epoch)


@functools.lru_cache(maxsize=32)
def _adam_warmup_cosine(
  learning_rate: float, epochs: int, steps_per_epoch: int
) -> optax.GradientTransformation:
  total = max(1, epochs * steps_per_epoch)
  warmup = max(1, min(steps_per_epoch, total // 10))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total, warmup + 1),
    end_value=0.01 * learning_rate,
  )
  return optax.adam(schedule)


def make_data_mesh(
  batch_size: int,
  num_devices: int | None = None,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A 1-D ``("data",)`` mesh for data parallelism.

  Args:
    batch_size: global batch size; it must be divisible by the mesh size.
    num_devices: devices to use. None picks the largest count, at most the number of
      devices, that divides `batch_size` (all of them when it divides); in a
      multi-process run it is all of them, since every process must own part of the
      mesh.
    devices: devices to draw from; defaults to `jax.devices()` (all hosts' devices
      under ``jax.distributed.initialize()``).

  Raises:
    ValueError: if `num_devices` does not divide `batch_size` or exceeds the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None and jax.process_count() > 1:
    num_devices = len(devices)
  if num_devices is None:
    num_devices = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
      f"num_devices={num_devices} must be in [1, {len(devices)}] (the devices available)."
    )
  check_batch_divisible(batch_size, num_devices)
  return jax.make_mesh(
    (num_devices,),
    ("data",),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:num_devices],
  )


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
  if batch_size % num_devices:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the {num_devices} devices of the data "
      f"mesh; pick a batch size that is a multiple of {num_devices} or use fewer devices."
    )


def _shard_batch(mesh: jax.sharding.Mesh, x: np.ndarray) -> Array:
  """Places a global batch with its leading axis split over the ``"data"`` axis.

  Multi-process: every process holds the same global batch `x` and places the slices
  of its own devices (`_shard_rows`).
  """
  if jax.process_count() == 1:
    return jax.device_put(x, NamedSharding(mesh, P("data")))
  return _shard_rows(mesh, x, np.arange(len(x)))


def _shard_rows(mesh: jax.sharding.Mesh, source: np.ndarray, rows: np.ndarray) -> Array:
  """The global batch ``source[rows]``, split over ``"data"``; only local rows are read.

  Device ``d`` of the mesh holds global rows ``[d·B/D, (d+1)·B/D)``, whichever process
  owns it, so the global batch (and with it the result of a step) is the one a
  single-process run over the same number of devices sees. Each process gathers from
  `source` only the rows of its addressable devices: with P processes, 1/P of a batch.
  """
  sharding = NamedSharding(mesh, P("data"))
  shape = (len(rows), *source.shape[1:])
  return jax.make_array_from_callback(shape, sharding, lambda index: source[rows[index[0]]])  # type: ignore[index]


def _sync_each_step(mesh: jax.sharding.Mesh) -> bool:
  """Whether to wait for each step before dispatching the next (XLA:CPU, >1 local device).

  XLA:CPU runs the devices of one process on a shared thread pool (as its stack traces
  show). With asynchronous dispatch, several queued steps run at once, and a device's
  step blocked in the gradient all-reduce holds a pool thread while it waits for a device
  that cannot get one: with more (fake) devices than cores the run deadlocks, and XLA
  aborts it after 40 s ("Termination timeout for all reduce"). Seen here with 4 CPU
  devices in one process on 2 cores, for the 784-1000-600-400 MLP of mnist5k.
  """
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return len(local) > 1 and all(d.platform == "cpu" for d in local)


def _replicate(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Copies a tree onto every device of `mesh`.

  Multi-process: every process holds the same host values (the same seeded
  initialisation, or the same checkpoint) and places them on its own devices;
  `jax.device_put` cannot, since the sharding spans other processes' devices.
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x: Any) -> Array:
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def compute_loss(
  model: nn.ConditionalMLP,
  images: Array,
  labels: Array,
  l1: Sequence[float],
  mode: nn.Mode = "dense",
) -> tuple[Array, dict[str, Any]]:
  """The training objective of one batch: CE + Σ_l λ_l · mean_batch ‖a_l‖₁.

  Args:
    model: the network; dropout applies when it is in training mode.
    images: uint8 (B, H, W, C) images; `data.normalize` scales them.
    labels: int (B,) labels.
    l1: λ_l per hidden layer.
    mode: the model's forward mode (``"dense"`` or ``"mask"``).

  Returns:
    ``(loss, aux)``: the scalar loss and a dict with ``ce``, ``l1`` (the weighted
    penalty), ``logits`` and ``activations`` (hidden, before dropout).
  """
  x = data.normalize(images)
  logits, acts = model(x, mode=mode, return_activations=True)
  if len(acts) != len(l1):
    raise ValueError(f"{len(l1)} L1 weights for {len(acts)} hidden layers.")
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  penalty = sum(lam * jnp.abs(a).sum(axis=-1).mean() for lam, a in zip(l1, acts))
  return ce + penalty, {"ce": ce, "l1": penalty, "logits": logits, "activations": acts}


@functools.partial(jax.jit, static_argnames=("graphdef", "l1", "mode"), donate_argnames=("state",))
def train_step(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  images: Array,
  labels: Array,
  *,
  l1: tuple[float, ...],
  mode: nn.Mode = "dense",
) -> tuple[nnx.State, dict[str, Array]]:
  """One optimizer step on the split ``(model, optimizer)`` state.

  Args:
    graphdef, state: ``nnx.split((model, optimizer))`` with the model in training mode.
    images, labels: a batch, sharded over the mesh's ``"data"`` axis (or local).
    l1: λ_l per hidden layer.
    mode: ``"dense"`` (protocol a) or ``"mask"`` (protocol b).

  Returns:
    The new state and the batch's ``loss``, ``ce``, ``accuracy`` and per-layer
    ``density`` (fraction of hidden units active, before dropout).

  The input `state` is donated: its buffers hold the new state, so a step needs no second
  copy of the parameters and optimizer moments. Do not read the arrays passed in (nor the
  module they were split from) after the call; `nnx.update` the module with the result.
  """
  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = nnx.value_and_grad(lambda m: compute_loss(m, images, labels, l1, mode), has_aux=True)
  (loss, aux), grads = grad_fn(model)
  optimizer.update(model, grads)
  metrics = {
    "loss": loss,
    "ce": aux["ce"],
    "accuracy": (aux["logits"].argmax(-1) == labels).mean(),
    "density": jnp.stack([(a > 0).mean() for a in aux["activations"]]),
  }
  return nnx.state((model, optimizer)), metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def eval_step(
  graphdef: nnx.GraphDef,
  model_state: nnx.State,
  images: Array,
  labels: Array,
  valid: Array,
  *,
  mode: nn.Mode = "dense",
) -> dict[str, Array]:
  """Sums over one (padded) evaluation batch: errors, examples, active units per layer.

  Args:
    graphdef, model_state: ``nnx.split(model)`` with the model in evaluation mode.
    images, labels: the batch.
    valid: bool (B,), False for padding rows.
    mode: the forward mode.
  """
  model = nnx.merge(graphdef, model_state)
  logits, acts = model(data.normalize(images), mode=mode, return_activations=True)
  w = valid.astype(jnp.float32)
  return {
    "errors": ((logits.argmax(-1) != labels) * w).sum(),
    "count": w.sum(),
    "active": jnp.stack([((a > 0).mean(-1) * w).sum() for a in acts]),
  }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def refit_step(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
  """Refits every layer's estimator factors by truncated SVD of its current kernel."""
  model, optimizer = nnx.merge(graphdef, state)
  model.refit()
  return nnx.state((model, optimizer))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def subspace_refit_step(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
  """The in-loop refit: `subspace_refit` of every layer's factors from its kernel."""
  model, optimizer = nnx.merge(graphdef, state)
  for layer in model.layers:
    layer.set_estimator(subspace_refit(layer.kernel[...], layer.estimator))
  return nnx.state((model, optimizer))


def evaluate_split(
  model: nn.ConditionalMLP,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mode: nn.Mode = "dense",
  mesh: jax.sharding.Mesh | None = None,
  batch_size: int = _EVAL_BATCH,
) -> dict[str, Any]:
  """Error rate and per-layer density of `model` (evaluation mode) on a whole split.

  Batches are padded to a fixed size (a multiple of the mesh size), so one compiled
  program serves them all. Returns ``{"error", "density"}``.
  """
  n_dev = 1 if mesh is None else mesh.devices.size
  batch_size = -(-min(batch_size, len(images)) // n_dev) * n_dev
  was_training = not model.dropout.deterministic
  model.eval()
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = _replicate(mesh, state)
  totals = None
  for x_np, y_np, valid_np in data.padded_batches(images, labels, batch_size):
    x, y, valid = (
      (x_np, y_np, valid_np)
      if mesh is None
      else tuple(_shard_batch(mesh, a) for a in (x_np, y_np, valid_np))
    )
    out = eval_step(graphdef, state, x, y, valid, mode=mode)
    if mesh is not None and _sync_each_step(mesh):
      jax.block_until_ready(out)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if was_training:
    model.train()
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {
    "error": float(totals["errors"]) / count,
    "density": [float(a) / count for a in totals["active"]],
  }


# --------------------------------------------------------------------------- run files


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _check_config(workdir: pathlib.Path, config: TrainConfig) -> None:
  path = workdir / "config.json"
  if not path.exists():
    return
  old = TrainConfig.from_dict(json.loads(path.read_text()))
  differing = [
    f.name
    for f in dataclasses.fields(TrainConfig)
    if f.name not in RESUMABLE_FIELDS and getattr(old, f.name) != getattr(config, f.name)
  ]
  if differing:
    details = ", ".join(
      f"{name}: stored {getattr(old, name)!r} != requested {getattr(config, name)!r}"
      for name in differing
    )
    raise ValueError(
      f"{path} was written by a different configuration ({details}). Use a new workdir, "
      f"or the stored values to resume; only {sorted(RESUMABLE_FIELDS)} may change."
    )


def _read_metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut short by a crash
      continue
  return records


def _truncate_metrics(path: pathlib.Path, last_epoch: int, *, write: bool = True) -> list[dict]:
  """Keeps one line per epoch up to `last_epoch` (the restored checkpoint's).

  With ``write=False`` (the non-primary processes) only returns the kept records.
  """
  kept = {}
  for r in _read_metrics(path):
    if isinstance(r.get("epoch"), int) and r["epoch"] <= last_epoch:
      kept[r["epoch"]] = r
  records = [kept[e] for e in sorted(kept)]
  if not write:
    return records
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, path)
  return records


def _abstract_state(config: TrainConfig, num_features: int, num_classes: int, steps_per_epoch: int):
  model = create_model(config, num_features, num_classes)
  optimizer = nnx.Optimizer(model, make_optimizer(config, steps_per_epoch), wrt=nnx.Param)
  model.train()
  return model, optimizer


# --------------------------------------------------------------------------- main loop


def train_and_evaluate(
  config: TrainConfig,
  workdir: str | os.PathLike,
  *,
  progress: bool = True,
  stop_after_epochs: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict:
  """Trains `config` in `workdir`, resuming from its last complete checkpoint.

  Writes ``workdir/config.json``, ``workdir/model.json`` (input and class counts),
  one ``workdir/metrics.jsonl`` line per epoch and an Orbax checkpoint per epoch in
  ``workdir/checkpoints`` (model params, estimator factors, dropout RNG state, optimizer
  state, epoch and step). Damaged checkpoints are skipped (see `lrcc_jax.apps.checkpoint`);
  when none is usable, training starts from scratch.

  Args:
    config: the run's configuration.
    workdir: run directory; created if missing.
    progress: report progress: a tqdm bar per epoch (loss, accuracy, mean activation
      density), drawn only when stderr is a terminal (never into a log file, where every
      redraw would be a line), and one line per epoch.
    stop_after_epochs: stop once this epoch number is complete, as if interrupted
      (for tests); the schedule still spans ``config.epochs``.
    mesh: a 1-D ``("data",)`` mesh; defaults to `make_data_mesh(config.batch_size)`.

  Returns:
    The last epoch's metrics: ``epoch``, ``step``, ``train_loss``, ``train_acc``,
    ``test_error_dense``, ``test_error_conditional`` (mask mode at the config's
    threshold), ``density`` (per hidden layer, dense mode, test split), ``seconds``.

  Raises:
    ValueError: if ``workdir/config.json`` disagrees with `config` in a field outside
      `RESUMABLE_FIELDS`, or the batch size does not divide over the mesh.
  """
  workdir = pathlib.Path(workdir)
  _check_config(workdir, config)
  if mesh is None:
    mesh = make_data_mesh(config.batch_size)
  check_batch_divisible(config.batch_size, mesh.devices.size)

  ds = data.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  steps_per_epoch = data.num_batches(len(ds.train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(
      f"batch_size={config.batch_size} exceeds the {len(ds.train_images)} training examples."
    )
  # Multi-process: every process runs this function; process 0 alone writes the run
  # files (and the checkpoint manifests), the others only read them when resuming.
  primary = jax.process_index() == 0
  progress = progress and primary
  # Created only now: a run that fails on its arguments or its data leaves no empty workdir.
  workdir.mkdir(parents=True, exist_ok=True)
  if primary:
    _write_json_atomic(workdir / "config.json", config.to_dict())
    _write_json_atomic(
      workdir / "model.json", {"num_features": ds.num_features, "num_classes": ds.num_classes}
    )

  model, optimizer = _abstract_state(config, ds.num_features, ds.num_classes, steps_per_epoch)
  graphdef, state = nnx.split((model, optimizer))
  ckpt = Checkpointer(workdir / "checkpoints")
  metrics_path = workdir / "metrics.jsonl"
  try:
    restored = ckpt.restore_latest(nnx.to_pure_dict(state))
    epoch, step = 0, 0
    if restored is not None:
      tree, meta = restored
      nnx.replace_by_pure_dict(state, tree)
      epoch, step = int(meta["epoch"]), int(meta["step"])
      logger.info("Resuming %s from epoch %d (step %d).", workdir, epoch, step)
    records = _truncate_metrics(metrics_path, epoch, write=primary)
    state = _replicate(mesh, state)
    l1 = config.l1_per_layer
    train_labels = ds.train_labels.astype(np.int32)
    mode = "mask" if config.protocol == "in_loop" else "dense"
    sync_steps = _sync_each_step(mesh)
    last_epoch = (
      config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    )

    while epoch < last_epoch:
      epoch += 1
      t0 = time.perf_counter()
      batch_metrics = []
      bar = tqdm.tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=None if progress else True,
      )
      for rows in data.batch_indices(
        len(ds.train_images), config.batch_size, seed=config.seed, epoch=epoch
      ):
        if mode == "mask" and step % config.refit_every == 0:
          state = subspace_refit_step(graphdef, state)
        state, m = train_step(
          graphdef,
          state,
          _shard_rows(mesh, ds.train_images, rows),
          _shard_rows(mesh, train_labels, rows),
          l1=l1,
          mode=mode,
        )
        if sync_steps:
          jax.block_until_ready(state)
        step += 1
        batch_metrics.append(m)
        bar.update(1)
        if progress and (len(batch_metrics) % 10 == 0 or len(batch_metrics) == steps_per_epoch):
          recent = jax.device_get(batch_metrics[-10:])
          bar.set_postfix(
            loss=f"{np.mean([r['loss'] for r in recent]):.4f}",
            acc=f"{np.mean([r['accuracy'] for r in recent]):.3f}",
            density=f"{np.mean([r['density'] for r in recent]):.3f}",
          )
      bar.close()
      # Protocol (a) fits the estimators from the trained kernels; under (b) this keeps
      # the checkpoint's factors in step with its kernels. Both runs do it identically.
      state = refit_step(graphdef, state)
      nnx.update((model, optimizer), state)
      dense = evaluate_split(model, ds.test_images, ds.test_labels, mode="dense", mesh=mesh)
      cond = evaluate_split(model, ds.test_images, ds.test_labels, mode="mask", mesh=mesh)
      ckpt.save(epoch, nnx.to_pure_dict(state), {"epoch": epoch, "step": step})
      host = jax.device_get(batch_metrics)
      record = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(np.mean([r["loss"] for r in host])),
        "train_ce": float(np.mean([r["ce"] for r in host])),
        "train_acc": float(np.mean([r["accuracy"] for r in host])),
        "train_density": np.mean([r["density"] for r in host], axis=0).tolist(),
        "test_error_dense": dense["error"],
        "test_error_conditional": cond["error"],
        "density": dense["density"],
        "seconds": time.perf_counter() - t0,
      }
      if primary:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
      records.append(record)
      if progress:
        tqdm.tqdm.write(
          f"epoch {epoch}: loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} "
          f"test error {record['test_error_dense']:.4f} (conditional "
          f"{record['test_error_conditional']:.4f}) density "
          + " ".join(f"{d:.3f}" for d in record["density"])
        )
    ckpt.wait_until_finished()
  finally:
    ckpt.close()

  if records and records[-1]["epoch"] == epoch:
    return dict(records[-1])
  # Nothing trained now and no metrics line for the restored epoch: evaluate it.
  nnx.update((model, optimizer), state)
  dense = evaluate_split(model, ds.test_images, ds.test_labels, mode="dense", mesh=mesh)
  cond = evaluate_split(model, ds.test_images, ds.test_labels, mode="mask", mesh=mesh)
  return {
    "epoch": epoch,
    "step": step,
    "train_loss": None,
    "train_acc": None,
    "test_error_dense": dense["error"],
    "test_error_conditional": cond["error"],
    "density": dense["density"],
    "seconds": 0.0,
  }


class LoadedRun(NamedTuple):
  """A trained run as `load_run` found it.

  Attributes:
    model: the model in evaluation mode, with the checkpoint's params and factors.
    config: the run's `TrainConfig`.
    step: the checkpoint step restored (the epoch number of ``checkpoints/<step>``).
    damaged_steps: ``(step, reason)`` of newer checkpoint steps skipped as damaged.
  """

  model: nn.ConditionalMLP
  config: TrainConfig
  step: int
  damaged_steps: tuple[tuple[int, str], ...]


def load_run(workdir: str | os.PathLike) -> LoadedRun:
  """Rebuilds the trained model of `workdir` from its newest intact checkpoint, read-only.

  Never moves, deletes or writes a file of `workdir`: a damaged newer step is skipped and
  reported in `LoadedRun.damaged_steps` (and logged), left for `train` to quarantine.

  Raises:
    FileNotFoundError: if `workdir` has no config.json/model.json or no usable
      checkpoint (naming the damaged steps and how to recover).
  """
  workdir = pathlib.Path(workdir)
  cfg_path, shape_path = workdir / "config.json", workdir / "model.json"
  if not cfg_path.exists() or not shape_path.exists():
    raise FileNotFoundError(
      f"{workdir} is not a training workdir: {cfg_path.name} or {shape_path.name} is missing. "
      f"Train first: lrcc-jax train --workdir {workdir}"
    )
  config = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
  shapes = json.loads(shape_path.read_text())
  model, optimizer = _abstract_state(config, shapes["num_features"], shapes["num_classes"], 1)
  state = nnx.state((model, optimizer))
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"No checkpoints in {ckpt_dir}; train first (lrcc-jax train).")
  ckpt = Checkpointer(ckpt_dir)
  try:
    restored = ckpt.restore_latest(nnx.to_pure_dict(state), read_only=True)
  finally:
    ckpt.close()
  damaged = tuple(ckpt.damaged_steps)
  if restored is None:
    details = "; ".join(f"step {s}: {r}" for s, r in damaged) or "no steps at all"
    raise FileNotFoundError(
      f"No complete, undamaged checkpoint in {ckpt_dir} ({details}). To recover, run"
      f" `lrcc-jax train --workdir {workdir}` with the run's settings: it moves damaged"
      f" steps to {ckpt_dir.name}_corrupt/ and trains again from the newest intact one."
    )
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored[0]))
  nnx.update((model, optimizer), state)
  model.eval()
  assert ckpt.restored_step is not None  # restore_latest raised otherwise
  return LoadedRun(model, config, int(ckpt.restored_step), damaged)


def load_model(workdir: str | os.PathLike) -> tuple[nn.ConditionalMLP, TrainConfig]:
  """``(model, config)`` of `load_run`: the newest intact checkpoint, read-only."""
  run = load_run(workdir)
  return run.model, run.config
