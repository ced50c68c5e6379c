"""GGUF (llama.cpp) checkpoints: config, dequantized weights, BPE tokenizer and chat template.

A GGUF file holds metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and possibly
quantized tensors under llama.cpp names (`blk.3.attn_q.weight`). This module maps both onto the
HF conventions that `starjax.models.hf` already converts, so a GGUF model goes through exactly the
same `params_from_hf` path (and the same checks) as a safetensors one:

  * metadata -> `ModelConfig` (`config_from_gguf`);
  * tensors -> HF-named float32 numpy arrays, dequantized on access with the `gguf` package
    (`GGUFTensors`); llama.cpp's Q/K row permutation is undone per head (`unpermute_rope`);
  * `tokenizer.ggml.*` -> a `tokenizers.Tokenizer` wrapped in `starjax.tokenizers.HFTokenizer`
    (byte-level BPE only, e.g. SmolLM2), and `tokenizer.chat_template` as a string.

Supported architectures: "llama" (Llama, Mistral-in-llama-layout, SmolLM2) and "qwen2". Quantized
weights only approximate the original model; logits match other GGUF readers (e.g. transformers'
`from_pretrained(..., gguf_file=...)`), not the unquantized checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import numpy as np
import tokenizers as hf_tokenizers
from tokenizers import decoders, pre_tokenizers

from starjax.models import hf
from starjax.models.config import ModelConfig
from starjax.tokenizers import HFTokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose Q/K rows llama.cpp permuted for its interleaved ("normal") RoPE; qwen2 uses
# the NEOX (rotate-half) RoPE, like HF, and is stored unpermuted.
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Stale buffers some old converters wrote; recomputed from the config.
_IGNORED_LAYER_TENSORS = ("attn_rot_embd",)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# tokenizer.ggml.pre values whose pre-tokenizer we rebuild. "smollm" is GPT-2's split with every
# digit on its own, as in SmolLM2's own tokenizer.json (Digits + ByteLevel) and llama.cpp.
_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm")


def _nice_float(x: Any) -> float:
  """float32 metadata as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
  return float(str(np.float32(x)))


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF q/k rows -> llama.cpp layout (what llama.cpp's converter does; used to write test files).

  Per head, HF rotates the two halves (x[i], x[i + d/2]) while GGML's default RoPE rotates
  adjacent pairs (x[2i], x[2i + 1]), so each head's rows [first half; second half] get
  interleaved.
  """
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp q/k rows (or bias) -> HF layout: the inverse of `permute_rope`."""
  if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
    raise ValueError(f"cannot split {w.shape[0]} rows into {n_heads} heads of even size.")
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
  """The HF tensor name for a llama.cpp tensor name; None for ignorable buffers.

  Raises:
    ValueError: a tensor starjax cannot represent (e.g. `rope_freqs.weight`, Llama-3.1 RoPE
      scaling).
  """
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m:
    layer, rest = m.groups()
    if rest in _LAYER_NAMES:
      return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    if rest.split(".")[0] in _IGNORED_LAYER_TENSORS:
      return None
  if gguf_name == "rope_freqs.weight":
    raise ValueError("tensor rope_freqs.weight: RoPE frequency scaling (Llama 3.1 style) is not "
                     "supported.")
  raise ValueError(f"tensor {gguf_name}: no starjax equivalent (unsupported GGUF tensor).")


def read_metadata(reader: Any) -> dict[str, Any]:
  """All key/value metadata of a `gguf.GGUFReader` as Python values (GGUF.* header keys dropped)."""
  return {key: field.contents() for key, field in reader.fields.items()
          if not key.startswith("GGUF.")}


def config_from_gguf(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                     *, source: str = "GGUF file", **overrides: Any) -> ModelConfig:
  """Builds a `ModelConfig` from GGUF metadata and the (llama.cpp-named) tensor shapes.

  Args:
    metadata: see `read_metadata`.
    tensor_shapes: llama.cpp tensor name -> numpy-order shape (embedding is (vocab, dim)); used
      for the vocabulary size and to detect tied embeddings (no `output.weight`).
    source: the file, for error messages.
    **overrides: `ModelConfig` fields to set on top.

  Raises:
    ValueError: unsupported architecture or feature, or a missing required key (named).
  """
  arch = metadata.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{source}: unsupported GGUF architecture {arch!r}; supported: "
                     f"{list(SUPPORTED_ARCHITECTURES)}.")

  def get(key: str, default: Any = None, required: bool = False) -> Any:
    value = metadata.get(f"{arch}.{key}")
    if value is None:
      if required:
        raise ValueError(f"{source}: required GGUF metadata key '{arch}.{key}' is missing.")
      return default
    return value

  n_heads = int(get("attention.head_count", required=True))
  dim = int(get("embedding_length", required=True))
  head_dim = get("attention.key_length")
  head_dim = dim // n_heads if head_dim is None else int(head_dim)
  value_dim = get("attention.value_length")
  if value_dim is not None and int(value_dim) != head_dim:
    raise ValueError(f"{source}: key_length {head_dim} != value_length {value_dim} is not "
                     "supported.")
  rope_dims = get("rope.dimension_count")
  if rope_dims is not None and int(rope_dims) != head_dim:
    raise ValueError(f"{source}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, head_dim="
                     f"{head_dim}) is not supported.")
  scaling = get("rope.scaling.type")
  if scaling not in (None, "none"):
    raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported.")
  if "token_embd.weight" not in tensor_shapes:
    raise ValueError(f"{source}: tensor token_embd.weight is missing.")
  vocab_size = int(tensor_shapes["token_embd.weight"][0])
  fields = dict(
      vocab_size=vocab_size,
      dim=dim,
      n_layers=int(get("block_count", required=True)),
      n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      head_dim=head_dim,
      ffn_dim=int(get("feed_forward_length", required=True)),
      rope_theta=_nice_float(get("rope.freq_base", 10_000.0)),
      norm_eps=_nice_float(get("attention.layer_norm_rms_epsilon", required=True)),
      tie_embeddings="output.weight" not in tensor_shapes,
      qkv_bias=arch == "qwen2",
      max_seq_len=int(get("context_length", 2048)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


class GGUFTensors(Mapping[str, np.ndarray]):
  """Lazy HF name -> float32 numpy view of a GGUF file's tensors, dequantized on access.

  Q and K (weights and biases) come back in HF layout (see `unpermute_rope`), so the result can be
  fed to `hf.params_from_hf` directly.
  """

  def __init__(self, reader: Any, arch: str, n_heads: int, n_kv_heads: int, source: str):
    self._source = source
    self._heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
    self._permuted = arch in _PERMUTED_ARCHITECTURES
    self._tensors: dict[str, Any] = {}
    for t in reader.tensors:
      try:
        name = hf_name(t.name)
      except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
      if name is not None:
        self._tensors[name] = t

  def __getitem__(self, name: str) -> np.ndarray:
    import gguf  # pylint: disable=g-import-not-at-top

    t = self._tensors[name]
    shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest axis first.
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise ValueError(f"{self._source}: tensor {t.name} has quantization "
                       f"{t.tensor_type.name}, which gguf cannot dequantize: {e}") from e
    x = np.asarray(x, dtype=np.float32)
    if x.size != int(np.prod(shape)):
      raise ValueError(f"{self._source}: tensor {t.name} dequantized to {x.shape}, expected "
                       f"{shape} (truncated file?).")
    x = x.reshape(shape)
    proj = name.split(".")[-2]
    if self._permuted and proj in self._heads:
      x = unpermute_rope(x, self._heads[proj])
    return x

  def gguf_name(self, name: str) -> str:
    return self._tensors[name].name

  def __contains__(self, name: object) -> bool:
    return name in self._tensors

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte-level spelling: printable Latin-1 bytes stand for themselves, the other 68
  bytes (controls, space, ...) for U+0100 onwards, in byte order. Byte-level BPE vocabularies
  (and GGUF's copy of them) are written in this alphabet."""
  keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  out = {b: chr(b) for b in keep}
  moved = [b for b in range(256) if b not in out]
  out.update({b: chr(0x100 + i) for i, b in enumerate(moved)})
  return out


def tokenizer_from_gguf(metadata: Mapping[str, Any], *, source: str = "GGUF file") -> HFTokenizer:
  """Builds the file's byte-level BPE tokenizer (tokens, merges, token types, special ids).

  Control tokens (e.g. `<|im_start|>`) become special added tokens and user-defined ones plain
  added tokens, so both always encode to their single id. The result is wrapped in
  `HFTokenizer`, which appends the thought tokens after the file's vocabulary.

  Raises:
    ValueError: not a byte-level BPE ("gpt2") tokenizer, an unknown pre-tokenizer type, or
      missing tokens/merges.
  """
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{source}: GGUF tokenizer model {model!r} is not supported; only "
                     "byte-level BPE ('gpt2', e.g. SmolLM2) is. Load the tokenizer separately.")
  pre = metadata.get("tokenizer.ggml.pre") or "default"
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                     f"{list(_PRE_TOKENIZERS)}.")
  tokens = metadata.get("tokenizer.ggml.tokens")
  merges = metadata.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing.")
  types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))

  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  vocab: dict[str, int] = {}
  for i, token in enumerate(tokens):
    if not set(token) <= alphabet:  # Respell raw text in the byte alphabet, as the BPE sees it.
      token = "".join(spelling[b] for b in token.encode("utf-8"))
    vocab.setdefault(token, i)
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(" ")
    if not sep:
      raise ValueError(f"{source}: malformed merge {merge!r} in tokenizer.ggml.merges.")
    pairs.append((left, right))
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                                         byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(
      add_prefix_space=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
      use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  # A control token spelled outside the byte alphabet is not in `vocab` under that spelling;
  # adding it would grow the vocabulary past the model's, so it stays an ordinary token.
  control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
  user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
  tok.add_special_tokens([hf_tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in control])
  tok.add_tokens([hf_tokenizers.AddedToken(t, special=False, normalized=False) for t in user])
  if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
    raise ValueError(f"{source}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                     f"ids after adding special tokens, expected {len(vocab)}.")

  def special(key: str) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}_token_id")
    return None if value is None else int(value)

  return HFTokenizer(tok, bos=special("bos"), eos=special("eos"), pad=special("padding"))


# ----------------------------------------------------------------------------------------------
# Files.


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
  """An opened GGUF file: config and lazy tensors ready for `hf.params_from_hf`.

  Attributes:
    path: the file.
    cfg: the model config from the metadata.
    metadata: all key/value metadata (see `read_metadata`).
    tensors: HF-named lazy tensors (see `GGUFTensors`).
  """

  path: str
  cfg: ModelConfig
  metadata: dict[str, Any]
  tensors: GGUFTensors

  @property
  def chat_template(self) -> str | None:
    template = self.metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) else None

  @cached_property
  def tokenizer(self) -> HFTokenizer:
    """The file's tokenizer (see `tokenizer_from_gguf`); built on first access."""
    return tokenizer_from_gguf(self.metadata, source=self.path)


