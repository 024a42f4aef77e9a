"""The README's results table, rendered from the committed JSON in `experiments/results/`.

Every figure on the README's front page is a number some committed command wrote into a
JSON file. This module reads those files and renders the table, so the README never holds
a hand-copied figure: `python -m lrcc_jax.apps.report --write README.md` replaces the block
between the `<!-- results:begin -->` and `<!-- results:end -->` markers, `--check` only
compares (exit status 1 when the README is stale; `tests/apps/test_report.py` runs it), and
with neither it prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
DEFAULT_RESULTS = pathlib.Path("experiments/results")
HEADER = (
  "| setting (batch 1 unless said) | dense jit | skip | measured | FLOP model |"
  " command (writes `experiments/results/…`) |\n|---|---|---|---|---|---|"
)

Row = tuple[str, str, str, str, str, str]


def _ms(*values: float) -> str:
  return " / ".join(f"{v:.3g} ms" if v < 1 else f"{v:.2f} ms" for v in values)


def _x(*values: float, bold: bool = False) -> str:
  text = " / ".join(f"{v:.2f}×" if v < 2 else f"{v:.1f}×" for v in values)
  return f"**{text}**" if bold else text


def _pick(table: Iterable[dict], **where: Any) -> dict:
  """The one row whose fields equal `where` (floats compared to 1e-9)."""

  def matches(row: dict) -> bool:
    for key, want in where.items():
      got = row.get(key)
      if isinstance(want, float) and isinstance(got, (int, float)):
        if abs(got - want) > 1e-9:
          return False
      elif got != want:
        return False
    return True

  found = [r for r in table if matches(r)]
  if len(found) != 1:
    raise ValueError(f"expected one row with {where}, found {len(found)}")
  return found[0]


def _cmd(command: str, files: str) -> str:
  return f"`{command}` (`{files}`)"


def _layer(res: dict[str, Any]) -> list[Row]:
  rows = res["bench_layer"]["rows"]
  cmd = _cmd("lrcc-jax bench --suite layer --out experiments/results", "bench_layer.json")
  r10 = _pick(rows, batch=1, capacity_fraction=0.1, block_size=16)
  r5 = _pick(rows, batch=1, capacity_fraction=0.05, block_size=16)
  r25 = _pick(rows, batch=1, capacity_fraction=0.25, block_size=16)
  r8 = _pick(rows, batch=8, capacity_fraction=0.1, block_size=16)
  return [
    (
      f"one 4096² layer, 10% computed ({r10['capacity']} blocks of 16), rank {r10['rank']}",
      _ms(r10["dense_ms"]),
      _ms(r10["skip_ms"]),
      _x(r10["measured_speedup"], bold=True),
      _x(r10["flop_model_speedup"]),
      cmd,
    ),
    (
      "same layer, 5% / 25% computed",
      _ms(r5["dense_ms"], r25["dense_ms"]),
      _ms(r5["skip_ms"], r25["skip_ms"]),
      _x(r5["measured_speedup"], r25["measured_speedup"], bold=True),
      _x(r5["flop_model_speedup"], r25["flop_model_speedup"]),
      "same",
    ),
    (
      f"same layer, 8 rows at 10% ({r8['path']})",
      _ms(r8["dense_ms"]),
      _ms(r8["skip_ms"]),
      _x(r8["measured_speedup"]),
      _x(r8["flop_model_speedup"]),
      "same",
    ),
  ]


def _mlp(res: dict[str, Any]) -> list[Row]:
  rows = res["bench_mlp"]["rows"]
  cmd = _cmd(
    "lrcc-jax bench --suite mlp --batches 1,2,4,8,64 --out experiments/results", "bench_mlp.json"
  )
  r1, r4, r8 = (_pick(rows, batch=b) for b in (1, 4, 8))
  return [
    (
      "4-layer 4096-wide MLP, 10% per layer, input sparsity between layers",
      _ms(r1["dense_ms"]),
      _ms(r1["skip_ms"]),
      _x(r1["measured_speedup"], bold=True),
      _x(r1["flop_model_speedup"]),
      cmd,
    ),
    (
      "same MLP at 4 / 8 rows",
      _ms(r4["dense_ms"], r8["dense_ms"]),
      _ms(r4["skip_ms"], r8["skip_ms"]),
      _x(r4["measured_speedup"], r8["measured_speedup"]),
      _x(r4["flop_model_speedup"], r8["flop_model_speedup"]),
      "same",
    ),
  ]


def _batch(res: dict[str, Any]) -> list[Row]:
  rows = res["bench_batch"]["rows"]
  real, rand = _pick(rows, rows="real", batch=8), _pick(rows, rows="random", batch=8)
  return [
    (
      "same MLP shape, 8 rows: held-out digits through a digit-trained MLP / independent"
      f" random rows (overlap {real['mean_overlap']:.2f} / {rand['mean_overlap']:.2f};"
      " blocks shared across rows)",
      _ms(real["dense_ms"], rand["dense_ms"]),
      _ms(real["auto_ms"], rand["auto_ms"]),
      _x(real["auto_speedup"], rand["auto_speedup"], bold=True),
      "–",
      _cmd("lrcc-jax bench --suite batch --out experiments/results", "bench_batch.json"),
    )
  ]


def _paper(res: dict[str, Any]) -> list[Row]:
  out: list[Row] = []
  for r in res["bench_paper"]["rows"]:
    caps = "/".join(f"{round(100 * f)}" for f in r["capacity_fraction"])
    out.append(
      (
        f"paper's 784-1000-600-400 net on test digits, L1 {r['l1']:g}, {caps}% computed:"
        f" layerwise / sparse chain / auto ({r['auto_path']})",
        _ms(r["dense_ms"]),
        _ms(r["layerwise_ms"], r["sparse_ms"], r["auto_ms"]),
        _x(r["layerwise_speedup"], r["sparse_speedup"], r["auto_speedup"], bold=True),
        "–",
        _cmd("lrcc-jax bench --suite paper --out experiments/results", "bench_paper.json")
        if not out
        else "same",
      )
    )
  return out


def _storage(res: dict[str, Any]) -> list[Row]:
  r = _pick(res["bench_storage"]["rows"], batch=1)
  return [
    (
      f"4096² layer with **bf16** weights, {round(100 * r['capacity_fraction'])}%",
      _ms(r["dense_f32_ms"]),
      _ms(r["skip_bf16_ms"]),
      f"{_x(r['bf16_speedup_over_dense'], bold=True)} ({_x(r['bf16_speedup_over_f32_storage'])}"
      " the f32 storage)",
      "–",
      _cmd("lrcc-jax bench --suite storage --out experiments/results", "bench_storage.json"),
    )
  ]


def _module(res: dict[str, Any]) -> list[Row]:
  rows = sorted(res["bench_module"]["rows"], key=lambda r: r["width"])
  r = rows[-1]
  extra = " / ".join(f"{q['module_graph_false_extra_ms']:+.2f} ms" for q in rows)
  widths = " / ".join(str(q["width"]) for q in rows)
  note = f"{r['module_graph_false_over_packed_dense']:.2f}× the time of `packed_dense`"
  if len(rows) > 1:
    note += f" ({extra} per call at {widths} wide)"
  note += f"; split once + `jax.jit`: {r['module_split_over_packed_dense']:.2f}×"
  return [
    (
      f"`nn.ConditionalDense` skip mode under `nnx.jit(graph=False)`, {r['width']}², "
      f"{r['capacity_fraction']:.0%}",
      _ms(r["dense_ms"]),
      _ms(r["module_graph_false_ms"]),
      note,
      "–",
      _cmd("lrcc-jax bench --suite module --out experiments/results", "bench_module.json"),
    )
  ]


def _ffn(res: dict[str, Any]) -> list[Row]:
  rows = res["bench_ffn"]["rows"]
  rs = [_pick(rows, variant=v) for v in ("relu", "relu2", "gated")]
  r = rs[0]
  return [
    (
      f"transformer FFN d={r['d_model']}, d_ff={r['d_ff']}, ReLU / ReLU² / ReLU-gated,"
      f" {round(100 * r['computed_fraction'])}%",
      _ms(*(x["dense_ms"] for x in rs)),
      _ms(*(x["skip_ms"] for x in rs)),
      _x(*(x["skip_speedup"] for x in rs), bold=True),
      _x(*(x["flop_model_speedup"] for x in rs)),
      _cmd("lrcc-jax bench --suite ffn --out experiments/results", "bench_ffn.json"),
    )
  ]


def _fit(res: dict[str, Any]) -> list[Row]:
  f = res["bench_ffn"].get("randomized_fit_trained")
  if f is None:
    return []
  n_in, n_out = f["shape"]
  return [
    (
      f"rank-{f['rank']} estimator fit of a trained {n_in}×{n_out} layer: exact SVD /"
      ' randomized (`fit_svd(method="randomized")`), seconds',
      f"{f['exact_s']:.1f} s",
      f"{f['randomized_s']:.2f} s",
      _x(f["exact_s"] / f["randomized_s"], bold=True),
      f"error {100 * f['error_excess']:+.2f}% of the exact fit's",
      _cmd("lrcc-jax bench --suite ffn --out experiments/results", "bench_ffn.json"),
    )
  ]


def _sweep(res: dict[str, Any]) -> list[Row]:
  """The paper's network: the fastest measured row within 0.2 points of dense test error,
  and the data-aware rank-25 threshold-0 row (once if they are the same row)."""
  rows = res["sweep_mnist5k"]["rows"]
  close = [r for r in rows if r["test_error_capacity"] - r["test_error_dense"] <= 0.002 + 1e-9]
  best = max(close, key=lambda r: r["measured_speedup_batch1"])
  da25 = _pick(rows, protocol="dense", estimator="data_aware", ranks=[25, 25, 25], threshold=0.0)
  shown = [best] if best is da25 else [best, da25]
  label = []
  for r in shown:
    label.append(
      f"{r['protocol']} training, {r['estimator']} rank {r['ranks'][0]}, threshold"
      f" {r['threshold']}: error {100 * r['test_error_capacity']:.1f}% (dense"
      f" {100 * r['test_error_dense']:.1f}%)"
    )
  return [
    (
      "paper's 784-1000-600-400 net on test digits, L1 7e-4, skip mode with capacities: "
      + " / ".join(label),
      _ms(*(r["dense_ms_batch1"] for r in shown)),
      _ms(*(r["skip_ms_batch1"] for r in shown)),
      _x(*(r["measured_speedup_batch1"] for r in shown), bold=True),
      _x(*(r["capacity_flop_speedup"] for r in shown)),
      _cmd(
        "lrcc-jax sweep --config experiments/configs/mnist5k.py --workdir runs/sweep_mnist5k"
        " --out experiments/results",
        "sweep_mnist5k.json",
      ),
    )
  ]


def _threshold(setting: dict) -> str:
  if setting["threshold"] == "calibrated":
    return f"thresholds calibrated to {round(100 * setting['recall'])}% recall"
  return f"threshold {setting['threshold']}"


def _lm(res: dict[str, Any]) -> list[Row]:
  lm = res["lm"]
  cfg, dec = lm["config"], lm["decode_latency"]
  best = lm["target"]["best_within_gap"]
  gap = best["bits_per_byte"] - lm["dense_bits_per_byte"]
  widths = [w for w in dec["widths"] if w["d_model"] in (128, 512, 2048)]
  dims = " / ".join(str(w["d_model"]) for w in widths)
  return [
    (
      f"byte-level LM (d={cfg['d_model']}, {cfg['n_layers']} layers, ReLU² FFN):"
      f" {best['method']} rank {best['rank']}, {_threshold(best)}, {gap:+.3f} bits"
      f" per byte; decode step at d_model {dims} (d_ff = 4 d)",
      _ms(*(w["dense_ms"] for w in widths)),
      _ms(*(w["skip_auto_ms"] for w in widths)),
      _x(*(w["speedup_auto"] for w in widths), bold=True),
      f"FFN {_x(best['flop_model_speedup'])}",
      _cmd("lrcc-jax lm --workdir runs/lm --out experiments/results", "lm.json"),
    )
  ]


SECTIONS: tuple[tuple[str, Callable[[dict[str, Any]], list[Row]]], ...] = (
  ("bench_layer", _layer),
  ("bench_mlp", _mlp),
  ("bench_batch", _batch),
  ("bench_paper", _paper),
  ("sweep_mnist5k", _sweep),
  ("bench_storage", _storage),
  ("bench_module", _module),
  ("bench_ffn", _ffn),
  ("bench_ffn", _fit),
  ("lm", _lm),
)


def render(results: str | pathlib.Path = DEFAULT_RESULTS) -> str:
  """The markdown table of the committed results in `results`."""
  results = pathlib.Path(results)
  loaded = {name: json.loads((results / f"{name}.json").read_text()) for name, _ in SECTIONS}
  lines = [HEADER]
  for _, section in SECTIONS:
    lines += ["| " + " | ".join(row) + " |" for row in section(loaded)]
  return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
  """`text` with the block between the markers replaced by `table`."""
  try:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
  except ValueError as err:
    raise ValueError(f"the README needs the markers {BEGIN} and {END}") from err
  return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m lrcc_jax.apps.report", description=__doc__)
  ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="the results directory")
  mode = ap.add_mutually_exclusive_group()
  mode.add_argument("--write", metavar="README", help="replace the README's results block")
  mode.add_argument("--check", metavar="README", help="exit 1 if the README's block is stale")
  args = ap.parse_args(argv)
  table = render(args.results)
  if args.write is None and args.check is None:
    print(table)
    return 0
  path = pathlib.Path(args.write or args.check)
  text = path.read_text(encoding="utf-8")
  new = replace_block(text, table)
  if args.check is not None:
    if new != text:
      print(
        f"{path}: the results table differs from {args.results}; run with --write", file=sys.stderr
      )
      return 1
    return 0
  if new != text:
    path.write_text(new, encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
