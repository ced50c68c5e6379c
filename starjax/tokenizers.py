"""Tokenizers behind one small interface, each with single-id thought tokens.

STaR and Quiet-STaR need two extra tokens that open and close a rationale ("thought"). Every
tokenizer here guarantees that `START_THOUGHT` and `END_THOUGHT` are single, distinct ids that
never collide with pad/bos/eos, and that the literal marker strings inside text always encode to
those ids, whatever the backend's own pre-tokenization would do with them.

Implementations:
  * `ByteTokenizer`: fixed 261-id byte vocabulary for tiny CPU experiments; needs no training.
  * `SentencePieceTokenizer`: wraps a SentencePiece model; can load Llama-2/Mistral-style
    `tokenizer.model` files or train a small, deterministic model in-process.
  * `HFTokenizer`: wraps a Hugging Face `tokenizers.Tokenizer` (`tokenizer.json`).

`load_tokenizer` picks one from a string spec; `pad_batch` packs id lists into an array.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers

START_THOUGHT = "<|startthought|>"
END_THOUGHT = "<|endthought|>"

_THOUGHT_SPLIT_RE = re.compile(f"({re.escape(START_THOUGHT)}|{re.escape(END_THOUGHT)})")


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of starjax needs from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of ids, including special and thought tokens (embedding table rows)."""
    ...

  @property
  def pad_id(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def start_thought_id(self) -> int: ...

  @property
  def end_thought_id(self) -> int: ...

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Maps text to ids; literal thought markers become their single ids."""
    ...

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    """Maps ids to text, dropping pad/bos/eos (and thought tokens when `skip_special`)."""
    ...

  def token_to_id(self, piece: str) -> int | None:
    """Returns the id of a vocabulary piece, or None if there is no such piece."""
    ...


class _TokenizerBase:
  """Shared encode/decode logic; subclasses supply the backend for plain text runs.

  Text is split on the thought markers before the backend sees it, and ids are decoded in runs
  between thought tokens, so the two directions mirror each other exactly for every backend.
  """

  _vocab_size: int
  _pad_id: int
  _bos_id: int
  _eos_id: int
  _start_thought_id: int
  _end_thought_id: int

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def start_thought_id(self) -> int:
    return self._start_thought_id

  @property
  def end_thought_id(self) -> int:
    return self._end_thought_id

  def _encode_plain(self, text: str) -> list[int]:
    """Encodes text that contains no thought markers."""
    raise NotImplementedError

  def _decode_plain(self, ids: list[int], skip_special: bool) -> str:
    """Decodes ids that contain no thought, pad, bos or eos ids."""
    raise NotImplementedError

  def _check_thought_ids(self) -> None:
    specials = {
        "pad": self._pad_id,
        "bos": self._bos_id,
        "eos": self._eos_id,
    }
    for name, tid in (("start_thought", self._start_thought_id),
                      ("end_thought", self._end_thought_id)):
      clash = [k for k, v in specials.items() if v == tid]
      if clash:
        raise ValueError(f"{name} id {tid} collides with {clash[0]} id")
      specials[name] = tid

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = [self._bos_id] if add_bos else []
    for part in _THOUGHT_SPLIT_RE.split(text):
      if part == START_THOUGHT:
        ids.append(self._start_thought_id)
      elif part == END_THOUGHT:
        ids.append(self._end_thought_id)
      elif part:
        ids.extend(self._encode_plain(part))
    if add_eos:
      ids.append(self._eos_id)
    return ids

  def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
    vocab_size = self._vocab_size
    dropped = {self._pad_id, self._bos_id, self._eos_id}
    pieces: list[str] = []
    run: list[int] = []
    for raw in ids:
      i = int(raw)
      if i < 0 or i >= vocab_size:
        raise ValueError(f"token id {i} is out of range for vocab_size {vocab_size}")
      if i in dropped:
        continue
      if i == self._start_thought_id or i == self._end_thought_id:
        if run:
          pieces.append(self._decode_plain(run, skip_special))
          run = []
        if not skip_special:
          pieces.append(START_THOUGHT if i == self._start_thought_id else END_THOUGHT)
        continue
      run.append(i)
    if run:
      pieces.append(self._decode_plain(run, skip_special))
    return "".join(pieces)


class ByteTokenizer(_TokenizerBase):
  """UTF-8 bytes as tokens: 0 pad, 1 bos, 2 eos, 3..258 bytes, 259/260 start/end thought.

  Deterministic and training-free, so tiny arithmetic-scratchpad runs need no tokenizer file.
  """

  _BYTE_OFFSET = 3
  _NAMED = {"<pad>": 0, "<s>": 1, "</s>": 2, START_THOUGHT: 259, END_THOUGHT: 260}

  def __init__(self) -> None:
    self._pad_id, self._bos_id, self._eos_id = 0, 1, 2
    self._start_thought_id = self._BYTE_OFFSET + 256
    self._end_thought_id = self._BYTE_OFFSET + 257
    self._vocab_size = self._BYTE_OFFSET + 258

  def _encode_plain(self, text: str) -> list[int]:
    return [b + self._BYTE_OFFSET for b in text.encode("utf-8")]

  def _decode_plain(self, ids: list[int], skip_special: bool) -> str:
    del skip_special  # No other specials exist.
    return bytes(i - self._BYTE_OFFSET for i in ids).decode("utf-8", errors="replace")

  def token_to_id(self, piece: str) -> int | None:
    """Accepts special names, single-byte characters, and SentencePiece-style `<0xAB>`."""
    if piece in self._NAMED:
      return self._NAMED[piece]
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    if m:
      return int(m.group(1), 16) + self._BYTE_OFFSET
    raw = piece.encode("utf-8")
    if len(raw) == 1:
      return raw[0] + self._BYTE_OFFSET
    return None


class SentencePieceTokenizer(_TokenizerBase):
  """Wraps a `sentencepiece.SentencePieceProcessor`.

  If the model lacks a thought piece, that piece gets the next id after the model's vocabulary
  (so `vocab_size` grows); this is how Llama-2/Mistral checkpoints gain thought tokens without
  touching their model file. `serialized_model()` always returns the unmodified model.
  """

  def __init__(self, model_proto: bytes) -> None:
    """Builds the tokenizer from a serialized SentencePiece `ModelProto`."""
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    sp = self._sp
    n = sp.get_piece_size()
    self._vocab_size = n
    self._extra: dict[str, int] = {}
    for piece in (START_THOUGHT, END_THOUGHT):
      if self._model_piece_to_id(piece) is None:
        self._extra[piece] = self._vocab_size
        self._vocab_size += 1
    self._start_thought_id = self.token_to_id(START_THOUGHT)  # type: ignore[assignment]
    self._end_thought_id = self.token_to_id(END_THOUGHT)  # type: ignore[assignment]
    if sp.eos_id() < 0:
      raise ValueError("SentencePiece model has no eos piece")
    self._eos_id = sp.eos_id()
    self._bos_id = sp.bos_id() if sp.bos_id() >= 0 else self._eos_id
    self._pad_id = sp.pad_id() if sp.pad_id() >= 0 else self._eos_id
    self._check_thought_ids()

  @classmethod
  def load(cls, model_path: str | os.PathLike) -> SentencePieceTokenizer:
    """Loads a `tokenizer.model` file."""
    path = os.fspath(model_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path}")
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def train(
      cls,
      texts: Iterable[str],
      vocab_size: int,
      *,
      model_type: str = "bpe",
      seed: int = 0,
      character_coverage: float = 1.0,
  ) -> SentencePieceTokenizer:
    """Trains a model in-process; identical inputs give a byte-identical model.

    Ids: 0 pad, 1 unk, 2 bos, 3 eos, 4/5 start/end thought, 6 newline, then byte-fallback pieces
    and learned pieces. Normalization is the identity, whitespace is kept verbatim, digits are
    split, and newline is its own symbol, so any text (including newlines and characters never
    seen in training) round-trips exactly. Texts are fed line by line; lines never share pieces.

    Args:
      texts: training documents.
      vocab_size: target vocabulary size; a small corpus may yield fewer pieces, never more.
      model_type: "bpe" or "unigram".
      seed: seed for SentencePiece's global random generator.
      character_coverage: fraction of characters given their own piece; others use bytes.

    Returns:
      The trained tokenizer.
    """
    if model_type not in ("bpe", "unigram"):
      raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")

    def lines() -> Iterator[str]:
      for text in texts:
        for line in text.split("\n"):
          if line:
            yield line

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=[START_THOUGHT, END_THOUGHT, "\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        # Determinism: one thread, every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return cls(model.getvalue())

  def serialized_model(self) -> bytes:
    """The SentencePiece `ModelProto` bytes (without ids appended by this wrapper)."""
    return self._proto

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model file atomically (temp file in the same directory, then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        f.write(self._proto)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def _model_piece_to_id(self, piece: str) -> int | None:
    # piece_to_id returns unk_id for unknown pieces, so confirm the mapping round-trips.
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def token_to_id(self, piece: str) -> int | None:
    if piece in self._extra:
      return self._extra[piece]
    return self._model_piece_to_id(piece)

  def _encode_plain(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def _decode_plain(self, ids: list[int], skip_special: bool) -> str:
    del skip_special  # SentencePiece always decodes control pieces to "".
    return self._sp.decode(ids)


# Guesses tried in order when HFTokenizer is not told its special tokens.
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "<|im_start|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer(_TokenizerBase):
  """Wraps a Hugging Face `tokenizers.Tokenizer`.

  The wrapped tokenizer is a private copy: thought tokens are added to it as special tokens when
  missing (growing `vocab_size`), and truncation/padding configured in the file are disabled.
  The backend's post-processor (e.g. automatic bos) is never applied; use add_bos/add_eos.
  """

  def __init__(
      self,
      tokenizer: hf_tokenizers.Tokenizer,
      *,
      bos: str | int | None = None,
      eos: str | int | None = None,
      pad: str | int | None = None,
  ) -> None:
    """Wraps `tokenizer`; bos/eos/pad are token strings or ids, guessed from names if None.

    bos falls back to eos when no bos-like token exists (e.g. Qwen); pad falls back to eos.
    """
    tok = hf_tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    missing = [p for p in (START_THOUGHT, END_THOUGHT) if tok.token_to_id(p) is None]
    if missing:
      tok.add_special_tokens(
          [hf_tokenizers.AddedToken(p, special=True, normalized=False) for p in missing])
    self._tok = tok
    vocab = tok.get_vocab(with_added_tokens=True)
    self._vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    self._start_thought_id = tok.token_to_id(START_THOUGHT)
    self._end_thought_id = tok.token_to_id(END_THOUGHT)
    eos_id = self._resolve("eos", eos, _EOS_GUESSES)
    if eos_id is None:
      raise ValueError(f"no eos token found among {_EOS_GUESSES}; pass eos= explicitly")
    self._eos_id = eos_id
    bos_id = self._resolve("bos", bos, _BOS_GUESSES)
    self._bos_id = eos_id if bos_id is None else bos_id
    pad_id = self._resolve("pad", pad, _PAD_GUESSES)
    self._pad_id = eos_id if pad_id is None else pad_id
    self._check_thought_ids()

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> HFTokenizer:
    """Loads a `tokenizer.json`; kwargs go to the constructor."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    return cls(hf_tokenizers.Tokenizer.from_file(path), **kwargs)

  @property
  def backend(self) -> hf_tokenizers.Tokenizer:
    """The wrapped (private) `tokenizers.Tokenizer`, e.g. for saving."""
    return self._tok

  def _resolve(self, name: str, given: str | int | None, guesses: Sequence[str]) -> int | None:
    if isinstance(given, int):
      if not 0 <= given < self._vocab_size:
        raise ValueError(f"{name} id {given} is out of range for vocab_size {self._vocab_size}")
      return given
    if isinstance(given, str):
      i = self._tok.token_to_id(given)
      if i is None:
        raise ValueError(f"{name} token {given!r} is not in the vocabulary")
      return i
    for piece in guesses:
      i = self._tok.token_to_id(piece)
      if i is not None:
        return i
    return None

  def token_to_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def _encode_plain(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def _decode_plain(self, ids: list[int], skip_special: bool) -> str:
    # With skip_special the backend also drops its other special tokens (e.g. <|im_start|>).
    return self._tok.decode(ids, skip_special_tokens=skip_special)


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
  """Builds a tokenizer from `"byte"`, a `*.model` path, or a `tokenizer.json`-style path."""
  spec = os.fspath(spec)
  if spec == "byte":
    return ByteTokenizer()
  if spec.endswith(".model"):
    return SentencePieceTokenizer.load(spec)
  if spec.endswith(".json"):
    return HFTokenizer.from_file(spec)
  raise ValueError(
      f"unknown tokenizer spec {spec!r}: expected 'byte', a .model file or a .json file")


def pad_batch(
    tok: Tokenizer,
    seqs: Sequence[Sequence[int]],
    length: int | None = None,
    *,
    side: str = "right",
) -> np.ndarray:
  """Packs id lists into an int32 `[len(seqs), length]` array filled with `tok.pad_id`.

  `length` defaults to the longest row. `side="left"` right-aligns rows (for generation prompts).
  """
  if side not in ("right", "left"):
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")
  if length is None:
    length = max((len(s) for s in seqs), default=0)
  out = np.full((len(seqs), length), tok.pad_id, dtype=np.int32)
  for r, seq in enumerate(seqs):
    n = len(seq)
    if n > length:
      raise ValueError(f"row {r} has {n} tokens, longer than length {length}")
    if n == 0:
      continue
    if side == "right":
      out[r, :n] = seq
    else:
      out[r, length - n:] = seq
  return out
