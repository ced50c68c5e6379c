"""Thought attention without the L x (L * S) mask: one causal L x L block plus a diagonal term.

At thought step k, row t (branch t) sees the base keys of real tokens j <= t and, from every earlier
thought step j = 1..k (the current one included), only its own key K_j[t]. Both score blocks are
computed explicitly, (L x L) and (L x J), concatenated and softmaxed together, so the cost is
O(L^2 + L * J) per step instead of O(L^2 * J) with a dense mask, and no L x (L * J) array exists.

Conventions follow `starjax.models.attention`: q (B, L, H, D), base keys/values (B, L, K, D), H a
multiple of K (grouped-query attention), scores and softmax in float32. Thought keys/values are
kept in per-slot buffers, slot j holding step j + 1: keys (B, L, K, D, J), values (B, L, K, J, D)
(`empty_thought_kv`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from starjax.models import attention as attn_lib
from starjax.models import matmul as matmul_lib

Array = jax.Array
_dot = matmul_lib.dot  # Batched (..., M, K) x (..., K, N), f32 accumulation.


def base_block_mask(valid: Array, step: Array | int, sliding_window: int | None = None) -> Array:
  """bool (B, L, L): may row t at thought step `step` (position t + step) see base key j?

  Keys must be real tokens (`valid`) at or before t; with a sliding window the distance in
  positions, t + step - j, must also be below the window.
  """
  n = valid.shape[1]
  t = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  mask = (j <= t)[None] & valid[:, None, :].astype(bool)
  if sliding_window is not None:
    mask &= ((t + step - j) < sliding_window)[None]
  return mask


def thought_slot_mask(step: Array | int, n_slots: int,
                      sliding_window: int | None = None) -> Array:
  """bool (n_slots,): which thought slots (slot i = step i + 1) a query at `step` sees."""
  slot_step = jnp.arange(n_slots) + 1
  mask = slot_step <= step
  if sliding_window is not None:
    mask &= (step - slot_step) < sliding_window
  return mask


def empty_thought_kv(batch: int, length: int, n_kv_heads: int, head_dim: int, n_slots: int,
                     dtype: Any) -> tuple[Array, Array]:
  """Zero thought key/value buffers: keys (B, L, K, D, J), values (B, L, K, J, D).

  Slot j holds step j + 1. The slot axis sits next to the head dimension so that the diagonal
  term is one canonical batched product per (example, row, kv head): q (G, D) x keys (D, J) and
  probabilities (G, J) x values (J, D), with no transpose of the buffers.
  """
  shape = (batch, length, n_kv_heads)
  return (jnp.zeros(shape + (head_dim, n_slots), dtype),
          jnp.zeros(shape + (n_slots, head_dim), dtype))


def write_thought_kv(k_thought: Array, v_thought: Array, k: Array, v: Array, slot: Array | int
                     ) -> tuple[Array, Array]:
  """Stores one step's keys/values (..., B, L, K, D) in `slot` of the buffers (any leading axes)."""
  return (jax.lax.dynamic_update_index_in_dim(k_thought, k.astype(k_thought.dtype), slot,
                                              k_thought.ndim - 1),
          jax.lax.dynamic_update_index_in_dim(v_thought, v.astype(v_thought.dtype), slot,
                                              v_thought.ndim - 2))


def read_thought_kv(k_thought: Array, v_thought: Array, slot: Array | int) -> tuple[Array, Array]:
  """The keys/values (..., B, L, K, D) held in `slot`."""
  return (jax.lax.dynamic_index_in_dim(k_thought, slot, k_thought.ndim - 1, keepdims=False),
          jax.lax.dynamic_index_in_dim(v_thought, slot, v_thought.ndim - 2, keepdims=False))


def thought_attention(q: Array, k_base: Array, v_base: Array, base_mask: Array, k_thought: Array,
                      v_thought: Array, thought_mask: Array) -> Array:
  """Attention of one thought step over the base keys and the branch's own thought keys.

  Args:
    q: (B, L, H, D) queries of the current step (rotated at positions t + k).
    k_base: (B, L', K, D) base-pass keys (L' may differ from L: a block of rows needs only the
      keys up to its last row).
    v_base: (B, L', K, D) base-pass values.
    base_mask: bool (B, L, L'), True where row t may see base key j.
    k_thought: (B, L, K, D, J) thought keys; [b, t, :, :, j] is branch t's key of slot j.
    v_thought: (B, L, K, J, D) thought values (layouts: `empty_thought_kv`).
    thought_mask: bool, broadcastable to (B, L, J): which slots row t sees.

  Returns:
    (B, L, H, D) in q's dtype.
  """
  b, n, h, d = q.shape
  m, kh = k_base.shape[1:3]
  g = h // kh
  scale = d ** -0.5
  # The base block as one (G * L, D) x (D, L) product per (example, kv head): XLA CPU then keeps
  # the scores in (b, k, g, t, s) order instead of transposing them between the products.
  qh = q.reshape(b, n, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * n, d)
  s_base = _dot(qh, k_base.transpose(0, 2, 3, 1)).reshape(b, kh, g, n, m) * scale
  s_base = jnp.where(base_mask[:, None, None], s_base, attn_lib.MASK_VALUE)
  s_diag = _dot(q.reshape(b, n, kh, g, d), k_thought) * scale  # (b, t, k, g, j)
  s_diag = jnp.where(jnp.broadcast_to(thought_mask, (b, n, k_thought.shape[-1]))[:, :, None, None],
                     s_diag, attn_lib.MASK_VALUE)
  probs = jax.nn.softmax(
      jnp.concatenate([s_base, s_diag.transpose(0, 2, 3, 1, 4)], axis=-1), axis=-1)
  p_base = probs[..., :m].reshape(b, kh, g * n, m).astype(v_base.dtype)
  p_diag = probs[..., m:].transpose(0, 3, 1, 2, 4).astype(v_thought.dtype)  # (b, t, k, g, j)
  out = _dot(p_base, v_base.transpose(0, 2, 1, 3))                        # (b, k, g * t, d)
  out = out.reshape(b, kh, g, n, d).transpose(0, 3, 1, 2, 4)
  out = out + _dot(p_diag, v_thought)
  return out.reshape(b, n, h, d).astype(q.dtype)


def dense_thought_attention(q: Array, k_base: Array, v_base: Array, base_mask: Array,
                            k_thought: Array, v_thought: Array, thought_mask: Array) -> Array:
  """Reference for tests and benchmarks: the same attention through an explicit dense mask.

  Builds the (B, L, L * (J + 1)) mask of the reference implementation (causal block, then one
  identity block per thought step) and calls the decoder's `dot_product_attention`.
  Same arguments and result as `thought_attention`.
  """
  b, n = q.shape[:2]
  n_slots = k_thought.shape[-1]
  keys = jnp.concatenate([k_base] + [k_thought[..., j] for j in range(n_slots)], axis=1)
  values = jnp.concatenate([v_base] + [v_thought[..., j, :] for j in range(n_slots)], axis=1)
  slots = jnp.broadcast_to(thought_mask, (b, n, n_slots))
  eye = jnp.eye(n, dtype=bool)[None]
  blocks = [base_mask.astype(bool)] + [eye & slots[:, :, j, None] for j in range(n_slots)]
  return attn_lib.dot_product_attention(q, keys, values, jnp.concatenate(blocks, axis=-1))
