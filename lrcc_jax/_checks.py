"""Argument validation shared by the functional core.

Every check runs on static shapes and Python values, so it costs nothing under `jit` and
fails at trace time with a message that names the offending values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any


def describe(value: Any) -> str:
  """A short description of `value` for an error message: never the whole of an array.

  Arrays (anything with a ``shape`` and a ``dtype``) are named by type, shape and dtype;
  other values by their repr, cut to 60 characters, and type. An error message that
  prints a (1000, 784) array buries the one line that says what went wrong.
  """
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  if shape is not None and dtype is not None:
    return f"a {type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
  text = repr(value)
  if len(text) > 60:
    text = text[:57] + "..."
  return f"{text} of type {type(value).__name__}"


def as_static_int(value: Any, name: str) -> int:
  """Returns `value` as a Python int, or raises `ValueError` naming `name`."""
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(
      f"{name} must be a static Python int (it fixes array shapes), got {describe(value)}."
    ) from None


def per_layer(value: Any, n: int, name: str) -> list:
  """`value` for each of `n` layers: one value for every layer, or a sequence of `n`.

  Every per-layer setting (ranks, thresholds, capacities, block sizes, L1 weights) takes
  either form, on the command line and in the library alike, so one rule lives here. A
  string is one value (it is a name, not a sequence of letters); an array is a sequence.

  Args:
    value: one value, or a sequence (list, tuple, 1-D array) with one entry per layer.
    n: the number of layers.
    name: the argument's name, for the error message.

  Returns:
    A list of `n` values.

  Raises:
    ValueError: if a sequence does not have exactly `n` entries.
  """
  if getattr(value, "ndim", None) == 1:
    value = list(value)
  if isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != n:
      raise ValueError(
        f"{name} has {len(value)} entries but the model has {n} hidden layers: give one"
        f" value for every layer, or exactly {n}."
      )
    return list(value)
  return [value] * n


def check_bias(bias: Any, n_out: int, what: str = "kernel", shape: Any = None) -> None:
  """Checks that `bias` is (n_out,) (or exactly `shape`), naming both shapes otherwise."""
  want = (n_out,) if shape is None else tuple(shape)
  got = getattr(bias, "shape", None)
  if got is None or tuple(got) != want:
    got_text = tuple(got) if got is not None else describe(bias)
    raise ValueError(f"bias has shape {got_text} but the {what} needs {want}.")


def check_kernel(kernel: Any, bias: Any | None = None) -> tuple[int, int]:
  """Checks a Flax-layout kernel (n_in, n_out) and an optional bias (n_out,)."""
  if getattr(kernel, "ndim", None) != 2:
    raise ValueError(
      f"kernel must be 2-D (n_in, n_out), got shape {getattr(kernel, 'shape', None)}."
    )
  n_in, n_out = kernel.shape
  if bias is not None:
    check_bias(bias, n_out, f"kernel {tuple(kernel.shape)}")
  return n_in, n_out


def check_features(x: Any, n_in: int, what: str = "kernel") -> None:
  """Checks that the last dimension of `x` is `n_in`."""
  shape = tuple(getattr(x, "shape", ()))
  if not shape or shape[-1] != n_in:
    raise ValueError(f"x has shape {shape}: its last dimension must be n_in={n_in} of the {what}.")


def check_estimator(est: Any, n_in: int | None = None, n_out: int | None = None) -> int:
  """Checks `est.u` (n_in, r) and `est.v` (r, n_out); returns r."""
  u, v = est.u, est.v
  if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
    raise ValueError(
      f"estimator factors must be u (n_in, r) and v (r, n_out), got u {tuple(u.shape)}"
      f" and v {tuple(v.shape)}."
    )
  if n_in is not None and u.shape[0] != n_in:
    raise ValueError(f"estimator u has shape {tuple(u.shape)} but the layer has n_in={n_in}.")
  if n_out is not None and v.shape[1] != n_out:
    raise ValueError(f"estimator v has shape {tuple(v.shape)} but the layer has n_out={n_out}.")
  return u.shape[1]


def check_rank(rank: Any, n_in: int, n_out: int) -> int:
  """Checks 1 <= rank <= min(n_in, n_out)."""
  rank = as_static_int(rank, "rank")
  if not 1 <= rank <= min(n_in, n_out):
    raise ValueError(
      f"rank={rank} is out of range for a ({n_in}, {n_out}) kernel: it must lie in"
      f" [1, {min(n_in, n_out)}]."
    )
  return rank


def check_block_size(block_size: Any, n_out: int) -> int:
  """Checks that `block_size` divides n_out; returns the number of blocks."""
  block_size = as_static_int(block_size, "block_size")
  if block_size < 1 or n_out % block_size:
    raise ValueError(f"block_size={block_size} must be a positive divisor of n_out={n_out}.")
  return n_out // block_size


def check_capacity(capacity: Any, n_blocks: int, block_size: int = 1) -> int | None:
  """Checks 1 <= capacity <= n_blocks (capacity counts blocks); None means no cap."""
  if capacity is None:
    return None
  capacity = as_static_int(capacity, "capacity")
  if not 1 <= capacity <= n_blocks:
    raise ValueError(
      f"capacity={capacity} is outside [1, {n_blocks}]: n_out / block_size ="
      f" {n_blocks * block_size} / {block_size} = {n_blocks} blocks."
    )
  return capacity


def check_positive(value: Any, name: str) -> float:
  """Returns `value` as a positive Python float, or raises `ValueError` naming `name`."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive number, got {describe(value)}.") from None
  if not value > 0:
    raise ValueError(f"{name}={value} must be positive.")
  return value


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
  """Returns `value` if it is one of the names `choices`, else raises `ValueError`."""
  if not isinstance(value, str) or value not in choices:
    shown = repr(value) if isinstance(value, str) else describe(value)
    raise ValueError(f"{name}={shown} must be one of {choices}.")
  return value


def check_fraction(value: Any, name: str) -> float:
  """Checks a Python float in (0, 1]."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in (0, 1], got {describe(value)}.") from None
  if not (0.0 < value <= 1.0):
    raise ValueError(f"{name}={value} must lie in (0, 1].")
  return value
