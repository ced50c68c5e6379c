"""Decoder: shapes for every preset, KV-cache decoding, masks, positions, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models
from starjax.models import attention as attn_lib
from starjax.models import hf as hf_lib

# Jitted once per config (ModelConfig is frozen, hence hashable): eager flax is slow.
forward = jax.jit(models.forward, static_argnums=0)


def _decoder(cfg):
  @jax.jit
  def step(params, tokens, pos, cache, index):
    return models.Transformer(cfg).apply({"params": params}, tokens, pos, cache=cache,
                                         cache_index=index)
  return step


# Published parameter counts (from the model cards / papers) for the large presets.
PUBLISHED = {"smollm2_135m": 134.5e6, "llama2_7b": 6.74e9, "mistral_7b": 7.24e9,
             "qwen2_0_5b": 0.494e9}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_preset_shapes_abstract(name):
  cfg = models.preset(name)
  params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
  assert _count(params) == cfg.num_params()
  if name in PUBLISHED:
    assert abs(cfg.num_params() / PUBLISHED[name] - 1) < 0.01
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  out = jax.eval_shape(lambda p, t: models.forward(cfg, p, t), params, tokens)
  assert out.logits.shape == (2, 16, cfg.vocab_size)
  assert out.hidden.shape == (2, 16, cfg.dim)
  assert out.logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_forward_concrete(name):
  cfg = models.preset(name)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  out = forward(cfg, params, tokens)
  assert out.logits.shape == (2, 8, cfg.vocab_size)
  assert np.isfinite(np.asarray(out.logits)).all()


def test_bf16_compute_keeps_f32_params():
  cfg = models.preset("tiny", dtype="bfloat16")
  params = models.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = forward(cfg, params, jnp.zeros((1, 4), jnp.int32))
  # bf16 everywhere, except on CPU: bf16 matmul operands, f32 activations (`activation_dtype`).
  assert out.logits.dtype == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  ref = forward(cfg.replace(dtype="float32"), params, jnp.zeros((1, 4), jnp.int32))
  np.testing.assert_allclose(np.asarray(out.logits, np.float32), np.asarray(ref.logits),
                             atol=0.05)


VARIANTS = {
    "gqa": {},
    "mha_tied": dict(n_kv_heads=4, tie_embeddings=True),
    "window": dict(sliding_window=3),
    "qkv_bias": dict(qkv_bias=True),
    "mqa_remat": dict(n_kv_heads=1, remat="full"),
}


def _random_params(cfg, seed=0):
  """Random params with non-zero biases and norm scales (so those paths are exercised)."""
  params = models.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_matches_full_forward(variant):
  cfg = models.preset("tiny", **VARIANTS[variant])
  params = _random_params(cfg)
  b, t = 3, 11
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, cfg.vocab_size)
  # Row 1 is left-padded by 3: its pads have position -1 and must be invisible.
  pos = np.tile(np.arange(t), (b, 1))
  pos[1] = np.concatenate([[-1, -1, -1], np.arange(t - 3)])
  pos = jnp.asarray(pos, jnp.int32)
  full = forward(cfg, params, tokens, pos).logits
  step = _decoder(cfg)
  cache = models.init_cache(cfg, b, 16)
  out = step(params, tokens[:, :5], pos[:, :5], cache, 0)
  pieces, cache = [out.logits], out.cache
  for i in range(5, t):
    out = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache, i)
    pieces.append(out.logits)
    cache = out.cache
  stepwise = jnp.concatenate(pieces, axis=1)
  valid = np.asarray(pos) >= 0
  np.testing.assert_allclose(np.asarray(stepwise)[valid], np.asarray(full)[valid], atol=1e-5)
  # The padded row equals the same tokens run alone without padding.
  alone = forward(cfg, params, tokens[1:2, 3:]).logits
  np.testing.assert_allclose(np.asarray(full[1, 3:]), np.asarray(alone[0]), atol=1e-5)


def test_explicit_mask_equals_default_and_changes_output():
  cfg = models.preset("tiny")
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
  pos = jnp.tile(jnp.arange(7), (2, 1))
  mask = attn_lib.make_attention_mask(pos, pos)
  a = forward(cfg, params, tokens, pos).logits
  b = forward(cfg, params, tokens, pos, attn_mask=mask).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # An additive bias of -inf-like values on the same entries gives the same result too.
  bias = jnp.where(mask, 0.0, attn_lib.MASK_VALUE)
  c = forward(cfg, params, tokens, pos, attn_mask=bias).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
  # Full (bidirectional) attention changes the outputs: the mask is really used.
  d = forward(cfg, params, tokens, pos, attn_mask=jnp.ones_like(mask)).logits
  assert np.abs(np.asarray(d[:, :-1] - a[:, :-1])).max() > 1e-3


def test_model_skips_causal_blocks_without_changing_logits_or_grads(monkeypatch):
  """Training rows take the causal block skip; explicit masks never do. Same logits and
  parameter gradients on packed rows with padding (blocks of 4 over 11 tokens)."""
  monkeypatch.setattr(attn_lib, "CAUSAL_BLOCK", 4)
  cfg = models.preset("tiny")
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(5), (2, 11), 0, cfg.vocab_size)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
  pos = jnp.asarray([list(range(5)) + list(range(4)) + [-1, -1], list(range(11))])
  mask = attn_lib.make_attention_mask(pos, pos, q_seg=seg, k_seg=seg)

  def loss(p, explicit):
    out = models.forward(cfg, p, tokens, pos, segment_ids=seg,
                         attn_mask=mask if explicit else None).logits
    return jnp.where(seg[..., None] > 0, jnp.tanh(out), 0.0).sum(), out

  blocked = jax.jit(jax.value_and_grad(lambda p: loss(p, False), has_aux=True))
  assert str(jax.make_jaxpr(blocked)(params)).count("custom_vjp_call") >= 3
  (_, a), ga = blocked(params)
  (_, b), gb = jax.jit(jax.value_and_grad(lambda p: loss(p, True), has_aux=True))(params)
  valid = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_xla_attention_setting_matches_cpu_kernel_and_cudnn_needs_a_gpu():
  """`attention="xla"` (jax.nn's XLA kernel) gives the CPU recompute kernel's logits and
  gradients on packed rows; "cudnn" off GPU is a clear error; unknown names are refused."""
  cfg = models.preset("tiny")
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, cfg.vocab_size)
  seg = jnp.asarray([[1] * 4 + [2] * 3 + [0] * 2, [1] * 9])
  pos = jnp.asarray([list(range(4)) + list(range(3)) + [-1, -1], list(range(9))])

  def run(c):
    def loss(p):
      out = models.forward(c, p, tokens, pos, segment_ids=seg).logits
      return jnp.where(seg[..., None] > 0, jnp.tanh(out), 0.0).sum(), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, a), ga = run(cfg)
  (_, b), gb = run(cfg.replace(attention="xla"))
  valid = np.asarray(seg) > 0
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs the GPU backend"):
    run(cfg.replace(attention="cudnn"))
  with pytest.raises(ValueError, match="attention='flash'"):
    cfg.replace(attention="flash")


def test_packed_segments_equal_separate_sequences():
  cfg = models.preset("tiny")
  params = _random_params(cfg)
  x = jax.random.randint(jax.random.key(4), (1, 5), 0, cfg.vocab_size)
  y = jax.random.randint(jax.random.key(5), (1, 4), 0, cfg.vocab_size)
  packed = jnp.concatenate([x, y, jnp.zeros((1, 3), jnp.int32)], axis=1)
  pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, -1, -1, -1]])
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3])
  out = forward(cfg, params, packed, pos, segment_ids=seg).logits
  np.testing.assert_allclose(np.asarray(out[0, :5]),
                             np.asarray(forward(cfg, params, x).logits[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0, 5:9]),
                             np.asarray(forward(cfg, params, y).logits[0]), atol=1e-5)


def test_rope_is_relative_and_positions_matter():
  cfg = models.preset("tiny")
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(6), (1, 6), 0, cfg.vocab_size)
  pos = jnp.arange(6)[None]
  a = forward(cfg, params, tokens, pos).logits
  b = forward(cfg, params, tokens, pos + 37).logits  # A shift of every position.
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
  c = forward(cfg, params, tokens, pos.at[0, 3].set(9)).logits  # A gap changes things.
  assert np.abs(np.asarray(c[0, 4:] - a[0, 4:])).max() > 1e-4


def test_nope_ignores_position_values():
  """rope=False: only the order of positions (the causal mask) matters, not their values."""
  cfg = models.preset("tiny", rope=False)
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(6), (1, 6), 0, cfg.vocab_size)
  pos = jnp.arange(6)[None]
  gapped = pos.at[0, 3:].add(5)  # The gap that changes a RoPE model's output (test above).
  a = forward(cfg, params, tokens, pos).logits
  np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens, gapped).logits),
                             np.asarray(a), atol=1e-5)
  rope = forward(dataclasses.replace(cfg, rope=True), params, tokens, pos).logits
  assert np.abs(np.asarray(rope - a)).max() > 1e-3  # The flag really switches RoPE off.
  with pytest.raises(ValueError, match="NoPE"):
    hf_lib.config_to_hf(cfg)


def test_sliding_window_limits_context():
  cfg = models.preset("tiny", sliding_window=2)
  params = _random_params(cfg)
  tokens = jax.random.randint(jax.random.key(7), (1, 6), 0, cfg.vocab_size)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % cfg.vocab_size)
  a = forward(cfg, params, tokens).logits
  b = forward(cfg, params, changed).logits
  # With 2 layers and window 2, token 0 reaches positions <= 2 and no further.
  np.testing.assert_allclose(np.asarray(a[0, 3:]), np.asarray(b[0, 3:]), atol=1e-6)
  assert np.abs(np.asarray(a[0, 2] - b[0, 2])).max() > 1e-4


def test_attention_matches_numpy_float64():
  rng = np.random.default_rng(0)
  b, t, s, h, k, d = 2, 3, 5, 4, 2, 8
  q, kk, v = (rng.normal(size=shape) for shape in [(b, t, h, d), (b, s, k, d), (b, s, k, d)])
  mask = rng.random((b, t, s)) > 0.3
  mask[..., 0] = True
  out = attn_lib.dot_product_attention(jnp.asarray(q, jnp.float32), jnp.asarray(kk, jnp.float32),
                                       jnp.asarray(v, jnp.float32), jnp.asarray(mask))
  ref = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      kv = hi // (h // k)
      sc = q[bi, :, hi] @ kk[bi, :, kv].T / np.sqrt(d)
      sc = np.where(mask[bi], sc, -np.inf)
      p = np.exp(sc - sc.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      ref[bi, :, hi] = p @ v[bi, :, kv]
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError, match="n_kv_heads"):
    models.preset("tiny", n_kv_heads=3)
  with pytest.raises(ValueError, match="Unknown model preset"):
    models.preset("gpt5")
  with pytest.raises(ValueError, match="dtype"):
    models.preset("tiny", dtype="float8")
  cfg = models.preset("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.dim = 3


@pytest.mark.parametrize("form", ["bool", "bias3", "bias4"])
def test_fast_attention_equals_reference(form):
  """dot_product_attention (on CPU: the recompute-in-backward path) against the plain einsum
  reference, values and the gradients of q, k, v and a float bias, fully masked row included."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 5, 7)) > 0.4).at[0, 2].set(False)  # One row sees nothing.
  if form == "bias3":
    mask = jnp.where(mask, 0.0, attn_lib.MASK_VALUE)
  elif form == "bias4":
    mask = jnp.asarray(rng.normal(size=(2, 4, 5, 7)), jnp.float32)
  fast = attn_lib.dot_product_attention(q, k, v, mask)
  ref = attn_lib.reference_attention(q, k, v, mask)
  assert np.isfinite(np.asarray(fast)).all()
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5)
  w = jnp.asarray(rng.normal(size=fast.shape), jnp.float32)  # A loss that weighs every output.
  argnums = (0, 1, 2, 3) if form != "bool" else (0, 1, 2)
  grads = jax.grad(lambda *a: (attn_lib.dot_product_attention(*a) * w).sum(), argnums)(
      q, k, v, mask)
  grads_ref = jax.grad(lambda *a: (attn_lib.reference_attention(*a) * w).sum(), argnums)(
      q, k, v, mask)
  for name, g, g_ref in zip("qkvb", grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_causal_block_skip_equals_full_mask(monkeypatch, dtype):
  """With a CausalMask, the blocks above the diagonal are skipped: same values and gradients as
  the full product on the plain mask (packed segments and padding, a ragged last block)."""
  monkeypatch.setattr(attn_lib, "CAUSAL_BLOCK", 4)
  rng = np.random.default_rng(3)
  t = 14
  q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[1] * 6 + [2] * 6 + [0] * 2, [1] * t])
  pos = jnp.asarray([list(range(6)) * 2 + [-1, -1], list(range(t))])
  mask = attn_lib.make_attention_mask(pos, pos, q_seg=seg, k_seg=seg)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def loss(m, *a):
    return (attn_lib.recompute_attention(*a, m, operand_dtype=dtype) * w).sum()

  full = jax.value_and_grad(loss, (1, 2, 3))(mask, q, k, v)
  jaxpr = jax.make_jaxpr(lambda *a: loss(attn_lib.CausalMask(mask), *a))(q, k, v)
  blocked = jax.value_and_grad(lambda m, *a: loss(attn_lib.CausalMask(m), *a), (1, 2, 3))(
      mask, q, k, v)
  assert str(jaxpr).count("custom_vjp_call") == 4  # ceil(14 / 4) query blocks.
  tol = 1e-5 if dtype is None else 2e-2
  np.testing.assert_allclose(float(blocked[0]), float(full[0]), rtol=tol)
  for name, g, g_ref in zip("qkv", blocked[1], full[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=tol * 10, err_msg=name)


def test_recompute_attention_bf16_operands_close_to_f32():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 6, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(2))
  mask = attn_lib.make_attention_mask(jnp.arange(6)[None], jnp.arange(6)[None])

  def loss(dtype, *a):
    return (attn_lib.recompute_attention(*a, mask, operand_dtype=dtype) ** 2).sum()

  ref = jax.value_and_grad(functools.partial(loss, None), (0, 1, 2))(q, k, v)
  out = jax.value_and_grad(functools.partial(loss, jnp.bfloat16), (0, 1, 2))(q, k, v)
  assert out[0].dtype == jnp.float32
  np.testing.assert_allclose(float(out[0]), float(ref[0]), rtol=2e-2)
  for g, g_ref in zip(out[1], ref[1]):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=0.1, rtol=0.05)
