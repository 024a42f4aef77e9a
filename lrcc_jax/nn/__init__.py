"""Flax NNX modules: thin wrappers over the lrcc-jax functional core.

Each module keeps its parameters in the Flax layout for training and delegates the math to
the pure functions of `lrcc_jax` (`conditional_dense`, `packed_dense`, `packed_mlp`).
"""

from lrcc_jax.nn._ffn import ConditionalFFN as ConditionalFFN
from lrcc_jax.nn._ffn import PackedCache as PackedCache
from lrcc_jax.nn._modules import MODES as MODES
from lrcc_jax.nn._modules import ConditionalDense as ConditionalDense
from lrcc_jax.nn._modules import ConditionalMLP as ConditionalMLP
from lrcc_jax.nn._modules import EstimatorFactor as EstimatorFactor
from lrcc_jax.nn._modules import Mode as Mode
from lrcc_jax.nn._modules import PackedWeight as PackedWeight
from lrcc_jax.nn._modules import Threshold as Threshold
from lrcc_jax.nn._modules import default_rank as default_rank
