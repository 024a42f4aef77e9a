"""The ``lrcc-jax`` command line: train, evaluate, and a demo of the paper's protocol.

Usage::

  lrcc-jax train --dataset mnist5k --workdir runs/mnist5k [--epochs 5 --ranks 50,35,25]
  lrcc-jax evaluate --workdir runs/mnist5k --dataset mnist5k [--threshold calibrated]
  lrcc-jax demo [--workdir runs/demo]

Every subcommand is one entry of `COMMANDS`: a `Command` with a help line, a function
that adds its arguments to a subparser and a function that runs it. Adding one (``bench``,
``sweep``) is one more entry. Machine-readable results go to stdout as JSON; progress and
logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
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


def float_or_list(text: str) -> float | tuple[float, ...]:
  """``"1e-4"`` -> ``1e-4``; ``"1e-4,1e-5"`` -> ``(1e-4, 1e-5)``; finite values only."""
  try:
    values = tuple(float(s) for s in _split(text))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
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
    ("--ranks", "ranks", int_list, "estimator rank per hidden layer, e.g. 50,35,25; unset: min(n_in, n_out) // 8"),
    ("--refit-every", "refit_every", positive_int, "in_loop protocol: refit the estimator every K steps"),
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


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
  defaults = _config_defaults()
  parser.add_argument("--dataset", required=True, help="mnist5k, mnist, svhn_cropped, svhn_cropped_gray or npz:PATH")
  parser.add_argument("--workdir", required=True, help="checkpoints, config.json and metrics.jsonl go here; resumes from it")
  for flag, field, kind, text in _TRAIN_FLAGS:
    parser.add_argument(
        flag, dest=field, type=kind, default=argparse.SUPPRESS,
        metavar=flag[2:].upper().replace("-", "_"),
        help=f"{text} (default: {_fmt_default(defaults.get(field))})",
    )
  parser.add_argument(
      "--protocol", dest="protocol", choices=("dense", "in_loop"), default=argparse.SUPPRESS,
      help=f"dense training, or the estimator in the loop (default: {defaults.get('protocol')})",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace) -> Any:
  from lrcc_jax.apps.train import TrainConfig  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  given = {k: v for k, v in vars(args).items() if k in fields}
  return TrainConfig(**given)


def _run_train(args: argparse.Namespace) -> int:
  from lrcc_jax.apps.train import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = _train_config(args)
  with contextlib.redirect_stdout(sys.stderr):
    summary = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
  print(to_json(summary))
  return 0


# --- evaluate -------------------------------------------------------------------------


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
  """The estimator settings shared by ``evaluate`` (and future sweeps)."""
  parser.add_argument("--ranks", type=int_list, default=None, help="estimator rank per hidden layer (default: the model's)")
  parser.add_argument(
      "--threshold", type=threshold_arg, default=None,
      help="estimator threshold: a number, one per layer, or 'calibrated' (default: the run's)",
  )
  parser.add_argument("--recall", type=fraction, default=0.99, help="target recall of --threshold calibrated (default: 0.99)")
  parser.add_argument("--estimator", choices=("svd", "data_aware"), default="svd", help="estimator fit (default: svd)")
  parser.add_argument("--calibration-rows", type=positive_int, default=1000, help="training rows for data_aware and calibration (default: 1000)")
  parser.add_argument("--batch-size", type=positive_int, default=500, help="test rows per batch (default: 500)")


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--dataset", default=None, help="dataset to test on (default: the run's)")
  parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: the run's)")
  _add_evaluation_arguments(parser)


def _load_run(workdir: str) -> tuple[Any, Any]:
  from lrcc_jax.apps.train import load_model  # pylint: disable=g-import-not-at-top

  if not pathlib.Path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {workdir!r} does not exist; run `{PROG} train` first.")
  return load_model(workdir)


def _load_data(name: str, data_dir: str | None, seed: int, model: Any) -> Any:
  """The test data of a run: `seed` must be the run's, which fixes the train/test split."""
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
      ranks=args.ranks, threshold=args.threshold, recall=args.recall, estimator=args.estimator,
      calibration_rows=args.calibration_rows, batch_size=args.batch_size,
  )
  settings.update(overrides)
  return evaluate_model(model, dataset, **settings)


