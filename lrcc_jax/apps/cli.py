"""The ``lrcc-jax`` command line: train, evaluate, and a demo of the paper's protocol.

Usage::

  lrcc-jax train --dataset mnist5k --workdir runs/mnist5k [--epochs 5 --ranks 50,35,25]
  lrcc-jax evaluate --workdir runs/mnist5k --dataset mnist5k [--threshold calibrated]
  lrcc-jax demo [--workdir runs/demo]

Every subcommand is one entry of `COMMANDS`: a `Command` with a help line, a function
that adds its arguments to a subparser and a function that runs it. Adding one (``bench``,
``sweep``) is one more entry. Machine-readable results go to stdout as JSON; progress and
logs go to stderr.

Conventions shared by every subcommand:

- a per-layer option (``--ranks``, ``--threshold``, ``--l1``) takes one value for every
  hidden layer or a comma list with one per layer; negative numbers and lists of them
  work as values (``--threshold -0.1,-0.1,-0.05``);
- ``--no-progress`` turns progress bars off; they are off anyway when stderr is not a
  terminal, so logs never fill with bar redraws;
- arguments are checked (names, ranges, files) before JAX, the data or a checkpoint is
  loaded: this module imports only the standard library at the top, and ``--help`` and
  argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

PROG = "lrcc-jax"


class Command(NamedTuple):
  """One subcommand: its help line, how to add its arguments, and how to run it."""

  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace], int]


# --- argument types -------------------------------------------------------------------


def _split(text: str) -> list[str]:
  items = [s.strip() for s in text.split(",")]
  if not text.strip() or any(not s for s in items):
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
  return items


def int_list(text: str) -> tuple[int, ...]:
  """``"1000,600,400"`` -> ``(1000, 600, 400)``; positive integers only."""
  try:
    values = tuple(int(s) for s in _split(text))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated positive integers, got {text!r}"
    ) from None
  if any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
  return values


def float_list(text: str) -> tuple[float, ...]:
  """``"0.05,0.5"`` -> ``(0.05, 0.5)``; fractions in (0, 1] only."""
  try:
    values = tuple(float(s) for s in _split(text))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  if any(not 0 < v <= 1 for v in values):
    raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {text!r}")
  return values


def int_or_list(text: str) -> int | tuple[int, ...]:
  """``"50"`` -> ``50`` (every layer); ``"50,35,25"`` -> ``(50, 35, 25)`` (one per layer)."""
  values = int_list(text)
  return values[0] if len(values) == 1 else values


def float_or_list(text: str) -> float | tuple[float, ...]:
  """``"1e-4"`` -> ``1e-4``; ``"1e-4,1e-5"`` -> ``(1e-4, 1e-5)``; finite values only."""
  try:
    values = tuple(float(s) for s in _split(text))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected a number or comma-separated numbers, got {text!r}"
    ) from None
  if not all(math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
  return values[0] if len(values) == 1 else values


def threshold_arg(text: str) -> float | tuple[float, ...] | str:
  """A threshold for every layer, one per layer (comma list), or ``calibrated``."""
  if text.strip() == "calibrated":
    return "calibrated"
  try:
    return float_or_list(text)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
      f"expected a number, comma-separated numbers or 'calibrated', got {text!r}"
    ) from None


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _float_in(text: str, interval: str, inside: Callable[[float], bool]) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
  if not inside(value):
    raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
  return value


def fraction(text: str) -> float:
  """A float in (0, 1]."""
  return _float_in(text, "(0, 1]", lambda v: 0.0 < v <= 1.0)


def probability(text: str) -> float:
  """A float in [0, 1)."""
  return _float_in(text, "[0, 1)", lambda v: 0.0 <= v < 1.0)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
  """``--no-progress``, the same on every subcommand."""
  parser.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bars (they are also off when stderr is not a terminal)",
  )


def show_progress(args: argparse.Namespace) -> bool:
  """Whether to report progress: bars and one line per epoch or row, unless --no-progress.

  The bars themselves are tqdm's with ``disable=None``: drawn only when stderr is a
  terminal, so a log file gets the per-epoch lines and no redraws.
  """
  return not getattr(args, "no_progress", False)


_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NEGATIVE_VALUE = re.compile(rf"^-(?:\d|\.\d)[^,]*(?:,\s*{_NUMBER})*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
  """Rewrites ``--opt -0.1,-0.05`` as ``--opt=-0.1,-0.05`` so argparse takes it as a value.

  argparse reads a token that starts with ``-`` as an option unless it looks like one
  plain negative number, so ``--threshold -0.1,-0.05`` or ``--threshold -1e-3`` would fail
  with "expected one argument". No option of this command line is a number, so a
  number-like token after a ``--option`` is always its value.
  """
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    tok = argv[i]
    if tok == "--":
      out += argv[i:]
      break
    nxt = argv[i + 1] if i + 1 < len(argv) else None
    if tok.startswith("--") and "=" not in tok and nxt is not None and _NEGATIVE_VALUE.match(nxt):
      out.append(f"{tok}={nxt}")
      i += 2
      continue
    out.append(tok)
    i += 1
  return out


def to_json(obj: Any) -> str:
  """JSON text of results that may hold numpy or jax scalars and arrays."""

  def default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / jax arrays and scalars
      return o.tolist()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
      return dataclasses.asdict(o)
    if isinstance(o, (os.PathLike, pathlib.Path)):
      return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")

  return json.dumps(obj, default=default)


# --- train ----------------------------------------------------------------------------

# (flag, TrainConfig field, type, help). Defaults are TrainConfig's; unset flags keep them.
_TRAIN_FLAGS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
  ("--data-dir", "data_dir", str, "TFDS data directory (mnist, svhn_cropped)"),
  ("--epochs", "epochs", positive_int, "training epochs"),
  ("--batch-size", "batch_size", positive_int, "examples per step"),
  ("--lr", "learning_rate", float, "learning rate"),
  ("--l1", "l1", float_or_list, "L1 activation penalty: one value, or one per hidden layer"),
  ("--hidden", "hidden_sizes", int_list, "hidden layer widths, e.g. 1000,600,400"),
  (
    "--ranks",
    "ranks",
    int_or_list,
    "estimator rank: one for every hidden layer, or one per layer, e.g. 50,35,25; unset:"
    " min(n_in, n_out) // 8",
  ),
  (
    "--refit-every",
    "refit_every",
    positive_int,
    "in_loop protocol: refit the estimator every K steps",
  ),
  ("--dropout", "dropout_rate", probability, "dropout rate"),
  ("--threshold", "threshold", float, "estimator threshold for the conditional test error"),
  ("--seed", "seed", int, "seed of the data split, initialisation, dropout and batch order"),
)


def _config_defaults() -> dict[str, Any]:
  """TrainConfig's field defaults, the single source of the training defaults."""
  from lrcc_jax.apps.train import TrainConfig  # pylint: disable=g-import-not-at-top

  out = {}
  for f in dataclasses.fields(TrainConfig):
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return out


