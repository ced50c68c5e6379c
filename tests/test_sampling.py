"""Sampler: greedy vs full forward, filters vs numpy, stop sequences, device invariance, errors."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models, parallel, tokenizers
from starjax.sampling import DecodeConfig, core, filter_logits, generate_text, generate_tokens

CFG = models.preset("tiny", vocab_size=64, sliding_window=None)


@pytest.fixture(scope="module")
def params():
  p = models.init_params(CFG, jax.random.key(0))
  # Sharper distributions than the 0.02-std init, so greedy paths are not near-ties.
  return jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, p)


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 3, 3, 3, 3, 3, 3, 3], [1, 2, 3]]


def test_greedy_equals_argmax_of_full_forward(params):
  dc = DecodeConfig(max_new_tokens=12, greedy=True)
  out = generate_tokens(CFG, params, PROMPTS, dc)
  fwd = jax.jit(lambda p, t: models.forward(CFG, p, t).logits)
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for t in range(12):
      # One compiled shape: right-pad to 32 (causal, so the padding cannot leak backwards).
      padded = jnp.asarray([seq + [0] * (32 - len(seq))])
      logits = np.asarray(fwd(params, padded))[0, len(seq) - 1]
      logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      tok = int(out.tokens[i, 0, t])
      assert tok == int(np.argmax(logits)), (i, t)
      np.testing.assert_allclose(out.logprobs[i, 0, t], logp[tok], atol=1e-4)
      seq.append(tok)
  assert (out.lengths == 12).all() and not out.finished.any()


def _np_filter(logits, top_k, top_p):
  out = logits.astype(np.float64).copy()
  for row in out:
    if top_k:
      kth = np.sort(row)[::-1][top_k - 1]
      row[row < kth] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind="stable")
      probs = np.exp(row[order] - row[order][0])
      probs /= probs.sum()
      keep_n = 0
      mass = 0.0
      while keep_n < len(order) and mass < top_p:  # smallest prefix with mass >= top_p
        mass += probs[keep_n]
        keep_n += 1
      row[order[keep_n:]] = -np.inf
  return np.isfinite(out)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (10, 0.8),
                                         (0, 1e-6)])
def test_top_k_top_p_keep_exactly_the_intended_tokens(top_k, top_p):
  rng = np.random.default_rng(top_k * 100 + int(top_p * 10))
  logits = rng.normal(size=(16, 50)) * 2
  kept = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p)) > core.NEG_INF
  np.testing.assert_array_equal(kept, _np_filter(logits, top_k, top_p))


def test_top_p_on_a_full_size_vocabulary_matches_float64():
  """49,152 logits per row (SmolLM2's vocabulary), many near the cut-off, plus masked entries."""
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(4, 49152)) * 2).astype(np.float32)
  logits[1, :1000] = core.NEG_INF  # Suppressed tokens take no mass.
  for top_p in (0.5, 0.95):
    kept = np.asarray(filter_logits(jnp.asarray(logits), 0, top_p)) > core.NEG_INF
    want = _np_filter(np.where(logits <= core.NEG_INF, -np.inf, logits), 0, top_p)
    np.testing.assert_array_equal(kept, want)


def test_top_p_keeps_ties_at_the_cut_off_together():
  logits = jnp.log(jnp.asarray([[0.3, 0.2, 0.2, 0.2, 0.1]], jnp.float32))
  kept = lambda p: (np.asarray(filter_logits(logits, 0, p)) > core.NEG_INF)[0].tolist()
  assert kept(0.25) == [True, False, False, False, False]  # The first alone has mass 0.3.
  assert kept(0.4) == [True, True, True, True, False]  # The cut-off falls inside the 0.2 ties.
  assert kept(0.95) == [True] * 5
  assert kept(1e-6) == [True, False, False, False, False]  # The most likely token always stays.


