"""Tests for starjax.tokenizers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers as hf_tokenizers

from starjax import tokenizers as tk

SCRATCHPAD = (
    "Input:\n2 9 + 5 7\nTarget:\n<scratch>\n2 9 + 5 7 , C: 0\n2 + 5 , 6 C: 1\n, 8 6 C: 0\n"
    "</scratch>\n8 6\n"
)
GSM8K = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?\n"
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 3*4 = <<3*4=12>>12 boxes.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
ROUND_TRIP_TEXTS = [
    SCRATCHPAD,
    GSM8K,
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🎉🧠, Ωμέγα",
    "  leading and trailing spaces  \n\n\ttabs\tand  double  spaces \n",
    f"Q: 2+2?{tk.START_THOUGHT}2 plus 2 is 4{tk.END_THOUGHT} A: 4",
    "",
]


def _corpus() -> list[str]:
  """A few hundred lines of scratchpad / GSM8K-like training text."""
  texts = []
  for a in range(12, 99, 7):
    for b in range(10, 99, 9):
      s = a + b
      texts.append(
          f"Input:\n{a // 10} {a % 10} + {b // 10} {b % 10}\nTarget:\n<scratch>\n"
          f"{a // 10} {a % 10} + {b // 10} {b % 10} , C: 0\n</scratch>\n{s // 10} {s % 10}\n")
      texts.append(f"She bought {a} apples at {b} cents each: <<{a}*{b}={a * b}>>{a * b}\n#### {s}")
  texts.append(GSM8K)
  return texts


@pytest.fixture(scope="module")
def sp_tok() -> tk.SentencePieceTokenizer:
  return tk.SentencePieceTokenizer.train(_corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
  """A small byte-level BPE tokenizer.json trained in-process."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=500,
      special_tokens=["<|endoftext|>", "<pad>"],
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(_corpus(), trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


@pytest.fixture(params=["byte", "sentencepiece", "hf"])
def any_tok(request, sp_tok, hf_json) -> tk.Tokenizer:
  if request.param == "byte":
    return tk.ByteTokenizer()
  if request.param == "sentencepiece":
    return sp_tok
  return tk.load_tokenizer(hf_json)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(any_tok, text):
  assert isinstance(any_tok, tk.Tokenizer)
  ids = any_tok.encode(text)
  assert all(0 <= i < any_tok.vocab_size for i in ids)
  assert any_tok.decode(ids, skip_special=False) == text
  with_specials = any_tok.encode(text, add_bos=True, add_eos=True)
  assert with_specials == [any_tok.bos_id, *ids, any_tok.eos_id]
  assert any_tok.decode(with_specials, skip_special=False) == text


def test_trained_models_compress_text(sp_tok, hf_json):
  # Guards against a degenerate vocabulary where everything falls back to bytes.
  hf = tk.load_tokenizer(hf_json)
  for tok in (sp_tok, hf):
    assert len(tok.encode(GSM8K)) < 0.6 * len(GSM8K.encode("utf-8"))


def test_thought_tokens(any_tok):
  start, end = any_tok.start_thought_id, any_tok.end_thought_id
  assert start != end
  assert {start, end}.isdisjoint({any_tok.pad_id, any_tok.bos_id, any_tok.eos_id})
  assert any_tok.encode(tk.START_THOUGHT) == [start]
  assert any_tok.encode(tk.END_THOUGHT) == [end]
  assert any_tok.token_to_id(tk.START_THOUGHT) == start
  assert any_tok.token_to_id(tk.END_THOUGHT) == end
  assert start < any_tok.vocab_size and end < any_tok.vocab_size

  text = f"7 * 8{tk.START_THOUGHT}seven eights{tk.END_THOUGHT} = 56"
  ids = any_tok.encode(text)
  assert ids.count(start) == 1 and ids.count(end) == 1
  assert any_tok.decode(ids, skip_special=False) == text
  assert any_tok.decode(ids) == "7 * 8seven eights = 56"
  # pad/bos/eos are dropped even when special tokens are kept.
  padded = [any_tok.bos_id, *ids, any_tok.eos_id, any_tok.pad_id, any_tok.pad_id]
  assert any_tok.decode(padded, skip_special=False) == text


def test_byte_tokenizer_layout():
  tok = tk.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert (tok.start_thought_id, tok.end_thought_id, tok.vocab_size) == (259, 260, 261)
  assert tok.encode("A") == [ord("A") + 3]
  assert tok.token_to_id("A") == ord("A") + 3
  assert tok.token_to_id("<0xFF>") == 258
  assert tok.token_to_id("é") is None
  # Invalid UTF-8 is replaced, not raised.
  assert tok.decode([0xFF + 3, ord("x") + 3]) == "\ufffdx"


def test_sentencepiece_trained_layout(sp_tok):
  assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
  assert (sp_tok.start_thought_id, sp_tok.end_thought_id) == (4, 5)
  assert sp_tok.token_to_id("\n") == 6
  assert sp_tok.token_to_id("no-such-piece") is None
  # Digits are split into single-digit pieces.
  assert len(sp_tok.encode("123456")) == 6


def test_sentencepiece_training_is_deterministic(sp_tok, tmp_path):
  again = tk.SentencePieceTokenizer.train(_corpus(), vocab_size=400)
  assert again.serialized_model() == sp_tok.serialized_model()
  for text in ROUND_TRIP_TEXTS:
    assert again.encode(text) == sp_tok.encode(text)
  smaller = tk.SentencePieceTokenizer.train(_corpus(), vocab_size=350)
  assert smaller.serialized_model() != sp_tok.serialized_model()
  assert smaller.vocab_size < sp_tok.vocab_size
  unigram = tk.SentencePieceTokenizer.train(_corpus(), vocab_size=400, model_type="unigram")
  unigram2 = tk.SentencePieceTokenizer.train(_corpus(), vocab_size=400, model_type="unigram")
  assert unigram.serialized_model() == unigram2.serialized_model()
  assert unigram.decode(unigram.encode(SCRATCHPAD)) == SCRATCHPAD

  path = tmp_path / "tokenizer.model"
  sp_tok.save(path)
  assert path.read_bytes() == sp_tok.serialized_model()
  assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]  # No temp file left.
  loaded = tk.load_tokenizer(str(path))
  assert isinstance(loaded, tk.SentencePieceTokenizer)
  assert loaded.vocab_size == sp_tok.vocab_size
  assert loaded.encode(GSM8K) == sp_tok.encode(GSM8K)


