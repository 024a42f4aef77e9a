"""The estimator fits by name: one place that knows which fits exist and how to call them.

Every application that lets a user pick an estimator (the modules' `refit`, `select_ranks`,
``lrcc-jax evaluate --estimator``, the sweep, the experiments) calls `fit_estimator`, so a
new fit is one entry of `_FITS` and is offered everywhere at once. All fits share one
signature::

  fit(kernel, rank, inputs=None, *, bias=None, recall=0.99, seed=0, **options)

and ignore what they do not use: ``"svd"`` (the paper's truncated SVD) needs only the
kernel, ``"data_aware"`` the layer's calibration inputs too, ``"trained"`` also the bias
and the recall target it is trained for.

The fits are imported when first called, so the names (`ESTIMATORS`) cost no JAX import:
the command line offers them in ``--help`` and checks ``--estimator`` before JAX loads.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lrcc_jax._checks import describe

if TYPE_CHECKING:
  import jax

  from lrcc_jax._estimator import LowRankEstimator

  Array = jax.Array


def _no_options(name: str, options: Mapping[str, Any]) -> None:
  if options:
    raise ValueError(
      f"estimator {name!r} takes no options, got {sorted(options)}; only 'trained' does"
      " (e.g. steps, learning_rate)."
    )


def _needs(name: str, inputs: Array | None) -> Array:
  if inputs is None:
    raise ValueError(
      f"estimator {name!r} needs calibration inputs (the rows the layer sees); got None."
    )
  return inputs


def _svd(kernel, rank, inputs=None, *, bias=None, recall=0.99, seed=0, fit="exact", **options):
  del inputs, bias, recall, seed
  _no_options("svd", options)
  from lrcc_jax._estimator import fit_svd  # pylint: disable=g-import-not-at-top

  return fit_svd(kernel, rank, method=fit)


def _data_aware(
  kernel, rank, inputs=None, *, bias=None, recall=0.99, seed=0, fit="exact", **options
):
  del bias, recall, seed
  _no_options("data_aware", options)
  from lrcc_jax._estimator import fit_data_aware  # pylint: disable=g-import-not-at-top

  return fit_data_aware(kernel, rank, _needs("data_aware", inputs), method=fit)


def _trained(kernel, rank, inputs=None, *, bias=None, recall=0.99, seed=0, **options):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lrcc_jax._trained import fit_trained  # pylint: disable=g-import-not-at-top

  inputs = _needs("trained", inputs)
  if bias is None:
    bias = jnp.zeros((getattr(kernel, "shape", (0, 0))[-1],), getattr(kernel, "dtype", None))
  return fit_trained(kernel, bias, rank, inputs, recall=recall, seed=seed, **options)


_FITS: Mapping[str, Callable[..., LowRankEstimator]] = types.MappingProxyType(
  {
    "svd": _svd,
    "data_aware": _data_aware,
    "trained": _trained,
  }
)

ESTIMATORS: tuple[str, ...] = tuple(_FITS)
"""The names `fit_estimator` accepts: ``"svd"``, ``"data_aware"``, ``"trained"``."""

NEEDS_INPUTS: frozenset[str] = frozenset({"data_aware", "trained"})
"""The fits that read calibration inputs (the others ignore them)."""


def check_estimator_name(name: Any) -> str:
  """Returns `name` if it is a registered estimator; else raises `ValueError` listing them."""
  if not isinstance(name, str) or name not in _FITS:
    shown = repr(name) if isinstance(name, str) else describe(name)
    raise ValueError(f"estimator {shown} is not one of {', '.join(ESTIMATORS)}.")
  return name


def fit_estimator(
  name: str,
  kernel: Array,
  rank: int,
  inputs: Array | None = None,
  *,
  bias: Array | None = None,
  recall: float = 0.99,
  seed: int = 0,
  **options: Any,
) -> LowRankEstimator:
  """Fits the estimator called `name` to one layer.

  Args:
    name: one of `ESTIMATORS`.
    kernel: (n_in, n_out) kernel.
    rank: static int in [1, min(n_in, n_out)].
    inputs: (..., n_in) calibration inputs of the layer; required by `NEEDS_INPUTS`.
    bias: (n_out,) bias of the layer (``"trained"``; zeros when None).
    recall: recall target of ``"trained"``.
    seed: seed of ``"trained"``'s batch draws.
    **options: ``fit="randomized"`` for ``"svd"`` and ``"data_aware"`` (their `method`
      keyword; the exact fit is the default), or further keyword arguments of
      `fit_trained` (``"trained"`` only).

  Returns:
    A `LowRankEstimator` with `u` (n_in, rank) and `v` (rank, n_out).

  Raises:
    ValueError: for an unknown name (listing the valid ones), missing inputs, options
      given to a fit that takes none, or whatever the fit itself rejects.

  Examples:
    >>> import jax.numpy as jnp
    >>> fit_estimator("svd", jnp.eye(4, 3), 2).u.shape
    (4, 2)
  """
  fit = _FITS[check_estimator_name(name)]
  return fit(kernel, rank, inputs, bias=bias, recall=recall, seed=seed, **options)