def _fmt_default(value: Any) -> str:
  if value is None:
    return "unset"
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  return str(value)


_TRAIN_DEFAULT = "{train_default}"


class _TrainDefaultsFormatter(argparse.HelpFormatter):
  """Fills TrainConfig's defaults into the help text, only when help is printed.

  They come from `TrainConfig` itself (the single source of the training defaults), which
  lives next to JAX; reading them only for ``--help`` keeps argument errors instant.
  """

  def _get_help_string(self, action: argparse.Action) -> str | None:
    text = action.help
    if text and _TRAIN_DEFAULT in text:
      text = text.replace(_TRAIN_DEFAULT, _fmt_default(_config_defaults().get(action.dest)))
    return text


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--dataset",
    required=True,
    help="mnist5k, mnist, svhn_cropped, svhn_cropped_gray or npz:PATH (format: lrcc_jax.apps.data)",
  )
  parser.add_argument(
    "--workdir",
    required=True,
    help="checkpoints, config.json and metrics.jsonl go here; resumes from it",
  )
  for flag, field, kind, text in _TRAIN_FLAGS:
    parser.add_argument(
      flag,
      dest=field,
      type=kind,
      default=argparse.SUPPRESS,
      metavar=flag[2:].upper().replace("-", "_"),
      help=f"{text} (default: {_TRAIN_DEFAULT})",
    )
  parser.add_argument(
    "--protocol",
    dest="protocol",
    choices=("dense", "in_loop"),
    default=argparse.SUPPRESS,
    help=f"dense training, or the estimator in the loop (default: {_TRAIN_DEFAULT})",
  )
  add_progress_argument(parser)
  parser.add_argument(
    "--stop-after",
    type=positive_int,
    default=None,
    metavar="EPOCH",
    help="stop once this epoch is complete, as if interrupted; the learning-rate schedule "
    "still spans --epochs, and a later run with the same flags resumes",
  )
  multi = parser.add_argument_group(
    "multi-process",
    "one process per host (docs/multihost.md); with none of these, JAX's "
    "auto-detection runs on a Cloud TPU VM and in SLURM / Open MPI jobs of several tasks",
  )
  multi.add_argument(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="process 0's address and a free port, the same in every process",
  )
  multi.add_argument(
    "--num-processes",
    type=positive_int,
    default=None,
    help="processes in the run (1: single-process, no auto-detection)",
  )
  multi.add_argument(
    "--process-id", type=int, default=None, help="this process's index, 0 .. NUM_PROCESSES-1"
  )


