"""Hugging Face checkpoint interop for Llama, Mistral and Qwen2 causal LMs (numpy; no torch).

Converts `config.json` dicts to `ModelConfig` and HF tensor names/layouts to the starjax parameter
tree, and back. HF `nn.Linear` weights are (out, in); starjax kernels are (in, out) with the q/k/v
output and the o_proj input split into (heads, head_dim). Decoder layers are stacked along a
leading axis because starjax scans over them.

No torch import: tensors are numpy arrays, e.g. from `safetensors.numpy.load_file`. Placement on
devices (and sharding) is up to the caller: `params_from_hf(..., place=...)` hands over each leaf
as soon as it is converted (see `starjax.models.registry`).

Files: `load_safetensors_dir` reads a checkpoint directory lazily (single file or sharded index,
headers checked for truncation first), `load_tokenizer_dir` its tokenizer and chat template, and
`save_hf` writes a directory that transformers loads unchanged (atomically, via `atomic_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes  # Also registers bfloat16 with numpy so bf16 safetensors files load.
import numpy as np
import sentencepiece as spm

from starjax.models.config import ModelConfig
from starjax.tokenizers import (
    END_THOUGHT,
    START_THOUGHT,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}
ARCHITECTURES = tuple(_MODEL_TYPES.values())
# HF class defaults for optional fields, so a sparse config.json reads as transformers reads it.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 131072,
                          "Qwen2ForCausalLM": 32768}
_DEFAULT_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10_000.0
# Buffers some older checkpoints saved; recomputed from the config, so safe to drop.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# place(path, numpy_leaf) -> stored leaf (e.g. a sharded jax.Array); see `params_from_hf`.
Placer = Callable[[tuple[str, ...], np.ndarray], Any]


# ----------------------------------------------------------------------------------------------
# Config.


def _architecture(c: Mapping[str, Any], source: str) -> str:
  archs = c.get("architectures")
  if archs:
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
      raise ValueError(f"{source}: unsupported architecture {archs[0]!r} (architectures={archs}); "
                       f"supported: {list(ARCHITECTURES)}.")
    return supported[0]
  model_type = c.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"{source}: no 'architectures' and unsupported model_type {model_type!r}; "
                     f"supported: {list(ARCHITECTURES)}.")
  return _MODEL_TYPES[model_type]


def _require(c: Mapping[str, Any], key: str, source: str) -> Any:
  if c.get(key) is None:
    raise ValueError(f"{source}: required field {key!r} is missing.")
  return c[key]


def _rope_theta(c: Mapping[str, Any], source: str) -> float:
  """RoPE base from `rope_parameters` (transformers 5.x) or top-level `rope_theta` (older)."""
  theta = c.get("rope_theta")
  for key in ("rope_scaling", "rope_parameters"):  # rope_parameters wins when both set theta.
    rp = c.get(key)
    if rp is None:
      continue
    if not isinstance(rp, Mapping):
      raise ValueError(f"{source}: {key} must be a dict, got {rp!r}.")
    if rp and all(isinstance(v, Mapping) for v in rp.values()):
      raise ValueError(f"{source}: per-layer-type {key} ({sorted(rp)}) is not supported.")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{source}: {key} has rope_type {rope_type!r}; only 'default' RoPE is "
                       "supported (no scaling).")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"{source}: partial_rotary_factor={rp['partial_rotary_factor']} is not "
                       "supported.")
    if rp.get("rope_theta") is not None:
      theta = rp["rope_theta"]
  if c.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor={c['partial_rotary_factor']} is not "
                     "supported.")
  return float(_DEFAULT_ROPE_THETA if theta is None else theta)


def _sliding_window(c: Mapping[str, Any], arch: str, n_layers: int, source: str) -> int | None:
  """The window applied to every layer, or None; rejects configs that mix full and sliding."""
  window = c.get("sliding_window")
  if arch == "LlamaForCausalLM" or window is None:
    return None
  if arch == "MistralForCausalLM":
    return None if c.get("use_sliding_window") is False else int(window)
  # Qwen2: off unless use_sliding_window; then only layers >= max_window_layers slide.
  if not c.get("use_sliding_window", False):
    return None
  layer_types = c.get("layer_types")
  if layer_types is None:
    first_sliding = c.get("max_window_layers", 28)
    layer_types = ["sliding_attention" if i >= first_sliding else "full_attention"
                   for i in range(n_layers)]
  kinds = set(layer_types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"}:
    return int(window)
  raise ValueError(f"{source}: layers mix full and sliding-window attention ({layer_types}); "
                   "starjax applies one window to every layer.")


def config_from_hf(hf_config: Mapping[str, Any], *, source: str | None = None,
                   **overrides: Any) -> ModelConfig:
  """Builds a `ModelConfig` from a HF `config.json` dict (Llama, Mistral or Qwen2).

  Args:
    hf_config: the parsed `config.json` (or `PretrainedConfig.to_dict()`).
    source: where the dict came from, for error messages (e.g. the file path).
    **overrides: `ModelConfig` fields to set on top (e.g. dtype="bfloat16", remat="full").

  Returns:
    The equivalent `ModelConfig`.

  Raises:
    ValueError: unsupported architecture or feature (RoPE scaling, biases starjax lacks, mixed
      sliding/full layers), or a missing required field.
  """
  c = hf_config
  source = source or c.get("_name_or_path") or "HF config"
  arch = _architecture(c, source)
  act = c.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported.")
  if c.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=True is not supported.")
  if arch == "LlamaForCausalLM" and c.get("attention_bias"):
    raise ValueError(f"{source}: Llama attention_bias=True also biases o_proj, which starjax "
                     "does not support.")
  n_heads = int(_require(c, "num_attention_heads", source))
  n_layers = int(_require(c, "num_hidden_layers", source))
  fields = dict(
      vocab_size=int(_require(c, "vocab_size", source)),
      dim=int(_require(c, "hidden_size", source)),
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
      head_dim=None if c.get("head_dim") is None else int(c["head_dim"]),
      ffn_dim=int(_require(c, "intermediate_size", source)),
      rope_theta=_rope_theta(c, source),
      norm_eps=float(c.get("rms_norm_eps", _DEFAULT_NORM_EPS)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)),
      qkv_bias=arch == "Qwen2ForCausalLM",
      sliding_window=_sliding_window(c, arch, n_layers, source),
      max_seq_len=int(c.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch]),
      init_std=float(c.get("initializer_range", 0.02)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, architecture: str | None = None,
                 **extra: Any) -> dict[str, Any]:
  """A HF `config.json` dict for `cfg`.

  Args:
    cfg: the model config.
    architecture: one of `ARCHITECTURES`; by default Qwen2 when `cfg.qkv_bias`, else Mistral when
      `cfg.sliding_window` is set, else Llama.
    **extra: extra keys to set (e.g. bos_token_id, eos_token_id, dtype).

  Raises:
    ValueError: the architecture is unknown or cannot express `cfg`.
  """
  if architecture is None:
    architecture = ("Qwen2ForCausalLM" if cfg.qkv_bias else
                    "MistralForCausalLM" if cfg.sliding_window is not None else "LlamaForCausalLM")
  if architecture not in ARCHITECTURES:
    raise ValueError(f"Unsupported architecture {architecture!r}; supported: "
                     f"{list(ARCHITECTURES)}.")
  if not cfg.rope:
    raise ValueError("cfg.rope is False (a NoPE decoder); HF Llama/Mistral/Qwen2 always use RoPE.")
  if cfg.digit_positions:
    raise ValueError("cfg.digit_positions > 0 (digit-index embeddings); HF Llama/Mistral/Qwen2 "
                     "have no such table.")
  if cfg.position_coupling:
    raise ValueError(f"cfg.position_coupling={cfg.position_coupling!r}: the model was trained on "
                     "task-coupled position ids, which HF generation would not feed it.")
  if architecture == "Qwen2ForCausalLM" and not cfg.qkv_bias:
    raise ValueError("Qwen2ForCausalLM always has q/k/v biases; cfg.qkv_bias is False.")
  if architecture != "Qwen2ForCausalLM" and cfg.qkv_bias:
    raise ValueError(f"{architecture} cannot express q/k/v biases without an o_proj bias; use "
                     "Qwen2ForCausalLM.")
  if architecture == "LlamaForCausalLM" and cfg.sliding_window is not None:
    raise ValueError("LlamaForCausalLM has no sliding window; use MistralForCausalLM.")
  model_type = {v: k for k, v in _MODEL_TYPES.items()}[architecture]
  out: dict[str, Any] = {
      "architectures": [architecture],
      "model_type": model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.ffn_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "initializer_range": cfg.init_std,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      # transformers >= 5 reads rope_parameters; older versions read the top-level rope_theta.
      "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if architecture == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif architecture == "MistralForCausalLM":
    out.update(sliding_window=cfg.sliding_window)
  else:
    sliding = cfg.sliding_window is not None
    out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
               max_window_layers=0 if sliding else cfg.n_layers)
  out.update(extra)
  return out


# ----------------------------------------------------------------------------------------------
# Parameters.


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One HF tensor: its starjax path, HF shape and the layout maps in both directions."""

  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  to_starjax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(path: tuple[str, ...], shape: tuple[int, ...]) -> _Spec:
  return _Spec(path, shape, lambda x: x, lambda x: x)


