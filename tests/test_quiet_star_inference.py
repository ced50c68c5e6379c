"""Quiet-STaR inference with a KV cache: equal to a cache-free reference that re-runs the whole
[prefix, start, thought, end] sequence per step, equal to the training forward's thoughts and mixed
logits, equal to plain greedy decoding at init, batch-independent, clear input errors, and the
command line on a training run's directory.
"""

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xla_env

from starjax import models, parallel
from starjax.quiet_star import evaluate as qs_eval
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import generate, inference, objective
from starjax.quiet_star import sampling as qs_sampling
from starjax.quiet_star import train as qs_train
from starjax.quiet_star.config import QuietStarConfig
from starjax.sampling import core
from starjax.sampling.core import DecodeConfig
from starjax.train import checkpoint, optim
from starjax.train.state import TrainState

ROOT = Path(__file__).resolve().parents[1]

MODEL = models.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                           max_seq_len=64)
# Qwen-style biases, tied head, and a sliding window short enough to bind inside a thought.
MODEL_B = MODEL.replace(qkv_bias=True, tie_embeddings=True, sliding_window=5)
# M = 2 sampled thought tokens; ids 62/63 play <start>/<end> and are never sampled.
CFG = QuietStarConfig(n_thought_tokens=2, n_ahead_talk=1, n_passes=1, suppress_ids=(62, 63))
SAMPLE = DecodeConfig(max_new_tokens=5, temperature=1.0, eos_id=None)
PROMPTS = [[1, 5, 9, 33, 7, 20, 11], [1, 40], [1, 12, 3, 3]]


@functools.cache
def _params(model_cfg=MODEL, random_mixer=True):
  # Random decoder without compiling its init; std 0.06 gives sharp, non-tied distributions.
  shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  lm = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, 0.06, s.shape), s.dtype), shapes)
  p = objective.init_params(jax.random.key(1), CFG, model_cfg, lm)
  if random_mixer:  # A mixing head that has moved: w != 0.
    p["mixer"]["out"]["kernel"] = jax.random.normal(jax.random.key(2), (model_cfg.dim, 1))
  return p


@functools.cache
def _decoder(model_cfg):
  return jax.jit(lambda p, e, pos: models.forward(model_cfg, p, None, pos, inputs_embeds=e))


def _naive(params, prompt, prompt_id, cfg, model_cfg, dc, seed, pad_to=32):
  """The reference way: every decode step re-runs the plain decoder (no cache) over the whole
  explicit sequence [x_0..x_t, start, c_1..c_j] (positions 0, 1, ...), right-padded to `pad_to`
  with position -1 so it compiles once."""
  lm = params["lm"]
  table = np.asarray(lm["embed"]["embedding"], np.float32)
  start, end = (np.asarray(v) for v in fwd.thought_embeddings(params, cfg, model_cfg))
  # The documented streams: split(key(seed)) -> text base, thought base; then the prompt id.
  text_base, thought_base = jax.random.split(jax.random.key(seed))
  text_key = jax.random.fold_in(jax.random.fold_in(text_base, prompt_id), 0)
  thought_key = jax.random.fold_in(thought_base, prompt_id)
  run = _decoder(model_cfg)

  def last(rows):
    x = np.zeros((1, pad_to, model_cfg.dim), np.float32)
    pos = np.full((1, pad_to), -1, np.int32)
    x[0, :len(rows)], pos[0, :len(rows)] = np.stack(rows), np.arange(len(rows))
    out = run(lm, x, pos)
    return out.logits[0, len(rows) - 1], out.hidden[0, len(rows) - 1]

  seq, out = list(prompt), {"tokens": [], "thoughts": [], "weights": [], "logits": []}
  for n in range(dc.max_new_tokens):
    t = len(seq) - 1
    rows = [table[i] for i in seq]
    z_base, h_base = last(rows)
    rows.append(start)
    thought = []
    for i in range(1, cfg.n_sampled + 1):  # c_i is drawn from the logits of the step before it.
      z, _ = last(rows)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(thought_key, 0), t), i)
      c = int(qs_sampling.choose_tokens(fwd.suppress(z, cfg.suppress_ids)[None], key[None],
                                        cfg)[0])
      thought.append(c)
      rows.append(table[c])
    rows.append(end)
    z_end, h_end = last(rows)
    w = objective.mixing_weight(params["mixer"], h_base, h_end, cfg)
    mixed = objective.mix_logits(w, z_base, z_end)
    dcs = dataclasses.replace(dc, suppress_ids=tuple(set(dc.suppress_ids) | set(cfg.suppress_ids)))
    tok = int(core.choose_tokens(mixed[None], jax.random.fold_in(text_key, n)[None], dcs)[0])
    seq.append(tok)
    for k, v in (("tokens", tok), ("thoughts", thought), ("weights", float(w)),
                 ("logits", np.asarray(mixed))):
      out[k].append(v)
  return out


