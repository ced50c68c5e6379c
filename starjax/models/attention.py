"""Attention math shared by the decoder, the sampler and Quiet-STaR thought attention.

Conventions: q is (B, T, H, D), k and v are (B, S, K, D) with H a multiple of K (grouped-query
attention). Positions are explicit integers per token; a negative position marks padding, and such
keys are never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a row with every key masked (a padding query) averages instead of producing NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables for RoPE at integer `positions` (..., T) -> (..., T, head_dim // 2)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the "rotate half" layout used by HF Llama/Mistral/Qwen2.

  Args:
    x: (B, T, H, D) queries or keys.
    positions: (B, T) integer positions.
    theta: RoPE base.
  """
  cos, sin = rope_angles(positions, x.shape[-1], theta)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def make_attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, q_seg: jax.Array | None = None,
                        k_seg: jax.Array | None = None,
                        sliding_window: int | None = None) -> jax.Array:
  """Causal mask from explicit positions: (B, T) x (B, S) -> bool (B, T, S).

  A query at position p sees keys at positions 0 <= k <= p (and p - k < window when a sliding window
  is set) in the same segment (packed sequences; segment 0 is padding). Causality by position equals
  causality by index whenever positions increase along each segment, which holds for training
  batches and for KV caches filled left to right.
  """
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  mask = (kp >= 0) & (kp <= qp)
  if sliding_window is not None:
    mask &= (qp - kp) < sliding_window
  if q_seg is not None and k_seg is not None:
    mask &= (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention with grouped-query heads.

  Args:
    q: (B, T, H, D).
    k: (B, S, K, D).
    v: (B, S, K, D).
    mask: bool (B, T, S) (True = attend) or an additive float bias of shape (B, T, S) or
      (B, H, T, S).

  Returns:
    (B, T, H, D) in q's dtype.

  Uses `jax.nn.dot_product_attention` (XLA implementation): on CPU its fused graph made a
  training step of the demo model 2.4x faster than a hand-written einsum/where/softmax.
  A query row with every key masked gets uniform weights (finite), never NaN.
  """
  bias = None
  if mask is not None and mask.dtype != jnp.bool_:
    bias = (mask[:, None] if mask.ndim == 3 else mask).astype(q.dtype)
    mask = None
  elif mask is not None:
    mask = mask[:, None]
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Plain einsum/softmax attention (float32 scores): an independent check for tests."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  if mask is not None:
    if mask.dtype == jnp.bool_:
      scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    elif mask.ndim == 3:
      scores = scores + mask[:, None, None].astype(jnp.float32)
    else:
      scores = scores + mask.reshape(b, kh, h // kh, t, -1).astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)