def _check_dataset_argument(name: str, option: str = "--dataset") -> None:
  """The dataset name and, for ``npz:``, the file: checked before anything is loaded."""
  from lrcc_jax.apps.data import check_dataset_name, check_npz_path  # pylint: disable=g-import-not-at-top

  check_dataset_name(name, option)
  check_npz_path(name, option)


def _train_config(args: argparse.Namespace) -> Any:
  from lrcc_jax.apps.train import TrainConfig  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  given = {k: v for k, v in vars(args).items() if k in fields}
  if isinstance(given.get("ranks"), int):  # one rank for every hidden layer
    hidden = given.get("hidden_sizes", _config_defaults()["hidden_sizes"])
    given["ranks"] = (given["ranks"],) * len(hidden)
  return TrainConfig(**given)


@contextlib.contextmanager
def _native_stdout_to_stderr():
  """Points file descriptor 1 at stderr for a while, so stdout stays JSON only.

  Native libraries write there directly, past `sys.stdout` (Gloo, the CPU collectives of
  multi-process runs, prints a line per connection).
  """
  sys.stdout.flush()
  try:
    saved = os.dup(1)
    os.dup2(2, 1)
  except OSError:  # no usable descriptors (an unusual embedding): leave them alone
    yield
    return
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def _run_train(args: argparse.Namespace) -> int:
  _check_dataset_argument(args.dataset)
  from lrcc_jax.apps import distributed  # pylint: disable=g-import-not-at-top
  from lrcc_jax.apps.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = _train_config(args)
  with contextlib.redirect_stdout(sys.stderr), _native_stdout_to_stderr():
    # Before anything starts a JAX backend: the runtime must know all processes first.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    summary = train_and_evaluate(
      config, args.workdir, progress=show_progress(args), stop_after_epochs=args.stop_after
    )
  print(to_json(summary))
  return 0


