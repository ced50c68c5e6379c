"""Coupled positions for the arithmetic scratchpad: the fixed-offset lookups at every width, one
implementation on host and device, training rows and the sampler agreeing with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models, tokenizers
from starjax.data import arithmetic as ar
from starjax.data import arithmetic_positions as ap
from starjax.models import positions as positions_lib
from starjax.sampling import DecodeConfig, generate_tokens
from starjax.train import batching


def _lines(text, ids):
  """[(line text, [(char, id), ...]), ...] without the newlines."""
  out, cur = [], []
  for ch, i in zip(text, ids):
    if ch == "\n":
      out.append(("".join(c for c, _ in cur), cur))
      cur = []
    else:
      cur.append((ch, int(i)))
  return out


def test_ids_of_a_two_digit_example_by_hand():
  text = ar.example(ar.Problem(29, 57))
  ids = ap.coupled_positions(text)
  lines = _lines(text, ids)
  got = {t: [i % ap.LINE for ch, i in chars if ch != " "] for t, chars in lines}
  a, b, c, s = ap.A, ap.B, ap.COMMA, ap.S
  assert got["2 9 + 5 7"] == [a - 2, a, a + 2, b - 2, b]  # The prompt's operands.
  assert got["2 9 + 5 7 , C: 0"] == [a - 2, a, a + 2, b - 2, b, c, s + 2, s + 3, s + 5]
  assert got["2 + 5 , 6 C: 1"] == [a, a + 2, b, c, s, s + 2, s + 3, s + 5]
  assert got[", 8 6 C: 0"] == [c, s - 2, s, s + 2, s + 3, s + 5]
  assert got["0 8 6"] == [s - 4, s - 2, s]
  assert got["8 6"] == [s - 2, s]  # The answer drops the 0 carry.
  newline_ids = [i for ch, i in zip(text, ids) if ch == "\n"]
  # A newline sits just before the next line's first digit.
  assert [newline_ids[3] % ap.LINE, newline_ids[4] % ap.LINE] == [a - 3, a - 1]
  assert (np.diff(ids) > 0).all()


def _fields(chars):
  """Ids of a's digits, b's digits, the sum digits and the carry on one scratchpad line."""
  text = [ch for ch, _ in chars]
  plus = text.index("+") if "+" in text else 0
  comma = text.index(",")
  digits = lambda lo, hi: [i for ch, i in chars[lo:hi] if ch.isdigit()]
  return digits(0, plus), digits(plus, comma), digits(comma, len(chars))[:-1], chars[-1][1]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12])
def test_every_lookup_is_a_fixed_offset_at_every_width(n):
  """What the scheme is for: the same relative offsets at every width and on every line."""
  p = ar.sample_problems(np.random.default_rng(n), n, 1)[0]
  text = ar.example(p)
  ids = ap.coupled_positions(text)
  assert (np.diff(ids) > 0).all()
  lines = _lines(text, ids)
  start = [t for t, _ in lines].index("<scratch>") + 1
  prompt_a, prompt_b, _, _ = _fields(lines[1][1] + [(",", 0), ("0", 0)])
  header_a, header_b, _, _ = _fields(lines[start][1])
  assert header_a == [i + 3 * ap.LINE for i in prompt_a]  # The first line copies the prompt.
  assert header_b == [i + 3 * ap.LINE for i in prompt_b]
  offsets = set()
  for s in range(n):  # Line s + 1 from line s (line n is the final ", ... C: c" line).
    above, here = lines[start + s][1], lines[start + s + 1][1]
    a_up, b_up, sums_up, carry_up = _fields(above)
    a_here, b_here, sums_here, _ = _fields(here)
    # Operand copies: each kept digit moves one digit pair right, on the next line.
    assert a_here == [i + ap.LINE + 2 for i in a_up[:-1]]
    assert b_here == [i + ap.LINE + 2 for i in b_up[:-1]]
    assert sums_here[1:] == [i + ap.LINE for i in sums_up]  # Older sum digits: same id.
    first = ids[[j for j, ch in enumerate(text) if ch == "\n"][start + s]]  # Ends line s.
    if a_here:
      assert a_here[0] == first + 1
    new_digit_query = here[[ch for ch, _ in here].index(",") + 1][1]
    carry_query = here[-2][1]
    for q in (new_digit_query, carry_query):
      offsets.add((q - a_up[-1], q - b_up[-1], q - carry_up))
  assert offsets == {(ap.LINE + ap.COMMA + 1 - ap.A, ap.LINE + ap.COMMA + 1 - ap.B,
                      ap.LINE + ap.COMMA + 1 - ap.S - 5), (ap.LINE + ap.S + 4 - ap.A,
                                                           ap.LINE + ap.S + 4 - ap.B,
                                                           ap.LINE - 1)}


def test_numpy_and_jax_steps_agree_on_examples_and_garbage():
  rng = np.random.default_rng(0)
  texts = [ar.example(p) for p in ar.sample_problems(rng, 3, 3)]
  texts += [ar.prompt_with_hint(ar.Problem(5, 123)) + ar.scratchpad(ar.Problem(5, 123))]
  alphabet = list("0123456789 +,C:<scratch>/\nTagI")
  texts += ["".join(rng.choice(alphabet, 150)) for _ in range(4)]
  t = max(map(len, texts))
  codes = np.full((len(texts), t), -1, np.int32)
  for i, x in enumerate(texts):
    codes[i, :len(x)] = [ord(c) for c in x]
  widths = np.asarray([ap.prompt_widths(x) for x in texts], np.int32)
  widths[-4:] = [[3, 2], [0, 0], [1, 7], [25, 25]]
  ref, _ = ap.batch_positions(codes, widths)

  @jax.jit
  def scan(codes, widths):
    st0 = jnp.stack([jnp.asarray(ap.initial_state(0, 0))] * codes.shape[0])
    st0 = st0.at[:, 0].set(widths[:, 0]).at[:, 1].set(widths[:, 1])

    def body(st, c):
      pos, new = ap.step(ap.as_dict(st), c)
      return ap.as_array(new), pos

    return jax.lax.scan(body, st0, codes.T)[1].T

  np.testing.assert_array_equal(np.asarray(scan(codes, widths)), ref)
  for x, row in zip(texts, ref):
    assert (np.diff(row[:len(x)]) > 0).all()


def test_training_rows_carry_the_coupled_ids():
  tok = tokenizers.ByteTokenizer()
  cfg = models.preset("tiny", vocab_size=tok.vocab_size, position_coupling="arithmetic")
  fn = positions_lib.position_fn(cfg)
  exs = [batching.completion_example(tok.encode(ar.prompt(p), add_bos=True),
                                     tok.encode(ar.scratchpad(p), add_eos=True))
         for p in (ar.Problem(12, 34), ar.Problem(7, 8))]
  rows = batching.make_rows(exs, 256, tok.pad_id, pack=True, position_fn=fn)
  assert rows["inputs"].shape[0] == 1  # Both examples packed into one row.
  first = len(exs[0].tokens) - 1
  want = ap.coupled_positions("\0" + ar.prompt(ar.Problem(12, 34)) + ar.scratchpad(
      ar.Problem(12, 34)))[:first]
  np.testing.assert_array_equal(rows["positions"][0, :first], want)
  assert rows["positions"][0, first] == 0  # The second example starts afresh.
  assert batching.make_rows(exs, 256, tok.pad_id, pack=True)["positions"][0, 5] == 5


def test_coupled_greedy_decoding_equals_full_forward_with_host_positions():
  tok = tokenizers.ByteTokenizer()
  cfg = models.preset("tiny", vocab_size=tok.vocab_size, position_coupling="arithmetic",
                      max_seq_len=2048)
  params = models.init_params(cfg, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, params)
  texts = [ar.prompt(ar.Problem(45, 67)) + "<scratch>\n4 5 + 6 7 , C: 0\n",
           ar.prompt(ar.Problem(3, 4)) + "<scratch>\n",
           ar.prompt_with_hint(ar.Problem(123, 456))]
  prompts = [tok.encode(t, add_bos=True) for t in texts]
  dc = DecodeConfig(max_new_tokens=10, greedy=True)
  out = generate_tokens(cfg, params, prompts, dc, batch_size=2)  # Two calls, one filler row.
  fwd = jax.jit(lambda p, t, q: models.forward(cfg, p, t, q).logits)
  for i, prompt in enumerate(prompts):
    seq = list(prompt)
    for t in range(10):
      codes = positions_lib.char_codes(np.asarray(seq))
      text = "".join(chr(c) if c >= 0 else "\0" for c in codes)
      pos = ap.coupled_positions(text, ap.prompt_widths(texts[i]))
      pad = 64 - len(seq)
      logits = np.asarray(fwd(params, jnp.asarray([seq + [0] * pad]),
                              jnp.asarray([list(pos) + [-1] * pad])))[0, len(seq) - 1]
      tok_t = int(out.tokens[i, 0, t])
      assert tok_t == int(np.argmax(logits)), (i, t)
      logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      np.testing.assert_allclose(out.logprobs[i, 0, t], logp[tok_t], atol=1e-4)
      seq.append(tok_t)


def test_ids_still_increase_beyond_the_aligned_width():
  p = ar.Problem(int("7" * 25), int("8" * 25))  # Wider than MAX_WIDTH: alignment is lost.
  ids = ap.coupled_positions(ar.example(p))
  assert (np.diff(ids) > 0).all() and ids.min() == 0


def test_bad_settings_are_errors(tmp_path):
  with pytest.raises(ValueError, match="position_coupling"):
    models.preset("tiny", vocab_size=300, position_coupling="columns")
  with pytest.raises(ValueError, match="sliding_window"):
    models.preset("tiny", vocab_size=300, position_coupling="arithmetic", sliding_window=64)
  from starjax import configs  # pylint: disable=g-import-not-at-top
  from starjax.train import loop  # pylint: disable=g-import-not-at-top
  c = loop.default_config()
  c.tokenizer = "byte"
  c.model.update(preset="tiny", position_coupling="arithmetic")
  c.data = dict(task="arithmetic", digits=(1, 2))
  c.train.position_jitter = 0.1
  with pytest.raises(configs.ConfigError, match="position_jitter"):
    loop.train_and_evaluate(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # Refused before touching the disk.


def test_paths_without_coupled_positions_say_so():
  from starjax.models import hf  # pylint: disable=g-import-not-at-top
  from starjax.quiet_star import QuietStarConfig, forward, inference  # pylint: disable=g-import-not-at-top
  cfg = models.preset("tiny", vocab_size=300, position_coupling="arithmetic")
  with pytest.raises(ValueError, match="position_coupling"):
    hf.config_to_hf(cfg)
  with pytest.raises(NotImplementedError, match="coupled positions"):
    forward.base_pass({}, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), cfg)
  with pytest.raises(NotImplementedError, match="coupled positions"):
    inference.compiled_generate(QuietStarConfig(), cfg, DecodeConfig(max_new_tokens=2))
