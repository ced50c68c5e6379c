"""Parity of starjax with HF transformers (Llama, Mistral, Qwen2) on random tiny models."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax.models import Transformer, attention, forward, hf, init_cache, init_params

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, BATCH, LENGTH = 300, 3, 12
ROW_LENGTHS = (12, 7, 9)  # right padding on rows 1 and 2.
PROMPT_LENGTH, NEW_TOKENS = 6, 32
LOGIT_ATOL = 1e-4
MAX_DIFFS: dict[str, float] = {}  # case -> max |logit diff|, printed at teardown (pytest -s).

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  config_cls: str
  model_cls: str
  kwargs: dict


CASES = [
    Case("llama_gqa", "LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2)),
    Case("mistral_sliding", "MistralConfig", "MistralForCausalLM",
         dict(num_hidden_layers=3, sliding_window=4)),
    Case("qwen2_bias", "Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2)),
    Case("llama_tied", "LlamaConfig", "LlamaForCausalLM",
         dict(num_hidden_layers=2, tie_word_embeddings=True)),
]


def _randomize(model, seed: int) -> None:
  """O(1)-scale random weights (HF's init gives near-zero logits), non-zero biases and norms."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif p.ndim == 1:
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5)


def _padded_batch() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH))
  valid = np.arange(LENGTH)[None, :] < np.array(ROW_LENGTHS)[:, None]
  return np.where(valid, tokens, 0), valid


def _hf_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(valid).long())
  return out.logits.numpy()


_jit_forward = jax.jit(forward, static_argnums=0)


def _starjax_logits(cfg, params, tokens: np.ndarray, valid: np.ndarray, **kwargs) -> np.ndarray:
  positions = np.where(valid, np.arange(LENGTH)[None, :], -1)
  out = _jit_forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), **kwargs)
  return np.asarray(out.logits)


def _starjax_greedy(cfg, params, prompt: np.ndarray, n_new: int) -> list[int]:
  """Prefill the prompt into a KV cache, then decode one token at a time (argmax)."""
  model = Transformer(cfg)

  @jax.jit
  def step(params, tokens, positions, cache, index):
    out = model.apply({"params": params}, tokens, positions, cache=cache, cache_index=index)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache

  n = prompt.shape[0]
  cache = init_cache(cfg, 1, n + n_new)
  token, cache = step(params, jnp.asarray(prompt)[None], jnp.arange(n)[None], cache, 0)
  generated = [int(token[0])]
  for i in range(n, n + n_new - 1):
    token, cache = step(params, token[:, None], jnp.full((1, 1), i), cache, i)
    generated.append(int(token[0]))
  return generated


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
  """A random HF model, its state dict as numpy and the converted starjax config and params."""
  c = request.param
  hf_config = getattr(transformers, c.config_cls)(**COMMON, **c.kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
  assert type(model).__name__ == c.model_cls
  model.eval()
  _randomize(model, seed=CASES.index(c))
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  cfg = hf.config_from_hf(model.config.to_dict())
  params = hf.params_from_hf(cfg, state)
  return c, model, state, cfg, params


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
  yield
  if MAX_DIFFS:
    print("\nmax |logit diff| vs HF:", {k: f"{v:.2e}" for k, v in MAX_DIFFS.items()})


def test_config_mapping(case):
  c, model, _, cfg, _ = case
  assert cfg.n_layers == c.kwargs["num_hidden_layers"]
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, 2, 16)
  assert cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-5 and cfg.max_seq_len == 256
  assert cfg.tie_embeddings == bool(c.kwargs.get("tie_word_embeddings", False))
  assert cfg.qkv_bias == (c.name == "qwen2_bias")
  assert cfg.sliding_window == c.kwargs.get("sliding_window")
  if cfg.qkv_bias:
    bias = model.model.layers[0].self_attn.q_proj.bias
    assert bias.abs().min() > 0