def open_gguf(path: str | os.PathLike[str], **overrides: Any) -> GGUFCheckpoint:
  """Reads a GGUF file's metadata and tensor index (tensor data stays memory-mapped).

  Args:
    path: the .gguf file.
    **overrides: `ModelConfig` fields to override (e.g. dtype="bfloat16").

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a readable GGUF file, or an unsupported model (the message names the file).
  """
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    reader = gguf.GGUFReader(path)
    metadata = read_metadata(reader)
  except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e!r}") from e
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
  cfg = config_from_gguf(metadata, shapes, source=path, **overrides)
  tensors = GGUFTensors(reader, metadata["general.architecture"], cfg.n_heads, cfg.n_kv_heads,
                        source=path)
  return GGUFCheckpoint(path=path, cfg=cfg, metadata=metadata, tensors=tensors)


def load_gguf(path: str | os.PathLike[str], *, dtype: Any = np.float32,
              place: hf.Placer | None = None, with_tokenizer: bool = True, **overrides: Any
              ) -> tuple[ModelConfig, dict[str, Any], HFTokenizer | None, str | None]:
  """Loads a GGUF model: (cfg, params, tokenizer, chat_template).

  Params are float32 numpy arrays (or whatever `place` returns, leaf by leaf). The tokenizer has
  the thought tokens appended, so its `vocab_size` is larger than `cfg.vocab_size`; use
  `starjax.models.vocab.add_thought_tokens` (or `starjax.models.registry.load`, which does) to
  grow the embeddings.
  """
  ckpt = open_gguf(path, **overrides)
  try:
    params = hf.params_from_hf(ckpt.cfg, ckpt.tensors, dtype=dtype, place=place)
  except ValueError as e:
    raise ValueError(f"{ckpt.path}: {e}") from e
  tokenizer = ckpt.tokenizer if with_tokenizer else None
  return ckpt.cfg, params, tokenizer, ckpt.chat_template
