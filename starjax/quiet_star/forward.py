"""Quiet-STaR forward: one base pass, then all thought and talk steps in parallel over positions.

The decoder math is re-expressed as pure functions of the decoder's own parameter tree (the layout
of `starjax.models.Transformer`, layers stacked on a leading axis), so the base model stays
loadable by `starjax.models.forward` and the layer loop can mix base and thought attention.
`tests/test_quiet_star.py` checks this loop against `starjax.models.forward`.

Step k >= 1 runs the whole decoder on L rows at once (row t = the thought branch of position t, at
position id t + k). Its attention sees the base keys (causal, padding-masked) and the row's own keys
from steps 1..k (see `quiet_star.attention`). Thought keys/values live in buffer pairs with S - 1
slots (`quiet_star.attention.empty_thought_kv`), one per layer and row block
(`QuietStarConfig.row_blocks`), carried through `lax.scan` over steps; within a step the layers
run unrolled on them. The backward pass goes
through a custom VJP (`_thought_steps`) that recomputes each step from the final buffer, so it
keeps one buffer, not one per step (autodiff of the scan, `step_vjp=False`, keeps the carry of
every step: O(S^2 L) key/value memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from starjax.models import attention as attn_lib
from starjax.models.config import ModelConfig
from starjax.quiet_star import attention as qs_attn
from starjax.quiet_star.config import QuietStarConfig

Array = jax.Array
Params = dict[str, Any]
# choose(k, logits (B, L, V) f32, start/end suppressed, detached) -> thought token c_k (B, L) int32.
Chooser = Callable[[Array, Array], Array]

SUPPRESSED_LOGIT = -1e10

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class BaseOutputs:
  """The ordinary causal pass (step 0).

  Attributes:
    hidden: (B, L, dim) final-norm hidden states.
    logits: (B, L, vocab) LM-head logits.
    k: (n_layers, B, L, K, D) rotated keys of every layer.
    v: (n_layers, B, L, K, D) values of every layer.
  """

  hidden: Array
  logits: Array
  k: Array
  v: Array


@flax.struct.dataclass
class ThoughtOutputs:
  """Steps 1..S-1 of one pass.

  Attributes:
    hidden: (S - 1, B, L, dim) final-norm hidden states; hidden[k - 1] is step k. The talk steps
      are the last T entries.
    tokens: (M, B, L) thought tokens c_1..c_M (c_i is the input of step i + 1).
    logp: (M, B, L) log-probability of c_i under step i's logits at the reinforce temperature
      (start/end ids suppressed); differentiable in the parameters.
  """

  hidden: Array
  tokens: Array
  logp: Array


# ---------------------------------------------------------------------------------------------
# Decoder math on the Transformer's parameter tree.


def rms_norm(x: Array, scale: Array, eps: float, dtype: Any) -> Array:
  """RMSNorm as in `llama.RMSNorm`: float32 statistics, learned scale, cast to `dtype`."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(dtype)


def embed_tokens(lm: Params, tokens: Array, model_cfg: ModelConfig) -> Array:
  """Token ids (...) -> embeddings (..., dim) in the compute dtype."""
  table = lm["embed"]["embedding"].astype(model_cfg.compute_dtype)
  return jnp.take(table, tokens, axis=0)


def logits_from_hidden(lm: Params, hidden: Array, model_cfg: ModelConfig) -> Array:
  """Final-norm hidden states (..., dim) -> logits (..., vocab) (tied or separate head)."""
  dt = model_cfg.compute_dtype
  if model_cfg.tie_embeddings:
    return jnp.dot(hidden.astype(dt), lm["embed"]["embedding"].astype(dt).T)
  return jnp.dot(hidden.astype(dt), lm["lm_head"]["kernel"].astype(dt))