def test_logits_match(case):
  c, model, _, cfg, params = case
  tokens, valid = _padded_batch()
  want = _hf_logits(model, tokens, valid)
  got = _starjax_logits(cfg, params, tokens, valid)
  diff = float(np.max(np.abs(got - want)[valid]))
  MAX_DIFFS[c.name] = diff
  assert diff <= LOGIT_ATOL, f"{c.name}: max |logit diff| {diff:.3g}"
  if cfg.sliding_window is not None:  # the window matters here, and is not off by one.
    positions = jnp.asarray(np.where(valid, np.arange(LENGTH)[None, :], -1))
    for window in (None, cfg.sliding_window - 1, cfg.sliding_window + 1):
      mask = attention.make_attention_mask(positions, positions, sliding_window=window)
      other = _starjax_logits(cfg, params, tokens, valid, attn_mask=mask)
      assert np.max(np.abs(other - want)[valid]) > 1e-2, window


def test_greedy_decode_matches(case):
  _, model, _, cfg, params = case
  prompt = np.random.default_rng(1).integers(0, VOCAB, PROMPT_LENGTH)
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompt)[None], attention_mask=torch.ones(1, PROMPT_LENGTH,
                         dtype=torch.long), do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
  want = out[0, PROMPT_LENGTH:].tolist()
  assert len(want) == NEW_TOKENS
  assert _starjax_greedy(cfg, params, prompt, NEW_TOKENS) == want


def test_params_round_trip(case):
  _, _, state, cfg, params = case
  back = hf.params_to_hf(cfg, params)
  if cfg.tie_embeddings:
    assert "lm_head.weight" not in back
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_export_loads_in_hf(case):
  c, model, _, cfg, params = case
  exported = hf.config_to_hf(cfg)
  assert exported["architectures"] == [c.model_cls]
  config = transformers.AutoConfig.for_model(**exported)
  fresh = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  assert type(fresh).__name__ == c.model_cls
  tensors = {k: torch.from_numpy(v) for k, v in hf.params_to_hf(cfg, params).items()}
  if cfg.tie_embeddings:  # the tied lm_head is not a separate tensor in the export.
    result = fresh.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
  else:
    fresh.load_state_dict(tensors, strict=True)
  fresh.eval()
  tokens, valid = _padded_batch()
  np.testing.assert_allclose(_hf_logits(fresh, tokens, valid)[valid],
                             _hf_logits(model, tokens, valid)[valid], atol=1e-6, rtol=0)
  assert hf.config_from_hf(fresh.config.to_dict()) == cfg


def test_export_starjax_params_custom_head_dim():
  """starjax-born params (head_dim != dim / heads, q/k/v bias) exported to HF give the same logits."""
  cfg = hf.config_from_hf(dict(COMMON, architectures=["Qwen2ForCausalLM"], num_hidden_layers=2,
                               head_dim=32))
  assert cfg.head_dim == 32 and cfg.qkv_bias
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.3).astype(np.float32), shapes)
  config = transformers.AutoConfig.for_model(**hf.config_to_hf(cfg))
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.params_to_hf(cfg, params).items()},
                        strict=True)
  model.eval()
  tokens, valid = _padded_batch()
  want = _hf_logits(model, tokens, valid)
  got = _starjax_logits(cfg, params, tokens, valid)
  assert np.max(np.abs(got - want)[valid]) <= LOGIT_ATOL


