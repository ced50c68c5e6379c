"""Digit-index embeddings: indices vs a plain loop, token-by-token = whole sequence, training
offsets per example, and a model using them decodes exactly like its full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models, tokenizers
from starjax.models import abacus
from starjax.sampling import DecodeConfig, generate_tokens
from starjax.train import batching
from starjax.train.loop import RowSource

TOK = tokenizers.load_tokenizer("byte")
DIGITS = tuple(TOK.token_to_id(c) for c in "0123456789")
SPACE = (TOK.token_to_id(" "),)
CFG = models.preset("tiny", vocab_size=TOK.vocab_size, digit_positions=12, digit_ids=DIGITS,
                    digit_separator_ids=SPACE, digit_offset=5)


def _loop_reference(text: str) -> list[int]:
  """Index of each character: its place in the current number (spaces may separate digits)."""
  out, run = [], 0
  for ch in text:
    if ch.isdigit():
      run += 1
      out.append(run)
    else:
      run = run if ch == " " else 0
      out.append(0)
  return out


def test_indices_match_a_plain_loop_on_scratchpad_text():
  text = "Input:\n4 5 6 + 7 8 9\nTarget:\n<scratch>\n4 5 + 7 8 , 5 C: 1\n1 2 4 5\n"
  toks = np.asarray([TOK.encode(text)])
  want = _loop_reference(text)
  got_np, run_np = abacus.digit_index(CFG, toks)
  got_jax, run_jax = abacus.digit_index(CFG, jnp.asarray(toks))
  assert got_np[0].tolist() == want
  np.testing.assert_array_equal(np.asarray(got_jax), got_np)
  assert int(run_np[0]) == int(run_jax[0]) == 0  # The text ends with "\n".
  assert want[text.index("4 5 6") + 4] == 3  # "6" is the third digit of 456.
  assert want[text.index("1 2 4 5") + 6] == 4


@pytest.mark.parametrize("seed", range(3))
def test_token_by_token_equals_whole_sequence(seed):
  rng = np.random.default_rng(seed)
  alphabet = "0123456789  +,\n"
  texts = ["".join(rng.choice(list(alphabet), size=40)) for _ in range(4)]
  toks = np.asarray([TOK.encode(t) for t in texts])
  split = 17
  whole, run_end = abacus.digit_index(CFG, toks)
  assert [r.tolist() for r in whole] == [_loop_reference(t) for t in texts]
  _, run = abacus.digit_index(CFG, jnp.asarray(toks[:, :split]))
  steps = []
  for t in range(split, toks.shape[1]):
    idx, run = abacus.digit_step(CFG, jnp.asarray(toks[:, t]), run)
    steps.append(np.asarray(idx))
  np.testing.assert_array_equal(np.stack(steps, 1), whole[:, split:])
  np.testing.assert_array_equal(np.asarray(run), run_end)


def test_offsets_are_one_per_packed_example_and_shift_only_digits():
  examples = [batching.completion_example(TOK.encode(p), TOK.encode(c)) for p, c in
              [("1 2 + 3 4\n", "4 6\n"), ("5 + 6\n", "1 1\n"), ("9 9 9 + 1\n", "1 0 0 0\n")]]
  rows = batching.make_rows(examples * 4, 48, TOK.pad_id, pack=True)
  src = RowSource(rows, batch_size=2, seed=3, digit_offset=CFG.digit_offset)
  seen = set()
  for step in range(6):
    batch = src(step)
    off = batch["digit_offset"]
    for r in range(off.shape[0]):
      for seg in set(batch["segment_ids"][r].tolist()) - {0}:
        vals = set(off[r][batch["segment_ids"][r] == seg].tolist())
        assert len(vals) == 1 and 0 <= next(iter(vals)) <= CFG.digit_offset
        seen |= vals
    plain, _ = abacus.digit_index(CFG, batch["inputs"])
    shifted, _ = abacus.digit_index(CFG, batch["inputs"], off)
    np.testing.assert_array_equal(shifted, np.where(plain > 0, plain + off, 0))
  assert len(seen) > 1  # Offsets vary between examples.
  assert "digit_offset" not in RowSource(rows, 2, 3)(0)


def test_offsets_change_the_training_loss():
  from starjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x,
                        models.init_params(CFG, jax.random.key(1)))
  ex = batching.completion_example(TOK.encode("Input:\n4 5 + 7 8\n"), TOK.encode("1 2 3\n"))
  rows = {k: jnp.asarray(v) for k, v in batching.make_rows([ex], 32, TOK.pad_id,
                                                           pack=True).items()}
  base, _ = step_lib.lm_loss(CFG, params, rows)
  zero, _ = step_lib.lm_loss(CFG, params, {**rows, "digit_offset": jnp.zeros_like(rows["inputs"])})
  shifted, _ = step_lib.lm_loss(CFG, params, {**rows, "digit_offset": jnp.full_like(
      rows["inputs"], 3)})
  assert float(zero) == pytest.approx(float(base), abs=1e-6)
  assert abs(float(shifted) - float(base)) > 1e-4
  # Without the embedding the offset is ignored.
  plain = CFG.replace(digit_positions=0, digit_offset=0)
  p0 = models.init_params(plain, jax.random.key(1))
  a, _ = step_lib.lm_loss(plain, p0, rows)
  b, _ = step_lib.lm_loss(plain, p0, {**rows, "digit_offset": jnp.full_like(rows["inputs"], 3)})
  assert float(a) == float(b)


def test_sampler_decodes_like_the_full_forward_pass():
  params = models.init_params(CFG, jax.random.key(0))
  # Sharp logits, and digit embeddings large enough to change the argmax.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
  params["digit_embed"]["embedding"] = params["digit_embed"]["embedding"] * 10.0
  prompts = [TOK.encode("1 2 3 + 4"), TOK.encode("7 7 , 1 C"), TOK.encode("5 5 5 5 5 5")]
  n_new = 16
  out = generate_tokens(CFG, params, prompts, DecodeConfig(max_new_tokens=n_new, greedy=True))
  fwd = jax.jit(lambda p, t: models.forward(CFG, p, t).logits)
  no_digits = jax.jit(lambda p, t: models.forward(CFG, p, t, digit_index=jnp.zeros_like(t)).logits)
  differs = 0
  for i, prompt in enumerate(prompts):
    seq = list(prompt)
    for t in range(n_new):
      padded = jnp.asarray([seq + [0] * (40 - len(seq))])
      logits = np.asarray(fwd(params, padded))[0, len(seq) - 1]
      other = np.asarray(no_digits(params, padded))[0, len(seq) - 1]
      differs += int(np.argmax(other) != np.argmax(logits))
      assert int(out.tokens[i, 0, t]) == int(np.argmax(logits)), (i, t)
      seq.append(int(out.tokens[i, 0, t]))
  assert differs > 0  # The digit embedding matters, so the test would catch a wrong index.


def test_config_errors():
  with pytest.raises(ValueError, match="digit_ids"):
    models.preset("tiny", digit_positions=8)
  with pytest.raises(ValueError, match="digit_offset"):
    models.preset("tiny", digit_positions=8, digit_ids=DIGITS, digit_offset=8)
  cfg = CFG.replace()
  params = models.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="digit_index"):
    models.llama.decode_unrolled(cfg, params, models.llama.unstack_layers(params, cfg.n_layers),
                                 jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                 {"k": [], "v": [], "pos": jnp.zeros((1, 4), jnp.int32)}, 0)


def test_unsupported_paths_say_so():
  from starjax.models import hf  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import forward  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="digit_positions"):
    hf.config_to_hf(CFG)
  with pytest.raises(NotImplementedError, match="digit-index"):
    forward.base_pass({}, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), CFG)
  from starjax.quiet_star import QuietStarConfig, inference  # pylint: disable=g-import-not-at-top
  with pytest.raises(NotImplementedError, match="digit-index"):
    inference.compiled_generate(QuietStarConfig(), CFG, DecodeConfig(max_new_tokens=2))


def test_a_packed_example_starts_a_new_number():
  toks = np.asarray([TOK.encode("4 6") + TOK.encode(" 5 + 6") + TOK.encode("7")])
  seg = np.asarray([[1] * 3 + [2] * 6 + [3]])
  want = [1, 0, 2, 0, 1, 0, 0, 0, 1, 1]
  assert abacus.digit_index(CFG, toks, segment_ids=seg)[0][0].tolist() == want
  assert np.asarray(abacus.digit_index(CFG, jnp.asarray(toks), segment_ids=jnp.asarray(seg))[0]
                    )[0].tolist() == want
  assert abacus.digit_index(CFG, toks)[0][0].tolist()[4] == 3  # Without segments: one number.
  # The training loss sees the same indices as the examples run alone.
  from starjax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x,
                        models.init_params(CFG, jax.random.key(2)))
  exs = [batching.completion_example(TOK.encode("1 2"), TOK.encode(" 3 4")),
         batching.completion_example(TOK.encode("5 6"), TOK.encode(" 7 8"))]
  packed = {k: jnp.asarray(v) for k, v in batching.make_rows(exs, 16, TOK.pad_id,
                                                             pack=True).items()}
  assert packed["segment_ids"][0].max() == 2  # Both examples share one row.
  alone = [step_lib.lm_loss(CFG, params, {k: jnp.asarray(v) for k, v in batching.make_rows(
      [e], 16, TOK.pad_id, pack=True).items()})[1] for e in exs]
  _, stats = step_lib.lm_loss(CFG, params, packed)
  np.testing.assert_allclose(float(stats["loss_sum"]),
                             sum(float(a["loss_sum"]) for a in alone), rtol=1e-5)


def test_cached_calls_after_slot_0_need_digit_indices():
  params = models.init_params(CFG, jax.random.key(0))
  cache = models.llama.init_cache(CFG, 1, 8)
  with pytest.raises(ValueError, match="digit_index"):
    models.llama.Transformer(CFG).apply({"params": params}, jnp.zeros((1, 1), jnp.int32),
                                        jnp.zeros((1, 1), jnp.int32), cache=cache,
                                        cache_index=jnp.int32(3))
  with pytest.raises(ValueError, match="pad_id"):
    generate_tokens(CFG, params, [TOK.encode("1 2")],
                    DecodeConfig(max_new_tokens=2, greedy=True, pad_id=DIGITS[0]))
