"""cuDNN flash attention, the GPU "auto" attention path, against independent references.

Skipped without a GPU backend (CI has none). On a lent GPU:

  JAX_PLATFORMS=cuda python -m pytest tests/test_gpu_attention.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax.models import attention as attn_lib
from starjax.models import config as config_lib
from starjax.models import llama

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")

B, T, H, K, D = 2, 320, 8, 2, 64


def _packed_rows():
  """Row 0: two packed segments and padding; row 1: one segment. Positions restart per segment."""
  seg = np.ones((B, T), np.int32)
  seg[0, 200:300] = 2
  seg[0, 300:] = 0
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for s in np.unique(seg[b]):
      idx = np.flatnonzero(seg[b] == s)
      pos[b, idx] = np.arange(idx.size) if s else -1
  return pos, seg


def _mask():
  pos, seg = _packed_rows()
  return np.asarray(attn_lib.make_attention_mask(jnp.asarray(pos), jnp.asarray(pos),
                                                 q_seg=jnp.asarray(seg), k_seg=jnp.asarray(seg)))


def _reference_f64(q, k, v, mask):
  """Plain float64 softmax attention with grouped-query heads (rows with no key: zeros)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None], s, -np.inf)
  top = np.max(s, axis=-1, keepdims=True)
  e = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
  p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(dtype):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype),
          jax.random.normal(kk, (B, T, K, D), jnp.float32).astype(dtype),
          jax.random.normal(kv, (B, T, K, D), jnp.float32).astype(dtype))


def test_auto_takes_cudnn_for_bf16_causal_passes():
  q, k, v = _qkv(jnp.bfloat16)
  mask = attn_lib.CausalMask(jnp.asarray(_mask()))
  hlo = jax.jit(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask)).lower(
      q, k, v).as_text()
  assert "cudnn" in hlo
  plain = jax.jit(lambda q, k, v: attn_lib.dot_product_attention(q, k, v, mask.mask)).lower(
      q, k, v).as_text()
  assert "cudnn" not in plain  # An explicit mask (no causal guarantee) stays on XLA.


def test_cudnn_forward_matches_float64_on_packed_rows():
  q, k, v = _qkv(jnp.bfloat16)
  mask = _mask()
  out = jax.jit(lambda q, k, v: attn_lib.dot_product_attention(
      q, k, v, attn_lib.CausalMask(jnp.asarray(mask)), impl="cudnn"))(q, k, v)
  ref = _reference_f64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
  live = mask.any(-1)  # Padding queries attend to nothing: their output is unspecified.
  got = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[live], ref[live], atol=3e-2, rtol=3e-2)


def test_cudnn_gradients_match_xla_float32():
  q, k, v = _qkv(jnp.bfloat16)
  mask = jnp.asarray(_mask())
  w = jax.random.normal(jax.random.key(1), (B, T, H, D), jnp.float32) * mask.any(-1)[..., None,
                                                                                        None]

  def loss(impl, dtype):
    def f(q, k, v):
      m = attn_lib.CausalMask(mask) if impl == "cudnn" else mask
      o = attn_lib.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), m,
                                         impl=impl)
      return jnp.sum(o.astype(jnp.float32) * w)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  got = loss("cudnn", jnp.bfloat16)(qf, kf, vf)
  ref = loss("xla", jnp.float32)(qf, kf, vf)
  for g, r in zip(got, ref):
    g, r = np.asarray(g), np.asarray(r)
    assert np.isfinite(g).all()
    scale = np.abs(r).max()
    np.testing.assert_allclose(g / scale, r / scale, atol=3e-2)


def test_model_loss_and_grads_equal_with_cudnn_and_xla_attention():
  base = config_lib.preset("tiny", dtype="bfloat16")
  base = base.replace(n_heads=4, n_kv_heads=2, head_dim=32, dim=128)
  pos, seg = _packed_rows()
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, base.vocab_size)
  params = llama.Transformer(base).init(jax.random.key(3), tokens, jnp.asarray(pos),
                                        segment_ids=jnp.asarray(seg))["params"]
  live = jnp.asarray(seg > 0, jnp.float32)

  def loss_fn(cfg):
    def f(p):
      logits = llama.Transformer(cfg).apply({"params": p}, tokens, jnp.asarray(pos),
                                            segment_ids=jnp.asarray(seg)).logits
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.sum(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
                      * live[:, 1:]) / jnp.sum(live[:, 1:])
    return jax.jit(jax.value_and_grad(f))

  l_auto, g_auto = loss_fn(base)(params)
  l_xla, g_xla = loss_fn(base.replace(attention="xla"))(params)
  np.testing.assert_allclose(float(l_auto), float(l_xla), rtol=1e-2)
  for a, x in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_xla)):
    a, x = np.asarray(a, np.float32), np.asarray(x, np.float32)
    scale = np.abs(x).max() + 1e-12
    np.testing.assert_allclose(a / scale, x / scale, atol=5e-2)
