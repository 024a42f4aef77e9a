"""Argument validation shared by the functional core.

Every check runs on static shapes and Python values, so it costs nothing under `jit` and
fails at trace time with a message that names the offending values.
"""

from __future__ import annotations

import operator
from typing import Any


def as_static_int(value: Any, name: str) -> int:
  """Returns `value` as a Python int, or raises `ValueError` naming `name`."""
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(
        f"{name} must be a static Python int (it fixes array shapes), got {value!r}"
        f" of type {type(value).__name__}."
    ) from None


def check_kernel(kernel: Any, bias: Any | None = None) -> tuple[int, int]:
  """Checks a Flax-layout kernel (n_in, n_out) and an optional bias (n_out,)."""
  if getattr(kernel, "ndim", None) != 2:
    raise ValueError(
        f"kernel must be 2-D (n_in, n_out), got shape {getattr(kernel, 'shape', None)}."
    )
  n_in, n_out = kernel.shape
  if bias is not None and tuple(bias.shape) != (n_out,):
    raise ValueError(
        f"bias has shape {tuple(bias.shape)} but the kernel {tuple(kernel.shape)} needs"
        f" ({n_out},)."
    )
  return n_in, n_out


def check_features(x: Any, n_in: int, what: str = "kernel") -> None:
  """Checks that the last dimension of `x` is `n_in`."""
  shape = tuple(getattr(x, "shape", ()))
  if not shape or shape[-1] != n_in:
    raise ValueError(
        f"x has shape {shape}: its last dimension must be n_in={n_in} of the {what}."
    )


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
    raise ValueError(
        f"block_size={block_size} must be a positive divisor of n_out={n_out}."
    )
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


def check_fraction(value: Any, name: str) -> float:
  """Checks a Python float in (0, 1]."""
  value = float(value)
  if not (0.0 < value <= 1.0):
    raise ValueError(f"{name}={value} must lie in (0, 1].")
  return value