def _linear(path: tuple[str, ...], d_in: int, d_out: int) -> _Spec:
  """HF (out, in) weight <-> (in, out) kernel."""
  return _Spec(path, (d_out, d_in), lambda w: w.T, lambda k: k.T)


def _heads_out(path: tuple[str, ...], d_in: int, heads: int, head_dim: int) -> _Spec:
  """q/k/v: HF (heads*head_dim, in) <-> DenseGeneral kernel (in, heads, head_dim)."""
  return _Spec(path, (heads * head_dim, d_in),
               lambda w: w.T.reshape(d_in, heads, head_dim),
               lambda k: k.reshape(d_in, heads * head_dim).T)


def _heads_in(path: tuple[str, ...], heads: int, head_dim: int, d_out: int) -> _Spec:
  """o_proj: HF (out, heads*head_dim) <-> DenseGeneral kernel (heads, head_dim, out)."""
  return _Spec(path, (d_out, heads * head_dim),
               lambda w: w.T.reshape(heads, head_dim, d_out),
               lambda k: k.reshape(heads * head_dim, d_out).T)


def _heads_bias(path: tuple[str, ...], heads: int, head_dim: int) -> _Spec:
  return _Spec(path, (heads * head_dim,), lambda b: b.reshape(heads, head_dim),
               lambda b: b.reshape(heads * head_dim))