@pytest.mark.parametrize("model_cfg", [MODEL, MODEL_B], ids=["llama", "qwen_window"])
def test_cached_generation_equals_naive_recompute(model_cfg):
  params = _params(model_cfg)
  prompt = PROMPTS[0]
  res = inference.generate_with_thoughts(params, [prompt], CFG, model_cfg, SAMPLE, seed=3,
                                         prompt_ids=[4], return_logits=True)
  ref = _naive(params, prompt, 4, CFG, model_cfg, SAMPLE, seed=3)
  assert res.completion(0) == ref["tokens"]
  assert res.thoughts_of(0) == ref["thoughts"]
  np.testing.assert_allclose(res.logits[0], np.stack(ref["logits"]), atol=1e-4, rtol=0)
  np.testing.assert_allclose(res.mixing_weights[0], ref["weights"], atol=1e-5)
  assert np.all(np.abs(res.mixing_weights[0]) > 1e-3)  # The mixing head is really in play.
  assert len({tuple(c) for c in ref["thoughts"]}) > 1  # Thoughts differ from token to token.


def test_thoughts_and_logits_equal_the_training_forward():
  """The parallel training/eval forward over the generated text samples the same thought at each
  position (same keys) and gives the same mixed logits: positions t+1.. and keys match training."""
  params = _params()
  prompt = PROMPTS[0]
  res = inference.generate_with_thoughts(params, [prompt], CFG, MODEL, SAMPLE, seed=3,
                                         prompt_ids=[4], return_logits=True)
  seq = np.asarray(prompt + res.completion(0), np.int32)[None]
  # position_scores folds the example id in itself, so it gets the thought stream's base key.
  thought_base = jax.random.split(jax.random.key(3))[1]
  s = qs_eval.position_scores(params, {"tokens": seq, "mask": np.ones_like(seq, bool),
                                       "example_ids": np.asarray([4], np.int32)},
                              thought_base, CFG, MODEL, with_logits=True)
  t = np.arange(len(prompt) - 1, seq.shape[1] - 1)
  np.testing.assert_array_equal(np.asarray(s["thoughts"])[0][:, t].T, res.thoughts[0])
  np.testing.assert_allclose(np.asarray(s["thought_logits"])[0, t], res.logits[0], atol=1e-4)
  np.testing.assert_allclose(np.asarray(s["mixing_weight"])[0, t], res.mixing_weights[0],
                             atol=1e-5)


