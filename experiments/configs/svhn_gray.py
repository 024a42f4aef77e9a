r"""SVHN in gray levels: 1024 inputs, a 1024-2000-1000-500 ReLU net, TFDS `svhn_cropped`.

The paper's SVHN experiment uses a wider fully connected net than MNIST's. Here the
32x32 RGB crops are reduced to one luma channel (`svhn_cropped_gray`, ITU-R BT.601
weights), a third of the input width of `svhn_rgb.py`. Official splits: 73,257 train and
26,032 test images (the `extra` split is not used). Prepare the data once::

  python -c "import tensorflow_datasets as tfds; tfds.data_source('svhn_cropped')"

Command::

  lrcc-jax sweep --config experiments/configs/svhn_gray.py \
      --workdir runs/sweep_svhn_gray --out experiments/results

Expected result (not measured in this repository; typical of MLPs on gray SVHN): dense
test error about 12-16% after 20 epochs. SVHN's hidden units are less sparse than
MNIST's, so expect larger computed fractions, and the error to need higher ranks
(100-200 per layer) before it approaches dense. Use an accelerator: on 2 CPU cores the
training alone takes hours. It writes experiments/results/sweep_svhn_cropped_gray.json
and sweep_svhn_cropped_gray_{error,recall,speedup}.png.
"""

from lrcc_jax.apps.sweep import SweepConfig
from lrcc_jax.apps.train import TrainConfig


def get_config() -> TrainConfig:
  """The wider net on gray SVHN (the protocol is set by the sweep)."""
  return TrainConfig(
      dataset="svhn_cropped_gray",
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
  """Ranks from 2 per layer to full (1024/1000/500); data-aware fits need >= 1024 rows."""
  return SweepConfig(
      ranks=((2,), (5,), (10,), (25,), (50,), (100,), (200,), ("full",)),
      thresholds=(0.0, "calibrated"),
      protocols=("dense", "in_loop"),
      estimators=("svd", "data_aware", "trained"),
      recall=0.99,
      capacity_quantile=0.99,
      calibration_rows=2048,
      bench_repeats=7,
  )