def _proj(p: Params, x: Array, dtype: Any) -> Array:
  y = jnp.einsum("btd,dhk->bthk", x.astype(dtype), p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


def _qkv(attn: Params, x: Array, positions: Array, model_cfg: ModelConfig
         ) -> tuple[Array, Array, Array]:
  dt = model_cfg.compute_dtype
  q = attn_lib.apply_rope(_proj(attn["q_proj"], x, dt), positions, model_cfg.rope_theta)
  k = attn_lib.apply_rope(_proj(attn["k_proj"], x, dt), positions, model_cfg.rope_theta)
  return q, k, _proj(attn["v_proj"], x, dt)


def _attn_out(attn: Params, o: Array, dtype: Any) -> Array:
  return jnp.einsum("bthk,hkd->btd", o.astype(dtype), attn["o_proj"]["kernel"].astype(dtype))


def _mlp(mlp: Params, x: Array, dtype: Any) -> Array:
  x = x.astype(dtype)
  gate = jnp.dot(x, mlp["gate_proj"]["kernel"].astype(dtype))
  up = jnp.dot(x, mlp["up_proj"]["kernel"].astype(dtype))
  return jnp.dot(jax.nn.silu(gate) * up, mlp["down_proj"]["kernel"].astype(dtype))


def _layer(lp: Params, x: Array, positions: Array, model_cfg: ModelConfig,
           attend: Callable[[Array, Array, Array], tuple[Array, Any]]) -> tuple[Array, Any]:
  """One pre-norm block. `attend(q, k, v) -> (o, aux)` is the attention (base or thought); the
  block returns (x, aux)."""
  dt, eps = model_cfg.compute_dtype, model_cfg.norm_eps
  q, k, v = _qkv(lp["attn"], rms_norm(x, lp["input_norm"]["scale"], eps, dt), positions, model_cfg)
  o, aux = attend(q, k, v)
  x = x + _attn_out(lp["attn"], o, dt)
  return x + _mlp(lp["mlp"], rms_norm(x, lp["post_attn_norm"]["scale"], eps, dt), dt), aux


def _maybe_remat(fn: Callable, model_cfg: ModelConfig) -> Callable:
  if model_cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[model_cfg.remat], prevent_cse=False)