def test_init_mixer_gives_plain_greedy_decoding():
  """With the head's zero last layer (w = 0) thoughts are sampled but change nothing: the text is
  greedy decoding of the base model (full forward, argmax, no cache), with or without thoughts."""
  params = _params(random_mixer=False)
  dc = DecodeConfig(max_new_tokens=6, greedy=True)
  res = inference.generate_with_thoughts(params, PROMPTS, CFG, MODEL, dc)
  no_thoughts = inference.generate_with_thoughts(params, PROMPTS, CFG, MODEL, dc, thoughts=False)
  table = np.asarray(params["lm"]["embed"]["embedding"])
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(dc.max_new_tokens):
      x = np.zeros((1, 32, MODEL.dim), np.float32)
      pos = np.full((1, 32), -1, np.int32)
      x[0, :len(seq)], pos[0, :len(seq)] = table[seq], np.arange(len(seq))
      z = np.array(_decoder(MODEL)(params["lm"], x, pos).logits[0, len(seq) - 1])
      z[list(CFG.suppress_ids)] = -np.inf  # The thought markers are never text.
      seq.append(int(np.argmax(z)))
    assert res.completion(i) == seq[len(prompt):]
    assert no_thoughts.completion(i) == seq[len(prompt):]
  assert np.all(res.mixing_weights == 0.0)
  assert res.thoughts.shape == (3, 6, 2) and no_thoughts.thoughts.shape == (3, 6, 0)


def test_batch_rows_equal_rows_alone():
  params = _params()
  dc = dataclasses.replace(SAMPLE, eos_id=17)
  both = inference.generate_with_thoughts(params, PROMPTS, CFG, MODEL, dc, seed=5,
                                          return_logits=True)
  for i, p in enumerate(PROMPTS):
    alone = inference.generate_with_thoughts(params, [p], CFG, MODEL, dc, seed=5, prompt_ids=[i],
                                             return_logits=True, min_prompt_bucket=8)
    n = int(alone.lengths[0])
    assert both.completion(i) == alone.completion(0)
    assert both.thoughts_of(i) == alone.thoughts_of(0)
    np.testing.assert_allclose(both.logits[i, :n], alone.logits[0, :n], atol=1e-5)
    np.testing.assert_allclose(both.mixing_weights[i], alone.mixing_weights[0], atol=1e-6)


@pytest.mark.needs_8_devices
@pytest.mark.parametrize("mesh_cfg", [parallel.MeshConfig(data=8),
                                      parallel.MeshConfig(data=2, fsdp=4)], ids=["1x8", "2x4"])
def test_one_device_equals_a_mesh(mesh_cfg):
  params = _params()
  prompts = PROMPTS * 3  # 9 prompts: batch padding rows on every mesh.
  dc = dataclasses.replace(SAMPLE, eos_id=17)
  ref = inference.generate_with_thoughts(params, prompts, CFG, MODEL, dc, seed=4,
                                         return_logits=True)
  out = inference.generate_with_thoughts(params, prompts, CFG, MODEL, dc, seed=4,
                                         return_logits=True, mesh=parallel.make_mesh(mesh_cfg))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.thoughts, ref.thoughts)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)
  np.testing.assert_allclose(out.mixing_weights, ref.mixing_weights, atol=1e-6)


