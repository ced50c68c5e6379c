"""Quiet-STaR (spec §1.9): parallel thoughts equal sequential decoding, sampling keys, diagonal
attention, init invariants, advantages, alignment, padding, REINFORCE, embedding scale, meshes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from starjax import models, parallel
from starjax.quiet_star import attention as qs_attn
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import objective, sampling
from starjax.quiet_star.config import QuietStarConfig
from starjax.sampling import core as sampling_core

MODEL = models.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
# Qwen-style biases, tied head, and a sliding window short enough to bind inside thoughts.
MODEL_B = MODEL.replace(qkv_bias=True, tie_embeddings=True, sliding_window=5)
# M = 2 sampled tokens, T = 3 talk steps, S = 7 steps; ids 62/63 play <start>/<end>.
CFG = QuietStarConfig(n_ahead=5, n_ahead_talk=3, n_passes=2, suppress_ids=(62, 63))
B, L = 2, 12
KEY = jax.random.key(7)


def _batch(b=B, n=L, seed=0, lengths=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 62, (b, n)).astype(np.int32)
  lengths = [n] * b if lengths is None else lengths
  mask = np.arange(n)[None] < np.asarray(lengths)[:, None]
  return {"tokens": tokens, "mask": mask, "example_ids": np.arange(b, dtype=np.int32)}


@functools.cache
def _lm_params(model_cfg, seed=0):
  # The decoder's tree without compiling its init (slow on a busy CPU); std 0.06 instead of 0.02
  # gives sharper distributions, so sampled tokens are not near-ties.
  shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, 0.06, s.shape), s.dtype), shapes)


def _params(model_cfg=MODEL, cfg=CFG, random_mixer=False, seed=0):
  p = objective.init_params(jax.random.key(seed), cfg, model_cfg, _lm_params(model_cfg, seed))
  if random_mixer:
    p["mixer"]["out"]["kernel"] = jax.random.normal(jax.random.key(seed + 1),
                                                    p["mixer"]["out"]["kernel"].shape)
  return p


@functools.cache
def _cells_fn(cfg, model_cfg, forced=False):
  if forced:
    return jax.jit(lambda p, b, k, f: objective.quiet_star_cells(p, b, k, cfg, model_cfg,
                                                                 forced_thoughts=f))
  return jax.jit(lambda p, b, k: objective.quiet_star_cells(p, b, k, cfg, model_cfg))


@functools.cache
def _grad_fn(cfg, model_cfg, mesh=None):
  loss = lambda p, b, k: objective.quiet_star_loss(p, b, k, cfg, model_cfg, mesh)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.cache
def _decoder_fn(model_cfg):
  return jax.jit(lambda p, e, pos: models.forward(model_cfg, p, None, pos, inputs_embeds=e))


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# ---------------------------------------------------------------------------------------------


def test_config_thought_lengths_and_validation():
  assert CFG.n_sampled == 2 and CFG.n_steps == 7 and CFG.end_step == 4
  ref = QuietStarConfig()  # N = 8: 5 sampled tokens, as in reference training.
  assert ref.n_sampled == 5 and ref.n_steps == ref.n_ahead + ref.n_ahead_talk - 1
  assert QuietStarConfig(sampled_thought_len_fix=True).n_sampled == 6  # reference infer()
  assert QuietStarConfig(n_thought_tokens=16).n_sampled == 16
  with pytest.raises(ValueError, match="sampled thought"):
    QuietStarConfig(n_ahead=3)
  with pytest.raises(ValueError, match="leave-one-out"):
    QuietStarConfig(n_passes=1, include_self_in_baseline=False)
  with pytest.raises(ValueError, match="Temperatures"):
    QuietStarConfig(thought_temperature=0.0)
  with pytest.raises(ValueError, match="no reward cells"):
    objective.quiet_star_cells(None, _batch(n=4), KEY, CFG, MODEL)


@jax.jit
def _attention_both_ways(*args):
  """Diagonal and dense thought attention, and the gradients of a scalar function of each."""
  loss = lambda f: lambda *x: jnp.sum(jnp.sin(f(*x)))
  grad = lambda f: jax.grad(loss(f), argnums=(0, 1, 4))(*args)
  return (qs_attn.thought_attention(*args), qs_attn.dense_thought_attention(*args),
          grad(qs_attn.thought_attention), grad(qs_attn.dense_thought_attention))


@pytest.mark.parametrize("window", [None, 2])
def test_diagonal_attention_equals_dense_mask(window):
  b, n, h, kh, d, n_slots, step = 2, 7, 4, 2, 8, 3, 2
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, n, h, d)).astype(np.float32)
  kb, vb = rng.normal(size=(2, b, n, kh, d)).astype(np.float32)
  kt, vt = rng.normal(size=(2, b, n, kh, d, n_slots)).astype(np.float32)  # slot axis last
  vt = vt.swapaxes(-1, -2)  # values (b, n, kh, n_slots, d)
  valid = np.arange(n)[None] < np.array([[n], [4]])  # example 1 is padded after 4 tokens
  base_mask = qs_attn.base_block_mask(jnp.asarray(valid), step, window)
  slots = qs_attn.thought_slot_mask(step, n_slots, window)
  out, ref, g, g_ref = _attention_both_ways(q, kb, vb, base_mask, kt, vt, slots)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for x, y in zip(g, g_ref):  # gradients agree as well
    np.testing.assert_allclose(x, y, atol=1e-5)
  # Padded keys and the inactive slot carry no weight: changing them changes nothing.
  kb2, kt2 = kb.copy(), kt.copy()
  kb2[1, 4:], kt2[..., 2] = 100.0, 100.0
  np.testing.assert_allclose(_attention_both_ways(q, kb2, vb, base_mask, kt2, vt, slots)[0], out,
                             atol=1e-6)
  # The efficient form never builds an L x (L * J) score or mask array.
  jaxpr = jax.make_jaxpr(qs_attn.thought_attention)(q, kb, vb, base_mask, kt, vt, slots)
  shapes = [v.aval.shape for e in jaxpr.eqns for v in e.outvars]
  assert not any(n * n_slots in s or n * (n_slots + 1) in s for s in shapes)


def test_thought_positions_are_t_plus_k():
  pos = np.asarray(fwd.step_positions(2, 5, 3))
  np.testing.assert_array_equal(pos, np.tile(np.arange(5) + 3, (2, 1)))
  # Slot i holds step i + 1; step k sees slots of steps 1..k (within the window).
  np.testing.assert_array_equal(qs_attn.thought_slot_mask(2, 4), [True, True, False, False])
  np.testing.assert_array_equal(qs_attn.thought_slot_mask(4, 4, sliding_window=2),
                                [False, False, True, True])


def _explicit_sequences(params, tokens, thoughts, cfg, model_cfg):
  """Embeddings (B*P*L, L+S-1, d) of x_0..x_t, start, c_1..c_M, end, x_{t+1}..x_{t+T-1}."""
  b, n = tokens.shape
  n_pass, m = thoughts.shape[1], thoughts.shape[2]
  table = np.asarray(params["lm"]["embed"]["embedding"])
  start, end = (np.asarray(e) for e in fwd.thought_embeddings(params, cfg, model_cfg))
  ext = np.concatenate([tokens, np.full((b, cfg.n_ahead_talk), cfg.fill_id)], axis=1)
  seqs = np.zeros((b * n_pass * n, n + cfg.n_steps - 1, model_cfg.dim), np.float32)
  for i, (e, p, t) in enumerate(np.ndindex(b, n_pass, n)):
    parts = [table[tokens[e, :t + 1]], start[None], table[thoughts[e, p, :, t]], end[None],
             table[ext[e, t + 1:t + cfg.n_ahead_talk]]]
    seq = np.concatenate(parts)
    assert len(seq) == t + cfg.n_steps and m == cfg.n_sampled
    seqs[i, :len(seq)] = seq
  pos = np.broadcast_to(np.arange(seqs.shape[1]), seqs.shape[:2])
  return seqs, pos


@pytest.mark.parametrize("model_cfg", [MODEL, MODEL_B], ids=["gqa", "bias_tied_window"])
def test_parallel_equals_sequential(model_cfg):
  params = _params(model_cfg, random_mixer=True)
  batch = _batch(lengths=[L, 9])
  rng = np.random.default_rng(1)
  thoughts = rng.integers(0, 62, (B, CFG.n_passes, CFG.n_sampled, L)).astype(np.int32)

  @jax.jit
  def parallel_run(p, t, v, forced):
    base, th = sampling.rollouts(p, t, v, sampling.example_keys(KEY, jnp.arange(B)), CFG,
                                 model_cfg, forced)
    plain = models.forward(model_cfg, p["lm"], t, jnp.where(v, jnp.arange(L), -1))
    return base, th, fwd.logits_from_hidden(p["lm"], th.hidden, model_cfg), plain

  base, th, logits, plain = _np(parallel_run(params, batch["tokens"], batch["mask"], thoughts))
  v = batch["mask"]
  # The layer loop is the decoder: the base pass equals `models.forward` on every real token.
  np.testing.assert_allclose(base.hidden[v], plain.hidden[v], atol=1e-5)
  np.testing.assert_allclose(base.logits[v], plain.logits[v], atol=1e-5)
  np.testing.assert_array_equal(th.tokens, np.transpose(thoughts, (1, 2, 0, 3)))
  # Every branch of a real position equals its explicit sequence through the plain decoder.
  seqs, pos = _explicit_sequences(params, batch["tokens"], thoughts, CFG, model_cfg)
  ref = _np(_decoder_fn(model_cfg)(params["lm"], seqs, pos))
  e, p, t = (a.ravel() for a in np.indices((B, CFG.n_passes, L)))
  rows = np.flatnonzero(v[e, t])
  e, p, t = e[rows], p[rows], t[rows]
  np.testing.assert_allclose(base.hidden[e, t], ref.hidden[rows, t], atol=1e-4)
  for k in range(1, CFG.n_steps):  # every thought and talk step, at position t + k
    np.testing.assert_allclose(th.hidden[p, k - 1, e, t], ref.hidden[rows, t + k], atol=1e-4,
                               err_msg=f"step {k}")
    np.testing.assert_allclose(logits[p, k - 1, e, t], ref.logits[rows, t + k], atol=1e-4,
                               err_msg=f"step {k}")
  # Thought log-probs are those of the explicit sequence at the reinforce temperature.
  for i in range(CFG.n_sampled):
    z = fwd.suppress(jnp.asarray(ref.logits[rows, t + i + 1]), CFG.suppress_ids)
    lp = np.asarray(jax.nn.log_softmax(z / CFG.reinforce_temperature))
    np.testing.assert_allclose(th.logp[p, i, e, t], lp[np.arange(len(rows)), thoughts[e, p, i, t]],
                               atol=1e-4)


def _sequential_thoughts(params, batch, cfg, model_cfg):
  """Samples every (example, pass, position) one token at a time through the plain decoder."""
  tokens = batch["tokens"]
  b, n = tokens.shape
  table = np.asarray(params["lm"]["embed"]["embedding"])
  start, _ = (np.asarray(x) for x in fwd.thought_embeddings(params, cfg, model_cfg))
  e, p, t = (a.ravel() for a in np.indices((b, cfg.n_passes, n)))
  seqs = np.zeros((len(e), n + cfg.n_steps - 1, model_cfg.dim), np.float32)
  for i in range(len(e)):
    seqs[i, :t[i] + 1] = table[tokens[e[i], :t[i] + 1]]
    seqs[i, t[i] + 1] = start
  pos = np.broadcast_to(np.arange(seqs.shape[1]), seqs.shape[:2])
  ids = batch["example_ids"][e]

  @jax.jit
  def choose(logits, ids, p, t, k):
    z = fwd.suppress(logits, cfg.suppress_ids)
    if cfg.greedy_thoughts:
      return jnp.argmax(z, -1)
    keys = jax.vmap(lambda a, b_, c: sampling.token_key(KEY, a, b_, c, k))(ids, p, t)
    # The draw itself is checked against float64 softmax in test_sampling.py.
    return sampling_core.sample_categorical(keys, z / cfg.thought_temperature)

  out = np.zeros((b, cfg.n_passes, cfg.n_sampled, n), np.int32)
  for k in range(1, cfg.n_sampled + 1):
    logits = np.asarray(_decoder_fn(model_cfg)(params["lm"], seqs, pos).logits)
    tok = np.asarray(choose(logits[np.arange(len(e)), t + k], ids, p, t, k))
    out[e, p, k - 1, t] = tok
    seqs[np.arange(len(e)), t + k + 1] = table[tok]
  return out


@pytest.mark.parametrize("greedy", [False, True])
def test_sampling_identity(greedy):
  cfg = CFG.replace(greedy_thoughts=greedy)
  params = _params()
  batch = _batch(lengths=[L, 9])
  cells = _np(_cells_fn(cfg, MODEL)(params, batch, KEY))
  ref = _sequential_thoughts(params, batch, cfg, MODEL)
  # Rows of padding positions differ by design (the explicit sequence would contain the pads).
  v = np.broadcast_to(batch["mask"][:, None, None], ref.shape)
  np.testing.assert_array_equal(cells["thoughts"][v], ref[v])
  assert not np.isin(cells["thoughts"], cfg.suppress_ids).any()
  if greedy:
    # Identical thoughts in every pass: equal rewards, so every advantage is exactly 0.
    np.testing.assert_array_equal(cells["thoughts"][:, 0], cells["thoughts"][:, 1])
    mixed = _np(_cells_fn(cfg, MODEL)(_params(random_mixer=True), batch, KEY))
    assert np.abs(mixed["reward"]).max() > 0
    np.testing.assert_array_equal(mixed["reward"][:, 0], mixed["reward"][:, 1])
    assert (mixed["advantage"] == 0).all()
    return
  assert (cells["thoughts"][:, 0] != cells["thoughts"][:, 1]).any()
  sampled = jax.jit(lambda p, b: sampling.sample_thoughts(p, b, KEY, cfg, MODEL))(params, batch)
  np.testing.assert_array_equal(sampled["tokens"], cells["thoughts"])
  np.testing.assert_allclose(sampled["logp"], cells["logp"], atol=1e-5)
  # Keys follow the example id, not the row: a permuted batch permutes the thoughts.
  perm = {k: v[::-1].copy() for k, v in batch.items()}
  again = _np(_cells_fn(cfg, MODEL)(params, perm, KEY))
  np.testing.assert_array_equal(again["thoughts"], cells["thoughts"][::-1])


def test_init_invariants():
  params = _params()  # last mixing layer = 0
  batch = _batch(b=8, lengths=[L, 9] * 4)
  (loss, metrics), grads = _grad_fn(CFG, MODEL)(params, batch, KEY)
  cells = _np(_cells_fn(CFG, MODEL)(params, _batch(lengths=[L, 9]), KEY))
  assert (cells["mixing_weight"] == 0).all()
  m = cells["talk_mask"][:, None, 0].repeat(CFG.n_passes, 1)
  np.testing.assert_array_equal(cells["talk_nll"][:, :, 0][m],
                                np.repeat(cells["base_nll"][:, None], 2, 1)[m])
  np.testing.assert_allclose(cells["reward"], 0.0, atol=1e-5)
  assert (cells["advantage"] == 0).all()
  assert float(metrics["policy_loss"]) == 0.0
  assert float(metrics["talk_loss_0"]) == pytest.approx(float(metrics["base_loss"]), rel=1e-6)
  assert np.abs(np.asarray(grads["mixer"]["out"]["kernel"])).max() > 0
  # With w = 0 the thoughts cannot influence the loss yet (the policy starts once w moves).
  assert (np.asarray(grads["thought"]["start_embedding"]) == 0).all()
  # Mixed logits at w = 0 are the base logits exactly.
  z = jax.random.normal(jax.random.key(0), (2, 3, 64))
  w = objective.mixing_weight(params["mixer"], jnp.ones((2, 3, 32)), jnp.ones((2, 3, 32)), CFG)
  np.testing.assert_array_equal(objective.mix_logits(w, z, 5.0 * z + 1.0), z)
  # The sigmoid variant is bounded and starts at w = 1/2.
  ws = objective.mixing_weight(params["mixer"], jnp.ones((3, 32)), jnp.ones((3, 32)),
                               CFG.replace(mixing_sigmoid=True))
  np.testing.assert_allclose(ws, 0.5)


def test_advantage_properties():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(2, 3, 5)).astype(np.float32)  # (P, B, L)
  raw = CFG.replace(clamp_negative_advantage=False)
  a = np.asarray(objective.advantages(r, raw))
  np.testing.assert_allclose(a, np.stack([(r[0] - r[1]) / 2, (r[1] - r[0]) / 2]), atol=1e-6)
  clamped = np.asarray(objective.advantages(r, CFG))
  assert ((clamped != 0).sum(axis=0) == 1).all()  # P = 2: exactly one pass is reinforced
  np.testing.assert_allclose(clamped, np.maximum(a, 0))
  np.testing.assert_array_equal(objective.advantages(np.stack([r[0], r[0]]), CFG), 0.0)
  # Leave-one-out baseline (P = 3) and the reference's self-inclusive one differ by (P-1)/P.
  r3 = rng.normal(size=(3, 4)).astype(np.float32)
  loo = np.asarray(objective.advantages(r3, raw.replace(include_self_in_baseline=False,
                                                        n_passes=3)))
  np.testing.assert_allclose(loo, r3 - (r3.sum(0) - r3) / 2, atol=1e-6)
  np.testing.assert_allclose(objective.advantages(r3, raw), loo * 2 / 3, atol=1e-6)
  # A constant (per position) added to the base NLL shifts R, not A.
  base_nll = rng.normal(size=(3, 8)).astype(np.float32)
  talk = rng.normal(size=(2, CFG.n_ahead_talk, 3, 8)).astype(np.float32)
  masks = objective.loss_masks(np.ones((3, 8), bool), CFG)
  r1 = objective.thought_rewards(base_nll, talk, masks["talk"], masks["cells"])
  r2 = objective.thought_rewards(base_nll + rng.normal(size=(3, 8)).astype(np.float32), talk,
                                 masks["talk"], masks["cells"])
  assert not np.allclose(r1, r2)
  np.testing.assert_allclose(objective.advantages(r1, raw), objective.advantages(r2, raw),
                             atol=1e-5)


def test_reward_alignment_and_valid_ranges():
  params = _params(random_mixer=True)
  batch = _batch()
  fn = _cells_fn(CFG, MODEL)
  cells = _np(fn(params, batch, KEY))
  t0, n_talk = 3, CFG.n_ahead_talk
  later = {**batch, "tokens": batch["tokens"].copy()}
  later["tokens"][:, t0 + n_talk + 1] = (later["tokens"][:, t0 + n_talk + 1] + 1) % 62
  moved = _np(fn(params, later, KEY))
  np.testing.assert_allclose(moved["reward"][..., :t0 + 1], cells["reward"][..., :t0 + 1],
                             atol=1e-6)
  assert not np.allclose(moved["reward"][..., t0 + 1:t0 + n_talk + 2],
                         cells["reward"][..., t0 + 1:t0 + n_talk + 2])
  nxt = {**batch, "tokens": batch["tokens"].copy()}
  nxt["tokens"][:, t0 + 1] = (nxt["tokens"][:, t0 + 1] + 1) % 62
  moved = _np(fn(params, nxt, KEY))
  assert (np.abs(moved["reward"][..., t0] - cells["reward"][..., t0]) > 1e-6).all()
  np.testing.assert_array_equal(moved["thoughts"][..., :t0 + 1], cells["thoughts"][..., :t0 + 1])
  # Rewards only at t < L - 1 - T; talk step s only scores targets t + 1 + s < L.
  assert (cells["reward"][..., L - 1 - n_talk:] == 0).all()
  assert cells["cell_mask"][:, :L - 1 - n_talk].all()
  for s in range(n_talk):
    assert not cells["talk_mask"][:, s, L - 1 - s:].any()
    assert cells["talk_mask"][:, s, :L - 1 - s].all()


def test_pad_invariance():
  params = _params(random_mixer=True)
  batch = _batch(lengths=[L, 7])
  other = {**batch, "tokens": np.where(batch["mask"], batch["tokens"],
                                       (batch["tokens"] + 17) % 62).astype(np.int32)}
  fn = _cells_fn(CFG, MODEL)
  a, b = _np(fn(params, batch, KEY)), _np(fn(params, other, KEY))
  v = batch["mask"]
  np.testing.assert_array_equal(a["thoughts"][1][..., :7], b["thoughts"][1][..., :7])
  for name in ("reward", "advantage", "talk_nll", "base_nll", "cell_mask", "talk_mask",
               "base_mask"):
    x, y = a[name], b[name]
    if name in ("reward", "advantage"):
      x, y = x * a["cell_mask"][:, None], y * b["cell_mask"][:, None]
    if name == "talk_nll":
      x, y = x * a["talk_mask"][:, None], y * b["talk_mask"][:, None]
    if name == "base_nll":
      x, y = x * a["base_mask"], y * b["base_mask"]
    np.testing.assert_allclose(x, y, atol=1e-6, err_msg=name)
  assert not a["cell_mask"][1, 6:].any() and not v[1, 7:].any()
  for mean_over_padding in (True, False):
    cfg = CFG.replace(policy_mean_over_padding=mean_over_padding)
    la, ma = objective.reduce_cells(a, cfg)
    lb, mb = objective.reduce_cells(b, cfg)
    assert abs(float(la) - float(lb)) <= 1e-6 * abs(float(la))
    assert float(ma["policy_loss"]) != 0


def test_reduce_cells_formulas():
  rng = np.random.default_rng(0)
  b, p, n_talk, n, m = 2, 2, CFG.n_ahead_talk, 9, CFG.n_sampled
  valid = np.arange(n)[None] < np.array([[n], [6]])
  masks = _np(objective.loss_masks(valid, CFG))
  cells = {"base_nll": rng.random((b, n)), "base_mask": masks["base"],
           "talk_mask": masks["talk"].transpose(1, 0, 2), "cell_mask": masks["cells"],
           "talk_nll": rng.random((b, p, n_talk, n)), "mixing_weight": rng.random((b, p, n_talk, n)),
           "reward": rng.normal(size=(b, p, n)), "logp": -rng.random((b, p, m, n))}
  cells["advantage"] = (np.asarray(objective.advantages(cells["reward"], CFG, axis=1))
                        * masks["cells"][:, None])
  base = (cells["base_nll"] * masks["base"]).sum() / masks["base"].sum()
  talk = [(cells["talk_nll"][:, :, s] * cells["talk_mask"][:, None, s]).sum()
          / (p * cells["talk_mask"][:, s].sum()) for s in range(n_talk)]
  lm = 0.5 * base + 0.5 * np.mean(talk)
  weighted = -(cells["advantage"][:, :, None] * cells["logp"]).sum() / m
  for over_padding, n_cells in ((True, b * p * (n - 1 - n_talk)),
                                (False, p * masks["cells"].sum())):
    cfg = CFG.replace(policy_mean_over_padding=over_padding)
    loss, met = objective.reduce_cells(cells, cfg)
    np.testing.assert_allclose(met["base_loss"], base, rtol=1e-5)
    np.testing.assert_allclose([met[f"talk_loss_{s}"] for s in range(n_talk)], talk, rtol=1e-5)
    np.testing.assert_allclose(met["policy_loss"], weighted / n_cells, rtol=1e-5)
    np.testing.assert_allclose(loss, lm + cfg.policy_loss_beta * weighted / n_cells, rtol=1e-5)
  assert masks["cells"].sum() == (n - 1 - n_talk) + (6 - 1)  # row 1: t = 0..4 have x_{t+1}


@pytest.mark.parametrize("include_self", [False, True])
def test_reinforce_matches_analytic_gradient(include_self):
  # Unclamped estimator, thoughts sampled and scored at the same temperature.
  cfg = CFG.replace(clamp_negative_advantage=False, include_self_in_baseline=include_self,
                    n_passes=4, thought_temperature=2.0, reinforce_temperature=2.0,
                    suppress_ids=())
  theta = jnp.asarray([0.3, -0.5, 1.0, 0.0, 0.2])
  reward = jnp.asarray([1.0, -0.5, 2.0, 0.0, 0.3])
  n_cells = 50_000

  @jax.jit
  def estimate(theta, key):
    keys = jax.random.split(key, cfg.n_passes * n_cells).reshape(cfg.n_passes, n_cells)
    logits = jnp.broadcast_to(theta, (cfg.n_passes, n_cells, 5))
    c = sampling.choose_tokens(jax.lax.stop_gradient(logits), keys, cfg)
    adv = objective.advantages(reward[c], cfg, axis=0)

    def loss(th):
      logp = jax.nn.log_softmax(th / cfg.reinforce_temperature)[c]
      return objective.policy_loss(logp[:, None, :], adv, cfg.n_passes * n_cells)

    return jax.grad(loss)(theta)

  prob = jax.nn.softmax(theta / 2.0)
  analytic = prob * (reward - prob @ reward) / 2.0
  scale = 1.0 if not include_self else (cfg.n_passes - 1) / cfg.n_passes
  np.testing.assert_allclose(-estimate(theta, jax.random.key(1)), scale * analytic, atol=6e-3)


def test_embedding_scale_under_adam():
  params = _params(random_mixer=True)
  batch = _batch(b=8, lengths=[L, 9] * 4)
  _, grads = _grad_fn(CFG, MODEL)(params, batch, KEY)
  opt = optax.adam(1e-3)
  updates, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(grads, params)
  start = np.abs(np.asarray(updates["thought"]["start_embedding"])) * CFG.embedding_scale
  row = np.abs(np.asarray(updates["lm"]["embed"]["embedding"])[int(batch["tokens"][0, 0])])
  assert np.abs(np.asarray(grads["thought"]["start_embedding"])).max() > 0
  ratio = np.median(start) / np.median(row)
  assert 80 < ratio < 120, ratio


@pytest.mark.needs_8_devices
def test_one_device_equals_2x4_mesh():
  params = _params(random_mixer=True)
  batch = _batch(b=8, lengths=[L, 9, 12, 5, 12, 12, 8, 12])
  (l1, m1), g1 = _grad_fn(CFG, MODEL)(params, batch, KEY)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
  (l8, m8), g8 = _grad_fn(CFG, MODEL, mesh)(params, batch, KEY)
  assert float(m1["policy_loss"]) != 0
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # beta = 1e6 makes the gradients sums of large cancelling terms; summation order differs.
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_bfloat16_compute_traces_with_float32_params_and_loss():
  model_cfg = MODEL.replace(dtype="bfloat16")
  params = _params()
  loss = lambda p, b: objective.quiet_star_loss(p, b, KEY, CFG, model_cfg)
  (value, metrics), grads = jax.eval_shape(jax.value_and_grad(loss, has_aux=True), params,
                                           _batch())
  assert value.dtype == jnp.float32 and metrics["policy_loss"].dtype == jnp.float32
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and g.dtype == jnp.float32


@pytest.mark.parametrize("model_cfg", [MODEL, MODEL_B], ids=["plain", "bias_tied_window"])
def test_step_vjp_equals_autodiff_of_the_step_scan(model_cfg):
  """The O(one buffer) backward through the thought steps = differentiating the scan itself."""
  params = _params(model_cfg, random_mixer=True)
  batch = _batch(lengths=[L, 9])
  # A small beta keeps the loss a sum of terms of similar size, so f32 differences stay small.
  cfg = CFG.replace(policy_loss_beta=1.0)
  (l1, m1), g1 = _grad_fn(cfg, model_cfg)(params, batch, KEY)
  (l2, m2), g2 = _grad_fn(cfg.replace(step_vjp=False), model_cfg)(params, batch, KEY)
  assert float(m1["policy_loss"]) != 0
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  flat1 = jax.tree_util.tree_flatten_with_path(g1)[0]
  for (path, a), b in zip(flat1, jax.tree.leaves(g2)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(b).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                               err_msg=jax.tree_util.keystr(path))
  # The thought embeddings only reach the loss through the steps: their gradient is all VJP.
  assert np.abs(np.asarray(g1["thought"]["start_embedding"])).max() > 0


def test_row_blocks_change_nothing_but_speed():
  """Rows split into blocks (uneven, with padding and a sliding window) = one block of all rows."""
  assert fwd.row_blocks(12, 5) == ((0, 2), (2, 5), (5, 7), (7, 10), (10, 12))
  assert fwd.row_blocks(3, 8) == ((0, 1), (1, 2), (2, 3))
  params = _params(MODEL_B, random_mixer=True)
  batch = _batch(lengths=[L, 9])
  cfg = CFG.replace(policy_loss_beta=1.0)
  cells = [_np(_cells_fn(cfg.replace(row_blocks=r), MODEL_B)(params, batch, KEY)) for r in (1, 5)]
  np.testing.assert_array_equal(cells[0]["thoughts"], cells[1]["thoughts"])
  for name in ("talk_nll", "mixing_weight", "logp", "reward"):
    np.testing.assert_allclose(cells[0][name], cells[1][name], atol=1e-5, err_msg=name)
  (l1, _), g1 = _grad_fn(cfg.replace(row_blocks=1), MODEL_B)(params, batch, KEY)
  (l5, _), g5 = _grad_fn(cfg.replace(row_blocks=5), MODEL_B)(params, batch, KEY)
  np.testing.assert_allclose(l1, l5, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g5)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(a)).max())
  with pytest.raises(ValueError, match="row_blocks"):
    CFG.replace(row_blocks=0)
