"""Small checkpoints built in tests: a byte-level BPE tokenizer, random params, GGUF files."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import tokenizers as hf_tokenizers
from tokenizers import decoders, pre_tokenizers, trainers

from starjax.models import hf, init_params
from starjax.models.config import ModelConfig

TEXTS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
    "Josh decides to try flipping a house.  He buys a house for $80,000.",
    "James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint.",
    "The quick brown fox jumps over the lazy dog, then naps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")


def tiny_bpe(vocab_size: int = 320) -> hf_tokenizers.Tokenizer:
  """A SmolLM2-style byte-level BPE (digits split, no normalizer) trained on `TEXTS`."""
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(TEXTS, trainer)
  return tok


def bpe_tables(tok: hf_tokenizers.Tokenizer) -> tuple[list[str], list[str]]:
  """(tokens by id, merges as "a b" strings), as a GGUF file stores them."""
  vocab = tok.get_vocab(with_added_tokens=True)
  tokens = [""] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  merges = json.loads(tok.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  return tokens, merges


def hf_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random HF-named tensors at O(1) logit scale (as in test_hf_parity): weights N(0, 1/fan_in),
  biases N(0, 0.5^2), norm scales U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  out = {}
  for name, x in hf.params_to_hf(cfg, zeros).items():
    if "norm" in name:
      out[name] = rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    elif x.ndim == 1:
      out[name] = rng.normal(0.0, 0.5, x.shape).astype(np.float32)
    else:
      out[name] = rng.normal(0.0, x.shape[-1] ** -0.5, x.shape).astype(np.float32)
  return out


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, Any]:
  """`hf_tensors` as a starjax params tree (numpy)."""
  return hf.params_from_hf(cfg, hf_tensors(cfg, seed))


_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
    "self_attn.q_proj.bias": "attn_q", "self_attn.k_proj.bias": "attn_k",
    "self_attn.v_proj.bias": "attn_v",
    "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter: per head, rows [first half; second half] -> interleaved pairs."""
  d = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: str, cfg: ModelConfig, hf_tensors: dict[str, np.ndarray], *,
               arch: str = "llama", tokenizer: hf_tokenizers.Tokenizer | None = None,
               quantize: tuple[str, ...] = (), drop_keys: tuple[str, ...] = (),
               tokenizer_model: str = "gpt2", pre: str = "smollm") -> None:
  """Writes HF-named tensors as a GGUF file the way llama.cpp's converter lays them out.

  Args:
    quantize: substrings of llama.cpp tensor names to store as Q8_0 (others F32).
    drop_keys: metadata keys (without the arch prefix) to leave out, for error tests.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  w = gguf.GGUFWriter(path, arch)
  kv = {
      "block_count": ("uint32", cfg.n_layers), "context_length": ("uint32", cfg.max_seq_len),
      "embedding_length": ("uint32", cfg.dim), "feed_forward_length": ("uint32", cfg.ffn_dim),
      "attention.head_count": ("uint32", cfg.n_heads),
      "attention.head_count_kv": ("uint32", cfg.n_kv_heads),
      "rope.freq_base": ("float32", cfg.rope_theta),
      "attention.layer_norm_rms_epsilon": ("float32", cfg.norm_eps),
      "rope.dimension_count": ("uint32", cfg.head_dim),
      "vocab_size": ("uint32", cfg.vocab_size),
  }
  for key, (kind, value) in kv.items():
    if key not in drop_keys:
      getattr(w, f"add_{kind}")(f"{arch}.{key}", value)
  if tokenizer is not None:
    tokens, merges = bpe_tables(tokenizer)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
  for name, x in hf_tensors.items():
    if name in _GGUF_GLOBAL:
      gname = _GGUF_GLOBAL[name]
    else:
      _, _, layer, rest = name.split(".", 3)
      gname = f"blk.{layer}.{_GGUF_LAYER[rest]}.{rest.rsplit('.', 1)[1]}"
    x = np.asarray(x, np.float32)
    if arch == "llama" and ("attn_q." in gname or "attn_k." in gname):
      x = llama_cpp_permute(x, cfg.n_heads if "attn_q." in gname else cfg.n_kv_heads)
    if any(q in gname for q in quantize):
      qtype = gguf.GGMLQuantizationType.Q8_0
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, np.ascontiguousarray(x))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def tiny_cfg(**changes: Any) -> ModelConfig:
  fields = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                rope_theta=5000.0, norm_eps=1e-5, max_seq_len=256)
  fields.update(changes)
  return ModelConfig(**fields)