def test_sampling_frequencies_follow_the_distribution():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 20000)
  dc = DecodeConfig(max_new_tokens=1, temperature=1.0)
  toks = jax.vmap(lambda k: core.choose_tokens(logits, k[None], dc)[0])(keys)
  freq = np.bincount(np.asarray(toks), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  dc = DecodeConfig(max_new_tokens=1, temperature=1.0, top_k=2)
  toks = jax.vmap(lambda k: core.choose_tokens(logits, k[None], dc)[0])(keys)
  freq = np.bincount(np.asarray(toks), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)


@pytest.mark.parametrize("vocab,block", [(600, 256), (50, 7), (5, 256)])
def test_inverse_cdf_sampling_matches_float64_softmax(vocab, block):
  """Two-level inverse-CDF draws follow softmax(logits) (float64 numpy) across block edges,
  including a partial last block, and never pick a masked (zero-probability) token."""
  rng = np.random.default_rng(vocab)
  logits = np.full(vocab, core.NEG_INF, np.float32)
  hot = rng.choice(vocab, size=min(6, vocab - 1), replace=False)  # Spread over the blocks.
  logits[hot] = rng.normal(size=len(hot)) * 1.5
  logits[vocab - 1] = 0.5  # The last entry of the partial last block.
  probs = np.exp(logits.astype(np.float64) - logits.max())
  probs /= probs.sum()
  n = 20000
  keys = jax.random.split(jax.random.key(vocab), n)
  toks = np.asarray(jax.jit(lambda k: core.sample_categorical(
      k, jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), block=block))(keys))
  freq = np.bincount(toks, minlength=vocab) / n
  assert freq[logits <= core.NEG_INF].sum() == 0
  np.testing.assert_allclose(freq, probs, atol=0.015)


def test_first_argmax_equals_argmax_with_ties_and_nan():
  logits = np.random.default_rng(0).integers(0, 4, size=(64, 300)).astype(np.float32)
  logits[5, 17] = logits[5, 40] = np.nan  # argmax returns the first NaN.
  np.testing.assert_array_equal(core.first_argmax(jnp.asarray(logits)), np.argmax(logits, -1))


def test_stop_sequences_and_eos_end_rows_without_touching_others(params):
  free = generate_tokens(CFG, params, PROMPTS, DecodeConfig(max_new_tokens=10, greedy=True))
  # Choose a stop pair from row 0's own output, and EOS = a token from row 2.
  stop = tuple(int(t) for t in free.tokens[0, 0, 3:5])
  eos = int(free.tokens[2, 0, 6])
  dc = DecodeConfig(max_new_tokens=10, greedy=True, stop_sequences=(stop,), eos_id=eos)
  out = generate_tokens(CFG, params, PROMPTS, dc)
  for i in range(len(PROMPTS)):
    ref = free.tokens[i, 0].tolist()
    end = 10
    for t in range(10):  # First point where EOS or the stop pair appears in the free run.
      if ref[t] == eos or (t >= 1 and tuple(ref[t - 1:t + 1]) == stop):
        end = t + 1
        break
    assert out.lengths[i, 0] == end, i
    assert out.finished[i, 0] == (end < 10 or ref[9] == eos or tuple(ref[8:10]) == stop)
    assert out.tokens[i, 0, :end].tolist() == ref[:end]  # Same tokens up to the end.
    assert (out.tokens[i, 0, end:] == dc.pad_id).all()
  assert out.lengths[0, 0] <= 5


def test_batching_does_not_change_results(params):
  dc = DecodeConfig(max_new_tokens=8, temperature=0.8, top_p=0.9)
  together = generate_tokens(CFG, params, PROMPTS, dc, num_samples=2, seed=3)
  for i, p in enumerate(PROMPTS):
    alone = generate_tokens(CFG, params, [p], dc, num_samples=2, seed=3, prompt_ids=[i])
    np.testing.assert_array_equal(alone.tokens[0], together.tokens[i])
  # Distinct samples per prompt (the sample index is in the key).
  assert (together.tokens[:, 0] != together.tokens[:, 1]).any()


@pytest.mark.needs_8_devices
@pytest.mark.parametrize("mesh_cfg", [parallel.MeshConfig(data=8),
                                      parallel.MeshConfig(data=2, fsdp=4),
                                      parallel.MeshConfig(data=1, fsdp=8)])
def test_same_samples_on_one_device_and_a_mesh(params, mesh_cfg):
  dc = DecodeConfig(max_new_tokens=8, temperature=1.0, top_k=20)
  prompts = PROMPTS * 3  # 12 prompts: not a multiple of 8, so padding rows are exercised.
  ref = generate_tokens(CFG, params, prompts, dc, num_samples=3, seed=7)
  out = generate_tokens(CFG, params, prompts, dc, num_samples=3, seed=7,
                        mesh=parallel.make_mesh(mesh_cfg))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_compiles_once_per_bucket(params):
  dc = DecodeConfig(max_new_tokens=4, greedy=True)
  fn = core.compiled_generate(CFG, dc, None)
  generate_tokens(CFG, params, [[1, 2, 3]], dc)
  n = fn._cache_size()
  generate_tokens(CFG, params, [[1, 2, 3, 4, 5]], dc)   # Same prompt bucket (16), same batch.
  generate_tokens(CFG, params, [[1]], dc, seed=9)
  assert fn._cache_size() == n
  generate_tokens(CFG, params, [[1] * 20], dc)           # Next bucket (32): one more program.
  assert fn._cache_size() == n + 1


