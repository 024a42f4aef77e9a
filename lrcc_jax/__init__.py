"""lrcc-jax: low-rank conditional computation for ReLU networks in JAX.

Implements Davis & Arel, "Low-Rank Approximations for Conditional Feedforward Computation
in Deep Neural Networks" (arXiv:1312.4461): a truncated SVD of each layer's kernel predicts
the sign of every pre-activation, and units predicted non-positive are not computed.
"""

from lrcc_jax._estimator import LowRankEstimator as LowRankEstimator
from lrcc_jax._estimator import estimate as estimate
from lrcc_jax._estimator import fit_data_aware as fit_data_aware
from lrcc_jax._estimator import fit_svd as fit_svd
from lrcc_jax._estimator import sign_mask as sign_mask
from lrcc_jax._trained import fit_trained as fit_trained
from lrcc_jax._flops import LayerCost as LayerCost
from lrcc_jax._flops import layer_flops as layer_flops
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
from lrcc_jax._sparse import SparseRows as SparseRows
from lrcc_jax._sparse import densify as densify
from lrcc_jax._sparse import sparse_packed_dense as sparse_packed_dense
from lrcc_jax._pallas import block_sparse_dense_masked as block_sparse_dense_masked
from lrcc_jax._pallas import block_sparse_dense_prefetch as block_sparse_dense_prefetch
from lrcc_jax._policy import Policy as Policy
from lrcc_jax._policy import export_checks as export_checks
from lrcc_jax._policy import policy_status as policy_status
from lrcc_jax._rank_select import RankSelection as RankSelection
from lrcc_jax._rank_select import select_ranks as select_ranks
from lrcc_jax._stats import calibrate_threshold as calibrate_threshold
from lrcc_jax._stats import estimator_stats as estimator_stats

__version__ = "0.1.0"