def test_load_sharded_safetensors_dir(tmp_path):
  hf_config = transformers.LlamaConfig(**COMMON, num_hidden_layers=2)
  model = transformers.LlamaForCausalLM(hf_config)
  _randomize(model, seed=7)
  model.save_pretrained(tmp_path, max_shard_size="60KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params = hf.load_safetensors_dir(tmp_path)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  want = hf.params_from_hf(hf.config_from_hf(model.config.to_dict()), state)
  assert cfg == hf.config_from_hf(model.config.to_dict())
  jax.tree.map(np.testing.assert_array_equal, params, want)


# ------------------------------------------------------------------------------------------------
# Config handling and errors (no models needed).


def _llama_json(**changes):
  d = dict(COMMON, architectures=["LlamaForCausalLM"], num_hidden_layers=2)
  d.update(changes)
  return d


def test_config_old_style_rope_theta():
  d = _llama_json(rope_theta=123.0, rope_scaling=None)
  del d["rope_parameters"]
  assert hf.config_from_hf(d).rope_theta == 123.0


def test_config_defaults_kv_heads_and_dtype_override():
  d = _llama_json(num_key_value_heads=None)
  cfg = hf.config_from_hf(d, dtype="bfloat16")
  assert cfg.n_kv_heads == 4 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_config_rejects_rope_scaling(key):
  d = _llama_json(**{key: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
  with pytest.raises(ValueError, match="linear"):
    hf.config_from_hf(d)


def test_config_qwen2_sliding_layers():
  base = dict(COMMON, architectures=["Qwen2ForCausalLM"], num_hidden_layers=2, sliding_window=4)
  assert hf.config_from_hf(base).sliding_window is None  # use_sliding_window defaults off.
  assert hf.config_from_hf(dict(base, use_sliding_window=True, max_window_layers=0)
                           ).sliding_window == 4
  assert hf.config_from_hf(dict(base, use_sliding_window=True)).sliding_window is None
  with pytest.raises(ValueError, match="mix full and sliding"):
    hf.config_from_hf(dict(base, use_sliding_window=True, max_window_layers=1))


def test_config_mistral_sliding_disabled():
  d = dict(COMMON, architectures=["MistralForCausalLM"], num_hidden_layers=2, sliding_window=4)
  assert hf.config_from_hf(d).sliding_window == 4
  assert hf.config_from_hf(dict(d, use_sliding_window=False)).sliding_window is None
  assert hf.config_from_hf(dict(d, sliding_window=None)).sliding_window is None


def test_config_to_hf_architecture_choice():
  cfg = hf.config_from_hf(_llama_json())
  assert hf.config_to_hf(cfg)["architectures"] == ["LlamaForCausalLM"]
  assert hf.config_to_hf(cfg.replace(sliding_window=8))["architectures"] == ["MistralForCausalLM"]
  assert hf.config_to_hf(cfg.replace(qkv_bias=True))["architectures"] == ["Qwen2ForCausalLM"]
  with pytest.raises(ValueError, match="sliding window"):
    hf.config_to_hf(cfg.replace(sliding_window=8), "LlamaForCausalLM")
  with pytest.raises(ValueError, match="Unsupported architecture"):
    hf.config_to_hf(cfg, "GPT2LMHeadModel")
  json.dumps(hf.config_to_hf(cfg))  # serialisable as config.json.


def test_error_unknown_architecture():
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    hf.config_from_hf(_llama_json(architectures=["GPT2LMHeadModel"]))


def test_error_missing_hidden_size():
  d = _llama_json()
  del d["hidden_size"]
  with pytest.raises(ValueError, match=r"my/config.json.*'hidden_size'"):
    hf.config_from_hf(d, source="my/config.json")


def _small_state(cfg):
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)
  return hf.params_to_hf(cfg, params)


def test_error_missing_tensor():
  cfg = hf.config_from_hf(_llama_json())
  state = _small_state(cfg)
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"Missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.params_from_hf(cfg, state)


def test_error_unknown_tensor():
  cfg = hf.config_from_hf(_llama_json())
  state = _small_state(cfg)
  state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"Unknown tensors.*model\.layers\.2\.mlp\.up_proj"):
    hf.params_from_hf(cfg, state)


def test_error_shape_mismatch():
  cfg = hf.config_from_hf(_llama_json())
  state = _small_state(cfg)
  state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(64, 64\)"
                     r".*\(32, 64\)"):
    hf.params_from_hf(cfg, state)