def _stacked_weight_slices(jaxpr, shapes) -> int:
  """Slicing ops anywhere in `jaxpr` whose operand has the shape of a stacked layer weight."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("slice", "dynamic_slice", "gather", "squeeze"):
      n += any(getattr(v.aval, "shape", None) in shapes for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _stacked_weight_slices(sub, shapes)
  return n


def test_layer_weights_are_split_once_per_call_not_per_batch(params, monkeypatch):
  """The decode loop's per-layer weights come in as arguments: no weight copy per batch."""
  dc = DecodeConfig(max_new_tokens=3, greedy=True)
  calls = []
  split = core.split_layers
  monkeypatch.setattr(core, "split_layers", lambda p, n: calls.append(n) or split(p, n))
  out = generate_tokens(CFG, params, PROMPTS, dc, batch_size=2)  # Two device calls.
  assert calls == [CFG.n_layers] and out.tokens.shape == (4, 1, 3)
  layers = split(params, CFG.n_layers)
  b = CFG.n_layers + 1  # Rows (b, dim) must not look like a stacked (n_layers, dim) weight.
  args = (np.ones((b, 16), np.int32), np.tile(np.arange(16, dtype=np.int32), (b, 1)),
          np.zeros((b, 0), np.int32), core.sample_keys(0, jnp.arange(b), 1))
  jaxpr = jax.make_jaxpr(lambda *a: core._generate_local(CFG, dc, *a))(params, layers, *args)
  shapes = {x.shape for x in jax.tree.leaves(params["layers"])}
  assert _stacked_weight_slices(jaxpr.jaxpr, shapes) == 0
  # The check can fail: splitting inside the program, as before, slices every stacked weight.
  inside = jax.make_jaxpr(lambda p, *a: core._generate_local(
      CFG, dc, p, split.__wrapped__(p, CFG.n_layers), *a))(params, *args)
  assert _stacked_weight_slices(inside.jaxpr, shapes) >= len(shapes)


def test_text_api_truncates_at_stop_strings(params):
  tok = tokenizers.ByteTokenizer()
  cfg = models.preset("tiny", vocab_size=tok.vocab_size)
  p = models.init_params(cfg, jax.random.key(1))
  res = generate_text(cfg, p, tok, ["Q: 1+1\nA:", "Q: hi"], max_new_tokens=6, num_samples=2,
                      greedy=True)
  assert len(res) == 2 and len(res[0]) == 2
  raw = res[0][0].text
  if len(raw) >= 3:
    res2 = generate_text(cfg, p, tok, ["Q: 1+1\nA:"], max_new_tokens=6, greedy=True,
                         stop=[raw[1:3]])
    assert res2[0][0].text == raw[:1] and res2[0][0].finished


def test_bad_input_is_a_clear_error(params):
  dc = DecodeConfig(max_new_tokens=4)
  with pytest.raises(ValueError, match="No prompts"):
    generate_tokens(CFG, params, [], dc)
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    generate_tokens(CFG, params, [[1], []], dc)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    DecodeConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="exceeds the cache length 16"):
    generate_tokens(CFG, params, [[1] * 14], dc, max_cache_len=16)
  with pytest.raises(ValueError, match="temperature"):
    DecodeConfig(max_new_tokens=4, temperature=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    generate_tokens(CFG, params, [[1]], dc, num_samples=0)


def test_ids_beyond_the_tokenizer_are_never_sampled(params):
  logits = jnp.zeros((4, 64)).at[:, 60:].set(50.0)  # Padded rows the tokenizer does not know.
  dc = DecodeConfig(max_new_tokens=1, temperature=1.0, vocab_limit=60)
  toks = core.choose_tokens(logits, jax.random.split(jax.random.key(0), 4), dc)
  assert (np.asarray(toks) < 60).all()
  greedy = core.choose_tokens(logits, None, DecodeConfig(max_new_tokens=1, greedy=True,
                                                         vocab_limit=60))
  assert (np.asarray(greedy) < 60).all()
