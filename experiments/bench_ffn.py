"""Batch-1 conditional FFN latency (d=2048, d_ff=8192, 10% in blocks of 16) and the
randomized rank-64 fit; writes experiments/results/bench_ffn.json.

  PYTHONPATH=$PWD python experiments/bench_ffn.py [--repeats 9] [--no-exact-fit]
"""

import argparse

from lrcc_jax.apps import bench

if __name__ == "__main__":
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--rank", type=int, default=64)
  parser.add_argument("--no-fit", action="store_true", help="skip the randomized-fit timing")
  parser.add_argument(
      "--no-exact-fit", action="store_true", help="skip the (slow) exact SVD it is compared with"
  )
  parser.add_argument("--out", default="experiments/results")
  args = parser.parse_args()
  bench.latency_mode()  # synchronous CPU dispatch, as `lrcc-jax bench` measures
  bench.run_ffn(
      args.out, repeats=args.repeats, rank=args.rank, fit=not args.no_fit,
      exact_fit=not args.no_exact_fit,
  )
