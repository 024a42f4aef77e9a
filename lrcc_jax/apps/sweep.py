"""The paper's rank sweep: error, recall, computed fraction and speed-ups per rank setting.

Davis & Arel (arXiv:1312.4461) train a ReLU MLP with an L1 activation penalty, fit a
low-rank sign estimator to every hidden layer, and sweep the estimator's rank per layer,
reporting the test error of the conditional network against the full one and the
theoretical speed-up. `run_sweep` does that for both training protocols and every
estimator, and adds what the paper could not: a measured batch-1 latency of the
compute-skipping network against dense jit on the same machine, in the same run.

For every protocol × estimator × rank setting × threshold it writes one row with the
results fields (``dataset, estimator, ranks, threshold, test_error_dense,
test_error_conditional, density, recall, computed_fraction, theoretical_speedup,
measured_speedup_batch1``) plus ``protocol`` and the skip-mode settings:

- ``capacities``: skipping needs a static capacity on every hidden layer. Each layer's
  is the `capacity_quantile` (default 99th percentile) of the per-row count of units the
  estimator selects on the calibration rows (training split) at that threshold.
- ``test_error_capacity``: the test error of the network run with those capacities; a
  capacity below a row's count drops that row's lowest-scoring selected units.
- ``measured_speedup_batch1``: `lrcc_jax.apps.bench.bench_mlp` on real test rows (dense jit
  against `packed_mlp` with the capacities; the protocol of `lrcc_jax.apps.bench`). It is below
  1 where skip mode is slower than dense, and that is what is reported.

Usage::

  lrcc-jax sweep --config experiments/configs/mnist5k.py \\
      [--workdir runs/sweep_mnist5k --out runs/sweep_mnist5k --quick]

``--out`` defaults to the workdir; the committed figures are regenerated with
``--out experiments/results``.

A config is a Python file with ``get_config() -> TrainConfig`` and
``get_sweep_config() -> SweepConfig`` (see ``experiments/configs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrcc_jax import _checks
from lrcc_jax._registry import ESTIMATORS
from lrcc_jax.apps import bench, data, evaluate, table, train

logger = logging.getLogger(__name__)

ROW_KEYS: tuple[str, ...] = (
  "dataset",
  "estimator",
  "ranks",
  "threshold",
  "test_error_dense",
  "test_error_conditional",
  "density",
  "recall",
  "computed_fraction",
  "theoretical_speedup",
  "measured_speedup_batch1",
)
"""The results-row fields shared with ``lrcc-jax evaluate``; every sweep row has them."""

EXTRA_KEYS: tuple[str, ...] = (
  "protocol",
  "thresholds",
  "n_examples",
  "capacities",
  "test_error_capacity",
  "skip_strategy",
  "dense_ms_batch1",
  "skip_ms_batch1",
  "capacity_flop_speedup",
  "fraction_of_theoretical",
)
"""The other fields of a sweep row (see `run_sweep`)."""

FULL = "full"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What the sweep varies and how it measures; the network is the `TrainConfig`.

  Attributes:
    ranks: the rank settings, each one rank per hidden layer or one for all layers. A
      rank may be ``"full"``; every rank is capped at its layer's full rank
      min(n_in, n_out), and settings that become equal after capping are kept once.
    thresholds: estimator thresholds: floats (0.0 is the paper's) and/or
      ``"calibrated"`` (per layer, the largest threshold reaching `recall` on the
      calibration rows).
    protocols: training protocols, ``"dense"`` (estimator after training, the paper)
      and/or ``"in_loop"`` (estimator mask in the training loop).
    estimators: names of `lrcc_jax.ESTIMATORS`: ``"svd"`` (the paper),
      ``"data_aware"``, ``"trained"``.
    recall: recall target of calibrated thresholds and of the trained estimator.
    capacity_quantile: quantile of the per-row selected-unit counts that sets each
      layer's static capacity for skip mode (1.0 takes the largest count).
    calibration_rows: training rows for data-aware/trained fits, calibration and
      capacities.
    bench_repeats: repeats of the batch-1 latency measurement (median reported).
    quick_ranks: indices into `ranks` kept by `quick`.
  """

  ranks: tuple[Any, ...] = ((2,), (5,), (10,), (25,), (50,), (100,), (FULL,))
  thresholds: tuple[float | str, ...] = (0.0, "calibrated")
  protocols: tuple[str, ...] = train.PROTOCOLS
  estimators: tuple[str, ...] = ("svd", "data_aware", "trained")
  recall: float = 0.99
  capacity_quantile: float = 0.99
  calibration_rows: int = 1000
  bench_repeats: int = 7
  quick_ranks: tuple[int, ...] = (0, -1)

  def __post_init__(self):
    for name in ("ranks", "thresholds", "protocols", "estimators", "quick_ranks"):
      value = getattr(self, name)
      if isinstance(value, (list, str)):
        object.__setattr__(self, name, tuple(value) if isinstance(value, list) else (value,))
    object.__setattr__(
      self, "ranks", tuple(tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in self.ranks)
    )
    for name in ("ranks", "thresholds", "protocols", "estimators"):
      if not getattr(self, name):
        raise ValueError(f"SweepConfig.{name} is empty.")
    for setting in self.ranks:
      for r in setting:
        if r != FULL and not (isinstance(r, int) and r >= 1):
          raise ValueError(f"rank {r!r} in ranks={self.ranks} must be a positive int or 'full'.")
    for t in self.thresholds:
      if isinstance(t, str) and t != "calibrated":
        raise ValueError(f"threshold {t!r} must be a number or 'calibrated'.")
    bad = [p for p in self.protocols if p not in train.PROTOCOLS]
    if bad:
      raise ValueError(f"protocols {bad} must be among {train.PROTOCOLS}.")
    bad = [e for e in self.estimators if e not in ESTIMATORS]
    if bad:
      raise ValueError(f"estimators {bad} must be among {ESTIMATORS}.")
    if self.bench_repeats < 1 or self.calibration_rows < 1:
      raise ValueError("bench_repeats and calibration_rows must be at least 1.")

  def quick(self) -> SweepConfig:
    """A tiny version for tests and smoke runs: the `quick_ranks` settings, 3 repeats."""
    ranks = tuple(dict.fromkeys(self.ranks[i] for i in self.quick_ranks))
    return dataclasses.replace(self, ranks=ranks, bench_repeats=min(self.bench_repeats, 3))

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- configs