def _run_evaluate(args: argparse.Namespace) -> int:
  from lrcc_jax.apps.evaluate import check_ranks  # pylint: disable=g-import-not-at-top

  with contextlib.redirect_stdout(sys.stderr):
    model, config = _load_run(args.workdir)
    check_ranks(args.ranks, model)  # fail before loading data
    dataset = _load_data(
        args.dataset or config.dataset,
        args.data_dir if args.data_dir is not None else config.data_dir, config.seed, model,
    )
    threshold = config.threshold if args.threshold is None else args.threshold
    result = _evaluate(args, model, dataset, threshold=threshold)
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
  defaults = _config_defaults()
  parser.add_argument("--workdir", default="runs/demo", help="run directory; resumes from it (default: runs/demo)")
  parser.add_argument(
      "--epochs", type=positive_int, default=argparse.SUPPRESS,
      help=f"training epochs (default: {defaults.get('epochs')})",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width text table of demo rows (one `evaluate_model` result each)."""
  header = ("setting", "err dense", "err cond", "ranks", "recall", "computed fraction", "speed-up")
  lines = [header]
  for row in rows:
    lines.append((
        row["setting"],
        f"{row['test_error_dense']:.4f}",
        f"{row['test_error_conditional']:.4f}",
        "/".join(str(r) for r in row["ranks"]),
        "/".join(f"{r:.3f}" for r in row["recall"]),
        "/".join(f"{c:.3f}" for c in row["computed_fraction"]),
        f"{row['theoretical_speedup']:.2f}x",
    ))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


def _run_demo(args: argparse.Namespace) -> int:
  from lrcc_jax.apps.evaluate import evaluate_model  # pylint: disable=g-import-not-at-top
  from lrcc_jax.apps.train import load_model, train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = demo_config(**({"epochs": args.epochs} if hasattr(args, "epochs") else {}))
  workdir = pathlib.Path(args.workdir)
  with contextlib.redirect_stdout(sys.stderr):
    print(f"{PROG} demo: training {config.dataset} in {workdir} (resumes if present)")
    train_and_evaluate(config, os.fspath(workdir), progress=not args.no_progress)
    model, config = load_model(os.fspath(workdir))
    dataset = _load_data(config.dataset, config.data_dir, config.seed, model)
    rows = []
    for label, settings in DEMO_SETTINGS:
      print(f"{PROG} demo: evaluating {label}")
      rows.append({"setting": label, **evaluate_model(model, dataset, **settings)})
  (workdir / "demo.json").write_text(to_json(rows) + "\n")
  print(f"{config.dataset}, hidden {','.join(str(h) for h in config.hidden_sizes)},"
        f" {rows[0]['n_examples']} test examples")
  print(format_table(rows))
  print(f"rows written to {workdir / 'demo.json'}")
  return 0


# --- sweep (lrcc_jax.apps.sweep does the work) -----------------------------------------------


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. experiments/configs/mnist5k.py")
  parser.add_argument("--workdir", default=None, help="training runs go to WORKDIR/<protocol> (default: runs/sweep_<config name>)")
  parser.add_argument("--out", default="experiments/results", help="directory of the JSON and PNGs (default: experiments/results)")
  parser.add_argument("--quick", action="store_true", help="tiny version: 1 epoch, the config's quick ranks, 3 repeats")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-row lines")
  _add_dispatch_argument(parser)


def _add_dispatch_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--async-dispatch", action="store_true",
                      help="keep JAX's asynchronous CPU dispatch for the latency figures"
                           " (default: off, see lrcc_jax.apps.bench.latency_mode)")


def _latency_mode(args: argparse.Namespace) -> None:
  from lrcc_jax.apps import bench  # pylint: disable=g-import-not-at-top

  if not args.async_dispatch and not bench.latency_mode():
    print("note: JAX had already started; timing with its dispatch mode as it is", file=sys.stderr)


def _run_sweep(args: argparse.Namespace) -> int:
  from lrcc_jax.apps.sweep import run_command  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  return run_command(args)


# --- bench (lrcc_jax.apps.bench does the work) ---------------------------------------------


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--suite", choices=("layer", "mlp", "full"), default="layer",
                      help="layer: one 4096 layer at batch 1/8/64; mlp: 4-layer 4096 MLP; full: widths x batches x fractions")
  parser.add_argument("--widths", type=int_list, default=None, help="widths for --suite full (default 1024,4096,8192)")
  parser.add_argument("--batches", type=int_list, default=None, help="batch sizes (default depends on the suite)")
  parser.add_argument("--rank", type=positive_int, default=64, help="estimator rank (default 64)")
  parser.add_argument("--block-size", type=positive_int, default=16,
                      help="units per selected block; capacities count blocks (default 16)")
  parser.add_argument("--repeats", type=positive_int, default=9, help="interleaved repeats; the median is reported (default 9)")
  parser.add_argument("--out", default="experiments/results", help="directory of the JSON and PNG (default: experiments/results)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  _add_dispatch_argument(parser)


def _run_bench(args: argparse.Namespace) -> int:
  from lrcc_jax.apps import bench  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  return bench.run_command(args)


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
  from lrcc_jax.apps import tune  # pylint: disable=g-import-not-at-top

  tune.add_arguments(parser)
  _add_dispatch_argument(parser)


def _run_tune(args: argparse.Namespace) -> int:
  from lrcc_jax.apps import tune  # pylint: disable=g-import-not-at-top

  _latency_mode(args)
  return tune.run_command(args)


# --- entry point ----------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "train": Command("train a conditional MLP (resumes from --workdir)", _add_train_arguments, _run_train),
    "evaluate": Command("test error, estimator recall and speed-up of a trained run", _add_evaluate_arguments, _run_evaluate),
    "demo": Command("train on mnist5k and compare estimator settings in a table", _add_demo_arguments, _run_demo),
    "bench": Command("latency of dense jit vs compute-skipping inference; writes JSON and PNG", _add_bench_arguments, _run_bench),
    "sweep": Command("train both protocols, sweep estimator ranks and thresholds, write JSON and plots", _add_sweep_arguments, _run_sweep),
    "tune": Command("measure dense vs gather on this device; write the policy the auto strategy uses", _add_tune_arguments, _run_tune),
}
"""Subcommands by name. To add one: ``COMMANDS["bench"] = Command(help, add_args, run)``."""


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with one subparser per entry of `COMMANDS`."""
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="Low-rank conditional computation (Davis & Arel, arXiv:1312.4461) in JAX.",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, command in COMMANDS.items():
    command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status.

  Bad arguments exit through argparse (status 2, usage on stderr). A `ValueError` or
  `FileNotFoundError` from the library (unknown dataset, out-of-range rank, missing
  workdir, unprepared TFDS dataset) prints ``lrcc-jax: error: ...`` and returns 2.
  """
  args = build_parser().parse_args(argv)
  try:
    return COMMANDS[args.command].run(args)
  except (ValueError, FileNotFoundError) as err:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
