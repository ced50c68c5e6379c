"""Growing a model's vocabulary to its tokenizer's (thought tokens and other added tokens).

starjax tokenizers append the thought tokens after a checkpoint's own vocabulary, so a loaded
tokenizer can have more ids than the embedding has rows. `add_thought_tokens` appends the missing
rows to the input embedding (and to the output projection when it is not tied).

New rows start at the mean of the existing rows, because:
  * as an output row, the mean gives each new token the average logit over the old vocabulary
    (logits are linear in the row: h . mean(E) = mean(h . E)), so new tokens start neither
    impossible nor dominant; a zero row would give logit 0, far above the typical (negative) logit
    of a trained model, and random rows give arbitrary logits;
  * as an input embedding, the mean lies inside the region the layers were trained on, so the
    hidden states of sequences containing a new token stay in range from the first step.
Old tokens keep their rows exactly, so their relative logits are unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from starjax.models.config import ModelConfig
from starjax.tokenizers import Tokenizer

# Parameter paths with a vocabulary axis, and which axis it is.
VOCAB_AXES: dict[tuple[str, ...], int] = {("embed", "embedding"): 0, ("lm_head", "kernel"): 1}


def grow_rows(x: Any, new_size: int, axis: int) -> Any:
  """Appends copies of the mean slice along `axis` until it has `new_size` entries.

  Works on numpy and jax arrays alike (returns the same kind); the mean is taken in float32.
  """
  old = x.shape[axis]
  if new_size < old:
    raise ValueError(f"cannot shrink a vocabulary axis from {old} to {new_size}.")
  if new_size == old:
    return x
  xp = jnp if isinstance(x, jax.Array) else np
  mean = xp.mean(x.astype(xp.float32), axis=axis, keepdims=True).astype(x.dtype)
  reps = [1] * x.ndim
  reps[axis] = new_size - old
  return xp.concatenate([x, xp.tile(mean, reps)], axis=axis)


def grow_leaf(path: tuple[str, ...], x: Any, vocab_size: int) -> Any:
  """`grow_rows` for the params leaf at `path` if it has a vocabulary axis, else `x` unchanged."""
  axis = VOCAB_AXES.get(tuple(path))
  return x if axis is None else grow_rows(x, vocab_size, axis)


def grow_vocab(cfg: ModelConfig, params: dict[str, Any],
               vocab_size: int) -> tuple[ModelConfig, dict[str, Any]]:
  """Grows embedding (and untied LM head) to `vocab_size` rows; a no-op when already that big.

  Returns:
    (cfg with the new vocab_size, params with grown leaves; other leaves are shared, not copied).
  """
  if vocab_size <= cfg.vocab_size:
    return cfg, params
  out = dict(params)
  for path in VOCAB_AXES:
    if path[0] in out:
      sub = dict(out[path[0]])
      sub[path[1]] = grow_leaf(path, sub[path[1]], vocab_size)
      out[path[0]] = sub
  return cfg.replace(vocab_size=vocab_size), out


def add_thought_tokens(cfg: ModelConfig, params: dict[str, Any],
                       tokenizer: Tokenizer) -> tuple[ModelConfig, dict[str, Any]]:
  """Makes the model cover every tokenizer id (thought tokens included); see the module docstring.

  A model whose vocabulary is already at least `tokenizer.vocab_size` (e.g. padded to a multiple
  of 64) is returned unchanged.
  """
  for name in ("start_thought_id", "end_thought_id"):
    if getattr(tokenizer, name) >= tokenizer.vocab_size:
      raise ValueError(f"tokenizer {name}={getattr(tokenizer, name)} is outside its vocab_size "
                       f"{tokenizer.vocab_size}.")
  return grow_vocab(cfg, params, tokenizer.vocab_size)
