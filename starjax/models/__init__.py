"""Llama-family decoder, presets, and checkpoint import/export (HF safetensors, GGUF)."""

from starjax.models.config import PRESETS, ModelConfig, preset
from starjax.models.hf import save_hf
from starjax.models.llama import (
    ModelOutput,
    Transformer,
    forward,
    init_cache,
    init_params,
)
from starjax.models.registry import LoadedModel, builtin_names, load, save_starjax
from starjax.models.vocab import add_thought_tokens

__all__ = [
    "PRESETS", "LoadedModel", "ModelConfig", "ModelOutput", "Transformer", "add_thought_tokens",
    "builtin_names", "forward", "init_cache", "init_params", "load", "preset", "save_hf",
    "save_starjax",
]
