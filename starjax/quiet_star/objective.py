"""The Quiet-STaR objective: parameters, mixing head, LM losses and REINFORCE on thoughts.

Parameters: {"lm": decoder params (the `starjax.models` tree, unchanged), "thought":
{"start_embedding", "end_embedding"} (d,) each, stored divided by `embedding_scale`, "mixer": the
mixing head}. A train step is

  (loss, metrics), grads = jax.value_and_grad(quiet_star_loss, has_aux=True)(
      params, batch, key, cfg, model_cfg)

with cfg, model_cfg (and mesh) static. Losses (spec §1.5), per example b, pass p, position t, talk
step s = 0..T-1 (talk step s predicts x_{t+1+s}):

  L_base    = mean over valid t of NLL(z_base[t], x_{t+1})
  L_talk_s  = mean over valid (b, p, t) of NLL(mix_s[t], x_{t+1+s})
  L_LM      = w0 * L_base + (1 - w0) * mean_s L_talk_s
  R[t, p]   = sum_s NLL_base(x_{t+1+s}) - NLL_talk_s(x_{t+1+s}), t < L - 1 - T (detached)
  A         = R - mean over passes of R (optionally leave-one-out), optionally max(A, 0)
  L_pol     = mean over sampled steps i of [sum over cells of -A * log pi(c_i)] / n_cells
  loss      = L_LM + beta * L_pol
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from starjax.models import llama
from starjax.models.config import ModelConfig
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import sampling
from starjax.quiet_star.config import QuietStarConfig
from starjax.train.losses import token_nll

Array = jax.Array
Params = dict[str, Any]
Batch = dict[str, Array]


# ---------------------------------------------------------------------------------------------
# Parameters.


def init_mixer(rng: Array, dim: int, std: float) -> Params:
  """Mixing head Linear(2d, d) -> ReLU -> Linear(d, d) -> ReLU -> Linear(d, 1, no bias).

  The first two layers are N(0, std) with zero bias; the last is zero, so w = 0 at init.
  """
  k0, k1 = jax.random.split(rng)
  return {
      "hidden_0": {"kernel": std * jax.random.normal(k0, (2 * dim, dim), jnp.float32),
                   "bias": jnp.zeros((dim,), jnp.float32)},
      "hidden_1": {"kernel": std * jax.random.normal(k1, (dim, dim), jnp.float32),
                   "bias": jnp.zeros((dim,), jnp.float32)},
      "out": {"kernel": jnp.zeros((dim, 1), jnp.float32)},
  }


def init_thought_embeddings(lm: Params, cfg: QuietStarConfig, init_vector: Array | None = None
                            ) -> Params:
  """Start/end embeddings, both `init_vector` (default: the mean embedding row) / scale.

  The reference initialises both to the embedding of "---" divided by the scale; pass that row as
  `init_vector` to reproduce it.
  """
  v = jnp.mean(lm["embed"]["embedding"], axis=0) if init_vector is None else init_vector
  v = jnp.asarray(v, jnp.float32) / cfg.embedding_scale
  return {"start_embedding": v, "end_embedding": v}


def init_params(rng: Array, cfg: QuietStarConfig, model_cfg: ModelConfig,
                lm_params: Params | None = None, init_vector: Array | None = None) -> Params:
  """{"lm", "thought", "mixer"}; the decoder is freshly initialised unless `lm_params` is given."""
  k_lm, k_mix = jax.random.split(rng)
  lm = llama.init_params(model_cfg, k_lm) if lm_params is None else lm_params
  std = model_cfg.init_std if cfg.mixer_init_std is None else cfg.mixer_init_std
  return {"lm": lm, "thought": init_thought_embeddings(lm, cfg, init_vector),
          "mixer": init_mixer(k_mix, model_cfg.dim, std)}


# ---------------------------------------------------------------------------------------------
# Mixing head.


def mixing_weight(mixer: Params, h_base: Array, h_thought: Array, cfg: QuietStarConfig) -> Array:
  """w (...) from concat[h_base, h_thought] (..., 2d); unbounded unless `mixing_sigmoid`."""
  x = jnp.concatenate([h_base, h_thought], axis=-1).astype(jnp.float32)
  x = jax.nn.relu(x @ mixer["hidden_0"]["kernel"] + mixer["hidden_0"]["bias"])
  x = jax.nn.relu(x @ mixer["hidden_1"]["kernel"] + mixer["hidden_1"]["bias"])
  w = (x @ mixer["out"]["kernel"])[..., 0]
  return jax.nn.sigmoid(w) if cfg.mixing_sigmoid else w


def mix_logits(w: Array, z_base: Array, z_thought: Array) -> Array:
  """(1 - w) z_base + w z_thought in float32 (= LM head of the mixed hidden state, by linearity)."""
  w = w[..., None]
  return (1.0 - w) * z_base.astype(jnp.float32) + w * z_thought.astype(jnp.float32)


def talk_losses(params: Params, base: fwd.BaseOutputs, talk_hidden: Array, tokens: Array,
                cfg: QuietStarConfig, model_cfg: ModelConfig) -> tuple[Array, Array]:
  """Per-token NLL and mixing weight (T, B, L) of the talk steps of one pass.

  Talk step s at row t mixes the base prediction at position t + s (hidden state and logits,
  shifted left by s; the wrapped-around tail is never scored) with the thought branch's hidden
  state `talk_hidden[s]` (B, L, d), and is scored on x_{t+1+s}.
  """
  lm = params["lm"]

  def one(xs):
    s, h = xs
    z = fwd.logits_from_hidden(lm, h, model_cfg)
    w = mixing_weight(params["mixer"], fwd.shift_left_dynamic(base.hidden, s, 0), h, cfg)
    mixed = mix_logits(w, fwd.shift_left_dynamic(base.logits, s, 0), z)
    return token_nll(mixed, fwd.shift_left_dynamic(tokens, s + 1, cfg.fill_id)), w

  if cfg.remat_steps:
    one = jax.checkpoint(one, prevent_cse=False)
  return jax.lax.map(one, (jnp.arange(cfg.n_ahead_talk), talk_hidden))


# ---------------------------------------------------------------------------------------------
# Masks, rewards, advantages.


def loss_masks(valid: Array, cfg: QuietStarConfig) -> dict[str, Array]:
  """Which cells are scored.

  Returns:
    base (B, L): x_t and x_{t+1} real (the base NLL at t is scored).
    talk (T, B, L): x_t and x_{t+1+s} real (talk step s at t is scored).
    cells (B, L): positions that get a reward and a policy gradient: t < L - 1 - T (as in the
      reference) with x_t and x_{t+1} real.
  """
  valid = valid.astype(bool)
  n = valid.shape[1]
  talk = jnp.stack([valid & fwd.shift_left(valid, s + 1, False)
                    for s in range(cfg.n_ahead_talk)])
  base = talk[0]
  cells = base & (jnp.arange(n) < n - 1 - cfg.n_ahead_talk)[None]
  return {"base": base, "talk": talk, "cells": cells}


def thought_rewards(base_nll: Array, talk_nll: Array, talk_mask: Array, cell_mask: Array) -> Array:
  """R (..., L) = sum_s [NLL_base(x_{t+1+s}) - NLL_talk_s(x_{t+1+s})] over scored (s, t).

  Args:
    base_nll: (B, L) base NLL of x_{t+1} at t.
    talk_nll: (..., T, B, L) talk NLL (leading axes, e.g. passes, broadcast).
    talk_mask: (T, B, L).
    cell_mask: (B, L); R = 0 outside.

  Detached: rewards carry no gradient.
  """
  n_talk = talk_nll.shape[-3]
  base_s = jnp.stack([fwd.shift_left(base_nll, s, 0.0) for s in range(n_talk)])
  gain = jnp.where(talk_mask, base_s - talk_nll, 0.0)
  return jax.lax.stop_gradient(jnp.where(cell_mask, gain.sum(axis=-3), 0.0))


def advantages(rewards: Array, cfg: QuietStarConfig, axis: int = 0) -> Array:
  """A = R - baseline over the passes on `axis` (detached), clamped at 0 if configured.

  Computed as sum_q (R_p - R_q) / n, so identical rewards give exactly 0; n = P (the reference,
  baseline includes the sample itself) or P - 1 (leave-one-out).
  """
  r = jnp.moveaxis(rewards, axis, 0)
  n_pass = r.shape[0]
  denom = n_pass if cfg.include_self_in_baseline else n_pass - 1
  adv = (r[:, None] - r[None, :]).sum(axis=1) / denom
  if cfg.clamp_negative_advantage:
    adv = jnp.maximum(adv, 0.0)
  return jax.lax.stop_gradient(jnp.moveaxis(adv, 0, axis))


def policy_loss(logp: Array, adv: Array, n_cells: Array | float) -> Array:
  """mean over sampled steps i of sum(-A * log pi(c_i)) / n_cells.

  Args:
    logp: (..., M, L) log-probs of the sampled thought tokens.
    adv: (..., L) advantages (0 on cells without reward).
    n_cells: the denominator of the cell mean.
  """
  m = logp.shape[-2]
  return -jnp.sum(adv[..., None, :] * logp) / (jnp.maximum(n_cells, 1.0) * m)


# ---------------------------------------------------------------------------------------------
# The objective.


def _per_example(params: Params, key: Array, tokens: Array, valid: Array, example_ids: Array,
                 forced: Array | None, *, cfg: QuietStarConfig, model_cfg: ModelConfig
                 ) -> dict[str, Array]:
  """All per-cell quantities for the local examples; leading axis B everywhere."""
  valid = valid.astype(bool)
  base, th = sampling.rollouts(params, tokens, valid, sampling.example_keys(key, example_ids),
                               cfg, model_cfg, forced)
  masks = loss_masks(valid, cfg)
  base_nll = token_nll(base.logits, fwd.shift_left(tokens, 1, cfg.fill_id))
  talk_hidden = th.hidden[:, cfg.end_step - 1:]  # (P, T, B, L, d)
  talk_nll, w = jax.vmap(lambda h: talk_losses(params, base, h, tokens, cfg, model_cfg))(
      talk_hidden)
  rewards = thought_rewards(base_nll, talk_nll, masks["talk"], masks["cells"])  # (P, B, L)
  adv = jnp.where(masks["cells"], advantages(rewards, cfg, axis=0), 0.0)
  to_b = lambda x: jnp.moveaxis(x, -2, 0)  # (..., B, L) -> (B, ..., L)
  return {
      "base_nll": base_nll, "base_mask": masks["base"], "talk_mask": to_b(masks["talk"]),
      "cell_mask": masks["cells"], "talk_nll": to_b(talk_nll), "mixing_weight": to_b(w),
      "reward": to_b(rewards), "advantage": to_b(adv), "logp": to_b(th.logp),
      "thoughts": to_b(th.tokens),
  }


def quiet_star_cells(params: Params, batch: Batch, key: Array, cfg: QuietStarConfig,
                     model_cfg: ModelConfig, mesh: Mesh | None = None,
                     forced_thoughts: Array | None = None) -> dict[str, Array]:
  """Per-cell quantities of a batch (for losses, tests and diagnostics).

  Args:
    params: {"lm", "thought", "mixer"}.
    batch: {"tokens": int (B, L), "mask": (B, L) real tokens (right padding), optional
      "example_ids": int (B,) global ids that seed the thought keys (default 0..B-1)}.
    key: base PRNG key of the thought sampling.
    cfg: objective settings.
    model_cfg: decoder shape.
    mesh: optional mesh: examples are split over its ("data", "fsdp") axes with `shard_map`.
    forced_thoughts: optional int (B, P, M, L) thought tokens used instead of sampling.

  Returns:
    base_nll, base_mask (B, L); talk_nll, mixing_weight (B, P, T, L); talk_mask (B, T, L);
    reward, advantage (B, P, L); cell_mask (B, L); logp, thoughts (B, P, M, L).
  """
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  n = tokens.shape[1]
  if n < cfg.n_ahead_talk + 2:
    raise ValueError(f"Sequence length {n} leaves no reward cells for n_ahead_talk="
                     f"{cfg.n_ahead_talk} (need L >= T + 2).")
  args = (params, key, tokens, jnp.asarray(batch["mask"]).astype(bool),
          sampling.batch_example_ids(batch))
  if forced_thoughts is None:
    fn = lambda p, k, t, v, i: _per_example(p, k, t, v, i, None, cfg=cfg, model_cfg=model_cfg)
  else:
    fn = lambda p, k, t, v, i, f: _per_example(p, k, t, v, i, f, cfg=cfg, model_cfg=model_cfg)
    args += (jnp.asarray(forced_thoughts, jnp.int32),)
  return sampling.over_examples(fn, mesh, 2)(*args)


def reduce_cells(cells: dict[str, Array], cfg: QuietStarConfig) -> tuple[Array, dict[str, Array]]:
  """The scalar loss and metrics from `quiet_star_cells` output (global means over the batch)."""
  f32 = lambda x: x.astype(jnp.float32)
  b, n_pass = cells["reward"].shape[:2]
  n_len = cells["base_mask"].shape[1]
  base_mask, talk_mask, cell_mask = (f32(cells[k]) for k in ("base_mask", "talk_mask",
                                                              "cell_mask"))
  base_loss = jnp.sum(cells["base_nll"] * base_mask) / jnp.maximum(base_mask.sum(), 1.0)
  talk_count = n_pass * talk_mask.sum(axis=(0, 2))  # (T,)
  talk_w = talk_mask[:, None]  # (B, 1, T, L)
  talk_loss = jnp.sum(cells["talk_nll"] * talk_w, axis=(0, 1, 3)) / jnp.maximum(talk_count, 1.0)
  lm_loss = (cfg.original_loss_weight * base_loss
             + (1.0 - cfg.original_loss_weight) * jnp.mean(talk_loss))
  if cfg.policy_mean_over_padding:
    n_cells = jnp.asarray(b * n_pass * (n_len - 1 - cfg.n_ahead_talk), jnp.float32)
  else:
    n_cells = n_pass * cell_mask.sum()
  pol = policy_loss(cells["logp"], cells["advantage"], n_cells)
  loss = lm_loss + cfg.policy_loss_beta * pol
  n_rewarded = jnp.maximum(n_pass * cell_mask.sum(), 1.0)
  cell_w = cell_mask[:, None]
  adv = cells["advantage"]
  metrics = {
      "loss": loss, "lm_loss": lm_loss, "base_loss": base_loss, "talk_loss": jnp.mean(talk_loss),
      "policy_loss": pol,
      "mixing_weight": jnp.sum(cells["mixing_weight"] * talk_w) / jnp.maximum(talk_count.sum(),
                                                                                1.0),
      "reward_mean": jnp.sum(cells["reward"] * cell_w) / n_rewarded,
      "advantage_mean": jnp.sum(adv * cell_w) / n_rewarded,
      "advantage_abs_mean": jnp.sum(jnp.abs(adv) * cell_w) / n_rewarded,
      "advantage_nonzero_frac": jnp.sum((adv != 0) * cell_w) / n_rewarded,
      "thought_logp": jnp.sum(cells["logp"] * cell_w[:, :, None]) / (
          n_rewarded * cells["logp"].shape[2]),
      "reward_cells": cell_mask.sum(),
  }
  for s in range(cfg.n_ahead_talk):
    metrics[f"talk_loss_{s}"] = talk_loss[s]
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def quiet_star_loss(params: Params, batch: Batch, key: Array, cfg: QuietStarConfig,
                    model_cfg: ModelConfig, mesh: Mesh | None = None,
                    forced_thoughts: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """(loss, metrics) of one batch; jittable (cfg, model_cfg, mesh static) and differentiable.

  See `quiet_star_cells` for the arguments. Metrics: loss, lm_loss, base_loss, talk_loss (mean
  over talk steps) and talk_loss_{s}, policy_loss, mixing_weight (mean w over scored talk cells),
  reward_mean, advantage_mean, advantage_abs_mean, advantage_nonzero_frac (over reward cells and
  passes), thought_logp, reward_cells.
  """
  cells = quiet_star_cells(params, batch, key, cfg, model_cfg, mesh, forced_thoughts)
  return reduce_cells(cells, cfg)
