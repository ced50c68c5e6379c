"""Llama-family decoder (Llama 2, Mistral, Qwen2, SmolLM2) in flax.linen.

The model is a pure function of (params, inputs): `Transformer(cfg).apply({"params": p}, ...)`.
Every parameter carries logical axis names (see `starjax.parallel.sharding.RULES`), and the main
activations are constrained with logical names too, so the same code runs on one CPU or a TPU pod.

Layers are stacked with `nn.scan` (one compiled block; parameters get a leading "layers" axis) and
can be rematerialised per layer (`ModelConfig.remat`).

KV cache: a dict with "k" and "v" of shape (n_layers, B, S, K, D) and "pos" (B, S) holding the
position of the token stored in each slot (-1 = empty). A call with `cache=` writes its T new keys
at slot `cache_index` and attends over the whole cache, masked by position, so prefill and
token-by-token decoding are the same code path.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from starjax.models import abacus
from starjax.models import attention as attn_lib
from starjax.models import matmul as matmul_lib
from starjax.models.config import ModelConfig
from starjax.parallel import sharding

Array = jax.Array
Cache = dict[str, Array]


@flax.struct.dataclass
class ModelOutput:
  """What a forward pass returns.

  Attributes:
    logits: (B, T, vocab) in the compute dtype.
    hidden: (B, T, dim) final-norm hidden states (the input of the LM head).
    cache: the updated KV cache, or None when no cache was passed.
  """

  logits: Array
  hidden: Array
  cache: Cache | None = None


def _init(cfg: ModelConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


def _zeros(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE at explicit positions and an optional KV cache."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dt = activation_dtype(cfg)

    def proj(heads: int, name: str, axis: str) -> nn.DenseGeneral:
      return nn.DenseGeneral(
          features=(heads, cfg.head_dim), axis=-1, use_bias=cfg.qkv_bias, dtype=dt,
          dot_general=_dot_general(cfg), kernel_init=_init(cfg, ("embed", axis, "head_dim")),
          bias_init=_zeros((axis, "head_dim")), name=name)

    self.q_proj = proj(cfg.n_heads, "q_proj", "q_heads")
    self.k_proj = proj(cfg.n_kv_heads, "k_proj", "kv_heads")
    self.v_proj = proj(cfg.n_kv_heads, "v_proj", "kv_heads")
    self.o_proj = nn.DenseGeneral(
        features=cfg.dim, axis=(-2, -1), use_bias=False, dtype=dt,
        dot_general=_dot_general(cfg),
        kernel_init=_init(cfg, ("q_heads", "head_dim", "embed")), name="o_proj")

  def qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """Projects and rotates: (B, T, dim) -> q (B, T, H, D), k and v (B, T, K, D)."""
    q = apply_names(self.q_proj(x), ("activation_batch", "activation_length", "activation_heads",
                                     None))
    k = apply_names(self.k_proj(x), ("activation_batch", "activation_length",
                                     "activation_kv_heads", None))
    v = apply_names(self.v_proj(x), ("activation_batch", "activation_length",
                                     "activation_kv_heads", None))
    if self.cfg.rope:
      q = attn_lib.apply_rope(q, positions, self.cfg.rope_theta)
      k = attn_lib.apply_rope(k, positions, self.cfg.rope_theta)
    return q, k, v

  def out(self, o: Array) -> Array:
    return self.o_proj(o)

  def __call__(self, x: Array, positions: Array, mask: Array | attn_lib.CausalMask,
               kv: tuple[Array, Array] | None, cache_index: Array | None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    q, k, v = self.qkv(x, positions)
    if kv is not None:
      ck, cv = kv
      ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
      k, v, kv = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
    o = attn_lib.dot_product_attention(q, k, v, mask, operand_dtype=_matmul_dtype(self.cfg),
                                       impl=self.cfg.attention)
    return self.out(o), kv


class MLP(nn.Module):
  """SwiGLU feed-forward block."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dt = activation_dtype(cfg)

    def dense(features: int, names: tuple[str, str], name: str) -> nn.Dense:
      return nn.Dense(features, use_bias=False, dtype=dt, dot_general=_dot_general(cfg),
                      kernel_init=_init(cfg, names), name=name)

    gate = dense(cfg.ffn_dim, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.ffn_dim, ("embed", "mlp"), "up_proj")(x)
    h = apply_names(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                         "activation_mlp"))
    return dense(cfg.dim, ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Scanned over layers."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.input_norm = RMSNorm(cfg.norm_eps, activation_dtype(cfg))
    self.attn = Attention(cfg)
    self.post_attn_norm = RMSNorm(cfg.norm_eps, activation_dtype(cfg))
    self.mlp = MLP(cfg)

  def __call__(self, x: Array, kv: tuple[Array, Array] | None, positions: Array,
               mask: Array | attn_lib.CausalMask, cache_index: Array | None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    h, kv = self.attn(self.input_norm(x), positions, mask, kv, cache_index)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    x = apply_names(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, kv


def apply_names(x: Array, names: tuple[str | None, ...]) -> Array:
  """Constrains an activation's sharding by logical axis names (a no-op outside a mesh)."""
  return sharding.constrain(x, names)


def activation_dtype(cfg: ModelConfig) -> Any:
  """The dtype of activations and elementwise math: the compute dtype, except f32 on CPU with bf16
  compute, where only the matmul operands are bf16 (XLA CPU would convert every bf16 elementwise
  op to f32 and back, and the converted residuals cost more than the bf16 matmuls save)."""
  return jnp.float32 if matmul_lib.use_fast_bf16(cfg.compute_dtype) else cfg.compute_dtype


def _matmul_dtype(cfg: ModelConfig) -> Any:
  """bf16 when the CPU fast path is on (activations are f32 then), else None (the inputs')."""
  return jnp.bfloat16 if matmul_lib.use_fast_bf16(cfg.compute_dtype) else None


def _dot_general(cfg: ModelConfig) -> Any:
  """The dense layers' dot: `starjax.models.matmul` on CPU (bf16 or f32 operands), else XLA's."""
  if not matmul_lib.cpu_kernels() or jnp.dtype(cfg.compute_dtype) not in (jnp.bfloat16,
                                                                         jnp.float32):
    return None
  return functools.partial(matmul_lib.dot_general, operand_dtype=cfg.compute_dtype)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """The decoder: embed -> scanned layers -> final norm -> LM head."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.dim, dtype=activation_dtype(cfg),
        embedding_init=_init(cfg, ("vocab", "embed")), name="embed")
    if cfg.digit_positions:
      self.digit_embed = nn.Embed(
          cfg.digit_positions, cfg.dim, dtype=activation_dtype(cfg),
          embedding_init=_init(cfg, (None, "embed")), name="digit_embed")
    layer_cls = DecoderLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    self.layers = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, activation_dtype(cfg))
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=activation_dtype(cfg),
                              dot_general=_dot_general(cfg),
                              kernel_init=_init(cfg, ("embed", "vocab")), name="lm_head")

  def embed_tokens(self, tokens: Array, digit_index: Array | None = None,
                   segment_ids: Array | None = None) -> Array:
    """Token ids (B, T) -> embeddings (B, T, dim) in the compute dtype.

    With digit-index embeddings (`cfg.digit_positions`), `digit_index` (B, T) is added; None
    computes it from `tokens` (and packed `segment_ids`) as the start of a text, offset 0.
    """
    x = self.embed(tokens)
    if self.cfg.digit_positions:
      if digit_index is None:
        digit_index, _ = abacus.digit_index(self.cfg, tokens, segment_ids=segment_ids)
      x = x + self.digit_embed(jnp.minimum(digit_index, self.cfg.digit_positions - 1))
    return x

  def finish(self, x: Array) -> tuple[Array, Array]:
    """Last layer's output (B, T, dim) -> (final-norm hidden states, logits)."""
    hidden = self.final_norm(x)
    return hidden, self.logits_from_hidden(hidden)

  def logits_from_hidden(self, hidden: Array) -> Array:
    """Final-norm hidden states -> logits (the LM head; tied or separate)."""
    if self.cfg.tie_embeddings and matmul_lib.use_fast_bf16(self.cfg.compute_dtype):
      # h @ E^T through the fast bf16 path (flax's attend would be a transposed, upcast dot).
      emb = matmul_lib.transpose_2d(self.embed.embedding.astype(jnp.bfloat16))
      h = hidden.reshape(-1, hidden.shape[-1])
      logits = matmul_lib.matmul(h, emb).reshape(*hidden.shape[:-1], -1)
    elif self.cfg.tie_embeddings:
      logits = self.embed.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return apply_names(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(self, tokens: Array | None, positions: Array, *,
               inputs_embeds: Array | None = None, segment_ids: Array | None = None,
               attn_mask: Array | None = None, cache: Cache | None = None,
               cache_index: Array | int = 0, digit_index: Array | None = None) -> ModelOutput:
    """Runs the decoder.

    Args:
      tokens: int (B, T) token ids, or None when `inputs_embeds` is given.
      positions: int (B, T) explicit positions; negative marks padding.
      inputs_embeds: optional (B, T, dim) embeddings used instead of `tokens` (no digit-index
        embedding is added to them).
      segment_ids: optional int (B, T) for packed rows (0 = padding). Ignored with a cache.
      attn_mask: optional explicit bool (B, T, S) mask or float additive bias that replaces the
        position-derived causal mask (S = T, or the cache length with a cache).
      cache: optional KV cache (see module docstring); the new keys are written at `cache_index`.
      cache_index: slot at which to write the T new keys/values.
      digit_index: optional int (B, T) digit indices (`starjax.models.abacus`) for a model with
        digit-index embeddings; None computes them from `tokens` (and `segment_ids`) as if
        they started a text: right for training rows and a prefill at slot 0; any other cached
        call must pass them (an error otherwise).

    Returns:
      ModelOutput with logits, final hidden states and the updated cache.
    """
    cfg = self.cfg
    if (cfg.digit_positions and cache is not None and digit_index is None
        and not (isinstance(cache_index, int) and cache_index == 0)):
      raise ValueError("A model with digit-index embeddings needs digit_index for a cached call "
                       "after slot 0 (abacus.digit_step gives it token by token).")
    x = (self.embed_tokens(tokens, digit_index, None if cache is not None else segment_ids)
         if inputs_embeds is None else inputs_embeds.astype(activation_dtype(cfg)))
    x = apply_names(x, ("activation_batch", "activation_length", "activation_embed"))
    positions = positions.astype(jnp.int32)
    new_cache = None
    if cache is not None:
      cache_index = jnp.asarray(cache_index, jnp.int32)
      key_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, cache_index, axis=1)
      if attn_mask is None:
        attn_mask = attn_lib.make_attention_mask(positions, key_pos,
                                                 sliding_window=cfg.sliding_window)
      x, (ks, vs) = self.layers(x, (cache["k"], cache["v"]), positions, attn_mask, cache_index)
      new_cache = {"k": ks, "v": vs, "pos": key_pos}
    else:
      if attn_mask is None:  # Causal by index too (see make_attention_mask): blocks may skip.
        attn_mask = attn_lib.CausalMask(attn_lib.make_attention_mask(
            positions, positions, q_seg=segment_ids, k_seg=segment_ids,
            sliding_window=cfg.sliding_window))
      x, _ = self.layers(x, None, positions, attn_mask, None)
    hidden, logits = self.finish(x)
    return ModelOutput(logits=logits, hidden=hidden, cache=new_cache)


def unstack_layers(params: Any, n_layers: int) -> list[Any]:
  """The scanned layers' stacked parameters as one tree per layer (static slices)."""
  return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(n_layers)]


def unstack_cache(cache: Cache) -> dict[str, Any]:
  """A stacked KV cache (`init_cache`) as the per-layer lists `decode_unrolled` takes."""
  return {"k": list(cache["k"]), "v": list(cache["v"]), "pos": cache["pos"]}


def decode_unrolled(cfg: ModelConfig, params: Any, layers: list[Any], tokens: Array | None,
                    positions: Array, cache: dict[str, Any], cache_index: Array,
                    digit_index: Array | None = None, *,
                    inputs_embeds: Array | None = None) -> ModelOutput:
  """One cached decoding call with the layer loop unrolled, for a sampler's inner loop.

  Same result as `Transformer(cfg).apply(..., cache=...)`, but `layers` holds each layer's
  parameters separately (`unstack_layers`, done once before the loop) and `cache` keeps per-layer
  lists (`unstack_cache`): {"k": [n_layers x (B, S, K, D)], "v": [...], "pos": (B, S)}.
  `inputs_embeds` (B, T, dim) replaces `tokens` as in `Transformer.__call__`; `digit_index` is
  required with digit-index embeddings (`abacus.digit_step` gives it). Under the layer scan, XLA CPU
  copied every layer's weights out of the stacked arrays and rewrote the stacked cache at every
  token; unrolled, the weights are read in place and each layer's cache is updated in place.

  Returns:
    ModelOutput with the logits, the final-norm hidden states and the per-layer cache.
  """
  model = Transformer(cfg)
  if inputs_embeds is not None:
    x = inputs_embeds.astype(activation_dtype(cfg))
  else:
    if cfg.digit_positions and digit_index is None:
      raise ValueError("A model with digit-index embeddings needs digit_index when decoding.")
    x = model.apply({"params": params}, tokens, digit_index, method=Transformer.embed_tokens)
  key_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions.astype(jnp.int32),
                                                cache_index, axis=1)
  mask = attn_lib.make_attention_mask(positions, key_pos, sliding_window=cfg.sliding_window)
  layer = DecoderLayer(cfg)
  ks, vs = [], []
  for lp, k, v in zip(layers, cache["k"], cache["v"]):
    x, (k, v) = layer.apply({"params": lp}, x, (k, v), positions, mask, cache_index)
    ks.append(k)
    vs.append(v)
  hidden, logits = model.apply({"params": params}, x, method=Transformer.finish)
  return ModelOutput(logits=logits, hidden=hidden, cache={"k": ks, "v": vs, "pos": key_pos})


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
  """An empty KV cache for `batch` rows of `length` slots (all positions -1)."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "pos": jnp.full((batch, length), -1, jnp.int32)}


@functools.partial(jax.jit, static_argnums=0, static_argnames="boxed")
def init_params(cfg: ModelConfig, rng: Array, *, boxed: bool = False) -> Any:
  """Random parameters; `boxed=True` keeps the logical-axis metadata boxes.

  Jitted (once per config): flax's eager init of scanned layers is several times slower.
  """
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(rng, tokens, jnp.zeros((1, 1), jnp.int32))
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def forward(cfg: ModelConfig, params: Any, tokens: Array, positions: Array | None = None,
            **kwargs: Any) -> ModelOutput:
  """Functional forward pass; positions default to 0..T-1."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return Transformer(cfg).apply({"params": params}, tokens, positions, **kwargs)
