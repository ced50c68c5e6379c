"""Thought-augmented generation with a KV cache (Quiet-STaR inference, spec §1.7).

Before each new token the model thinks: it reads <start-of-thought>, samples M thought tokens,
reads <end-of-thought>, and the token is drawn from the mixing head's blend of the post-thought
logits and the no-thought logits, exactly the talk step 0 of training:

  w      = mixing_weight(h_base(t), h_end(t))
  logits = (1 - w) z_base(t) + w z_end(t)    predicts x_{t+1}

Positions follow training (`QuietStarConfig` docstring, spec §1.2): with x_0..x_t the text so far,
start sits at t + 1, c_1..c_M at t + 2..t + M + 1 and end at t + M + 2; the next text token is
then written at t + 1, as if the thought had never been there.

Cache layout (one fixed buffer per batch, `starjax.models.llama` cache, slots addressed by index,
keys masked by their stored position): prompts are left-padded to P slots (pad positions -1); text
token n is stored at slot P + n; the thought of step n is written to the M + 2 scratch slots
P + n .. P + n + M + 1 right after the text, then those slots' positions are reset to -1 (masked;
a stale thought key would also lie at a later position than any query that reaches it) and text
token n overwrites slot P + n. The text's keys/values are computed once, so each new token costs
M + 3 one-token decode steps instead of passes over the whole prefix (the reference re-runs the full
forward for every token). Cache length: P + max_new_tokens + M + 1.

Randomness (results do not depend on the batch a prompt lands in, on padding or bucket sizes):
`stream_keys(seed, ids)` gives each prompt a text key and a thought key. Text token n of prompt e is
drawn with fold_in(text_key_e, n) (the scheme of `starjax.sampling`, sample 0); thought token c_i
at text position t with fold_in(fold_in(fold_in(thought_key_e, 0), t), i), the training keys of
`quiet_star.sampling` (pass 0), so a thought here equals the one `evaluate.position_scores` samples
at position t with the same key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from starjax.models import llama
from starjax.models.config import ModelConfig
from starjax.parallel import multihost
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import objective, sampling
from starjax.quiet_star.config import QuietStarConfig
from starjax.sampling import core
from starjax.sampling.core import DecodeConfig

Array = jax.Array
Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# On device.


def stream_keys(seed: int | Array, ids: Array) -> tuple[Array, Array]:
  """Per-prompt (text keys (B,), thought keys (B,)) for prompt ids `ids` (B,).

  The two streams come from `jax.random.split(key(seed))`; text keys follow `starjax.sampling`
  (sample 0 of each prompt), thought keys `quiet_star.sampling.example_keys`.
  """
  base = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
  text_base, thought_base = jax.random.split(base)
  ids = jnp.asarray(ids, jnp.int32)
  return core.sample_keys(text_base, ids, 1)[:, 0], sampling.example_keys(thought_base, ids)


def _fold(keys: Array, data: Array | int) -> Array:
  """fold_in per row: keys (B,), data (B,) or a scalar."""
  data = jnp.broadcast_to(jnp.asarray(data, jnp.int32), keys.shape)
  return jax.vmap(jax.random.fold_in)(keys, data)


def _generate_local(params: Params, layers: list[Params], prompts: Array, positions: Array,
                    text_keys: Array, thought_keys: Array, *, cfg: QuietStarConfig,
                    model_cfg: ModelConfig, dc: DecodeConfig, thoughts: bool,
                    with_logits: bool) -> dict[str, Array]:
  """Prefill the left-padded prompts (B, P), then a `while_loop` over new tokens.

  Iteration n runs M + 3 one-token decode steps in one `fori_loop` (one step without thoughts):
  step 0 reads the last text token (the prompt's last token when n = 0; it rewrites the slot the
  prefill filled) and gives the no-thought logits; steps 1 .. M + 2 read start, the thought and
  end. With one loop body the model is traced and compiled once, not twice. Each step runs
  the layers unrolled on `layers`, the per-layer weights (`sampling.core.split_layers`), and on a
  per-layer cache (`llama.decode_unrolled`): no step copies the stacked weights or rewrites the
  stacked cache.
  """
  b, plen = prompts.shape
  n_new, m = dc.max_new_tokens, cfg.n_sampled
  scratch = m + 2 if thoughts else 0
  lm = params["lm"]
  cache = llama.init_cache(model_cfg, b, plen + n_new + max(scratch - 1, 0))
  cache = llama.Transformer(model_cfg).apply({"params": lm}, prompts, positions, cache=cache,
                                             cache_index=0).cache
  last = jnp.max(positions, axis=1)  # (B,) position of each prompt's last token.
  if thoughts:
    start, end = fwd.thought_embeddings(params, cfg, model_cfg)

  act = llama.activation_dtype(model_cfg)
  zeros_z, zeros_h = jnp.zeros((b, model_cfg.vocab_size), act), jnp.zeros((b, model_cfg.dim), act)

  def cond(carry):
    return (carry["step"] < n_new) & ~jnp.all(carry["done"])

  def body(carry):
    n, done = carry["step"], carry["done"]
    t = last + n  # Position of the text token read at step 0: token n - 1, or the prompt's last.
    slot = plen - 1 + n
    tkeys = _fold(_fold(thought_keys, 0), t)

    def step(j, inner):
      """Step j reads `prev` (j = 0), start (1), a thought token or end (M + 2) at t + j."""
      cache, prev, toks, z_base, h_base, _, _ = inner
      x = fwd.embed_tokens(lm, prev, model_cfg)
      if thoughts:
        x = jnp.where(j == 1, start, jnp.where(j == scratch, end, x))
      out = llama.decode_unrolled(model_cfg, lm, layers, None, (t + j)[:, None], cache, slot + j,
                                  inputs_embeds=x[:, None])
      z, h = out.logits[:, -1], out.hidden[:, -1]
      z_base, h_base = jnp.where(j == 0, z, z_base), jnp.where(j == 0, h, h_base)
      if thoughts:  # Thought token c_j comes from step j's output (j = 1 .. M).
        prev = sampling.choose_tokens(fwd.suppress(z, cfg.suppress_ids), _fold(tkeys, j), cfg)
        toks = jnp.where((j >= 1) & (j <= m), jax.lax.dynamic_update_index_in_dim(
            toks, prev, jnp.clip(j - 1, 0, m - 1), 1), toks)
      return out.cache, prev, toks, z_base, h_base, z, h

    init = (carry["cache"], carry["prev"], jnp.zeros((b, m if thoughts else 0), jnp.int32),
            zeros_z, zeros_h, zeros_z, zeros_h)
    cache, _, toks, z_base, h_base, z_end, h_end = jax.lax.fori_loop(0, scratch + 1, step, init)
    if thoughts:
      # Free the scratch slots: their keys stay in memory but no query attends to position -1.
      pos = jax.lax.dynamic_update_slice_in_dim(
          cache["pos"], jnp.full((b, scratch), -1, jnp.int32), slot + 1, axis=1)
      cache = {**cache, "pos": pos}
      w = objective.mixing_weight(params["mixer"], h_base, h_end, cfg)
      logits = objective.mix_logits(w, z_base, z_end)
    else:
      w = jnp.zeros((b,), jnp.float32)
      logits = z_base.astype(jnp.float32)
    tok = core.choose_tokens(logits, _fold(text_keys, n), dc)
    tok = jnp.where(done, dc.pad_id, tok)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)[:, 0]
    out = dict(carry)
    out["tokens"] = carry["tokens"].at[:, n].set(tok)
    out["logprobs"] = carry["logprobs"].at[:, n].set(jnp.where(done, 0.0, logp))
    out["thoughts"] = carry["thoughts"].at[:, n].set(jnp.where(done[:, None], dc.pad_id, toks))
    out["weights"] = carry["weights"].at[:, n].set(jnp.where(done, 0.0, w))
    if with_logits:
      out["logits"] = carry["logits"].at[:, n].set(logits)
    ended = core.stopped(out["tokens"], n, dc)
    if dc.eos_id is not None:
      ended |= tok == dc.eos_id
    out["lengths"] = carry["lengths"] + (~done).astype(jnp.int32)
    out["done"] = done | ended
    out["finished"] = carry["finished"] | ended
    out["cache"], out["prev"], out["step"] = cache, tok, n + 1
    return out

  carry = {
      "step": jnp.zeros((), jnp.int32), "cache": llama.unstack_cache(cache),
      "prev": prompts[:, -1],
      "tokens": jnp.full((b, n_new), dc.pad_id, jnp.int32),
      "logprobs": jnp.zeros((b, n_new), jnp.float32),
      "thoughts": jnp.full((b, n_new, m if thoughts else 0), dc.pad_id, jnp.int32),
      "weights": jnp.zeros((b, n_new), jnp.float32),
      "lengths": jnp.zeros((b,), jnp.int32), "done": jnp.zeros((b,), bool),
      "finished": jnp.zeros((b,), bool),
  }
  if with_logits:
    carry["logits"] = jnp.zeros((b, n_new, model_cfg.vocab_size), jnp.float32)
  carry = jax.lax.while_loop(cond, body, carry)
  keep = ("tokens", "logprobs", "thoughts", "weights", "lengths", "finished")
  return {k: carry[k] for k in keep + (("logits",) if with_logits else ())}


@functools.lru_cache(maxsize=32)
def compiled_generate(cfg: QuietStarConfig, model_cfg: ModelConfig, dc: DecodeConfig,
                      thoughts: bool = True, with_logits: bool = False, mesh: Mesh | None = None):
  """The jitted generate(params, layers, prompts, positions, text_keys, thought_keys) -> dict.

  One compile per settings (and per shape): layers = `sampling.core.split_layers(params["lm"],
  n_layers)`, prompts int (B, P) left-padded, positions (B, P) with -1 on padding, keys (B,) from
  `stream_keys`. Returns tokens, logprobs, weights (B, N), thoughts (B, N, M), lengths, finished
  (B,), and logits (B, N, V) float32 if `with_logits`. With a `mesh`, the prompt rows are split
  over its batch axes (`sampling.core.row_sharding`; B must divide) under `shard_map`, the weights
  replicated: each device decodes its own rows and stops when they are done.
  """
  if model_cfg.digit_positions or model_cfg.position_coupling:
    raise NotImplementedError("Quiet-STaR generation does not support digit-index embeddings or "
                              "coupled positions (model.digit_positions, "
                              "model.position_coupling).")
  fn = functools.partial(_generate_local, cfg=cfg, model_cfg=model_cfg.replace(remat="none"),
                         dc=dc, thoughts=thoughts, with_logits=with_logits)
  if mesh is None:
    return jax.jit(fn)
  rows, replicated = core.row_sharding(mesh), NamedSharding(mesh, P())
  fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P()) + (rows.spec,) * 4, out_specs=rows.spec,
                     check_vma=False)
  return jax.jit(fn, in_shardings=(replicated, replicated) + (rows,) * 4, out_shardings=rows)


# ---------------------------------------------------------------------------------------------
# Host API.


@dataclasses.dataclass(frozen=True)
class ThoughtSamples:
  """Generated tokens for N prompts, with the thought behind each token.

  Attributes:
    tokens: int32 (N, max_new_tokens); `tokens[i, :lengths[i]]` is the completion, including the
      EOS or stop sequence that ended it; the rest is padding.
    lengths: int32 (N,).
    thoughts: int32 (N, max_new_tokens, M): the M sampled thought tokens read before each token
      (M = 0 without thoughts); padding after the end.
    mixing_weights: float32 (N, max_new_tokens): w of each token (0 without thoughts and after the
      end).
    logprobs: float32 (N, max_new_tokens): log p(token) under the mixed distribution (temperature
      1, no top-k/top-p), 0 after the end.
    finished: bool (N,): ended by EOS or a stop sequence.
    logits: float32 (N, max_new_tokens, vocab) mixed logits, only with `return_logits=True`.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  thoughts: np.ndarray
  mixing_weights: np.ndarray
  logprobs: np.ndarray
  finished: np.ndarray
  logits: np.ndarray | None = None

  def completion(self, i: int) -> list[int]:
    return self.tokens[i, :self.lengths[i]].tolist()

  def thoughts_of(self, i: int) -> list[list[int]]:
    """The thought (M token ids) before each token of completion i."""
    return self.thoughts[i, :self.lengths[i]].tolist()