def step_positions(batch: int, length: int, step: Array | int) -> Array:
  """Position ids (B, L) of thought step `step`: row t sits at t + step."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + step, (batch, length))


# ---------------------------------------------------------------------------------------------
# Base pass and thought steps.


def base_pass(lm: Params, tokens: Array, valid: Array, model_cfg: ModelConfig) -> BaseOutputs:
  """The causal pass over `tokens` (B, L); `valid` (B, L) marks real tokens (others are keys no
  row attends to). Equals `starjax.models.forward` on every valid row."""
  if model_cfg.digit_positions or model_cfg.position_coupling:
    raise NotImplementedError("Quiet-STaR does not support digit-index embeddings or coupled "
                              "positions (model.digit_positions, model.position_coupling).")
  b, n = tokens.shape
  positions = step_positions(b, n, 0)
  mask = attn_lib.CausalMask(qs_attn.base_block_mask(valid, 0, model_cfg.sliding_window))

  def layer(x, lp):
    return _layer(lp, x, positions, model_cfg,
                  lambda q, k, v: (attn_lib.dot_product_attention(
                      q, k, v, mask, impl=model_cfg.attention), (k, v)))

  x = embed_tokens(lm, tokens, model_cfg)
  x, (ks, vs) = jax.lax.scan(_maybe_remat(layer, model_cfg), x, lm["layers"])
  hidden = rms_norm(x, lm["final_norm"]["scale"], model_cfg.norm_eps, model_cfg.compute_dtype)
  return BaseOutputs(hidden=hidden, logits=logits_from_hidden(lm, hidden, model_cfg), k=ks, v=vs)


def row_blocks(length: int, n_blocks: int) -> tuple[tuple[int, int], ...]:
  """Static (start, stop) row ranges splitting `length` rows into at most `n_blocks` blocks."""
  n_blocks = max(1, min(n_blocks, length))
  edges = [round(i * length / n_blocks) for i in range(n_blocks + 1)]
  return tuple((a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a)


def thought_step(lm: Params, x: Array, step: Array, base: BaseOutputs, valid: Array,
                 buf_k: tuple[tuple[Array, ...], ...], buf_v: tuple[tuple[Array, ...], ...],
                 model_cfg: ModelConfig
                 ) -> tuple[Array, tuple[tuple[Array, ...], ...], tuple[tuple[Array, ...], ...]]:
  """Runs step `step` >= 1 on input embeddings `x` (B, L, dim).

  Writes the step's keys/values into slot `step - 1` of the buffers (per layer, one per row
  block, layouts of `quiet_star.attention.empty_thought_kv`) and returns (final-norm hidden
  (B, L, dim), buf_k, buf_v).
  """
  b, n = x.shape[:2]
  window = model_cfg.sliding_window
  positions = step_positions(b, n, step)
  mask = qs_attn.base_block_mask(valid, step, window)
  slots = qs_attn.thought_slot_mask(step, buf_k[0][0].shape[-1], window)
  blocks = row_blocks(n, len(buf_k[0]))

  def layer(x, xs):
    lp, pos, msk, kb, vb, bk, bv = xs

    def attend(q, k, v):
      bk2, bv2 = qs_attn.write_thought_kv(bk, bv, k, v, step - 1)
      return qs_attn.thought_attention(q, kb, vb, msk, bk2, bv2, slots), (bk2, bv2)

    return _layer(lp, x, pos, model_cfg, attend)

  layer = _maybe_remat(layer, model_cfg)
  buf_k = [list(t) for t in buf_k]
  buf_v = [list(t) for t in buf_v]
  xs = [x[:, r0:r1] for r0, r1 in blocks]
  # Layers unrolled over per-layer buffers: a layer scan would stack the buffers (and, in the
  # backward, their cotangents) and re-lay them out around every step. Rows are independent
  # given the base keys, so each row block is its own chain of ops (XLA can run them at once) and
  # sees base keys up to its last row only.
  for i in range(model_cfg.n_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], lm["layers"])
    for c, (r0, r1) in enumerate(blocks):
      xs[c], (buf_k[i][c], buf_v[i][c]) = layer(
          xs[c], (lp, positions[:, r0:r1], mask[:, r0:r1, :r1], base.k[i][:, :r1],
                  base.v[i][:, :r1], buf_k[i][c], buf_v[i][c]))
  x = jnp.concatenate(xs, axis=1)
  hidden = rms_norm(x, lm["final_norm"]["scale"], model_cfg.norm_eps, model_cfg.compute_dtype)
  return hidden, tuple(map(tuple, buf_k)), tuple(map(tuple, buf_v))


def suppress(logits: Array, ids: tuple[int, ...]) -> Array:
  """float32 logits with the given ids set to -1e10 (never sampled)."""
  logits = logits.astype(jnp.float32)
  if ids:
    logits = logits.at[..., jnp.asarray(ids)].set(SUPPRESSED_LOGIT)
  return logits


def shift_left(x: Array, n: int, fill: Any) -> Array:
  """x[:, t + n] at column t (axis 1), `fill` past the end."""
  if n == 0:
    return x
  pad = jnp.full((x.shape[0], n) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, n:], pad], axis=1)[:, :x.shape[1]]


def thought_embeddings(params: Params, cfg: QuietStarConfig, model_cfg: ModelConfig
                       ) -> tuple[Array, Array]:
  """The start/end-of-thought embeddings as used (stored value x embedding_scale)."""
  dt = model_cfg.compute_dtype
  th = params["thought"]
  return ((th["start_embedding"] * cfg.embedding_scale).astype(dt),
          (th["end_embedding"] * cfg.embedding_scale).astype(dt))


def shift_left_dynamic(x: Array, n: Array, fill: Any) -> Array:
  """`shift_left` for a traced shift 0 <= n <= L."""
  length = x.shape[1]
  pad = jnp.full((x.shape[0], length) + x.shape[2:], fill, x.dtype)
  return jax.lax.dynamic_slice_in_dim(jnp.concatenate([x, pad], axis=1), n, length, axis=1)


def thought_pass(params: Params, base: BaseOutputs, tokens: Array, valid: Array,
                 cfg: QuietStarConfig, model_cfg: ModelConfig, choose: Chooser) -> ThoughtOutputs:
  """Steps 1..S-1 of one pass for every position of `tokens` (B, L), as one `lax.scan`.

  Step k reads: start (k = 1), the previous step's thought token (2 <= k <= M + 1), end
  (k = M + 2) or the teacher-forced x_{t+k-M-2} (k > M + 2). At k <= M it draws c_k =
  choose(k, logits) and keeps log pi(c_k) at the reinforce temperature. The later steps skip the
  LM head (`_if_sampling`): their tokens read as `cfg.fill_id` and their log-probs as 0, unused.

  Gradients: with `cfg.step_vjp` (default) through `_thought_steps`' custom VJP, which keeps one
  copy of the thought K/V buffers instead of one per step; else by autodiff of the scan
  (rematerialised per step with `cfg.remat_steps`).
  """
  lm = params["lm"]
  start, end = thought_embeddings(params, cfg, model_cfg)
  if cfg.step_vjp:
    logits_like = jax.ShapeDtypeStruct(tokens.shape + (model_cfg.vocab_size,), jnp.float32)
    choose_fn, consts = jax.closure_convert(choose, jnp.int32(1), logits_like)
    hidden, toks, logp = _thought_steps(choose_fn, cfg, model_cfg, lm, start, end, base.k, base.v,
                                        tokens, valid, tuple(consts))
  else:
    (hidden, toks, logp), _ = _run_steps(choose, cfg, model_cfg, lm, start, end, base.k, base.v,
                                         tokens, valid, remat=cfg.remat_steps)
  m = cfg.n_sampled
  return ThoughtOutputs(hidden=hidden, tokens=toks[:m], logp=logp[:m])


def _step_input(lm: Params, start: Array, end: Array, tokens: Array, step: Array, prev: Array,
                cfg: QuietStarConfig, model_cfg: ModelConfig) -> Array:
  """Input embeddings (B, L, dim) of step `step`; `prev` holds the previous step's tokens."""
  forced_ids = shift_left_dynamic(tokens, jnp.maximum(step - cfg.end_step, 0), cfg.fill_id)
  ids = jnp.where(step <= cfg.n_sampled + 1, prev, forced_ids)
  x = embed_tokens(lm, ids, model_cfg)
  return jnp.where(step == 1, start, jnp.where(step == cfg.end_step, end, x))