# --- evaluate -------------------------------------------------------------------------


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
  """The estimator settings shared by ``evaluate`` (and future sweeps)."""
  from lrcc_jax._registry import ESTIMATORS  # pylint: disable=g-import-not-at-top  (no JAX)

  parser.add_argument(
    "--ranks",
    type=int_or_list,
    default=None,
    help="estimator rank: one for every hidden layer, or one per layer (default: the model's)",
  )
  parser.add_argument(
    "--threshold",
    type=threshold_arg,
    default=None,
    help=(
      "estimator threshold: one number for every layer, one per layer (e.g."
      " -0.1,-0.1,-0.05), or 'calibrated' (default: the run's)"
    ),
  )
  parser.add_argument(
    "--recall",
    type=fraction,
    default=0.99,
    help="target recall of --threshold calibrated and of the trained estimator (default: 0.99)",
  )
  parser.add_argument(
    "--estimator",
    choices=ESTIMATORS,
    default="svd",
    help=f"estimator fit: {', '.join(ESTIMATORS)} (default: svd, the paper's)",
  )
  parser.add_argument(
    "--calibration-rows",
    type=positive_int,
    default=1000,
    help="training rows for the data-dependent fits and calibration (default: 1000)",
  )
  parser.add_argument(
    "--batch-size", type=positive_int, default=500, help="rows per evaluation batch (default: 500)"
  )


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--workdir", required=True, help="a training run's workdir (only read, never written)"
  )
  parser.add_argument(
    "--dataset", default=None, help="dataset to score, e.g. npz:PATH (default: the run's)"
  )
  parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
  parser.add_argument(
    "--split",
    choices=("test", "all"),
    default="test",
    help="test: the test split (default); all: every example of the dataset, train and test",
  )
  parser.add_argument(
    "--table", action="store_true", help="print a human-readable table instead of the JSON object"
  )
  _add_evaluation_arguments(parser)
  add_progress_argument(parser)


def _check_workdir(workdir: str) -> None:
  """Cheap: the workdir and its run files exist (before JAX or a checkpoint loads)."""
  path = pathlib.Path(workdir)
  if not path.is_dir():
    raise FileNotFoundError(f"--workdir {workdir!r} does not exist; run `{PROG} train` first.")
  missing = [n for n in ("config.json", "model.json", "checkpoints") if not (path / n).exists()]
  if missing:
    raise FileNotFoundError(
      f"--workdir {workdir!r} is not a training workdir (no {', '.join(missing)});"
      f" run `{PROG} train --workdir {workdir} ...` first."
    )


def _run_config(workdir: str) -> dict:
  """The run's config.json as a dict (cheap; no JAX)."""
  return json.loads((pathlib.Path(workdir) / "config.json").read_text())


def _load_run(workdir: str) -> Any:
  """`lrcc_jax.apps.train.load_run`: the newest intact checkpoint, read-only."""
  from lrcc_jax.apps.train import load_run  # pylint: disable=g-import-not-at-top

  _check_workdir(workdir)
  run = load_run(workdir)
  for step, reason in run.damaged_steps:
    print(
      f"{PROG}: warning: checkpoint step {step} is damaged ({reason}); left in place."
      f" Scoring step {run.step}, the newest intact one. `{PROG} train` on this"
      " workdir moves damaged steps aside and resumes.",
      file=sys.stderr,
    )
  return run


def _load_data(name: str, data_dir: str | None, seed: int, model: Any) -> Any:
  """The data of a run: `seed` must be the run's, which fixes the train/test split."""
  from lrcc_jax.apps.data import load_dataset  # pylint: disable=g-import-not-at-top

  dataset = load_dataset(name, data_dir=data_dir, seed=seed)
  n_in = int(model.layers[0].kernel.shape[0])
  if dataset.num_features != n_in:
    raise ValueError(
      f"dataset {name!r} has {dataset.num_features} features per example but the model"
      f" takes {n_in}."
    )
  return dataset


