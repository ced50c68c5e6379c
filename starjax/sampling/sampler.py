"""Host-side sampling API: token or text prompts in, completions with log-probs out.

Prompts are grouped into batches, left-padded to a power-of-two length bucket, and the batch is
padded to a bucket size, so a long run compiles once per (batch bucket, prompt bucket, max new
tokens) and never per call.

Multi-process runs: every process calls with the same prompts; each places only its own devices'
rows on device, and the results are all-gathered, so every process returns the full, identical
output (write it from `parallel.multihost.is_primary()` only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from starjax.models import positions as positions_lib
from starjax.models.config import ModelConfig
from starjax.parallel import multihost
from starjax.sampling import core
from starjax.sampling.core import DecodeConfig


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated tokens for N prompts x K samples.

  Attributes:
    tokens: int32 (N, K, max_new_tokens); `tokens[i, k, :lengths[i, k]]` is the completion,
      including the EOS or stop sequence that ended it (if any); the rest is padding.
    lengths: int32 (N, K).
    logprobs: float32 (N, K, max_new_tokens): log p(token) under the model's raw distribution
      (temperature 1, no top-k/top-p), 0 after the end.
    finished: bool (N, K): ended by EOS or a stop sequence (False = hit max_new_tokens).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  finished: np.ndarray

  def completion(self, i: int, k: int = 0) -> list[int]:
    return self.tokens[i, k, :self.lengths[i, k]].tolist()


def generate_tokens(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
                    dc: DecodeConfig, *, num_samples: int = 1, seed: int = 0,
                    mesh: Mesh | None = None, batch_size: int = 32, max_cache_len: int | None = None,
                    min_prompt_bucket: int = 16, progress: bool = False,
                    prompt_ids: Sequence[int] | None = None) -> SampleOutput:
  """Samples `num_samples` completions for each token prompt.

  Args:
    cfg: model config.
    params: model params (replicated onto `mesh` if given).
    prompts: N token lists (each at least one token).
    dc: decoding settings.
    num_samples: K samples per prompt.
    seed: the random stream; sample k of prompt i depends only on (seed, prompt_ids[i], k).
    mesh: optional mesh; prompts are split over its ('data', 'fsdp') axes.
    batch_size: prompts per device call (rounded up to a multiple of the batch shards).
    max_cache_len: longest prompt bucket + new tokens allowed (default cfg.max_seq_len).
    min_prompt_bucket: smallest prompt-length bucket.
    progress: show a tqdm bar over batches.
    prompt_ids: stable ids for the random stream (default 0..N-1).

  Returns:
    SampleOutput with arrays of shape (N, K, ...).
  """
  if len(prompts) == 0:
    raise ValueError("No prompts given.")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; prompts need at least one token (e.g. BOS).")
  max_cache_len = max_cache_len or cfg.max_seq_len
  longest = max(len(p) for p in prompts)
  if longest + dc.max_new_tokens > max_cache_len:
    worst = int(np.argmax([len(p) for p in prompts]))
    raise ValueError(f"Prompt {worst} has {longest} tokens; with max_new_tokens="
                     f"{dc.max_new_tokens} that exceeds the cache length {max_cache_len}.")
  ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
  batch_size = core.rows_per_call(len(prompts), batch_size, mesh)
  fn = core.compiled_generate(cfg, dc, mesh)
  multiprocess = mesh is not None and multihost.is_multiprocess()
  if mesh is not None:
    params = multihost.global_from_host(
        params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  layers = core.split_layers(params, cfg.n_layers)

  n, k, m = len(prompts), num_samples, dc.max_new_tokens
  out = SampleOutput(np.zeros((n, k, m), np.int32), np.zeros((n, k), np.int32),
                     np.zeros((n, k, m), np.float32), np.zeros((n, k), bool))
  starts = range(0, n, batch_size)
  for start in tqdm(starts, desc="sample", disable=not progress, dynamic_ncols=True):
    chunk = list(range(start, min(start + batch_size, n)))
    plen = min(core.bucket(max(len(prompts[i]) for i in chunk), min_prompt_bucket),
               max_cache_len - m)
    toks = np.full((batch_size, plen), dc.pad_id, np.int32)
    pos = np.full((batch_size, plen), -1, np.int32)
    prompt_pos, prompt_state = positions_lib.prompt_positions(cfg, [prompts[i] for i in chunk])
    coupling = np.zeros((batch_size, prompt_state.shape[1]), np.int32)
    coupling[:len(chunk)] = prompt_state
    if prompt_state.shape[1]:  # Filler rows: a fresh state (their output is dropped).
      coupling[len(chunk):] = positions_lib.initial_state(cfg)
    for r, i in enumerate(chunk):
      p = np.asarray(prompts[i], np.int32)
      toks[r, plen - len(p):] = p
      pos[r, plen - len(p):] = prompt_pos[r]
    # Filler rows (batch padding) get one token so they stay finite; their output is dropped.
    toks[len(chunk):, -1] = dc.pad_id
    pos[len(chunk):, -1] = 0
    row_ids = np.concatenate([ids[chunk], np.full(batch_size - len(chunk), -1)])
    keys = core.sample_keys(seed, jax.numpy.asarray(row_ids, jax.numpy.int32), k)
    inputs = (toks, pos, coupling, keys)
    if multiprocess:  # Every process holds the whole batch; each places its own devices' rows.
      inputs = multihost.global_from_host(inputs, core.row_sharding(mesh))
    res = multihost.to_host(fn(params, layers, *inputs))  # All-gathered when rows span processes.
    sl = slice(start, start + len(chunk))
    out.tokens[sl] = res["tokens"][:len(chunk)]
    out.lengths[sl] = res["lengths"][:len(chunk)]
    out.logprobs[sl] = res["logprobs"][:len(chunk)]
    out.finished[sl] = res["finished"][:len(chunk)]
  return out


@dataclasses.dataclass(frozen=True)
class Completion:
  """One decoded sample: text up to (not including) its stop string or EOS."""

  text: str
  tokens: list[int]
  logprob: float
  finished: bool


def _truncate(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  cut = min((text.find(s) for s in stops if s in text), default=-1)
  return (text, False) if cut < 0 else (text[:cut], True)


def generate_text(cfg: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *,
                  max_new_tokens: int, num_samples: int = 1, greedy: bool = False,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  stop: Sequence[str] = (), seed: int = 0, mesh: Mesh | None = None,
                  batch_size: int = 32, add_bos: bool = True, progress: bool = False,
                  suppress_ids: Sequence[int] = ()) -> list[list[Completion]]:
  """Text in, text out: `result[i][k]` is sample k for prompt i.

  Stop strings end a sample on device when their token encoding appears, and the returned text is
  cut at the first occurrence of any stop string (exact even when the model produces the string
  through a different tokenization).
  """
  stop_seqs = tuple(tuple(tokenizer.encode(s)) for s in stop if s)
  dc = DecodeConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                    top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, stop_sequences=stop_seqs,
                    pad_id=tokenizer.pad_id, suppress_ids=tuple(suppress_ids),
                    vocab_limit=tokenizer.vocab_size if cfg.vocab_size > tokenizer.vocab_size
                    else None)
  token_prompts = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
  res = generate_tokens(cfg, params, token_prompts, dc, num_samples=num_samples, seed=seed,
                        mesh=mesh, batch_size=batch_size, progress=progress)
  results = []
  for i in range(len(prompts)):
    row = []
    for k in range(num_samples):
      ids = res.completion(i, k)
      if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
      text, cut = _truncate(tokenizer.decode(ids), stop)
      row.append(Completion(text=text, tokens=ids,
                            logprob=float(res.logprobs[i, k, :res.lengths[i, k]].sum()),
                            finished=bool(res.finished[i, k]) or cut))
    results.append(row)
  return results