def load_config_module(path: str | os.PathLike) -> ModuleType:
  """Imports a config file (a Python module with `get_config`) by path."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist.")
  name = "lrcc_sweep_config_" + re.sub(r"\W", "_", path.stem)
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ValueError(f"{path} is not an importable Python file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config() -> TrainConfig.")
  return module


def load_config(path: str | os.PathLike) -> tuple[train.TrainConfig, SweepConfig]:
  """The ``(TrainConfig, SweepConfig)`` of a config file.

  A file without ``get_sweep_config`` gets the default `SweepConfig`.
  """
  module = load_config_module(path)
  config = module.get_config()
  if not isinstance(config, train.TrainConfig):
    raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig.")
  sweep = module.get_sweep_config() if hasattr(module, "get_sweep_config") else SweepConfig()
  if not isinstance(sweep, SweepConfig):
    raise ValueError(
      f"{path}: get_sweep_config() returned {type(sweep).__name__}, not SweepConfig."
    )
  return config, sweep


def resolve_ranks(setting: Sequence[Any], widths: Sequence[int]) -> tuple[int, ...]:
  """One int rank per hidden layer: ``"full"`` and too-large ranks become min(n_in, n_out).

  Args:
    setting: one rank for every layer, or one per layer.
    widths: the network's widths ``(n_in, h_1, …, h_L)``.
  """
  full = [min(a, b) for a, b in zip(widths, widths[1:])]
  setting = _checks.per_layer(
    setting[0] if len(setting) == 1 else setting, len(full), "rank setting"
  )
  return tuple(f if r == FULL else min(int(r), f) for r, f in zip(setting, full))


def _dataset_tag(name: str) -> str:
  if name.startswith("npz:"):
    name = "npz_" + pathlib.Path(name[4:]).stem
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --------------------------------------------------------------------------- one row


def _skip_strategy(model: Any) -> str:
  """The path `packed_mlp`'s "auto" takes at batch 1 (the same decision, `auto_path`):
  ``"sparse"``, ``"layerwise"`` or ``"dense"``."""
  from lrcc_jax._mlp import auto_path  # pylint: disable=g-import-not-at-top

  return auto_path(1, model.pack(), [l.capacity for l in model.layers])


def sweep_row(
  model: Any,
  dataset: data.Dataset,
  *,
  protocol: str,
  estimator: str,
  threshold: float | str,
  calibration_x: jax.Array,
  x_pool: np.ndarray,
  sweep: SweepConfig,
) -> dict[str, Any]:
  """One results row for a model whose estimators are fitted (thresholds set here).

  Args:
    model: the network at its rank setting, with fitted estimators (not modified).
    dataset: the data (its test split is evaluated).
    protocol: the training protocol, for the row.
    estimator: the estimator's name, for the row.
    threshold: a float for every layer, or ``"calibrated"``.
    calibration_x: normalised training rows for calibration and capacities.
    x_pool: normalised test rows the latency benchmark draws its inputs from.
    sweep: the measuring settings.
  """
  m = nnx.clone(model)
  m.eval()
  m.set_capacities(None)
  if threshold == "calibrated":
    m.calibrate(calibration_x, recall=sweep.recall)
  else:
    m.set_thresholds(float(threshold))
  m.set_capacities(
    evaluate.selection_capacities(m, calibration_x, quantile=sweep.capacity_quantile)
  )
  result = evaluate.evaluate_prepared(m, dataset, estimator=estimator)
  timing = bench.bench_mlp(m, (1,), repeats=sweep.bench_repeats, x_pool=x_pool)[0]
  measured = float(timing["measured_speedup"])
  return {
    "dataset": result["dataset"],
    "protocol": protocol,
    "estimator": estimator,
    "ranks": result["ranks"],
    "threshold": threshold if isinstance(threshold, str) else float(threshold),
    "thresholds": result["threshold"],
    "n_examples": result["n_examples"],
    "test_error_dense": result["test_error_dense"],
    "test_error_conditional": result["test_error_conditional"],
    "test_error_capacity": result["test_error_capacity"],
    "capacities": result["capacities"],
    "density": result["density"],
    "recall": result["recall"],
    "computed_fraction": result["computed_fraction"],
    "theoretical_speedup": result["theoretical_speedup"],
    "measured_speedup_batch1": measured,
    "fraction_of_theoretical": measured / result["theoretical_speedup"],
    "capacity_flop_speedup": float(timing["flop_model_speedup"]),
    "skip_strategy": _skip_strategy(m),
    "dense_ms_batch1": float(timing["dense_ms"]),
    "skip_ms_batch1": float(timing["skip_ms"]),
  }


# --------------------------------------------------------------------------- the sweep


def run_sweep(
  config: train.TrainConfig,
  sweep: SweepConfig,
  workdir: str | os.PathLike,
  out_dir: str | os.PathLike | None = None,
  *,
  quick: bool = False,
  progress: bool = True,
  name: str | None = None,
) -> dict[str, Any]:
  """Trains `config` under every protocol, sweeps the estimators, writes JSON and plots.

  Each protocol trains (or resumes) in ``workdir/<protocol>`` (``workdir/quick_<protocol>``
  with `quick`, so a quick run never mixes with a full one). For every protocol ×
  estimator × rank setting the estimators are fitted once, then every threshold gives a
  row (`sweep_row`).

  Args:
    config: the network and its training; its ``protocol`` is replaced per protocol.
    sweep: what to vary (`SweepConfig`).
    workdir: parent directory of the training runs.
    out_dir: where ``sweep_<name>.json`` and the PNGs go; None (default) writes nothing.
    quick: 1 epoch and `SweepConfig.quick` (for tests and smoke runs).
    progress: training progress bars and one log line per row, on stderr.
    name: file tag; defaults to the dataset (``_quick`` appended with `quick`).

  Returns:
    ``{"environment", "config", "train", "rows", "seconds", "files"}``: the machine
    (`bench.environment`), both configs, each protocol's training summary, the rows, wall
    seconds per phase and the files written.
  """
  t_start = time.perf_counter()
  if quick:
    config = dataclasses.replace(config, epochs=1)
    sweep = sweep.quick()
  estimators = list(sweep.estimators)
  workdir = pathlib.Path(workdir)
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  x_pool = data.normalize(dataset.test_images)
  calibration_x = jnp.asarray(
    evaluate.calibration_subset(dataset, sweep.calibration_rows, config.seed)
  )
  say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

  rows, summaries, seconds = [], {}, {"train": 0.0, "rows": 0.0}
  for protocol in sweep.protocols:
    cfg = dataclasses.replace(config, protocol=protocol)
    run_dir = workdir / (f"quick_{protocol}" if quick else protocol)
    say(f"sweep: training protocol={protocol} in {run_dir} (resumes if present)")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
      summaries[protocol] = train.train_and_evaluate(cfg, run_dir, progress=progress)
    seconds["train"] += time.perf_counter() - t0
    model = train.load_model(run_dir)[0]
    widths = [int(model.layers[0].kernel.shape[0])] + [int(l.kernel.shape[1]) for l in model.layers]
    settings = list(dict.fromkeys(resolve_ranks(s, widths) for s in sweep.ranks))
    t0 = time.perf_counter()
    for estimator in estimators:
      for ranks in settings:
        fitted = nnx.clone(model)
        fitted.eval()
        evaluate.fit_estimators(
          fitted,
          calibration_x,
          estimator=estimator,
          ranks=list(ranks),
          recall=sweep.recall,
          seed=config.seed,
        )
        for threshold in sweep.thresholds:
          row = sweep_row(
            fitted,
            dataset,
            protocol=protocol,
            estimator=estimator,
            threshold=threshold,
            calibration_x=calibration_x,
            x_pool=x_pool,
            sweep=sweep,
          )
          rows.append(row)
          say("sweep: " + format_row(row))
    seconds["rows"] += time.perf_counter() - t0
  seconds["total"] = time.perf_counter() - t_start

  name = name or _dataset_tag(dataset.name) + ("_quick" if quick else "")
  payload = {
    "environment": bench.environment(),
    "config": {"train": config.to_dict(), "sweep": sweep.to_dict(), "quick": quick},
    "train": summaries,
    "rows": rows,
    "seconds": seconds,
  }
  files = []
  if out_dir is not None:
    files = plot_sweep(rows, out_dir, name) if rows else []
    payload["files"] = [p.name for p in files]
    files.insert(0, bench.write_results(f"sweep_{name}", payload, out_dir))
  payload["files"] = [os.fspath(p) for p in files]
  return payload


# --------------------------------------------------------------------------- output


def _fmt_list(values: Sequence[Any], fmt: str) -> str:
  return "/".join("-" if v is None else format(v, fmt) for v in values)


def _fmt_threshold(t: Any) -> str:
  return "cal" if t == "calibrated" else f"{float(t):g}"


def format_row(row: Mapping[str, Any]) -> str:
  """One line of a row, for progress logs."""
  return (
    f"{row['protocol']} {row['estimator']} ranks={_fmt_list(row['ranks'], 'd')}"
    f" t={_fmt_threshold(row['threshold'])} err {row['test_error_conditional']:.4f}"
    f" (dense {row['test_error_dense']:.4f}, cap {row['test_error_capacity']:.4f})"
    f" recall {_fmt_list(row['recall'], '.3f')} computed"
    f" {_fmt_list(row['computed_fraction'], '.3f')}"
    f" speed-up {row['theoretical_speedup']:.2f}x theory, {row['measured_speedup_batch1']:.2f}x"
    " measured"
  )


TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
  ("protocol", "protocol"),
  ("estimator", "estimator"),
  ("ranks", "ranks"),
  ("thr", "threshold"),
  ("err dense", "test_error_dense"),
  ("err cond", "test_error_conditional"),
  ("err cap", "test_error_capacity"),
  ("recall", "recall"),
  ("computed", "computed_fraction"),
  ("density", "density"),
  ("capacities", "capacities"),
  ("theory", "theoretical_speedup"),
  ("measured b1", "measured_speedup_batch1"),
)


def _cell(key: str, value: Any, markdown: bool) -> str:
  if key == "ranks" or key == "capacities":
    return _fmt_list(value, "d")
  if key == "threshold":
    return _fmt_threshold(value)
  if key.startswith("test_error"):
    return f"{100 * value:.2f}%" if markdown else f"{value:.4f}"
  if key in ("recall", "computed_fraction", "density"):
    return _fmt_list(value, ".3f" if key == "recall" else ".2f")
  if key.endswith("speedup") or key.endswith("batch1"):
    return f"{value:.2f}x"
  return str(value)


TABLE_LEGEND: tuple[str, ...] = (
  "thr: threshold ('cal' = calibrated to the recall target on training rows); err cond:"
  " conditional network; err cap: with the skip-mode capacities.",
  "theory: FLOP-model speed-up (multiply-adds), not a time; measured b1: dense jit time /"
  " skip-mode time at batch 1, measured on this machine (below 1: skipping is slower).",
)


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
  """A fixed-width text table (or a Markdown table) of sweep rows; text has a legend."""
  header = [h for h, _ in TABLE_COLUMNS]
  lines = [[_cell(k, r[k], markdown) for _, k in TABLE_COLUMNS] for r in rows]
  return table.format_table(
    header, lines, markdown=markdown, legend=() if markdown else TABLE_LEGEND
  )


def _rank_label(ranks: Sequence[int]) -> str:
  return str(ranks[0]) if len(set(ranks)) == 1 else "/".join(str(r) for r in ranks)


def plot_sweep(
  rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, name: str
) -> list[pathlib.Path]:
  """Writes the three PNGs of a sweep and returns their paths.

  - ``sweep_<name>_error.png``: test error vs rank (conditional network, and with the
    skip-mode capacities), one panel per threshold, the dense errors as horizontal lines;
  - ``sweep_<name>_recall.png``: recall and computed fraction vs rank, per hidden layer
    and threshold, with the dense network's density;
  - ``sweep_<name>_speedup.png``: theoretical vs measured batch-1 speed-up vs rank, per
    protocol and threshold.

  Uses matplotlib's object API (`Figure` renders with Agg), so it needs no display and
  leaves pyplot's backend alone.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  protocols = list(dict.fromkeys(r["protocol"] for r in rows))
  estimators = list(dict.fromkeys(r["estimator"] for r in rows))
  thresholds = list(dict.fromkeys(r["threshold"] for r in rows))
  settings = list(dict.fromkeys(tuple(r["ranks"]) for r in rows))
  xs = {s: i for i, s in enumerate(settings)}
  labels = [_rank_label(s) for s in settings]
  colors = {e: f"C{i}" for i, e in enumerate(estimators)}
  styles = {p: ("-", "--", ":", "-.")[i % 4] for i, p in enumerate(protocols)}
  n_layers = len(rows[0]["ranks"]) if rows else 0

  def series(protocol, estimator, threshold, key, layer=None):
    pts = sorted(
      (xs[tuple(r["ranks"])], r[key] if layer is None else r[key][layer])
      for r in rows
      if r["protocol"] == protocol and r["estimator"] == estimator and r["threshold"] == threshold
    )
    return [p[0] for p in pts], [p[1] for p in pts]

  def dense_value(protocol, key, layer=None):
    vals = [r[key] if layer is None else r[key][layer] for r in rows if r["protocol"] == protocol]
    return vals[0] if vals else None

  def finish(ax, ylabel):
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("estimator rank per layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)

  files = []
  # 1. error vs rank.
  fig = Figure(figsize=(5.5 * len(thresholds), 4.2), layout="constrained")
  axes = fig.subplots(1, len(thresholds), squeeze=False)[0]
  for ax, t in zip(axes, thresholds):
    for p in protocols:
      for e in estimators:
        x, y = series(p, e, t, "test_error_conditional")
        ax.plot(x, y, styles[p], color=colors[e], marker="o", ms=3, label=f"{p} / {e}")
        x, y = series(p, e, t, "test_error_capacity")
        ax.plot(x, y, styles[p], color=colors[e], marker="x", ms=3, alpha=0.35, lw=0.8)
      d = dense_value(p, "test_error_dense")
      ax.axhline(d, color="k", ls=styles[p], lw=1, label=f"{p}: dense net ({100 * d:.2f}%)")
    ax.set_yscale("log")
    ax.set_title(f"threshold {_fmt_threshold(t)} (x: with skip-mode capacities)")
    finish(ax, "test error")
    ax.legend(fontsize=7)
  fig.suptitle(f"{rows[0]['dataset'] if rows else name}: test error vs estimator rank")
  files.append(out / f"sweep_{name}_error.png")
  fig.savefig(files[-1], dpi=110)

  # 2. recall and computed fraction vs rank, per layer.
  fig = Figure(figsize=(4.2 * n_layers, 3.0 * 2 * len(thresholds)), layout="constrained")
  axes = fig.subplots(2 * len(thresholds), n_layers, squeeze=False)
  for ti, t in enumerate(thresholds):
    for li in range(n_layers):
      for mi, key in enumerate(("recall", "computed_fraction")):
        ax = axes[2 * ti + mi][li]
        for p in protocols:
          for e in estimators:
            x, y = series(p, e, t, key, li)
            ax.plot(x, y, styles[p], color=colors[e], marker="o", ms=3, label=f"{p} / {e}")
          if key == "computed_fraction":
            ax.axhline(
              dense_value(p, "density", li), color="k", ls=styles[p], lw=1, label=f"{p}: density"
            )
        ax.set_title(f"layer {li + 1}, threshold {_fmt_threshold(t)}", fontsize=9)
        finish(ax, "recall" if key == "recall" else "computed fraction")
        if ti == 0 and li == 0:
          ax.legend(fontsize=6)
  files.append(out / f"sweep_{name}_recall.png")
  fig.savefig(files[-1], dpi=100)

  # 3. theoretical vs measured speed-up.
  fig = Figure(figsize=(5.5 * len(thresholds), 3.8 * len(protocols)), layout="constrained")
  axes = fig.subplots(len(protocols), len(thresholds), squeeze=False)
  for pi, p in enumerate(protocols):
    for ti, t in enumerate(thresholds):
      ax = axes[pi][ti]
      for e in estimators:
        x, y = series(p, e, t, "theoretical_speedup")
        ax.plot(x, y, "--", color=colors[e], marker="o", ms=3, label=f"{e}: FLOP model")
        x, y = series(p, e, t, "measured_speedup_batch1")
        ax.plot(x, y, "-", color=colors[e], marker="s", ms=3, label=f"{e}: measured, batch 1")
      ax.axhline(1.0, color="k", lw=1)
      ax.set_yscale("log")
      ax.set_title(f"protocol {p}, threshold {_fmt_threshold(t)}", fontsize=9)
      finish(ax, "speed-up over dense")
      ax.legend(fontsize=6)
  files.append(out / f"sweep_{name}_speedup.png")
  fig.savefig(files[-1], dpi=100)
  return files


# --------------------------------------------------------------------------- CLI


def run_command(args: Any) -> int:
  """Runs ``lrcc-jax sweep``: the table goes to stdout, progress to stderr."""
  config, sweep = load_config(args.config)
  workdir = args.workdir or os.path.join("runs", f"sweep_{pathlib.Path(args.config).stem}")
  result = run_sweep(
    config,
    sweep,
    workdir,
    args.out or workdir,
    quick=args.quick,
    progress=getattr(args, "progress", not args.no_progress),
  )
  rows = result["rows"]
  print(
    f"{config.dataset}: hidden {','.join(map(str, config.hidden_sizes))},"
    f" {rows[0]['n_examples'] if rows else 0} test examples, {len(rows)} rows,"
    f" {result['seconds']['total']:.0f} s ({result['environment']['device_kind']})"
  )
  print(format_table(rows))
  for path in result["files"]:
    print(f"wrote {path}")
  return 0
