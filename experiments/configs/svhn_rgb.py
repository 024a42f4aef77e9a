r"""SVHN in colour: 3072 inputs, a 3072-2000-1000-500 ReLU net, TFDS `svhn_cropped`.

The same net as `svhn_gray.py` on the full 32x32x3 crops. The first layer is three
times wider, so the estimator saves the most there: at rank r it costs r (3072 + 2000)
multiply-adds against 3072 x 2000 for the exact product. Official splits: 73,257 train
and 26,032 test images. Prepare the data once::

  python -c "import tensorflow_datasets as tfds; tfds.data_source('svhn_cropped')"

Command::

  lrcc-jax sweep --config experiments/configs/svhn_rgb.py \
      --workdir runs/sweep_svhn_rgb --out experiments/results

Expected result (not measured in this repository; typical of MLPs on RGB SVHN): dense
test error about 12-16% after 20 epochs, close to the gray version; computed fractions
as in `svhn_gray.py`, with a larger theoretical speed-up from the wider first layer. Use
an accelerator. It writes experiments/results/sweep_svhn_cropped.json and
sweep_svhn_cropped_{error,recall,speedup}.png.
"""

from lrcc_jax.sweep import SweepConfig
from lrcc_jax.train import TrainConfig


def get_config() -> TrainConfig:
  """The wider net on RGB SVHN (the protocol is set by the sweep)."""
  return TrainConfig(
      dataset="svhn_cropped",
      hidden_sizes=(2000, 1000, 500),
      dropout_rate=0.2,
      l1=1e-4,
      learning_rate=5e-4,
      batch_size=128,
      epochs=20,
      seed=0,
      refit_every=200,
  )


def get_sweep_config() -> SweepConfig:
  """Ranks from 2 per layer to full (2000/1000/500); data-aware fits need >= 2000 rows."""
  return SweepConfig(
      ranks=((2,), (5,), (10,), (25,), (50,), (100,), (200,), ("full",)),
      thresholds=(0.0, "calibrated"),
      protocols=("dense", "in_loop"),
      estimators=("svd", "data_aware", "trained"),
      recall=0.99,
      capacity_quantile=0.99,
      calibration_rows=4096,
      bench_repeats=7,
  )
