"""lrcc-jax: low-rank conditional computation for ReLU networks in JAX.

Implements Davis & Arel, "Low-Rank Approximations for Conditional Feedforward Computation
in Deep Neural Networks" (arXiv:1312.4461): a truncated SVD of each layer's kernel predicts
the sign of every pre-activation, and units predicted non-positive are not computed.

Importing the package is cheap: every public name below is imported from its module on
first use (PEP 562), so ``lrcc-jax --help`` and argument errors answer before JAX loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
  "LowRankEstimator": ("lrcc_jax._estimator", "LowRankEstimator"),
  "estimate": ("lrcc_jax._estimator", "estimate"),
  "fit_data_aware": ("lrcc_jax._estimator", "fit_data_aware"),
  "fit_svd": ("lrcc_jax._estimator", "fit_svd"),
  "sign_mask": ("lrcc_jax._estimator", "sign_mask"),
  "fit_trained": ("lrcc_jax._trained", "fit_trained"),
  "ESTIMATORS": ("lrcc_jax._registry", "ESTIMATORS"),
  "fit_estimator": ("lrcc_jax._registry", "fit_estimator"),
  "PackedFFN": ("lrcc_jax._ffn", "PackedFFN"),
  "conditional_ffn": ("lrcc_jax._ffn", "conditional_ffn"),
  "pack_ffn": ("lrcc_jax._ffn", "pack_ffn"),
  "packed_ffn": ("lrcc_jax._ffn", "packed_ffn"),
  "LayerCost": ("lrcc_jax._flops", "LayerCost"),
  "layer_flops": ("lrcc_jax._flops", "layer_flops"),
  "network_costs": ("lrcc_jax._flops", "network_costs"),
  "theoretical_speedup": ("lrcc_jax._flops", "theoretical_speedup"),
  "conditional_dense": ("lrcc_jax._layers", "conditional_dense"),
  "masked_dense": ("lrcc_jax._layers", "masked_dense"),
  "unit_mask": ("lrcc_jax._layers", "unit_mask"),
  "PackedMLP": ("lrcc_jax._mlp", "PackedMLP"),
  "packed_mlp": ("lrcc_jax._mlp", "packed_mlp"),
  "native_kernel_status": ("lrcc_jax._native", "status"),
  "PackedDense": ("lrcc_jax._packed", "PackedDense"),
  "pack": ("lrcc_jax._packed", "pack"),
  "packed_dense": ("lrcc_jax._packed", "packed_dense"),
  "SparseRows": ("lrcc_jax._sparse", "SparseRows"),
  "densify": ("lrcc_jax._sparse", "densify"),
  "sparse_packed_dense": ("lrcc_jax._sparse", "sparse_packed_dense"),
  "block_sparse_dense_masked": ("lrcc_jax._pallas", "block_sparse_dense_masked"),
  "block_sparse_dense_prefetch": ("lrcc_jax._pallas", "block_sparse_dense_prefetch"),
  "Policy": ("lrcc_jax._policy", "Policy"),
  "export_checks": ("lrcc_jax._policy", "export_checks"),
  "policy_status": ("lrcc_jax._policy", "policy_status"),
  "RankSelection": ("lrcc_jax._rank_select", "RankSelection"),
  "select_ranks": ("lrcc_jax._rank_select", "select_ranks"),
  "calibrate_threshold": ("lrcc_jax._stats", "calibrate_threshold"),
  "estimator_stats": ("lrcc_jax._stats", "estimator_stats"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  try:
    module, attr = _EXPORTS[name]
  except KeyError:
    raise AttributeError(f"module 'lrcc_jax' has no attribute {name!r}") from None
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
  from lrcc_jax._estimator import LowRankEstimator as LowRankEstimator
  from lrcc_jax._estimator import estimate as estimate
  from lrcc_jax._estimator import fit_data_aware as fit_data_aware
  from lrcc_jax._estimator import fit_svd as fit_svd
  from lrcc_jax._estimator import sign_mask as sign_mask
  from lrcc_jax._ffn import PackedFFN as PackedFFN
  from lrcc_jax._ffn import conditional_ffn as conditional_ffn
  from lrcc_jax._ffn import pack_ffn as pack_ffn
  from lrcc_jax._ffn import packed_ffn as packed_ffn
  from lrcc_jax._flops import LayerCost as LayerCost
  from lrcc_jax._flops import layer_flops as layer_flops
  from lrcc_jax._flops import network_costs as network_costs
  from lrcc_jax._flops import theoretical_speedup as theoretical_speedup
  from lrcc_jax._layers import conditional_dense as conditional_dense
  from lrcc_jax._layers import masked_dense as masked_dense
  from lrcc_jax._layers import unit_mask as unit_mask
  from lrcc_jax._mlp import PackedMLP as PackedMLP
  from lrcc_jax._mlp import packed_mlp as packed_mlp
  from lrcc_jax._native import status as native_kernel_status
  from lrcc_jax._packed import PackedDense as PackedDense
  from lrcc_jax._packed import pack as pack
  from lrcc_jax._packed import packed_dense as packed_dense
  from lrcc_jax._pallas import block_sparse_dense_masked as block_sparse_dense_masked
  from lrcc_jax._pallas import block_sparse_dense_prefetch as block_sparse_dense_prefetch
  from lrcc_jax._policy import Policy as Policy
  from lrcc_jax._policy import export_checks as export_checks
  from lrcc_jax._policy import policy_status as policy_status
  from lrcc_jax._rank_select import RankSelection as RankSelection
  from lrcc_jax._rank_select import select_ranks as select_ranks
  from lrcc_jax._registry import ESTIMATORS as ESTIMATORS
  from lrcc_jax._registry import fit_estimator as fit_estimator
  from lrcc_jax._sparse import SparseRows as SparseRows
  from lrcc_jax._sparse import densify as densify
  from lrcc_jax._sparse import sparse_packed_dense as sparse_packed_dense
  from lrcc_jax._stats import calibrate_threshold as calibrate_threshold
  from lrcc_jax._stats import estimator_stats as estimator_stats
  from lrcc_jax._trained import fit_trained as fit_trained