def _evaluate(args: argparse.Namespace, model: Any, dataset: Any, **overrides: Any) -> dict:
  from lrcc_jax.apps.evaluate import evaluate_model  # pylint: disable=g-import-not-at-top

  settings = dict(
    ranks=args.ranks,
    threshold=args.threshold,
    recall=args.recall,
    estimator=args.estimator,
    calibration_rows=args.calibration_rows,
    batch_size=args.batch_size,
    split=args.split,
  )
  settings.update(overrides)
  return evaluate_model(model, dataset, **settings)


def _run_evaluate(args: argparse.Namespace) -> int:
  _check_workdir(args.workdir)
  dataset_name = args.dataset or _run_config(args.workdir).get("dataset", "")
  _check_dataset_argument(dataset_name, "--dataset" if args.dataset else "the run's dataset")
  from lrcc_jax.apps.evaluate import check_ranks, format_results  # pylint: disable=g-import-not-at-top

  with contextlib.redirect_stdout(sys.stderr):
    run = _load_run(args.workdir)
    model, config = run.model, run.config
    check_ranks(args.ranks, model)  # fail before loading data
    dataset = _load_data(
      dataset_name,
      args.data_dir if args.data_dir is not None else config.data_dir,
      config.seed,
      model,
    )
    threshold = config.threshold if args.threshold is None else args.threshold
    result = _evaluate(args, model, dataset, threshold=threshold)
  result["step"] = run.step
  result["damaged_steps"] = [step for step, _ in run.damaged_steps]
  if args.table:
    print(f"{args.workdir}: checkpoint step {run.step}, {result['dataset']}")
    print(format_results([result]))
  else:
    print(to_json(result))
  return 0


# --- demo -----------------------------------------------------------------------------

# (label, evaluate_model settings): the paper's estimator at threshold 0, then thresholds
# calibrated to 99% recall on training rows, with the SVD and the data-aware fit.
DEMO_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
  ("svd t=0", dict(estimator="svd", threshold=0.0)),
  ("svd recall>=0.99", dict(estimator="svd", threshold="calibrated", recall=0.99)),
  ("data_aware recall>=0.99", dict(estimator="data_aware", threshold="calibrated", recall=0.99)),
)


def demo_config(**overrides: Any) -> Any:
  """The demo's training config: `TrainConfig`'s defaults (mnist5k) with `overrides`."""
  from lrcc_jax.apps.train import TrainConfig  # pylint: disable=g-import-not-at-top

  return TrainConfig(**overrides)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--workdir", default="runs/demo", help="run directory; resumes from it (default: runs/demo)"
  )
  parser.add_argument(
    "--epochs",
    type=positive_int,
    default=argparse.SUPPRESS,
    help=f"training epochs (default: {_TRAIN_DEFAULT})",
  )
  add_progress_argument(parser)


def _run_demo(args: argparse.Namespace) -> int:
  from lrcc_jax.apps.evaluate import evaluate_model, format_results  # pylint: disable=g-import-not-at-top
  from lrcc_jax.apps.train import load_model, train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = demo_config(**({"epochs": args.epochs} if hasattr(args, "epochs") else {}))
  workdir = pathlib.Path(args.workdir)
  with contextlib.redirect_stdout(sys.stderr):
    print(f"{PROG} demo: training {config.dataset} in {workdir} (resumes if present)")
    train_and_evaluate(config, os.fspath(workdir), progress=show_progress(args))
    model, config = load_model(os.fspath(workdir))
    dataset = _load_data(config.dataset, config.data_dir, config.seed, model)
    rows = []
    for label, settings in DEMO_SETTINGS:
      print(f"{PROG} demo: evaluating {label}")
      rows.append({"setting": label, **evaluate_model(model, dataset, **settings)})
  (workdir / "demo.json").write_text(to_json(rows) + "\n")
  print(
    f"{config.dataset}, hidden {','.join(str(h) for h in config.hidden_sizes)},"
    f" {rows[0]['n_examples']} test examples"
  )
  print(format_results(rows, label="setting"))
  print(f"rows written to {workdir / 'demo.json'}")
  return 0


