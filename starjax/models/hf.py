"""Hugging Face checkpoint interop for Llama, Mistral and Qwen2 causal LMs (numpy only).

Converts `config.json` dicts to `ModelConfig` and HF tensor names/layouts to the starjax parameter
tree, and back. HF `nn.Linear` weights are (out, in); starjax kernels are (in, out) with the q/k/v
output and the o_proj input split into (heads, head_dim). Decoder layers are stacked along a
leading axis because starjax scans over them.

No torch import: tensors are numpy arrays, e.g. from `safetensors.numpy.load_file`. Placement on
devices (and sharding) is up to the caller.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so bf16 safetensors files load)
import numpy as np

from starjax.models.config import ModelConfig

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
    raise ValueError(f"Unsupported architecture {architecture!r}; supported: {list(ARCHITECTURES)}.")
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
                   dtype: Any = np.float32) -> dict[str, Any]:
  """Converts HF-named tensors to the starjax parameter tree (numpy arrays).

  Args:
    cfg: the model config (e.g. from `config_from_hf`).
    tensors: HF name -> array, e.g. a (merged) safetensors file or a torch state_dict converted
      with `.numpy()`.
    dtype: dtype of the returned arrays (float32 master weights by default); None keeps the input
      dtype.

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

  params: dict[str, Any] = {}
  for name, spec in _global_specs(cfg).items():
    _set(params, spec.path, convert(name, spec))
  for suffix, spec in _layer_specs(cfg).items():
    stacked = np.stack([convert(f"model.layers.{i}.{suffix}", spec)
                        for i in range(cfg.n_layers)])
    _set(params, ("layers",) + spec.path, stacked)
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


def load_safetensors_dir(path: str | os.PathLike[str], dtype: Any = np.float32,
                         **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a HF checkpoint directory into host memory (numpy).

  Reads `config.json` and either `model.safetensors` or the shards listed in
  `model.safetensors.index.json`. bfloat16 files load too (via ml_dtypes).

  Args:
    path: the directory.
    dtype: dtype of the returned parameters (see `params_from_hf`).
    **overrides: `ModelConfig` fields to override (see `config_from_hf`).

  Returns:
    (cfg, params) with params as numpy arrays.
  """
  # Imported here so the rest of this module works without safetensors installed.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f), source=config_path, **overrides)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
  else:
    raise ValueError(f"{path}: neither model.safetensors nor model.safetensors.index.json found.")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    tensors.update(load_file(file))
  return cfg, params_from_hf(cfg, tensors, dtype=dtype)