def cache_slots(prompt_len: int, max_new_tokens: int, cfg: QuietStarConfig,
                thoughts: bool = True) -> int:
  """KV-cache slots one row needs: prompt + new tokens + the thought scratch (M + 2, the last
  text token's slot shared)."""
  return prompt_len + max_new_tokens + (cfg.n_sampled + 1 if thoughts else 0)


def generate_with_thoughts(params: Params, prompts: Sequence[Sequence[int]], cfg: QuietStarConfig,
                           model_cfg: ModelConfig, dc: DecodeConfig, *, seed: int | Array = 0,
                           thoughts: bool = True, prompt_ids: Sequence[int] | None = None,
                           batch_size: int = 16, max_cache_len: int | None = None,
                           min_prompt_bucket: int = 16, return_logits: bool = False,
                           mesh: Mesh | None = None, progress: bool = False) -> ThoughtSamples:
  """Thought-augmented sampling from token prompts (see the module docstring).

  Args:
    params: Quiet-STaR parameters {"lm", "thought", "mixer"}.
    prompts: N token lists (each at least one token, e.g. BOS).
    cfg: the Quiet-STaR config: thought length M (`n_sampled`), thought temperature or
      `greedy_thoughts`, `suppress_ids` (never sampled in thoughts nor in the text), mixing.
    model_cfg: decoder shape.
    dc: text decoding (max_new_tokens, greedy/temperature/top-k/top-p, EOS, stop sequences, pad).
    seed: random stream (`stream_keys`); prompt i depends only on (seed, prompt_ids[i]).
    thoughts: False decodes the base LM alone (no thoughts, w = 0).
    prompt_ids: stable ids for the random stream (default 0..N-1).
    batch_size: prompts per device call.
    max_cache_len: the most KV-cache slots a row may use (default model_cfg.max_seq_len).
    min_prompt_bucket: smallest prompt-length bucket (prompts are left-padded to a power of 2).
    return_logits: also return the mixed logits of every step (N, max_new_tokens, vocab).
    mesh: optional mesh: each batch's rows are split over its batch axes ('data', 'fsdp'), so
      `batch_size` is rounded up to a multiple of their size; results equal those on one device.
    progress: tqdm bar over batches.

  Returns:
    ThoughtSamples.

  Raises:
    ValueError: no prompts, an empty prompt, or a prompt too long for the cache.
  """
  if len(prompts) == 0:
    raise ValueError("No prompts given.")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; prompts need at least one token (e.g. BOS).")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  max_cache_len = max_cache_len or model_cfg.max_seq_len
  n_new = dc.max_new_tokens
  extra = cache_slots(0, n_new, cfg, thoughts)
  lens = [len(p) for p in prompts]
  if max(lens) + extra > max_cache_len:
    worst = int(np.argmax(lens))
    raise ValueError(
        f"Prompt {worst} has {lens[worst]} tokens; with max_new_tokens={n_new}"
        + (f" and a thought scratch of {cfg.n_sampled + 2} slots" if thoughts else "")
        + f" it needs {lens[worst] + extra} cache slots, more than max_cache_len={max_cache_len}.")
  dc = dataclasses.replace(dc, suppress_ids=tuple(sorted(set(dc.suppress_ids)
                                                         | set(cfg.suppress_ids))))
  ids = np.arange(len(prompts)) if prompt_ids is None else np.asarray(prompt_ids)
  if len(ids) != len(prompts):
    raise ValueError(f"{len(ids)} prompt_ids for {len(prompts)} prompts.")
  batch_size = core.rows_per_call(len(prompts), batch_size, mesh)
  fn = compiled_generate(cfg, model_cfg, dc, thoughts, return_logits, mesh)
  multiprocess = mesh is not None and multihost.is_multiprocess()
  if mesh is not None:
    params = multihost.global_from_host(params, NamedSharding(mesh, P()))
  layers = core.split_layers(params["lm"], model_cfg.n_layers)  # Once per call, not per batch.
  n, m = len(prompts), cfg.n_sampled if thoughts else 0
  out = {"tokens": np.zeros((n, n_new), np.int32), "lengths": np.zeros((n,), np.int32),
         "thoughts": np.zeros((n, n_new, m), np.int32),
         "weights": np.zeros((n, n_new), np.float32),
         "logprobs": np.zeros((n, n_new), np.float32), "finished": np.zeros((n,), bool)}
  if return_logits:
    out["logits"] = np.zeros((n, n_new, model_cfg.vocab_size), np.float32)
  for start in tqdm(range(0, n, batch_size), desc="think+sample", disable=not progress,
                    dynamic_ncols=True):
    chunk = list(range(start, min(start + batch_size, n)))
    plen = min(core.bucket(max(lens[i] for i in chunk), min_prompt_bucket), max_cache_len - extra)
    toks = np.full((batch_size, plen), dc.pad_id, np.int32)
    pos = np.full((batch_size, plen), -1, np.int32)
    for r, i in enumerate(chunk):
      toks[r, plen - lens[i]:] = prompts[i]
      pos[r, plen - lens[i]:] = np.arange(lens[i])
    pos[len(chunk):, -1] = 0  # Filler rows get one token so they stay finite; dropped.
    row_ids = np.concatenate([ids[chunk], np.full(batch_size - len(chunk), -1)])
    inputs = (toks, pos, *stream_keys(seed, row_ids))
    if multiprocess:  # Every process holds the whole batch; each places its own devices' rows.
      inputs = multihost.global_from_host(inputs, core.row_sharding(mesh))
    res = multihost.to_host(fn(params, layers, *inputs))  # Gathered when rows span processes.
    for k in out:
      out[k][start:start + len(chunk)] = res[k][:len(chunk)]
  return ThoughtSamples(tokens=out["tokens"], lengths=out["lengths"], thoughts=out["thoughts"],
                        mixing_weights=out["weights"], logprobs=out["logprobs"],
                        finished=out["finished"], logits=out.get("logits"))


