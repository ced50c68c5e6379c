"""Thought attention without the L x (L * S) mask: one causal L x L block plus a diagonal term.

At thought step k, row t (branch t) sees the base keys of real tokens j <= t and, from every earlier
thought step j = 1..k (the current one included), only its own key K_j[t]. Both score blocks are
computed explicitly, (L x L) and (L x J), concatenated and softmaxed together, so the cost is
O(L^2 + L * J) per step instead of O(L^2 * J) with a dense mask, and no L x (L * J) array exists.

Conventions follow `starjax.models.attention`: q (B, L, H, D), base keys/values (B, L, K, D), H a
multiple of K (grouped-query attention), scores and softmax in float32. Thought keys/values are
stored per step: (J, B, L, K, D), slot j holding step j + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from starjax.models import attention as attn_lib

Array = jax.Array


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


def thought_attention(q: Array, k_base: Array, v_base: Array, base_mask: Array, k_thought: Array,
                      v_thought: Array, thought_mask: Array) -> Array:
  """Attention of one thought step over the base keys and the branch's own thought keys.

  Args:
    q: (B, L, H, D) queries of the current step (rotated at positions t + k).
    k_base: (B, L, K, D) base-pass keys.
    v_base: (B, L, K, D) base-pass values.
    base_mask: bool (B, L, L), True where row t may see base key j.
    k_thought: (J, B, L, K, D) thought keys; slot j, row t is branch t's key of that step.
    v_thought: (J, B, L, K, D) thought values.
    thought_mask: bool, broadcastable to (B, L, J): which slots row t sees.

  Returns:
    (B, L, H, D) in q's dtype.
  """
  b, n, h, d = q.shape
  kh = k_base.shape[2]
  n_slots = k_thought.shape[0]
  qg = q.reshape(b, n, kh, h // kh, d)
  scale = d ** -0.5
  s_base = jnp.einsum("btkgd,bskd->bkgts", qg, k_base,
                      preferred_element_type=jnp.float32) * scale
  s_diag = jnp.einsum("btkgd,jbtkd->bkgtj", qg, k_thought,
                      preferred_element_type=jnp.float32) * scale
  s_base = jnp.where(base_mask[:, None, None], s_base, attn_lib.MASK_VALUE)
  diag_mask = jnp.broadcast_to(thought_mask, (b, n, n_slots))
  s_diag = jnp.where(diag_mask[:, None, None], s_diag, attn_lib.MASK_VALUE)
  probs = jax.nn.softmax(jnp.concatenate([s_base, s_diag], axis=-1), axis=-1)
  p_base = probs[..., :n].astype(v_base.dtype)
  p_diag = probs[..., n:].astype(v_thought.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", p_base, v_base, preferred_element_type=jnp.float32)
  out = out + jnp.einsum("bkgtj,jbtkd->btkgd", p_diag, v_thought,
                         preferred_element_type=jnp.float32)
  return out.reshape(b, n, h, d).astype(q.dtype)


def dense_thought_attention(q: Array, k_base: Array, v_base: Array, base_mask: Array,
                            k_thought: Array, v_thought: Array, thought_mask: Array) -> Array:
  """Reference for tests and benchmarks: the same attention through an explicit dense mask.

  Builds the (B, L, L * (J + 1)) mask of the reference implementation (causal block, then one
  identity block per thought step) and calls the decoder's `dot_product_attention`.
  Same arguments and result as `thought_attention`.
  """
  b, n = q.shape[:2]
  n_slots = k_thought.shape[0]
  keys = jnp.concatenate([k_base] + [k_thought[j] for j in range(n_slots)], axis=1)
  values = jnp.concatenate([v_base] + [v_thought[j] for j in range(n_slots)], axis=1)
  slots = jnp.broadcast_to(thought_mask, (b, n, n_slots))
  eye = jnp.eye(n, dtype=bool)[None]
  blocks = [base_mask.astype(bool)] + [eye & slots[:, :, j, None] for j in range(n_slots)]
  return attn_lib.dot_product_attention(q, keys, values, jnp.concatenate(blocks, axis=-1))
