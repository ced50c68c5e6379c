"""Model configuration: one frozen dataclass and named presets.

The library passes `ModelConfig` around; ml_collections configs only exist at the command-line edge
(see `starjax.configs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder.

  Attributes:
    vocab_size: number of embedding rows (tokenizer size, including thought tokens).
    dim: residual width.
    n_layers: number of decoder blocks.
    n_heads: query heads.
    n_kv_heads: key/value heads (grouped-query attention when < n_heads).
    head_dim: per-head width; defaults to dim // n_heads.
    ffn_dim: SwiGLU hidden width.
    rope_theta: RoPE base frequency.
    rope: rotary position embeddings on q/k; False gives a NoPE decoder (position comes only from
      the causal mask), which length-generalizes better on small algorithmic tasks
      (Kazemnejad et al. 2023). Positions still drive the mask and padding.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: reuse the input embedding as the output projection.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    sliding_window: if set, a query at position p only sees keys at positions > p - window
      (Mistral).
    max_seq_len: longest sequence the model is meant for (sizes default KV caches).
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32 (master weights).
    remat: rematerialisation policy per layer: "none", "full" or "dots" (save matmul outputs).
    attention: attention kernel (`starjax.models.attention.dot_product_attention`): "auto" (the
      CPU recompute kernel on CPU; cuDNN flash attention on GPU for bf16 causal passes; XLA
      otherwise), "xla" (XLA's implementation on every backend) or "cudnn" (GPU, bf16/fp16).
    init_std: standard deviation of the normal initialiser (HF's `initializer_range`).
    digit_positions: rows of the digit-index embedding (`starjax.models.abacus`); 0 = none.
      Indices at or beyond it share the last row.
    digit_ids: token ids of the ten digits (needed when digit_positions > 0).
    digit_separator_ids: tokens allowed between the digits of one number (e.g. the space).
    digit_offset: training draws a random offset in [0, digit_offset] per example for the digit
      indices, so wide numbers' indices are trained on narrow ones; inference uses 0.
    position_coupling: position ids chosen from the task's structure instead of 0, 1, 2, ...
      ("arithmetic": `starjax.data.arithmetic_positions`, byte tokenizer); training rows and the
      sampler compute them from the tokens (`starjax.models.positions`). "" = plain positions.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int | None = None
  ffn_dim: int
  rope_theta: float = 10_000.0
  rope: bool = True
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  sliding_window: int | None = None
  max_seq_len: int = 2048
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  init_std: float = 0.02
  digit_positions: int = 0
  digit_ids: tuple[int, ...] = ()
  digit_separator_ids: tuple[int, ...] = ()
  digit_offset: int = 0
  position_coupling: str = ""

  def __post_init__(self):
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim.")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}.")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat={self.remat!r}; expected 'none', 'full' or 'dots'.")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}.")
    if self.digit_positions and not self.digit_ids:
      raise ValueError("digit_positions > 0 needs digit_ids (the digit tokens' ids).")
    if self.digit_offset < 0 or (self.digit_offset and self.digit_offset >= self.digit_positions):
      raise ValueError(f"digit_offset={self.digit_offset} must be in [0, digit_positions="
                       f"{self.digit_positions}).")
    if self.position_coupling not in ("", "arithmetic"):
      raise ValueError(f"position_coupling={self.position_coupling!r}; expected '' or "
                       "'arithmetic'.")
    if self.position_coupling and self.sliding_window is not None:
      raise ValueError("sliding_window counts position ids, which coupled positions "
                       f"(position_coupling={self.position_coupling!r}) space out by line; use "
                       "one of them.")
    for field in ("digit_ids", "digit_separator_ids"):  # Lists from configs: keep it hashable.
      object.__setattr__(self, field, tuple(int(i) for i in getattr(self, field)))
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, h, k, hd = self.dim, self.ffn_dim, self.n_heads, self.n_kv_heads, self.head_dim
    attn = d * h * hd * 2 + d * k * hd * 2 + (h * hd + 2 * k * hd if self.qkv_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + emb + d + self.digit_positions * d


PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: width <= 64 keeps a train step in milliseconds on 2 CPU cores.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=512),
    # CPU experiments (STaR arithmetic demo, Quiet-STaR toy runs): ~3M parameters.
    "small": dict(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704,
                  max_seq_len=1024),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    "smollm2_135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         ffn_dim=1536, rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True,
                         max_seq_len=8192),
    # mistralai/Mistral-7B-v0.1 (the Quiet-STaR base model).
    "mistral_7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       ffn_dim=14336, rope_theta=10_000.0, norm_eps=1e-5, sliding_window=4096,
                       max_seq_len=32768),
    # meta-llama/Llama-2-7b-hf.
    "llama2_7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      ffn_dim=11008, rope_theta=10_000.0, norm_eps=1e-5, max_seq_len=4096),
    # Qwen/Qwen2-0.5B.
    "qwen2_0_5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                       ffn_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6, tie_embeddings=True,
                       qkv_bias=True, max_seq_len=32768),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named preset with `overrides` applied (e.g. vocab_size, dtype)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}.")
  return ModelConfig(**{**PRESETS[name], **overrides})
