"""Quiet-STaR trainer and evaluation: metrics and thoughts written, SIGTERM + resume equals an
uninterrupted run, config errors name the key, the soft answer metric against a float64 numpy
computation from full-forward logits, the decile grouping against a plain-Python reference, and
zero-shot CoT majority vote through the generator hook.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xla_env

from starjax import configs, models
from starjax.data.tasks import Example
from starjax.quiet_star import evaluate as qs_eval
from starjax.quiet_star import forward as fwd
from starjax.quiet_star import objective
from starjax.quiet_star import train as qs_train
from starjax.quiet_star.config import QuietStarConfig
from starjax.tokenizers import ByteTokenizer
from starjax.train import checkpoint
from starjax.train import loop as train_loop

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples.\n\n"
        "A box holds 6 eggs. Two boxes hold 2 * 6 = 12 eggs.\n\n"
        "Sara reads 5 pages a day for 3 days: 5 * 3 = 15 pages.\n\n")
REQUIRED = ("loss", "base_loss", "talk_loss_0", "talk_loss_1", "talk_loss", "mixing_weight",
            "policy_loss", "grad_norm", "lr", "lm_loss")


def tiny_config(tmp_path: Path, steps: int = 4):
  (tmp_path / "train.txt").write_text(TEXT * 6)
  (tmp_path / "eval.txt").write_text(TEXT * 2)
  c = qs_train.default_config()
  c.model.update(preset="tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
  c.data = dict(task="text_files", train_files=[str(tmp_path / "train.txt")],
                eval_files=[str(tmp_path / "eval.txt")])
  c.warmup.update(steps=2, batch_size=4, seq_len=64, log_every=1, ckpt_every=2, eval_every=0,
                  progress=False, async_ckpt=False)
  c.quiet_star.update(n_thought_tokens=1, n_ahead_talk=2, n_passes=2)
  c.optimizer.update(lr=1e-3, schedule="constant")
  c.train.update(steps=steps, batch_size=8, seq_len=16, log_every=1, ckpt_every=2,
                 thoughts_every=2, thought_positions=2, progress=False)
  c.eval.update(every=2, n_windows=8, batch_size=8)
  return c


def _lines(path: Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines()]


def _without_timing(lines: list[dict]) -> list[dict]:
  return [{k: v for k, v in x.items() if k != "steps_per_s"} for x in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("qs_run")
  workdir = tmp / "w"
  return tmp, workdir, qs_train.train_and_evaluate(tiny_config(tmp), workdir)


@pytest.mark.slow
def test_training_writes_all_metrics_thoughts_and_eval(uninterrupted):
  _, workdir, result = uninterrupted
  assert result["step"] == 4 and not result["preempted"] and result["phase"] == "quiet_star"
  lines = _lines(workdir / "metrics.jsonl")
  train_lines = [x for x in lines if "loss" in x]
  assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
  for x in train_lines:
    for k in REQUIRED:
      assert isinstance(x[k], float) and math.isfinite(x[k]), (k, x)
  # The head starts at w = 0, so the first step has no policy gradient; then it moves.
  assert train_lines[0]["mixing_weight"] == 0.0 and train_lines[0]["policy_loss"] == 0.0
  assert train_lines[-1]["mixing_weight"] != 0.0
  assert [x["step"] for x in lines if "eval_base_loss" in x and "eval_mixing_weight" in x
          and "hardest_decile_delta" not in x] == [2, 4]
  # Warm-up ran as a plain LM run first.
  assert [x["step"] for x in _lines(workdir / "warmup" / "metrics.jsonl") if "loss" in x] == [1, 2]
  thoughts = _lines(workdir / "thoughts.jsonl")
  assert sorted({t["step"] for t in thoughts}) == [1, 2, 4]
  for t in thoughts:
    assert {"position", "context", "thought", "next", "reward", "mixing_weight"} <= set(t)
    assert isinstance(t["thought"], str) and isinstance(t["context"], str)
    assert 0 <= t["position"] < 16
  assert any(x["tag"] == "thoughts" for x in _lines(workdir / "samples.jsonl"))
  assert list((workdir / "tb").iterdir())
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  assert summary["step"] == 4 and math.isfinite(summary["eval_thought_loss"])
  table = json.loads((workdir / "eval" / "difficult_tokens.json").read_text())
  assert len(table["groups"]) == 10
  assert (workdir / "eval" / "difficult_tokens.png").read_bytes()[:4] == b"\x89PNG"
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(uninterrupted, monkeypatch):
  tmp, ref_dir, ref = uninterrupted
  workdir = tmp / "interrupted"
  original = train_loop.RowSource.__call__

  def call(self, step):
    if step == 2 and self.batch_size == 8 and not getattr(call, "fired", False):
      call.fired = True
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 3 is being prepared.
    return original(self, step)

  monkeypatch.setattr(train_loop.RowSource, "__call__", call)
  first = qs_train.train_and_evaluate(tiny_config(tmp), workdir)
  assert first["preempted"] and first["step"] == 3
  assert not (workdir / "eval").exists()  # No final evaluation for a stopped run.
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=2)
  assert ckpt.latest_step() == 3
  ckpt.close()
  monkeypatch.setattr(train_loop.RowSource, "__call__", original)
  second = qs_train.train_and_evaluate(tiny_config(tmp), workdir)
  assert second["step"] == 4 and not second["preempted"]
  for a, b in zip(jax.tree.leaves(second["state"].params), jax.tree.leaves(ref["state"].params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same metric, thought and sample lines, none duplicated or lost across the restart.
  for name in ("metrics.jsonl", "thoughts.jsonl", "samples.jsonl"):
    assert _without_timing(_lines(workdir / name)) == _without_timing(_lines(ref_dir / name)), name
  assert (json.loads((workdir / "eval" / "summary.json").read_text())
          == json.loads((ref_dir / "eval" / "summary.json").read_text()))


def test_config_errors_name_the_key(tmp_path):
  cases = [
      (("quiet_star", "n_ahed", 3), r"config\.quiet_star\.n_ahed"),
      (("train", "stepz", 3), r"config\.train\.stepz"),
      (("eval", "soft_taks", "gsm8k"), r"config\.eval\.soft_taks"),
      (("warmup", "stepz", 3), r"config\.warmup\.stepz"),
      (("data", "train_filez", ["x"]), r"config\.data\.train_filez"),
      (("base", "pretrianed", "x"), r"config\.base\.pretrianed"),
  ]
  for (section, key, value), pattern in cases:
    c = tiny_config(tmp_path).to_dict()
    c[section][key] = value
    with pytest.raises(configs.ConfigError, match=pattern):
      qs_train.train_and_evaluate(c, tmp_path / "w")
  c = tiny_config(tmp_path).to_dict()
  c["warmup"]["optimizer"]["lrr"] = 1.0
  with pytest.raises(configs.ConfigError, match=r"config\.warmup\.optimizer\.lrr"):
    qs_train.train_and_evaluate(c, tmp_path / "w")
  c = tiny_config(tmp_path).to_dict()
  c["quiet_star"]["n_passes"] = "two"
  with pytest.raises(configs.ConfigError, match=r"config\.quiet_star\.n_passes='two'"):
    qs_train.train_and_evaluate(c, tmp_path / "w")
  c = tiny_config(tmp_path).to_dict()
  c["eval"]["soft_tasks"] = "gsm9k"
  with pytest.raises(configs.ConfigError, match=r"config\.eval.*gsm9k"):
    qs_train.train_and_evaluate(c, tmp_path / "w")
  c = tiny_config(tmp_path).to_dict()
  c["traim"] = {}
  with pytest.raises(configs.ConfigError, match=r"config\.traim"):
    qs_train.train_and_evaluate(c, tmp_path / "w")
  c = tiny_config(tmp_path).to_dict()
  c["base"]["pretrained"] = "smollm2-135m"
  c["model"] = {"preset": "tiny"}
  with pytest.raises(configs.ConfigError, match="config.warmup.steps"):
    qs_train.train_and_evaluate(c, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # Rejected before any work or any file.


# ---------------------------------------------------------------------------------------------
# Soft answer metric against float64 numpy from full forwards.

MODEL = models.ModelConfig(vocab_size=261, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=64)
CFG = QuietStarConfig(n_thought_tokens=2, n_ahead_talk=3, n_passes=2, suppress_ids=(259, 260))


def _random_params(seed=0):
  shapes = jax.eval_shape(lambda: models.init_params(MODEL, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  lm = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, 0.08, s.shape), s.dtype), shapes)
  p = objective.init_params(jax.random.key(seed), CFG, MODEL, lm)
  p["mixer"]["out"]["kernel"] = jnp.asarray(rng.normal(0, 1.0, (MODEL.dim, 1)), jnp.float32)
  return p


def _np64(x):
  return np.asarray(x, np.float64)


def _renorm_logp64(logits, gold, allowed):
  sel = allowed.copy()
  sel[gold] = True
  z = logits[sel]
  m = z.max()
  return logits[gold] - (m + np.log(np.sum(np.exp(z - m))))


def _mixing_weight64(mixer, h_base, h_thought):
  x = np.concatenate([h_base, h_thought])
  x = np.maximum(x @ _np64(mixer["hidden_0"]["kernel"]) + _np64(mixer["hidden_0"]["bias"]), 0)
  x = np.maximum(x @ _np64(mixer["hidden_1"]["kernel"]) + _np64(mixer["hidden_1"]["bias"]), 0)
  return float((x @ _np64(mixer["out"]["kernel"]))[0])


def test_soft_answer_matches_float64_numpy_from_full_forwards():
  tok = ByteTokenizer()
  params = _random_params()
  examples = [Example(id="q0", question="2+3?", answer="5"),
              Example(id="q1", question="How many legs do 3 cats have?", answer="12"),
              Example(id="q2", question="10-4?", answer="6"),
              Example(id="q3", question="x" * 60, answer="1")]  # Too long for max_len 48.
  items, kind = qs_eval.soft_items("gsm8k", examples, tok)
  assert kind == "number"
  # " 12\n": the space is not scored, the digits and the newline are.
  assert items[1].scored == [False, True, True, True]
  allowed = qs_eval.allowed_ids(tok, qs_eval.UNITS[kind], MODEL.vocab_size)
  assert sorted(np.flatnonzero(allowed)) == sorted(tok.encode("0123456789\n"))
  key = jax.random.key(3)
  res = qs_eval.soft_answer(params, items, allowed, key, CFG, MODEL, batch_size=2, max_len=48)
  assert res["n"] == 3 and res["skipped_too_long"] == 1

  # Reference. A thought at position t depends only on (key, example id = index among the kept
  # items, t) and on x_0..x_t, so any padding reproduces the evaluation's thoughts; the batches
  # repeat soft_answer's (buckets of 32 and 64 tokens), so nothing compiles again.
  kept = items[:3]
  assert [len(it.tokens) for it in kept] == [14, 40, 15]
  thoughts = {}
  for rows, length in (([0, 2], 32), ([1], 64)):
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, i in enumerate(rows):
      tokens[r, :len(kept[i].tokens)] = kept[i].tokens
      mask[r, :len(kept[i].tokens)] = True
    out = qs_eval.position_scores(params, {"tokens": tokens, "mask": mask,
                                           "example_ids": np.asarray(rows)}, key, CFG, MODEL)
    thoughts.update({i: np.asarray(out["thoughts"][r]) for r, i in enumerate(rows)})
  table = np.asarray(params["lm"]["embed"]["embedding"])
  start, end = (np.asarray(x) for x in fwd.thought_embeddings(params, CFG, MODEL))
  m = CFG.n_sampled
  decoder = jax.jit(lambda e, pos: models.forward(MODEL, params["lm"], None, pos,
                                                  inputs_embeds=e))

  def full_forward(seqs):
    """Plain decoder on up to 4 embedding sequences, right-padded to one shape (one compile)."""
    batch = np.zeros((4, 72, MODEL.dim), np.float32)
    for i, x in enumerate(seqs):
      batch[i, :len(x)] = x
    out = decoder(jnp.asarray(batch), jnp.broadcast_to(jnp.arange(72), (4, 72)))
    return _np64(out.hidden), _np64(out.logits)

  soft = {"base": [], "thought": []}
  logprob = {"base": [], "thought": []}
  for r, it in enumerate(kept):
    n = len(it.tokens)
    h_base, z_base = (x[0] for x in full_forward([table[it.tokens]]))
    # Every answer position t: the explicit sequence x_0..x_t, start, c_1..c_M, end.
    pos = np.arange(it.answer_start, n) - 1
    h_seq, z_seq = full_forward([np.concatenate([table[it.tokens[:t + 1]], start[None],
                                                 table[thoughts[r][:, t]], end[None]])
                                 for t in pos])
    s_vals = {"base": 0.0, "thought": 0.0}
    l_vals = {"base": 0.0, "thought": 0.0}
    for j, t in enumerate(pos):
      gold = it.tokens[t + 1]
      at_end = t + m + 2  # The row that reads <end-of-thought>.
      w = _mixing_weight64(params["mixer"], h_base[t], h_seq[j, at_end])
      z = {"base": z_base[t], "thought": (1 - w) * z_base[t] + w * z_seq[j, at_end]}
      for name, logits in z.items():
        full_lp = logits[gold] - (logits.max() + np.log(np.sum(np.exp(logits - logits.max()))))
        l_vals[name] += full_lp
        if it.scored[t + 1 - it.answer_start]:
          s_vals[name] += _renorm_logp64(logits, gold, allowed)
    for name in soft:
      soft[name].append(np.exp(s_vals[name]))
      logprob[name].append(l_vals[name])
  for name in ("base", "thought"):
    np.testing.assert_allclose(res[f"soft_accuracy_{name}"], np.mean(soft[name]), rtol=1e-4)
    np.testing.assert_allclose(res[f"answer_logprob_{name}"], np.mean(logprob[name]), rtol=1e-4)
  # The thoughts matter: a nonzero mixing weight changes the score.
  assert abs(res["soft_accuracy_thought"] - res["soft_accuracy_base"]) > 1e-6


def test_letter_answers_and_renormalization():
  tok = ByteTokenizer()
  ex = Example(id="c", question="Where?", answer="b",
               meta={"labels": ("a", "b", "c", "d", "e"), "choices": ("x", "y", "z", "u", "v")})
  prefix, answer, kind = qs_eval.soft_answer_text("commonsense_qa", ex)
  assert prefix == "Q: Where?\n(A) x\n(B) y\n(C) z\n(D) u\n(E) v\nA:" and answer == " B\n"
  assert kind == "letter"
  allowed = qs_eval.allowed_ids(tok, qs_eval.UNITS[kind], 261)
  assert sorted(np.flatnonzero(allowed)) == sorted(tok.encode("ABCDE\n"))
  logits = np.random.default_rng(0).normal(size=(2, 261)).astype(np.float32)
  gold = np.asarray([tok.encode("B")[0], tok.encode("z")[0]])  # Allowed, and not allowed.
  got = np.asarray(qs_eval.renormalized_logp(jnp.asarray(logits), jnp.asarray(gold),
                                             jnp.asarray(allowed)))
  for i in range(2):
    np.testing.assert_allclose(got[i], _renorm_logp64(_np64(logits[i]), gold[i], allowed),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Difficult tokens.


def test_decile_table_matches_plain_python_reference(tmp_path):
  rng = np.random.default_rng(0)
  n = 103
  base = np.round(rng.exponential(2.0, n), 1)  # Rounded: many ties.
  thought = base + rng.normal(0, 0.3, n)
  table = qs_eval.decile_table(base, thought)
  order = sorted(range(n), key=lambda i: (base[i], i))
  sizes = [n // 10 + (1 if g < n % 10 else 0) for g in range(10)]
  at = 0
  for g, size in enumerate(sizes):
    idx = order[at:at + size]
    at += size
    row = table["groups"][g]
    assert row["group"] == g and row["count"] == size
    assert row["base_loss_min"] == min(base[i] for i in idx)
    assert row["base_loss_max"] == max(base[i] for i in idx)
    np.testing.assert_allclose(row["base_loss_mean"], sum(base[i] for i in idx) / size)
    np.testing.assert_allclose(row["thought_loss_mean"], sum(thought[i] for i in idx) / size)
    np.testing.assert_allclose(row["delta_mean"],
                               sum(thought[i] - base[i] for i in idx) / size)
    assert row["improved_frac"] == sum(thought[i] < base[i] for i in idx) / size
  assert table["n_tokens"] == n
  np.testing.assert_allclose(table["delta_mean"], np.mean(thought - base))
  path = qs_eval.plot_deciles(table, tmp_path / "d.png")
  assert path.read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="groups"):
    qs_eval.decile_table(base[:5], thought[:5])


# ---------------------------------------------------------------------------------------------
# Zero-shot CoT through the generator hook.


def test_zero_shot_cot_majority_vote_through_the_generator_hook():
  examples = [Example(id="a", question="1+1?", answer="2"),
              Example(id="b", question="2+2?", answer="4")]
  calls = []

  def generate(prompts, req):
    calls.append((list(prompts), req))
    if req.num_samples == 3:  # Rationales.
      assert all(p.endswith("A: Let's think step by step.") for p in prompts)
      return [[f"r{i}{k}" for k in range(3)] for i in range(len(prompts))]
    assert req.greedy and req.num_samples == 1
    finals = {"r00": " 2.", "r01": " 3", "r02": " 2,", "r10": " 5", "r11": " nothing", "r12": " 7"}
    return [[finals[p.split("step.")[1].split("\n")[0]]] for p in prompts]

  res = qs_eval.zero_shot_cot("gsm8k", examples, generate, k=3, max_new_tokens=16,
                              temperature=0.9)
  assert [q["answers"] for q in res["questions"]] == [["2", "3", "2"], ["5", None, "7"]]
  assert [q["majority"] for q in res["questions"]] == ["2", "5"]
  assert res["maj_accuracy"] == 0.5
  np.testing.assert_allclose(res["sample_accuracy"], 2 / 6)
  np.testing.assert_allclose(res["no_answer_frac"], 1 / 6)
  assert calls[1][0][0].endswith("r00\nTherefore, the answer (arabic numerals) is")
  assert qs_eval.extract_cot_answer("commonsense_qa", " (B) because") == "b"
  assert qs_eval.extract_cot_answer("gsm8k", " 1,080 dollars") == "1080"
  assert set(qs_eval.GENERATORS) >= {"base"}


# ---------------------------------------------------------------------------------------------
# The command line.


@pytest.mark.slow
def test_cli_sigterm_resume_and_evaluate(tmp_path):
  """The real commands: SIGTERM mid-run exits cleanly with a checkpoint; a rerun finishes; the
  evaluation CLI reads the checkpoint; a bad key is rejected up front."""
  data = tmp_path / "data" / "gsm8k"
  data.mkdir(parents=True)
  rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
           "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
          for a in range(1, 7) for b in range(1, 4)]
  (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
  (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[14:]))
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "starjax.quiet_star.train",
         "--config=experiments/quiet_star_demo.py", f"--workdir={workdir}",
         "--config.warmup.steps=0", "--config.train.steps=200", "--config.train.ckpt_every=1000",
         "--config.train.progress=False", "--config.train.batch_size=2",
         "--config.train.seq_len=16", "--config.eval.every=0", "--config.eval.at_end=False"]
  env = xla_env.env(devices=1, STARJAX_DATA_DIR=str(tmp_path / "data"))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  import time
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  summary = json.loads(out[out.rindex("{\n"):])
  assert summary["preempted"] and 2 <= summary["step"] < 200
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=1000)
  assert ckpt.latest_step() == summary["step"]
  ckpt.close()
  ev = subprocess.run([sys.executable, "-m", "starjax.quiet_star.evaluate", *cmd[3:],
                       "--config.eval.n_windows=4", "--config.eval.soft_n=2"], cwd=ROOT, env=env, capture_output=True,
                      text=True)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert (workdir / f"eval_step_{summary['step']}" / "difficult_tokens.png").exists()
  bad = subprocess.run(cmd[:5] + ["--config.quiet_star.n_ahed=3"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  # ml_collections rejects the unknown override while parsing flags, naming it.
  assert bad.returncode != 0 and "n_ahed" in bad.stderr and "n_ahead" in bad.stderr