def _layer_specs(cfg: ModelConfig) -> dict[str, _Spec]:
  """Per-layer tensors keyed by the HF name after `model.layers.{i}.`."""
  d, f, h, k, hd = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  specs = {
      "self_attn.q_proj.weight": _heads_out(("attn", "q_proj", "kernel"), d, h, hd),
      "self_attn.k_proj.weight": _heads_out(("attn", "k_proj", "kernel"), d, k, hd),
      "self_attn.v_proj.weight": _heads_out(("attn", "v_proj", "kernel"), d, k, hd),
      "self_attn.o_proj.weight": _heads_in(("attn", "o_proj", "kernel"), h, hd, d),
      "mlp.gate_proj.weight": _linear(("mlp", "gate_proj", "kernel"), d, f),
      "mlp.up_proj.weight": _linear(("mlp", "up_proj", "kernel"), d, f),
      "mlp.down_proj.weight": _linear(("mlp", "down_proj", "kernel"), f, d),
      "input_layernorm.weight": _same(("input_norm", "scale"), (d,)),
      "post_attention_layernorm.weight": _same(("post_attn_norm", "scale"), (d,)),
  }
  if cfg.qkv_bias:
    specs["self_attn.q_proj.bias"] = _heads_bias(("attn", "q_proj", "bias"), h, hd)
    specs["self_attn.k_proj.bias"] = _heads_bias(("attn", "k_proj", "bias"), k, hd)
    specs["self_attn.v_proj.bias"] = _heads_bias(("attn", "v_proj", "bias"), k, hd)
  return specs


