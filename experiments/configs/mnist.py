r"""The paper's MNIST experiment: a 784-1000-600-400 ReLU net on full TFDS `mnist`.

60,000 training and 10,000 test digits (the official splits), read with
`tfds.data_source` (no TensorFlow). Prepare the data once, with network access::

  python -c "import tensorflow_datasets as tfds; tfds.data_source('mnist')"

Command (from the repository root; experiments/colab.ipynb runs the same on a GPU/TPU)::

  lrcc-jax sweep --config experiments/configs/mnist.py \
      --workdir runs/sweep_mnist --out experiments/results

Expected result (not measured in this repository; what a 3-hidden-layer ReLU MLP with
dropout and an L1 activation penalty typically reaches): dense test error about 1.5%
after 20 epochs, with sparse hidden layers (density roughly 5-20%). The mnist5k run of
the same net (experiments/README.md) is the measured reference: expect the same shape of
curves here, with errors about 3 points lower. On a CPU the sweep takes about an hour
(training dominates); on a GPU a few minutes. It writes
experiments/results/sweep_mnist.json and sweep_mnist_{error,recall,speedup}.png.
"""

from lrcc_jax.apps.sweep import SweepConfig
from lrcc_jax.apps.train import TrainConfig


def get_config() -> TrainConfig:
  """The paper-scale network on full MNIST (the protocol is set by the sweep)."""
  return TrainConfig(
      dataset="mnist",
      hidden_sizes=(1000, 600, 400),
      dropout_rate=0.2,
      l1=3e-4,
      learning_rate=1e-3,
      batch_size=128,
      epochs=20,
      seed=0,
      refit_every=200,
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
      calibration_rows=2000,
      bench_repeats=7,
  )
