"""Single-layer benchmark: dense jit against the compute-skipping `packed_dense`.

Run:   .venv/bin/python experiments/bench_layer.py   (same as `lrcc-jax bench --suite layer`)
Writes experiments/results/bench_layer.json and prints the table: one 4096x4096 f32 layer,
rank 64, blocks of 16 units, batch 1/8/64, capacities 5/10/25%. Extra arguments are passed
to `lrcc-jax bench` (e.g. `--block-size 1`, `--repeats 15`).
"""

import sys

from lrcc_jax.apps import cli


if __name__ == "__main__":
  sys.exit(cli.main(["bench", "--suite", "layer", *sys.argv[1:]]))
