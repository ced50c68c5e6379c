"""Attention math shared by the decoder, the sampler and Quiet-STaR thought attention.

Conventions: q is (B, T, H, D), k and v are (B, S, K, D) with H a multiple of K (grouped-query
attention). Positions are explicit integers per token; a negative position marks padding, and such
keys are never attended to.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from starjax.models import config as config_lib
from starjax.models import matmul as matmul_lib

# Finite, so a row with every key masked (a padding query) averages instead of producing NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Query rows per block when a causal mask lets `recompute_attention` skip the blocks above the
# diagonal: at 1024 tokens, 4 blocks do 62.5% of the full score work. 128 measured the same speed
# on a 2-core EPYC with 5% more peak memory (the SmolLM2-135M step keeps every block's residuals).
CAUSAL_BLOCK = 256


@jax.tree_util.register_pytree_node_class
class CausalMask:
  """A bool (B, T, T) mask that is False wherever the key index exceeds the query index.

  Wrapping a mask in it lets attention skip the key blocks above the diagonal (on CPU, where
  attention is `recompute_attention`). Training rows qualify, packed or not: positions increase
  along each segment, so a later key is either a later position or another segment. A pytree, so
  it passes through `nn.scan`, remat and jit like the plain mask.
  """

  def __init__(self, mask: jax.Array):
    self.mask = mask

  def tree_flatten(self):
    return (self.mask,), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


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
                          mask: jax.Array | CausalMask | None = None,
                          operand_dtype: Any = None, impl: str = "auto") -> jax.Array:
  """Softmax attention with grouped-query heads.

  Args:
    q: (B, T, H, D).
    k: (B, S, K, D).
    v: (B, S, K, D).
    mask: bool (B, T, S) (True = attend), a `CausalMask`, or an additive float bias of shape
      (B, T, S) or (B, H, T, S).
    operand_dtype: dtype of the matmul operands on CPU (e.g. bf16 with f32 activations; see
      `starjax.models.matmul`); default q's dtype. Elsewhere the products take q's dtype.
    impl: "auto", "xla" or "cudnn" (`ModelConfig.attention`).

  Returns:
    (B, T, H, D) in q's dtype.

  "auto" on CPU is `recompute_attention`: the backward pass recomputes the probabilities instead
  of keeping them. In XLA's graph, the saved probabilities, their stacking across the scanned
  layers and a transpose with a size-3 minor dimension took over half of a SmolLM2-135M training
  step at 1024 tokens on a 2-core Xeon; with `starjax.models.matmul`, that step went from 18.5 to
  7.8 s. On GPU, "auto" takes cuDNN's flash attention for bf16/fp16 passes under a `CausalMask`
  (training rows; see `use_cudnn_flash`), which never materialises the (T, S) probabilities and skips
  the blocks above the diagonal; everything else is `jax.nn.dot_product_attention`'s XLA
  implementation. A query row with every key masked gets finite weights, never NaN.
  """
  if impl not in config_lib.ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r}; expected one of {config_lib.ATTENTION_IMPLS}.")
  if impl == "auto" and matmul_lib.cpu_kernels():
    return recompute_attention(q, k, v, mask, operand_dtype)
  causal = isinstance(mask, CausalMask)
  if causal:
    mask = mask.mask
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"attention='cudnn' needs the GPU backend; this one is "
                     f"{jax.default_backend()!r}. Use 'auto' or 'xla'.")
  use_cudnn = impl == "cudnn" or (impl == "auto" and causal and use_cudnn_flash(q, k))
  bias = None
  if mask is not None and mask.dtype != jnp.bool_:
    bias = (mask[:, None] if mask.ndim == 3 else mask).astype(q.dtype)
    mask = None
  elif mask is not None:
    mask = mask[:, None]
  if use_cudnn:
    # The mask goes in as an additive bias (segments, padding); `is_causal` lets cuDNN skip the
    # key blocks above the diagonal, which the mask of a `CausalMask` has masked anyway.
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                        implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


def cudnn_flash_supported(dtype: Any, head_dim: int) -> bool:
  """Whether cuDNN flash attention runs here: the GPU backend, bf16/fp16 operands and a head
  width cuDNN supports (a multiple of 8, at most 128)."""
  return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def use_cudnn_flash(q: jax.Array, k: jax.Array) -> bool:
  """Whether "auto" attention takes cuDNN flash attention for these operands: supported
  (`cudnn_flash_supported`) and as many keys as queries."""
  return cudnn_flash_supported(q.dtype, q.shape[-1]) and q.shape[1] == k.shape[1]


def recompute_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | CausalMask | None = None,
                        operand_dtype: Any = None) -> jax.Array:
  """`dot_product_attention` whose backward recomputes the probabilities (FlashAttention's
  trick, without the tiling): it saves only the output and each row's max and sum of exponentials.

  Query heads that share a key/value head are stacked along the rows, so each (batch, kv head)
  is one (G*T, D) x (D, S) product. The backward pass recomputes the scores transposed, (S, G*T),
  so that every product in it is a plain row-major matmul and nothing larger than q, k or v is
  ever transposed. Scores and softmax are float32; the products take `operand_dtype` (default
  q's) with float32 accumulation. Same arguments and result as `dot_product_attention`.

  With a `CausalMask`, query block i (`CAUSAL_BLOCK` rows) attends only to keys of blocks <= i:
  the blocks above the diagonal, all masked, are never computed (about half the work on long
  rows).
  """
  dt = jnp.dtype(operand_dtype or q.dtype)
  kt, vt = (_row_major(x.transpose(0, 2, 1, 3).astype(dt)) for x in (k, v))  # (B, K, S, D)
  t = q.shape[1]
  if isinstance(mask, CausalMask):
    mask = mask.mask
    if t == k.shape[1] and t > CAUSAL_BLOCK:
      outs = []
      for start in range(0, t, CAUSAL_BLOCK):
        stop = min(start + CAUSAL_BLOCK, t)
        # The last block takes the whole of kt, vt; earlier ones a row-major copy of their prefix.
        kb, vb = (x if stop == t else _row_major(x[:, :, :stop]) for x in (kt, vt))
        outs.append(_attend(q[:, start:stop], kb, vb, mask[:, start:stop, :stop], dt))
      return jnp.concatenate(outs, axis=1)
  return _attend(q, kt, vt, mask, dt)


def _attend(q: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array | None,
            dt: Any) -> jax.Array:
  """`recompute_attention` on keys/values already in (B, K, S, D) layout and operand dtype."""
  b, t, h, d = q.shape
  kh = kt.shape[1]
  g = h // kh
  # (B, T, K, G, D) -> (B, K, G*T, D).
  qg = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d)
  if mask is None:
    mask = jnp.ones((b, t, kt.shape[2]), jnp.bool_)
  elif mask.dtype != jnp.bool_:
    mask = mask.astype(jnp.float32)
    mask = mask[:, None, None] if mask.ndim == 3 else mask.reshape(b, kh, g, t, -1)
  out = _recompute_attention(_row_major(qg.astype(dt)), kt, vt, mask)
  out = out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  return out.astype(q.dtype)


def _row_major(x: jax.Array) -> jax.Array:
  """x, materialised row-major: a transposed view would make XLA CPU upcast bf16 products."""
  return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


# Shared with the dense layers: row-major transposes XLA cannot fold, f32-accumulated products.
_swap = matmul_lib.transpose_2d
_mm = matmul_lib.dot


@jax.custom_vjp
def _recompute_attention(qg: jax.Array, kt: jax.Array, vt: jax.Array,
                         mask: jax.Array) -> jax.Array:
  return _recompute_fwd(qg, kt, vt, mask)[0]


def _recompute_fwd(qg, kt, vt, mask):
  b, kh, m, d = qg.shape
  t, s_len = mask.shape[-2:]
  s = (_mm(qg, _swap(kt)) * (d ** -0.5)).reshape(b, kh, m // t, t, s_len)
  s = jnp.where(mask[:, None, None], s, MASK_VALUE) if mask.dtype == jnp.bool_ else s + mask
  top = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  p = (e / total).reshape(b, kh, m, s_len)
  out = _mm(p.astype(vt.dtype), vt).astype(qg.dtype)
  # The row max and the sum are kept apart: with fully masked rows, max + log(sum) rounds to max.
  stats = (top.reshape(b, kh, 1, m), total.reshape(b, kh, 1, m))
  pack = matmul_lib.pack_residual
  return out, (pack(qg), pack(kt), pack(vt), mask, pack(out), stats)


def _recompute_bwd(res, d_out):
  qg, kt, vt, mask, out, (top, total) = res
  qg, kt, vt, out = (matmul_lib.unpack_residual(x) for x in (qg, kt, vt, out))
  b, kh, m, d = qg.shape
  t, s_len = mask.shape[-2:]
  scale = d ** -0.5
  d_out = d_out.astype(qg.dtype)
  # Everything in the transposed orientation: rows are keys (S), columns query rows (G*T).
  s_t = (_mm(kt, _swap(qg)) * scale).reshape(b, kh, s_len, m // t, t)
  if mask.dtype == jnp.bool_:
    mask_t = jnp.swapaxes(mask, -1, -2)[:, None, :, None, :]  # (B, 1, S, 1, T)
    s_t = jnp.where(mask_t, s_t, MASK_VALUE)
  else:
    mask_t = jnp.moveaxis(jnp.swapaxes(mask, -1, -2), 2, 3)  # (B, K|1, S, G|1, T)
    s_t = s_t + mask_t
  p_t = jnp.exp(s_t.reshape(b, kh, s_len, m) - top) / total
  dv = _mm(p_t.astype(qg.dtype), d_out).astype(vt.dtype)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None]
  # dp - delta as one product, [v | 1] @ [do^T ; -delta]: as a separate broadcast, XLA CPU fused
  # delta's reduction into the product's epilogue and redid it for every key row (a third of
  # the step). In bf16, delta is split into two bf16 rows (hi + lo) to keep ~16 bits of it.
  if qg.dtype == jnp.bfloat16:
    hi = delta.astype(jnp.bfloat16)
    rows = jnp.concatenate([-hi, -(delta - hi.astype(jnp.float32)).astype(jnp.bfloat16)], axis=2)
  else:
    rows = -delta.astype(qg.dtype)
  ones = jnp.ones((b, kh, s_len, rows.shape[2]), qg.dtype)
  dp_minus_delta = _mm(jnp.concatenate([vt.astype(qg.dtype), ones], axis=-1),
                       jnp.concatenate([_swap(d_out), rows], axis=2))
  ds_t = p_t * dp_minus_delta  # d loss / d (masked, scaled) scores, transposed.
  if mask.dtype == jnp.bool_:  # Masked scores are constants: no gradient reaches q or k there.
    ds_t = jnp.where(mask_t, ds_t.reshape(s_t.shape), 0.0).reshape(b, kh, s_len, m)
  dsq_t = (ds_t * scale).astype(qg.dtype)
  dk = _mm(dsq_t, qg).astype(kt.dtype)
  # The barrier keeps XLA from turning transpose(dot) into a dot with transposed operands, which
  # on bf16 operands XLA CPU cannot run.
  dq = _swap(jax.lax.optimization_barrier(_mm(_swap(kt), dsq_t))).astype(qg.dtype)
  d_mask = None
  if mask.dtype != jnp.bool_:
    ds = jnp.moveaxis(ds_t.reshape(s_t.shape), 2, 4)  # (B, K, G, T, S)
    axes = tuple(i for i in range(5) if mask.shape[i] == 1 and ds.shape[i] != 1)
    d_mask = jnp.sum(ds, axis=axes, keepdims=True).astype(mask.dtype)
  return dq, dk, dv, d_mask


_recompute_attention.defvjp(_recompute_fwd, _recompute_bwd)


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