def _stacked_weight_ops_in_loops(jaxpr, shapes, in_loop=False) -> int:
  """Ops inside a loop of `jaxpr` that take an operand shaped like a stacked layer weight."""
  n = 0
  for eqn in jaxpr.eqns:
    if in_loop:
      n += any(getattr(v.aval, "shape", None) in shapes for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _stacked_weight_ops_in_loops(sub, shapes, in_loop or eqn.primitive.name == "while")
  return n


def test_decode_steps_read_per_layer_weights_not_the_stacked_ones(monkeypatch):
  """Every one-token step runs the unrolled layers on per-layer weights (split once per call):
  nothing in the decode loop touches the stacked weights, which the layer scan would slice."""
  params = _params()
  layers = core.split_layers(params["lm"], MODEL.n_layers)
  b = 3  # Activation rows (b, dim) must not look like a stacked (n_layers, dim) weight.
  toks, pos = np.ones((b, 8), np.int32), np.tile(np.arange(8, dtype=np.int32), (b, 1))
  keys = inference.stream_keys(0, np.arange(b))
  shapes = {x.shape for x in jax.tree.leaves(params["lm"]["layers"])}

  def count():
    fn = functools.partial(inference._generate_local, cfg=CFG, model_cfg=MODEL, dc=SAMPLE,
                           thoughts=True, with_logits=False)
    jaxpr = jax.make_jaxpr(fn)(params, layers, toks, pos, *keys)
    return _stacked_weight_ops_in_loops(jaxpr.jaxpr, shapes)

  assert count() == 0
  # The check can fail: decoding through the scanned layers, as before, reads them in the loop.
  def scanned(cfg, params, layers, tokens, positions, cache, index, digit_index=None, *,
              inputs_embeds=None):
    del layers, digit_index
    stacked = {"k": jnp.stack(cache["k"]), "v": jnp.stack(cache["v"]), "pos": cache["pos"]}
    out = models.forward(cfg, params, tokens, positions, inputs_embeds=inputs_embeds,
                         cache=stacked, cache_index=index)
    return out.replace(cache=models.llama.unstack_cache(out.cache))

  monkeypatch.setattr(models.llama, "decode_unrolled", scanned)
  assert count() > 0


def test_bad_input_is_a_clear_error():
  params = _params()
  with pytest.raises(ValueError, match="No prompts"):
    inference.generate_with_thoughts(params, [], CFG, MODEL, SAMPLE)
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    inference.generate_with_thoughts(params, [[1], []], CFG, MODEL, SAMPLE)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    DecodeConfig(max_new_tokens=0)
  # 60 + 5 new + 3 scratch > 64 slots; without thoughts 65 > 64 still.
  with pytest.raises(ValueError, match=r"needs 68 cache slots, more than max_cache_len=64"):
    inference.generate_with_thoughts(params, [[1] * 60], CFG, MODEL, SAMPLE)
  with pytest.raises(ValueError, match="max_cache_len=62"):
    inference.generate_with_thoughts(params, [[1] * 55], CFG, MODEL, SAMPLE, max_cache_len=62)


# ---------------------------------------------------------------------------------------------
# The command line on a training run's directory.


def _tiny_run_config(tmp: Path, steps: int = 2):
  (tmp / "train.txt").write_text("Tom has 3 apples and buys 4 more, so he has 7 apples.\n\n" * 12)
  c = qs_train.default_config()
  c.model.update(preset="tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
  c.data = dict(task="text_files", train_files=[str(tmp / "train.txt")])
  c.quiet_star.update(n_thought_tokens=2, n_ahead_talk=1, n_passes=2)
  c.optimizer.update(lr=1e-3, schedule="constant")
  c.train.update(steps=steps, batch_size=8, seq_len=16, ckpt_every=steps, thoughts_every=0,
                 progress=False, async_ckpt=False)
  c.eval.update(every=0, at_end=False)
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A Quiet-STaR workdir as the trainer leaves it (config.json + a checkpoint at step 2), written
  directly: the trainer's own 2-step run is `test_cli_after_real_training` (slow)."""
  tmp = tmp_path_factory.mktemp("qs_generate")
  c = _tiny_run_config(tmp)
  workdir = tmp / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(c.to_dict(), default=str))
  run = qs_train.parse_config(c)
  s = qs_train.setup(run)
  params = objective.init_params(jax.random.key(0), s.cfg, s.model_cfg)
  params["mixer"]["out"]["kernel"] = jax.random.normal(jax.random.key(1), (s.model_cfg.dim, 1))
  tx = optim.make_optimizer(run.optimizer, run.train.steps)
  state = TrainState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=tx.init(params))
  with checkpoint.Checkpointer(workdir / "checkpoints", save_every=2, async_save=False) as ckpt:
    ckpt.save(2, state, force=True)
  return workdir


