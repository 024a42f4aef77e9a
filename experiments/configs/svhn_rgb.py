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

import dataclasses
import pathlib

from lrcc_jax.apps.sweep import SweepConfig, load_config_module
from lrcc_jax.apps.train import TrainConfig

_GRAY = load_config_module(pathlib.Path(__file__).with_name("svhn_gray.py"))


def get_config() -> TrainConfig:
  """The net of svhn_gray.py on RGB SVHN (the protocol is set by the sweep)."""
  return dataclasses.replace(_GRAY.get_config(), dataset="svhn_cropped")


def get_sweep_config() -> SweepConfig:
  """svhn_gray.py's sweep; data-aware fits on 3072 inputs need >= 3072 rows."""
  return dataclasses.replace(_GRAY.get_sweep_config(), calibration_rows=4096)
