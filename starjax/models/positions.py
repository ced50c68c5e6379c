"""The position ids a model sees: plain 0, 1, 2, ... or task-coupled (`ModelConfig.position_coupling`).

A model trained with coupled positions must see the same ids when it samples, so both sides go
through this module: `position_fn` gives training rows their ids (`batching.make_rows`), and the
sampler takes the prompts' ids and decoder state from `prompt_positions` and steps that state one
token at a time on device with `decode_step`. The arithmetic scheme
(`starjax.data.arithmetic_positions`) is defined on characters, so it needs the byte tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from starjax.data import arithmetic_positions as arith
from starjax.models.config import ModelConfig
from starjax.tokenizers import ByteTokenizer

_OFFSET = ByteTokenizer._BYTE_OFFSET  # pylint: disable=protected-access


def char_codes(tokens: Any) -> Any:
  """Byte-tokenizer ids -> character codes; special tokens (BOS, EOS, pad, ...) -> -1."""
  xp = jnp if isinstance(tokens, jax.Array) else np
  t = xp.asarray(tokens).astype(np.int32)
  return xp.where((t >= _OFFSET) & (t < _OFFSET + 256), t - _OFFSET, -1).astype(np.int32)


def _widths(codes: np.ndarray) -> tuple[int, int]:
  text = bytes(int(c) for c in codes if 0 <= c < 128).decode("ascii")
  return arith.prompt_widths(text)


def _coupled(token_lists: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], np.ndarray]:
  lengths = np.asarray([len(t) for t in token_lists], np.int64)
  codes = np.full((len(token_lists), int(lengths.max(initial=0))), -1, np.int32)
  for i, t in enumerate(token_lists):
    codes[i, :len(t)] = char_codes(np.asarray(t, np.int32))
  widths = np.asarray([_widths(c[:n]) for c, n in zip(codes, lengths)], np.int32).reshape(-1, 2)
  ids, finals = arith.batch_positions(codes, widths, lengths)
  return [ids[i, :n] for i, n in enumerate(lengths)], finals


def initial_state(cfg: ModelConfig) -> np.ndarray:
  """The decoder state of an empty sequence ((len(FIELDS),) int32; (0,) for plain positions)."""
  return arith.initial_state(0, 0) if cfg.position_coupling else np.zeros(0, np.int32)


def position_fn(cfg: ModelConfig):
  """None for plain positions, else token lists -> per-example position ids (for training rows)."""
  if not cfg.position_coupling:
    return None
  return lambda token_lists: _coupled(token_lists)[0]


def prompt_positions(cfg: ModelConfig, prompts: Sequence[Sequence[int]]
                     ) -> tuple[list[np.ndarray], np.ndarray]:
  """Each prompt's ids and the decoder state after it ((N, state_size) int32)."""
  if not cfg.position_coupling:
    return ([np.arange(len(p), dtype=np.int32) for p in prompts],
            np.zeros((len(prompts), 0), np.int32))
  return _coupled(prompts)


def decode_step(cfg: ModelConfig, state: jax.Array, tokens: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Ids of the newly sampled tokens (R,) and the new state, for a coupled model."""
  del cfg  # One scheme so far.
  pos, new = arith.step(arith.as_dict(state), char_codes(tokens))
  return pos, arith.as_array(new)