def _check_cli_output(out: str, report: dict, prompts: list[str], moved_head: bool = True):
  """The printed text and thoughts agree with the JSON written by the same run."""
  assert report["step"] == 2 and report["thought_tokens"] == 2
  assert [r["prompt"] for r in report["results"]] == prompts
  blocks = out.split("--- [")[1:]
  assert out.startswith("# ") and len(blocks) == len(prompts)
  for block, r in zip(blocks, report["results"]):
    n = len(r["tokens"])
    assert 1 <= n <= 4 and len(r["token_texts"]) == n and len(r["mixing_weights"]) == n
    assert len(r["thoughts"]) == n and all(len(c) == 2 for c in r["thoughts"])
    assert any(abs(w) > 1e-3 for w in r["mixing_weights"]) or not moved_head
    marked = "".join(generate.THOUGHT_OPEN + generate.escape_thought(th) + generate.THOUGHT_CLOSE
                     + tt for th, tt in zip(r["thought_texts"], r["token_texts"]))
    assert f"text: {r['prompt']}{r['text']}\n" in block
    assert f"with thoughts: {r['prompt']}{marked}\n" in block
    assert "mixing weight: mean " in block


def test_cli_prints_text_and_thoughts_and_writes_json(run_dir, tmp_path, capsys):
  prompts = ["Tom has", "A\tB"]
  argv = ["--workdir", str(run_dir), "--prompt", "Tom has", "--prompt", "A\\tB",
          "--max_new_tokens", "4", "--seed", "1"]
  assert generate.main(argv + ["--json", str(tmp_path / "out.json"), "--color", "never"]) == 0
  out = capsys.readouterr().out
  report = json.loads((tmp_path / "out.json").read_text())
  _check_cli_output(out, report, prompts)
  assert "\x1b[" not in out
  # Same seed, same output; dimmed thoughts on request; JSON alone on stdout with --json=-.
  assert generate.main(argv + ["--color", "always"]) == 0
  dim = capsys.readouterr().out
  assert "\x1b[2m" + generate.THOUGHT_OPEN in dim
  assert dim.replace("\x1b[2m", "").replace("\x1b[0m", "").split("\n", 1)[1] == out.split(
      "\n", 1)[1]
  assert generate.main(argv + ["--json", "-"]) == 0
  assert json.loads(capsys.readouterr().out)["results"] == report["results"]


def test_thoughts_generator_for_zero_shot_cot(run_dir):
  """The evaluation hook: GENERATORS["thoughts"] gives k samples per prompt."""
  s, params, _ = generate.load_run(run_dir)
  gen = qs_eval.GENERATORS["thoughts"](params, s.model_cfg, s.tok, s.cfg)
  out = gen(["Q: 1+1?\nA:"], qs_eval.GenerationRequest(max_new_tokens=4, num_samples=2,
                                                         seed=1))
  assert len(out) == 1 and len(out[0]) == 2 and all(isinstance(x, str) for x in out[0])


def test_cli_bad_input(run_dir, tmp_path, capsys):
  with pytest.raises(SystemExit):
    generate.main(["--workdir", str(run_dir), "--prompt", ""])
  assert "--prompt must not be empty" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    generate.main(["--workdir", str(run_dir), "--prompt", "x", "--max_new_tokens", "0"])
  assert "--max_new_tokens must be >= 1" in capsys.readouterr().err
  assert generate.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
  assert "config.json not found" in capsys.readouterr().err
  # max_seq_len of the tiny preset is 512.
  assert generate.main(["--workdir", str(run_dir), "--prompt", "x" * 500,
                        "--max_new_tokens", "20"]) == 2
  assert "more than max_cache_len=512" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_after_real_training(tmp_path):
  """The real commands: 2 Quiet-STaR steps with the trainer, then the CLI in a fresh process."""
  workdir = tmp_path / "run"
  qs_train.train_and_evaluate(_tiny_run_config(tmp_path), workdir)
  env = xla_env.env(devices=1)
  proc = subprocess.run([sys.executable, "-m", "starjax.quiet_star.generate",
                         f"--workdir={workdir}", "--prompt", "Tom has", "--max_new_tokens=4",
                         f"--json={tmp_path / 'out.json'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check_cli_output(proc.stdout, json.loads((tmp_path / "out.json").read_text()), ["Tom has"],
                    moved_head=False)