# --- sweep (lrcc_jax.apps.sweep does the work) -----------------------------------------------


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--config", required=True, help="config file, e.g. experiments/configs/mnist5k.py"
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="training runs go to WORKDIR/<protocol> (default: runs/sweep_<config name>)",
  )
  parser.add_argument(
    "--out",
    default=None,
    help=(
      "directory of the JSON and PNGs (default: the workdir; the committed figures: --out"
      " experiments/results)"
    ),
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny version: 1 epoch, the config's quick ranks, 3 repeats",
  )
  add_progress_argument(parser)
  _add_dispatch_argument(parser)


def _add_dispatch_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--async-dispatch",
    action="store_true",
    help="keep JAX's asynchronous CPU dispatch for the latency figures"
    " (default: off, see lrcc_jax.apps.bench.latency_mode)",
  )


def _latency_mode(args: argparse.Namespace) -> None:
  from lrcc_jax.apps import bench  # pylint: disable=g-import-not-at-top

  if not args.async_dispatch and not bench.latency_mode():
    print("note: JAX had already started; timing with its dispatch mode as it is", file=sys.stderr)


def _run_sweep(args: argparse.Namespace) -> int:
  if not pathlib.Path(args.config).is_file():
    raise FileNotFoundError(f"--config {args.config!r}: no such file.")
  from lrcc_jax.apps.sweep import run_command  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  args.progress = show_progress(args)
  return run_command(args)


# --- bench (lrcc_jax.apps.bench does the work) ---------------------------------------------


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--suite",
    choices=("layer", "mlp", "module", "storage", "ffn", "full", "batch", "paper"),
    default="layer",
    help=(
      "layer: one 4096 layer at batch 1/8/64; mlp: 4-layer 4096 MLP; module: the NNX layer"
      " in skip mode; storage: bf16 vs f32 weights; ffn: transformer FFN d=2048, d_ff=8192;"
      " full: widths x batches x fractions; batch: 4-layer 4096 MLP with per-row and"
      " shared gathers, on real digits (trained MLP) and independent random rows;"
      " paper: the 784-1000-600-400 net trained on"
      " mnist5k, batch 1 on test digits"
    ),
  )
  parser.add_argument(
    "--rows",
    type=lambda s: [k.strip() for k in s.split(",") if k.strip()],
    default=None,
    help="row kinds for --suite batch: real,random (default both)",
  )
  parser.add_argument(
    "--train-steps",
    type=positive_int,
    default=40,
    help=(
      "Adam steps training the digit MLP of --suite batch (default 40; its weights are"
      " cached under runs/bench_batch/)"
    ),
  )
  parser.add_argument(
    "--widths",
    type=int_list,
    default=None,
    help="widths for --suite full (default 1024,2048,4096) and module (default 256,4096)",
  )
  parser.add_argument(
    "--block-sizes",
    type=int_list,
    default=None,
    help="block sizes for --suite full (default 1,16; the other suites take --block-size)",
  )
  parser.add_argument(
    "--fractions",
    type=float_list,
    default=None,
    help="computed fractions for --suite full (default 0.05,0.1,0.25,0.5)",
  )
  parser.add_argument(
    "--compare-default",
    action="store_true",
    help="--suite full: with a tuned policy in use, also time the shipped default policy in"
    " the same interleaved run (columns 'default path', 'default speedup')",
  )
  parser.add_argument(
    "--batches", type=int_list, default=None, help="batch sizes (default depends on the suite)"
  )
  parser.add_argument("--rank", type=positive_int, default=64, help="estimator rank (default 64)")
  parser.add_argument(
    "--block-size",
    type=positive_int,
    default=16,
    help="units per selected block; capacities count blocks (default 16)",
  )
  parser.add_argument(
    "--repeats",
    type=positive_int,
    default=9,
    help="interleaved repeats; the median is reported (default 9)",
  )
  parser.add_argument(
    "--out",
    default=None,
    help=(
      "directory of the JSON and PNG (default: runs/bench; the committed figures: --out"
      " experiments/results)"
    ),
  )
  add_progress_argument(parser)
  _add_dispatch_argument(parser)


