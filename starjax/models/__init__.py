"""Llama-family decoder, presets and (later) checkpoint import/export."""

from starjax.models.config import PRESETS, ModelConfig, preset
from starjax.models.llama import (
    ModelOutput,
    Transformer,
    forward,
    init_cache,
    init_params,
)

__all__ = [
    "PRESETS", "ModelConfig", "ModelOutput", "Transformer", "forward", "init_cache",
    "init_params", "preset",
]