@dataclasses.dataclass(frozen=True)
class ThoughtCompletion:
  """One decoded completion with its thoughts.

  Attributes:
    text: the completion, cut before EOS and the first stop string.
    tokens: its token ids (EOS excluded).
    thoughts: the thought token ids read before each token (one list per token).
    thought_texts: the thoughts decoded.
    mixing_weights: w per token.
    logprob: sum of the tokens' log-probabilities under the mixed distribution.
    finished: ended by EOS or a stop string.
  """

  text: str
  tokens: list[int]
  thoughts: list[list[int]]
  thought_texts: list[str]
  mixing_weights: list[float]
  logprob: float
  finished: bool


def generate_text_with_thoughts(params: Params, tok: Any, prompts: Sequence[str],
                                cfg: QuietStarConfig, model_cfg: ModelConfig, *,
                                max_new_tokens: int, greedy: bool = False,
                                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                stop: Sequence[str] = (), seed: int = 0, thoughts: bool = True,
                                add_bos: bool = True, prompt_ids: Sequence[int] | None = None,
                                batch_size: int = 16, max_cache_len: int | None = None,
                                mesh: Mesh | None = None,
                                progress: bool = False) -> list[ThoughtCompletion]:
  """Text in, text and thoughts out (`generate_with_thoughts` on the tokenizer's ids).

  The thought markers and the embedding rows beyond the tokenizer are never sampled, neither in the
  text nor in thoughts.

  Raises:
    ValueError: an empty prompt, max_new_tokens < 1, a bad temperature, or a
      prompt too long for the cache.
  """
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"Prompt {i} is empty; give some text (for samples from BOS alone, call "
                       "generate_with_thoughts with [[tok.bos_id]]).")
  markers = {tok.start_thought_id, tok.end_thought_id} | set(range(tok.vocab_size,
                                                                    model_cfg.vocab_size))
  cfg = cfg.replace(suppress_ids=tuple(sorted(set(cfg.suppress_ids) | markers)))
  dc = DecodeConfig(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                    top_k=top_k, top_p=top_p, eos_id=tok.eos_id,
                    stop_sequences=tuple(tuple(tok.encode(s)) for s in stop if s),
                    pad_id=tok.pad_id)
  res = generate_with_thoughts(params, [tok.encode(p, add_bos=add_bos) for p in prompts], cfg,
                               model_cfg, dc, seed=seed, thoughts=thoughts, prompt_ids=prompt_ids,
                               batch_size=batch_size, max_cache_len=max_cache_len, mesh=mesh,
                               progress=progress)
  out = []
  for i in range(len(prompts)):
    n = int(res.lengths[i])
    ids = res.completion(i)
    if ids and ids[-1] == tok.eos_id:
      ids, n = ids[:-1], n - 1
    text = tok.decode(ids)
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
      text = text[:min(cuts)]
    th = res.thoughts[i, :n].tolist()
    out.append(ThoughtCompletion(
        text=text, tokens=ids, thoughts=th, thought_texts=[tok.decode(c) for c in th],
        mixing_weights=res.mixing_weights[i, :n].tolist(),
        logprob=float(res.logprobs[i, :res.lengths[i]].sum()),
        finished=bool(res.finished[i]) or bool(cuts)))
  return out


def thought_lm_generator(params: Params, model_cfg: ModelConfig, tok: Any, cfg: QuietStarConfig,
                         mesh: Mesh | None = None, batch_size: int = 16,
                         progress: bool = False) -> Any:
  """A `quiet_star.evaluate.TextGenerator` that thinks before every token (registered there as
  "thoughts"); with a `mesh`, each batch's rows are split over its batch axes."""

  def generate(prompts: Sequence[str], req: Any) -> list[list[str]]:
    k = req.num_samples
    flat = [p for p in prompts for _ in range(k)]
    res = generate_text_with_thoughts(
        params, tok, flat, cfg, model_cfg, max_new_tokens=req.max_new_tokens, greedy=req.greedy,
        temperature=req.temperature, stop=req.stop, seed=req.seed, batch_size=batch_size,
        mesh=mesh, progress=progress)
    return [[res[i * k + s].text for s in range(k)] for i in range(len(prompts))]

  return generate