def test_sentencepiece_train_rejects_bad_model_type():
  with pytest.raises(ValueError, match="word"):
    tk.SentencePieceTokenizer.train(["a b c"], vocab_size=300, model_type="word")


def test_sentencepiece_appends_missing_thought_tokens(tmp_path):
  """A Llama-2-style model (bos 1, eos 2, no pad, no thought pieces) gains two extra ids."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()[:100]), model_writer=buf, vocab_size=300,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
      num_threads=1, hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / "tokenizer.model"
  path.write_bytes(buf.getvalue())
  base = spm.SentencePieceProcessor(model_file=str(path))
  n = base.get_piece_size()

  tok = tk.load_tokenizer(str(path))
  assert tok.vocab_size == n + 2
  assert (tok.start_thought_id, tok.end_thought_id) == (n, n + 1)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad falls back to eos.
  text = f"Sold 48 clips{tk.START_THOUGHT}half of 48{tk.END_THOUGHT} in May"
  ids = tok.encode(text)
  assert ids.count(n) == 1 and ids.count(n + 1) == 1
  assert tok.decode(ids, skip_special=False) == text
  assert tok.decode(ids) == "Sold 48 clipshalf of 48 in May"
  # Ids the model already has encode exactly as SentencePiece does.
  assert tok.encode("Sold 48 clips") == base.encode("Sold 48 clips")


def test_hf_tokenizer(hf_json):
  tok = tk.load_tokenizer(hf_json)
  assert isinstance(tok, tk.HFTokenizer)
  raw = hf_tokenizers.Tokenizer.from_file(hf_json)
  assert tok.vocab_size == raw.get_vocab_size() + 2
  assert tok.eos_id == raw.token_to_id("<|endoftext|>")
  assert tok.bos_id == tok.eos_id  # No "<s>", so bos uses <|endoftext|>.
  assert tok.pad_id == raw.token_to_id("<pad>")
  assert tok.encode("12 + 34") == raw.encode("12 + 34", add_special_tokens=False).ids
  # Explicit ids / tokens override the guesses; the caller's object is not mutated.
  explicit = tk.HFTokenizer(raw, bos="<pad>", eos="<|endoftext|>", pad=tok.eos_id)
  assert (explicit.bos_id, explicit.pad_id) == (tok.pad_id, tok.eos_id)
  assert raw.token_to_id(tk.START_THOUGHT) is None
  with pytest.raises(ValueError, match="<nope>"):
    tk.HFTokenizer(raw, eos="<nope>")


def test_hf_tokenizer_does_not_apply_post_processor(hf_json):
  raw = hf_tokenizers.Tokenizer.from_file(hf_json)
  eos = raw.token_to_id("<|endoftext|>")
  raw.post_processor = hf_tokenizers.processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
  assert raw.encode("1 + 1").ids[0] == eos
  tok = tk.HFTokenizer(raw)
  assert eos not in tok.encode("1 + 1")
  assert tok.encode("1 + 1", add_bos=True)[0] == eos


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_decode_out_of_range_raises(any_tok, bad):
  with pytest.raises(ValueError, match=str(bad)):
    any_tok.decode([any_tok.bos_id, bad])
  with pytest.raises(ValueError, match=str(any_tok.vocab_size)):
    any_tok.decode([any_tok.vocab_size])


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="gpt5-tokenizer"):
    tk.load_tokenizer("gpt5-tokenizer")
  missing_model = tmp_path / "missing.model"
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tk.load_tokenizer(str(missing_model))
  missing_json = tmp_path / "nothere" / "tokenizer.json"
  with pytest.raises(FileNotFoundError, match="nothere"):
    tk.load_tokenizer(str(missing_json))
  assert isinstance(tk.load_tokenizer("byte"), tk.ByteTokenizer)


def test_pad_batch():
  tok = tk.ByteTokenizer()
  seqs = [[5, 6, 7], [8], []]
  out = tk.pad_batch(tok, seqs)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, [[5, 6, 7], [8, 0, 0], [0, 0, 0]])
  left = tk.pad_batch(tok, seqs, 4, side="left")
  np.testing.assert_array_equal(left, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
  assert tk.pad_batch(tok, []).shape == (0, 0)
  with pytest.raises(ValueError, match="row 1"):
    tk.pad_batch(tok, [[1], [1, 2, 3]], length=2)
  with pytest.raises(ValueError, match="side"):
    tk.pad_batch(tok, seqs, side="middle")


def test_pad_batch_uses_tokenizer_pad_id(hf_json):
  tok = tk.load_tokenizer(hf_json)
  out = tk.pad_batch(tok, [[1, 2], [3]])
  np.testing.assert_array_equal(out, [[1, 2], [3, tok.pad_id]])
  assert tok.pad_id != 0