def _global_specs(cfg: ModelConfig) -> dict[str, _Spec]:
  specs = {
      "model.embed_tokens.weight": _same(("embed", "embedding"), (cfg.vocab_size, cfg.dim)),
      "model.norm.weight": _same(("final_norm", "scale"), (cfg.dim,)),
  }
  if not cfg.tie_embeddings:
    specs["lm_head.weight"] = _linear(("lm_head", "kernel"), cfg.dim, cfg.vocab_size)
  return specs


def _expected_names(cfg: ModelConfig) -> list[str]:
  names = list(_global_specs(cfg))
  for i in range(cfg.n_layers):
    names += [f"model.layers.{i}.{s}" for s in _layer_specs(cfg)]
  return names


def _ignored(cfg: ModelConfig, name: str) -> bool:
  return (cfg.tie_embeddings and name == "lm_head.weight") or name.endswith(_IGNORED_SUFFIXES)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise ValueError(f"params has no entry {'/'.join(path)}.")
    tree = tree[key]
  return tree


def _list(names: list[str], limit: int = 8) -> str:
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                   dtype: Any = np.float32, *, place: Placer | None = None) -> dict[str, Any]:
  """Converts HF-named tensors to the starjax parameter tree (numpy arrays).

  Tensors are read (and converted) one parameter leaf at a time, so with a lazy `tensors`
  mapping (`SafetensorsTensors`, `gguf.GGUFTensors`) and a `place` that moves each leaf to
  devices, the host never holds more than one stacked leaf.

  Args:
    cfg: the model config (e.g. from `config_from_hf`).
    tensors: HF name -> array, e.g. a (merged) safetensors file or a torch state_dict converted
      with `.numpy()`.
    dtype: dtype of the returned arrays (float32 master weights by default); None keeps the input
      dtype.
    place: optional `place(path, array)` applied to each finished leaf (path is the tuple of keys
      in the params tree); its result is stored instead of the numpy array.

  Returns:
    Nested dict matching `init_params(cfg, rng)`, with layers stacked along axis 0.

  Raises:
    ValueError: an unknown or missing tensor, or a tensor whose shape does not match `cfg`.
  """
  expected = _expected_names(cfg)
  expected_set = set(expected)
  unknown = sorted(n for n in tensors if n not in expected_set and not _ignored(cfg, n))
  if unknown:
    raise ValueError(f"Unknown tensors for this config: {_list(unknown)}.")
  missing = [n for n in expected if n not in tensors]
  if missing:
    raise ValueError(f"Missing tensors: {_list(missing)}.")

  def convert(name: str, spec: _Spec) -> np.ndarray:
    x = np.asarray(tensors[name])
    if x.shape != spec.hf_shape:
      raise ValueError(f"Tensor {name}: shape {x.shape} does not match the expected "
                       f"{spec.hf_shape} for this config.")
    x = spec.to_starjax(x)
    return x if dtype is None else x.astype(dtype)

  place = place or (lambda path, x: x)
  params: dict[str, Any] = {}
  for name, spec in _global_specs(cfg).items():
    _set(params, spec.path, place(spec.path, convert(name, spec)))
  for suffix, spec in _layer_specs(cfg).items():
    stacked = np.stack([convert(f"model.layers.{i}.{suffix}", spec)
                        for i in range(cfg.n_layers)])
    path = ("layers",) + spec.path
    _set(params, path, place(path, stacked))
    del stacked
  return params


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any],
                 dtype: Any = None) -> dict[str, np.ndarray]:
  """Converts a starjax parameter tree to HF-named numpy arrays (inverse of `params_from_hf`).

  Arrays are C-contiguous (ready for safetensors). Tied models get no `lm_head.weight`, as in HF
  checkpoints.

  Args:
    cfg: the model config.
    params: the parameter tree (numpy or jax arrays, unboxed).
    dtype: dtype of the returned arrays; None keeps the parameter dtype.

  Raises:
    ValueError: a parameter is missing or has the wrong shape for `cfg`.
  """
  out: dict[str, np.ndarray] = {}

  def emit(name: str, spec: _Spec, x: np.ndarray) -> None:
    y = np.ascontiguousarray(spec.to_hf(x))
    out[name] = y if dtype is None else y.astype(dtype)

  def fetch(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(_get(params, path))
    if x.shape != shape:
      raise ValueError(f"params/{'/'.join(path)}: shape {x.shape} does not match the expected "
                       f"{shape} for this config.")
    return x

  for name, spec in _global_specs(cfg).items():
    shape = spec.to_starjax(np.empty(spec.hf_shape, np.int8)).shape
    emit(name, spec, fetch(spec.path, shape))
  for suffix, spec in _layer_specs(cfg).items():
    shape = spec.to_starjax(np.empty(spec.hf_shape, np.int8)).shape
    stacked = fetch(("layers",) + spec.path, (cfg.n_layers,) + shape)
    for i in range(cfg.n_layers):
      emit(f"model.layers.{i}.{suffix}", spec, stacked[i])
  return out


# ----------------------------------------------------------------------------------------------
# Files.



CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def numpy_dtype(dtype: Any) -> Any:
  """A numpy dtype from a name ("float32", "bfloat16", "float16") or a dtype; None stays None."""
  if dtype is None or not isinstance(dtype, str):
    return dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_NP_DTYPES)}.")
  return _NP_DTYPES[dtype]


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e}).") from e