def _step(lm: Params, start: Array, end: Array, base_k: Array, base_v: Array, tokens: Array,
          valid: Array, buf_k: Any, buf_v: Any, step: Array, prev: Array, cfg: QuietStarConfig,
          model_cfg: ModelConfig) -> tuple[Array, Any, Any]:
  """One thought/talk step: (final-norm hidden, buf_k, buf_v)."""
  x = _step_input(lm, start, end, tokens, step, prev, cfg, model_cfg)
  base = BaseOutputs(hidden=None, logits=None, k=base_k, v=base_v)
  return thought_step(lm, x, step, base, valid, buf_k, buf_v, model_cfg)


def _thought_logits(lm: Params, h: Array, cfg: QuietStarConfig, model_cfg: ModelConfig) -> Array:
  """float32 logits of a step's hidden states, start/end ids suppressed."""
  return suppress(logits_from_hidden(lm, h, model_cfg), cfg.suppress_ids)


def _if_sampling(step: Array, cfg: QuietStarConfig, fn: Callable[[Array], Any], h: Array,
                 skipped: Any) -> Any:
  """fn(h) at steps 1..M, which draw a thought token; `skipped` at the later steps.

  Only those steps need the LM head's logits (talk losses take the hidden states), so the end and
  talk steps skip the head, the token draw and the log-softmax, forward and backward: for a large
  vocabulary the head is a fifth of a step's work.
  """
  return jax.lax.cond(step <= cfg.n_sampled, fn, lambda _: skipped, h)


def _token_logp(logits: Array, tok: Array, cfg: QuietStarConfig) -> Array:
  logp = jax.nn.log_softmax(logits / cfg.reinforce_temperature, axis=-1)
  return jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]


