"""Single-layer benchmark: dense jit against the compute-skipping `packed_dense`.

Run:   .venv/bin/python experiments/bench_layer.py
Writes experiments/results/bench_layer.json and prints the table. Expected on a 2-core
XLA:CPU machine (jax 0.10.2): about 4x at batch 1 and 10% capacity, rank 64; the "auto"
strategy falls back to the dense product at batch 64 (about 1x).
"""

import argparse

from lrcc_jax import bench


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=4096)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  rows = bench.bench_layer(args.width, args.rank, repeats=args.repeats)
  print(bench.format_table(rows))
  path = bench.write_results("bench_layer", {"environment": bench.environment(), "rows": rows}, args.out)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