def read_config(path: str | os.PathLike[str], **overrides: Any) -> ModelConfig:
  """`ModelConfig` from the `config.json` of a HF checkpoint directory (see `config_from_hf`)."""
  config_path = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a HF checkpoint directory.")
  return config_from_hf(_read_json(config_path), source=config_path, **overrides)


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Parses and checks a safetensors header without reading the tensor data.

  Safetensors' own errors do not name the file and only surface when a tensor is read; this
  check catches truncated or corrupt files (an interrupted download or copy) up front.

  Returns:
    Tensor name -> {"dtype", "shape", "data_offsets"} (the `__metadata__` entry removed).

  Raises:
    ValueError: the file is missing, truncated or not a safetensors file; the message names it.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: safetensors file not found.")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header).")
    n = int.from_bytes(head, "little")
    if 8 + n > size:
      raise ValueError(f"{path}: truncated or corrupt safetensors file: the header claims {n} "
                       f"bytes but the file has {size}.")
    try:
      header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e!r}).") from e
  if 8 + n + end > size:
    raise ValueError(f"{path}: truncated safetensors file: its tensors need {8 + n + end} bytes "
                     f"but the file has {size} (incomplete download or copy?).")
  return header


class SafetensorsTensors(Mapping[str, np.ndarray]):
  """Lazy name -> numpy array view of one or more safetensors files (read on access).

  Every header is checked when the mapping is built (see `read_safetensors_header`), so a
  truncated shard fails before any conversion work.
  """

  def __init__(self, files: list[str]):
    self._where: dict[str, str] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
      for name, info in read_safetensors_header(file).items():
        if name in self._where:
          raise ValueError(f"Tensor {name} is in both {self._where[name]} and {file}.")
        self._where[name] = file
        self._shapes[name] = tuple(info.get("shape", ()))

  @classmethod
  def from_dir(cls, path: str | os.PathLike[str]) -> SafetensorsTensors:
    """All tensors of a HF directory: `model.safetensors` or the shards of its index."""
    path = os.fspath(path)
    single = os.path.join(path, SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(single):
      return cls([single])
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' dict.")
      return cls([os.path.join(path, name) for name in sorted(set(weight_map.values()))])
    raise ValueError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found.")

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def __getitem__(self, name: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

    file = self._where[name]
    try:
      with safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)
    except SafetensorError as e:
      raise ValueError(f"{file}: cannot read tensor {name}: {e}") from e

  def __contains__(self, name: object) -> bool:
    return name in self._where

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def load_safetensors_dir(path: str | os.PathLike[str], dtype: Any = np.float32, *,
                         place: Placer | None = None,
                         **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a HF checkpoint directory, one parameter leaf at a time.

  Reads `config.json` and either `model.safetensors` or the shards listed in
  `model.safetensors.index.json`. bfloat16 files load too (via ml_dtypes).

  Args:
    path: the directory.
    dtype: dtype of the returned parameters (see `params_from_hf`).
    place: optional per-leaf placement (see `params_from_hf`); numpy arrays when None.
    **overrides: `ModelConfig` fields to override (see `config_from_hf`).

  Returns:
    (cfg, params).

  Raises:
    ValueError: unsupported config, truncated/corrupt files, missing/unknown tensors or shape
      mismatches, each naming the file or tensor.
  """
  cfg = read_config(path, **overrides)
  return cfg, params_from_hf(cfg, SafetensorsTensors.from_dir(path), dtype=dtype, place=place)


# ----------------------------------------------------------------------------------------------
# Tokenizer files.


def _special_name(value: Any) -> str | None:
  """tokenizer_config.json spells special tokens as strings or {"content": ...} dicts."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def load_tokenizer_dir(path: str | os.PathLike[str]) -> tuple[Tokenizer | None, str | None]:
  """The tokenizer and chat template of a HF checkpoint directory, if it has them.

  `tokenizer.model` (SentencePiece, Llama-2/Mistral style) wins over `tokenizer.json` (BPE, e.g.
  SmolLM2/Qwen2), because it is the exact original when both exist. For `tokenizer.json` the bos,
  eos and pad tokens come from `tokenizer_config.json`. Either way the tokenizer gets the thought
  tokens (see `starjax.tokenizers`), so its `vocab_size` may exceed the model's.

  Returns:
    (tokenizer or None, chat template or None).
  """
  path = os.fspath(path)
  tok_cfg_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
  tok_cfg = _read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
  template = tok_cfg.get("chat_template")
  template_path = os.path.join(path, CHAT_TEMPLATE_FILE)
  if os.path.isfile(template_path):
    with open(template_path) as f:
      template = f.read()
  if not isinstance(template, str):
    template = None  # Named templates (a list of dicts) are not supported.
  sp_path = os.path.join(path, "tokenizer.model")
  json_path = os.path.join(path, "tokenizer.json")
  tokenizer: Tokenizer | None = None
  if os.path.isfile(sp_path):
    tokenizer = SentencePieceTokenizer.load(sp_path)
  elif os.path.isfile(json_path):
    specials = {k: _special_name(tok_cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    tokenizer = HFTokenizer.from_file(json_path, **specials)
  return tokenizer, template


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
  if isinstance(tokenizer, HFTokenizer):
    return tokenizer.backend.id_to_token(token_id)
  if isinstance(tokenizer, SentencePieceTokenizer):
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.serialized_model())
    return sp.id_to_piece(token_id)
  raise TypeError(type(tokenizer).__name__)


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: str,
                         chat_template: str | None = None) -> None:
  """Writes `tokenizer.json` or `tokenizer.model` plus `tokenizer_config.json` into `out_dir`.

  The thought tokens travel along: as added special tokens inside `tokenizer.json`, or in
  `added_tokens_decoder` next to a SentencePiece model (whose file itself is never modified).

  Raises:
    ValueError: the tokenizer has no HF file format (e.g. `ByteTokenizer`).
  """
  tok_cfg: dict[str, Any] = {
      "bos_token": None, "eos_token": None, "pad_token": None,
      "add_bos_token": False, "add_eos_token": False,
      "model_max_length": 1_000_000_000,
      "clean_up_tokenization_spaces": False,
  }
  if isinstance(tokenizer, HFTokenizer):
    tokenizer.backend.save(os.path.join(out_dir, "tokenizer.json"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
  elif isinstance(tokenizer, SentencePieceTokenizer):
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
      f.write(tokenizer.serialized_model())
    tok_cfg["tokenizer_class"] = "LlamaTokenizer"
    tok_cfg["added_tokens_decoder"] = {
        str(tokenizer.token_to_id(p)): {"content": p, "special": True, "normalized": False,
                                        "lstrip": False, "rstrip": False, "single_word": False}
        for p in (START_THOUGHT, END_THOUGHT)}
  else:
    raise ValueError(f"{type(tokenizer).__name__} has no Hugging Face file format; export the "
                     "model without a tokenizer.")
  for key, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                        ("pad", tokenizer.pad_id)):
    tok_cfg[f"{key}_token"] = _piece(tokenizer, token_id)
  if chat_template is not None:
    tok_cfg["chat_template"] = chat_template
  with open(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), "w") as f:
    json.dump(tok_cfg, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Export.


def _umask_permissions(root: str) -> None:
  """mkdtemp (and some writers) create private files; give them the usual umask permissions."""
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(root, 0o777 & ~mask)
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(folder, d), 0o777 & ~mask)
    for f in files:
      os.chmod(os.path.join(folder, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that replaces `out_dir` only if the block succeeds.

  The temporary directory is a sibling of `out_dir` (same filesystem), so the final step is a
  rename: readers never see a half-written checkpoint, and a crash leaves `out_dir` untouched.

  Raises:
    FileExistsError: `out_dir` exists and `overwrite` is False (checked before any work).
  """
  out = os.path.abspath(os.fspath(out_dir))
  if os.path.lexists(out) and not overwrite:
    raise FileExistsError(f"{out} already exists; refusing to overwrite it (use --force / "
                          "overwrite=True).")
  parent, base = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
  try:
    yield tmp
    _umask_permissions(tmp)
    old = None
    if os.path.lexists(out):
      old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
      os.rename(out, os.path.join(old, base))
    os.rename(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> None:
  """model.safetensors, or model-0000i-of-0000n.safetensors shards plus the index json."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = x
    size += x.nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors files without a known format.
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, file), metadata=metadata)
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)


def save_hf(cfg: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike[str],
            tokenizer: Tokenizer | None = None, *, chat_template: str | None = None,
            dtype: Any = None, architecture: str | None = None,
            max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> str:
  """Writes a HF checkpoint directory that `transformers` loads unchanged.

  Files: `config.json`, `model.safetensors` (or shards plus index past `max_shard_bytes`) and,
  with a tokenizer, `tokenizer.json`/`tokenizer.model` plus `tokenizer_config.json` (carrying
  `chat_template`). Written atomically (see `atomic_dir`). Sharded jax arrays are gathered to the
  host one tensor at a time, so this runs on a single host.

  Args:
    cfg: the model config.
    params: the parameter tree (numpy or jax arrays).
    out_dir: the directory to create.
    tokenizer: optional tokenizer to save alongside (its special ids go into config.json).
    chat_template: optional chat template string.
    dtype: tensor dtype in the files ("float32", "bfloat16", ...); None keeps the params' dtype.
    architecture: HF architecture (see `config_to_hf`); chosen from `cfg` by default.
    max_shard_bytes: largest safetensors file before splitting into shards.
    overwrite: replace an existing `out_dir`.

  Returns:
    The absolute output path.
  """
  dtype = numpy_dtype(dtype)
  tensors = params_to_hf(cfg, params, dtype=dtype)
  file_dtype = next(iter(tensors.values())).dtype
  extra: dict[str, Any] = {"dtype": {np.dtype(v): k for k, v in _NP_DTYPES.items()}.get(
      np.dtype(file_dtype), "float32")}
  if tokenizer is not None:
    extra.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                 pad_token_id=tokenizer.pad_id)
  hf_config = config_to_hf(cfg, architecture, **extra)
  out = os.path.abspath(os.fspath(out_dir))
  with atomic_dir(out, overwrite=overwrite) as tmp:
    _write_safetensors(tensors, tmp, max_shard_bytes)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
      save_tokenizer_files(tokenizer, tmp, chat_template)
    elif chat_template is not None:
      with open(os.path.join(tmp, CHAT_TEMPLATE_FILE), "w") as f:
        f.write(chat_template)
  return out
