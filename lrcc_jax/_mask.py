"""Block selection: which units a row computes, from the estimate, a threshold and a capacity.

The rule (DESIGN, "How the mask M is built"): units form contiguous blocks of `block_size`;
a block's score is the largest estimate among its units; a block is selected when its
score is above `threshold` and, with a `capacity`, also among the row's `capacity` highest
scores. Every shape here is static, and there is no control flow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def block_scores(z_hat: Array, block_size: int) -> Array:
  """(..., n_out) estimates -> (..., n_blocks) block scores (max over each block)."""
  if block_size == 1:
    return z_hat
  return jnp.max(jnp.reshape(z_hat, z_hat.shape[:-1] + (-1, block_size)), axis=-1)


def above(scores: Array, threshold: float | Array) -> Array:
  """`scores > threshold`, with NaN counted as above (it is computed, never hidden)."""
  return ~(scores <= threshold)


def ranking_scores(scores: Array) -> Array:
  """Scores for `top_k`: NaN ranks first so a NaN block is always computed."""
  return jnp.where(jnp.isnan(scores), jnp.inf, scores)


def top_blocks(scores: Array, capacity: int) -> Array:
  """Indices (..., capacity) of the highest block scores of each row, sorted ascending.

  Sorting keeps the later gathers of weight rows in memory order.
  """
  _, idx = lax.top_k(ranking_scores(scores), capacity)
  return jnp.sort(idx, axis=-1)


def block_selection(
    scores: Array, threshold: float | Array, capacity: int | None
) -> Array:
  """bool (..., n_blocks): the selected blocks of each row."""
  selected = above(scores, threshold)
  if capacity is None or capacity == scores.shape[-1]:
    return selected
  idx = top_blocks(scores, capacity)
  flat_idx = jnp.reshape(idx, (-1, capacity))
  rows = jnp.arange(flat_idx.shape[0])[:, None]
  in_top = jnp.zeros((flat_idx.shape[0], scores.shape[-1]), bool).at[rows, flat_idx].set(True)
  return selected & jnp.reshape(in_top, scores.shape)


def expand_blocks(block_mask: Array, block_size: int) -> Array:
  """(..., n_blocks) -> (..., n_blocks * block_size) by repeating each block's value."""
  if block_size == 1:
    return block_mask
  shape = block_mask.shape
  wide = jnp.broadcast_to(block_mask[..., None], shape + (block_size,))
  return jnp.reshape(wide, shape[:-1] + (shape[-1] * block_size,))