def _run_steps(choose: Chooser, cfg: QuietStarConfig, model_cfg: ModelConfig, lm: Params,
               start: Array, end: Array, base_k: Array, base_v: Array, tokens: Array,
               valid: Array, remat: bool = False
               ) -> tuple[tuple[Array, Array, Array], tuple[Array, Array]]:
  """The step scan: ((hidden, tokens, logp) of every step, final thought K/V buffers)."""
  b, n = tokens.shape
  n_steps = cfg.n_steps

  def body(carry, step):
    buf_k, buf_v, prev = carry
    h, buf_k, buf_v = _step(lm, start, end, base_k, base_v, tokens, valid, buf_k, buf_v, step,
                            prev, cfg, model_cfg)

    def draw(h):
      logits = _thought_logits(lm, h, cfg, model_cfg)
      tok = choose(step, jax.lax.stop_gradient(logits)).astype(jnp.int32)
      return tok, _token_logp(logits, tok, cfg)

    tok, logp = _if_sampling(step, cfg, draw, h, (jnp.full((b, n), cfg.fill_id, jnp.int32),
                                                  jnp.zeros((b, n), jnp.float32)))
    return (buf_k, buf_v, tok), (h, tok, logp)

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  buffers = [[qs_attn.empty_thought_kv(b, r1 - r0, model_cfg.n_kv_heads, model_cfg.head_dim,
                                       n_steps - 1, model_cfg.compute_dtype)
              for r0, r1 in row_blocks(n, cfg.row_blocks)]
             for _ in range(model_cfg.n_layers)]
  init = (tuple(tuple(k for k, _ in layer) for layer in buffers),
          tuple(tuple(v for _, v in layer) for layer in buffers),
          jnp.full((b, n), cfg.fill_id, jnp.int32))
  (buf_k, buf_v, _), ys = jax.lax.scan(body, init, jnp.arange(1, n_steps, dtype=jnp.int32))
  return ys, (buf_k, buf_v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _thought_steps(choose_fn: Callable[..., Array], cfg: QuietStarConfig, model_cfg: ModelConfig,
                   lm: Params, start: Array, end: Array, base_k: Array, base_v: Array,
                   tokens: Array, valid: Array, consts: tuple[Array, ...]
                   ) -> tuple[Array, Array, Array]:
  """`_run_steps` with a backward pass in O(one K/V buffer) memory.

  Autodiff of the step scan keeps the scan carry, the thought K/V buffers of every layer, at every
  step: O(S^2 L) memory, the largest item of a training step. But step k reads only slots < k
  (the rest are masked), after writing slot k - 1 itself, so what it reads from its input buffer
  (slots < k - 1) is unchanged in the *final* buffer. The backward therefore runs the steps in
  reverse on the final buffer, recomputing each step (as `jax.checkpoint` would) with the tokens
  the forward chose, and carries one accumulated cotangent buffer: slot k - 1's cotangent is
  complete once every later step has added its share, and is then pushed through step k.
  """
  ys, _ = _run_steps(lambda s, z: choose_fn(s, z, *consts), cfg, model_cfg, lm, start, end,
                     base_k, base_v, tokens, valid)
  return ys


def _thought_steps_fwd(choose_fn, cfg, model_cfg, lm, start, end, base_k, base_v, tokens, valid,
                       consts):
  ys, (buf_k, buf_v) = _run_steps(lambda s, z: choose_fn(s, z, *consts), cfg, model_cfg, lm,
                                  start, end, base_k, base_v, tokens, valid)
  return ys, (lm, start, end, base_k, base_v, tokens, valid, buf_k, buf_v, ys[1])


def _read_slot(buf_k: Any, buf_v: Any, slot: Array) -> tuple[tuple[Array, Array], ...]:
  """Every buffer's (keys, values) of one slot (buffers: nested per layer and row block)."""
  return tuple(qs_attn.read_thought_kv(k, v, slot)
               for k, v in zip(jax.tree.leaves(buf_k), jax.tree.leaves(buf_v)))


def _thought_steps_bwd(choose_fn, cfg, model_cfg, res, cotangents):
  del choose_fn  # The forward's tokens are reused, never re-drawn.
  lm, start, end, base_k, base_v, tokens, valid, buf_k, buf_v, toks = res
  d_hidden, _, d_logp = cotangents
  prevs = jnp.concatenate([jnp.full_like(toks[:1], cfg.fill_id), toks[:-1]])

  def step_fn(diff, step, prev, tok):
    lm_, start_, end_, bk, bv, fk, fv = diff
    h, fk, fv = _step(lm_, start_, end_, bk, bv, tokens, valid, fk, fv, step, prev, cfg,
                      model_cfg)
    logp = _if_sampling(step, cfg,
                        lambda h: _token_logp(_thought_logits(lm_, h, cfg, model_cfg), tok, cfg),
                        h, jnp.zeros(tok.shape, jnp.float32))
    return (h, logp, _read_slot(fk, fv, step - 1))

  def back(carry, xs):
    grads, d_buf_k, d_buf_v = carry
    step, prev, tok, dh, dlp = xs
    diff = (lm, start, end, base_k, base_v, buf_k, buf_v)
    _, vjp = jax.vjp(lambda d: step_fn(d, step, prev, tok), diff)
    (g,) = vjp((dh, dlp, _read_slot(d_buf_k, d_buf_v, step - 1)))
    *g_rest, g_fk, g_fv = g
    # Earlier slots gain step k's share (g_f* is 0 from `slot` on: step k overwrote that slot and
    # masks the later ones); slots >= `slot` are consumed and never read again.
    d_buf_k, d_buf_v = jax.tree.map(jnp.add, (d_buf_k, d_buf_v), (g_fk, g_fv))
    grads = jax.tree.map(jnp.add, grads, tuple(g_rest))
    return (grads, d_buf_k, d_buf_v), None

  zeros = jax.tree.map(jnp.zeros_like, (lm, start, end, base_k, base_v))
  steps = jnp.arange(1, cfg.n_steps, dtype=jnp.int32)
  (grads, _, _), _ = jax.lax.scan(
      back, (zeros, *jax.tree.map(jnp.zeros_like, (buf_k, buf_v))),
      (steps, prevs, toks, d_hidden, d_logp), reverse=True)
  return (*grads, None, None, None)


_thought_steps.defvjp(_thought_steps_fwd, _thought_steps_bwd)