def _run_bench(args: argparse.Namespace) -> int:
  from lrcc_jax.apps import bench  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  args.progress = show_progress(args)
  return bench.run_command(args)


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
  from lrcc_jax.apps import tune  # pylint: disable=g-import-not-at-top

  tune.add_arguments(parser)
  _add_dispatch_argument(parser)


def _run_tune(args: argparse.Namespace) -> int:
  from lrcc_jax.apps import tune  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  return tune.run_command(args)


# --- lm (lrcc_jax.apps.lm does the work) ---------------------------------------------------


def _add_lm_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--workdir", required=True, help="checkpoints, metrics.jsonl and config.json; rerunning resumes"
  )
  parser.add_argument(
    "--steps", type=positive_int, default=None, help="training steps (default: LMConfig's)"
  )
  parser.add_argument(
    "--out",
    default=None,
    help=(
      "directory of lm.json and lm.png (default: the workdir; the committed figures: --out"
      " experiments/results)"
    ),
  )
  add_progress_argument(parser)
  _add_dispatch_argument(parser)


def _run_lm(args: argparse.Namespace) -> int:
  from lrcc_jax.apps import lm  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  args.progress = show_progress(args)
  return lm.run_command(args)


# --- entry point ----------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
  "train": Command(
    "train a conditional MLP (resumes from --workdir)", _add_train_arguments, _run_train
  ),
  "evaluate": Command(
    "test error, estimator recall and speed-up of a trained run",
    _add_evaluate_arguments,
    _run_evaluate,
  ),
  "demo": Command(
    "train on mnist5k and compare estimator settings in a table", _add_demo_arguments, _run_demo
  ),
  "bench": Command(
    "latency of dense jit vs compute-skipping inference; writes JSON and a PNG per suite",
    _add_bench_arguments,
    _run_bench,
  ),
  "sweep": Command(
    "train both protocols, sweep estimator ranks and thresholds, write JSON and plots",
    _add_sweep_arguments,
    _run_sweep,
  ),
  "tune": Command(
    "measure dense vs gather on this device; write the policy the auto strategy uses",
    _add_tune_arguments,
    _run_tune,
  ),
  "lm": Command(
    "train a byte-level LM with conditional ReLU² FFNs on the stdlib; bits/byte, FLOP model and"
    " decode latency",
    _add_lm_arguments,
    _run_lm,
  ),
}
"""Subcommands by name. To add one: ``COMMANDS["bench"] = Command(help, add_args, run)``."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The argument parser with one subparser per entry of `COMMANDS`.

  Args:
    command: add only this subcommand's arguments (the others keep their help line). The
      command line passes the one it runs, so it never builds what it will not parse.
  """
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="Low-rank conditional computation (Davis & Arel, arXiv:1312.4461) in JAX.",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, cmd in COMMANDS.items():
    subparser = sub.add_parser(
      name, help=cmd.help, description=cmd.help, formatter_class=_TrainDefaultsFormatter
    )
    if command is None or command == name:
      cmd.add_arguments(subparser)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status.

  Bad arguments exit through argparse (status 2, usage on stderr). A `ValueError` or
  `FileNotFoundError` from the library (unknown dataset, out-of-range rank, missing
  workdir or file, unprepared TFDS dataset) prints ``lrcc-jax: error: ...`` and returns 2.
  """
  argv = join_negative_values(sys.argv[1:] if argv is None else argv)
  command = next((a for a in argv if not a.startswith("-")), None)
  args = build_parser(command if command in COMMANDS else None).parse_args(argv)
  try:
    return COMMANDS[args.command].run(args)
  except (ValueError, FileNotFoundError) as err:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
