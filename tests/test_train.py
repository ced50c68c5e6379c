"""Losses, masks, batching, optimizer, config errors, and checkpoint/resume of the train loop."""

import json
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
from ml_collections import config_dict

from starjax import configs, models
from starjax.train import batching, checkpoint, loop, losses, optim
from starjax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- losses and masks


def test_masked_cross_entropy_matches_float64_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)) * 3
  targets = rng.integers(0, 7, (3, 5))
  mask = (rng.random((3, 5)) > 0.4).astype(np.float64)
  loss, stats = losses.masked_cross_entropy(jnp.asarray(logits, jnp.float32),
                                            jnp.asarray(targets), jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-6)
  assert float(stats["tokens"]) == mask.sum()


def test_masked_tokens_contribute_nothing():
  cfg = models.preset("tiny", vocab_size=64)
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(1)
  ex = batching.completion_example(rng.integers(3, 64, 6).tolist(), rng.integers(3, 64, 5).tolist())
  rows = batching.pad_rows([ex], 16, 0)
  # Prompt tokens are never targets: the mask starts at the first completion token.
  np.testing.assert_array_equal(rows["loss_mask"][0, :10], [0] * 5 + [1] * 5)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  grad = jax.jit(jax.grad(lambda p, b: step_lib.lm_loss(cfg, p, b)[0]))
  g1 = grad(params, batch)
  # Change every masked target (prompt and padding) to something else.
  masked = rows["loss_mask"] == 0
  other = dict(batch, targets=jnp.where(masked, (batch["targets"] + 7) % 64, batch["targets"]))
  g2 = grad(params, other)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... while changing one completion target does change the gradient.
  j = int(np.argmax(rows["loss_mask"][0]))
  g3 = grad(params, dict(batch, targets=batch["targets"].at[0, j].add(1)))
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
             for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g3)))


def test_packed_and_padded_rows_give_the_same_loss():
  cfg = models.preset("tiny", vocab_size=64)
  params = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(2)
  exs = [batching.completion_example(rng.integers(3, 64, int(n)).tolist(),
                                     rng.integers(3, 64, int(m)).tolist())
         for n, m in rng.integers(2, 8, (6, 2))]
  padded = batching.pad_rows(exs, 16, 0)
  packed = batching.pack_rows(exs, 32, 0)
  assert len(packed["inputs"]) < len(padded["inputs"])
  assert packed["segment_ids"].max() > 1
  loss_fn = jax.jit(lambda p, b: step_lib.lm_loss(cfg, p, b)[1])
  a = loss_fn(params, {k: jnp.asarray(v) for k, v in padded.items()})
  b = loss_fn(params, {k: jnp.asarray(v) for k, v in packed.items()})
  assert float(a["tokens"]) == float(b["tokens"])
  np.testing.assert_allclose(float(a["loss_sum"]), float(b["loss_sum"]), rtol=1e-5)


def test_batching_layout_and_errors():
  ex = batching.Example([5, 6, 7, 8], [0, 1, 1, 1])
  rows = batching.pad_rows([ex], 5, pad_id=0)
  np.testing.assert_array_equal(rows["inputs"][0], [5, 6, 7, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 0, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, -1, -1])
  np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="differ in length"):
    batching.Example([1, 2], [1])
  with pytest.raises(ValueError, match="Example 0 has 4 tokens"):
    batching.pad_rows([ex], 2, 0, truncate=False)
  packed = batching.pack_rows([ex, ex, ex], 7, 0)
  np.testing.assert_array_equal(packed["segment_ids"][0], [1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(packed["positions"][0], [0, 1, 2, 0, 1, 2, -1])


def test_jitter_positions_randomises_gaps_per_example():
  exs = [batching.Example([1, 2, 3, 4], [0, 1, 1, 1]), batching.Example([5, 6, 7], [0, 1, 1])]
  rows = batching.pack_rows(exs, 8, pad_id=0)  # One row: 3 + 2 tokens, then 3 pads.
  rng = np.random.default_rng(0)
  draws = [batching.jitter_positions(rows["positions"], rng, 0.3) for _ in range(200)]
  for pos in draws:
    seg = rows["segment_ids"][0]
    for s in (1, 2):  # Each example starts at 0 and advances by 1 or 2 per token.
      p = pos[0][seg == s]
      assert p[0] == 0 and np.all((np.diff(p) >= 1) & (np.diff(p) <= 2)), p
    np.testing.assert_array_equal(pos[0][seg == 0], -1)
  gaps = np.concatenate([np.diff(d[0][:3]) for d in draws])
  assert abs(np.mean(gaps == 2) - 0.3) < 0.06  # Skips at the requested rate.
  np.testing.assert_array_equal(batching.jitter_positions(rows["positions"], rng, 0),
                                rows["positions"])


def test_row_source_jitter_is_a_function_of_seed_and_step():
  exs = [batching.Example(list(range(1, 9)), [1] * 8) for _ in range(8)]
  rows = batching.pad_rows(exs, 8, pad_id=0)
  a, b = (loop.RowSource(rows, 4, seed=3, position_jitter=0.5) for _ in range(2))
  np.testing.assert_array_equal(a(5)["positions"], b(5)["positions"])
  assert not np.array_equal(a(5)["positions"], a(6)["positions"])
  np.testing.assert_array_equal(loop.RowSource(rows, 4, seed=3)(5)["positions"][0],
                                [0, 1, 2, 3, 4, 5, 6, -1])
  with pytest.raises(ValueError, match="position_jitter"):
    loop.TrainConfig(steps=1, position_jitter=1.0)


def test_schedule_and_weight_decay_mask():
  cfg = optim.OptimizerConfig(lr=1.0, warmup_steps=10, schedule="linear", end_lr_ratio=0.0)
  sched = optim.learning_rate_schedule(cfg, 110)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  const = optim.learning_rate_schedule(optim.OptimizerConfig(lr=2.0, schedule="constant"), 5)
  assert float(const(3)) == 2.0
  # Decay hits matrices, never norm scales (which are 2-D under scanned layers).
  mcfg = models.preset("tiny", vocab_size=64)
  params = models.init_params(mcfg, jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimizerConfig(lr=0.0, weight_decay=0.5, clip_norm=None), 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(upd["layers"]["input_norm"]["scale"]).max()) == 0.0
  with pytest.raises(ValueError, match="schedule"):
    optim.OptimizerConfig(schedule="exp")


def test_loss_falls_on_a_tiny_task():
  cfg = models.preset("tiny", vocab_size=32)
  tx = optim.make_optimizer(optim.OptimizerConfig(lr=1e-2, warmup_steps=5), 60)
  from starjax.parallel import make_mesh
  from starjax.train import state as state_lib
  mesh = make_mesh()
  state = state_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
  step = step_lib.jit_train_step(cfg, tx, mesh, state_lib.state_shardings(cfg, tx, mesh), 8)
  # A fixed cyclic pattern: perfectly predictable after the first token.
  seq = (np.arange(33)[None] * 3 + np.arange(8)[:, None]) % 32
  ex = [batching.Example(s.tolist(), [1] * 33) for s in seq]
  batch = step_lib.device_batch(batching.pad_rows(ex, 32, 0), mesh)
  first = last = None
  for i in range(60):
    state, m = step(state, batch)
    first = float(m["loss"]) if i == 0 else first
    last = float(m["loss"])
  assert first > 3.0 and last < 0.5 * first


# ---------------------------------------------------------------- the loop and its config


def tiny_run_config(**train):
  c = config_dict.ConfigDict()
  c.tokenizer = "byte"
  c.model = dict(preset="tiny", dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.data = dict(task="arithmetic", digits=(1, 2), n_train_per_digit=60, n_eval_per_digit=8,
                seed=0)
  c.optimizer = dict(lr=3e-3, warmup_steps=3, schedule="cosine")
  c.train = dict(steps=20, batch_size=8, seq_len=64, eval_every=0, eval_batches=1, log_every=5,
                 ckpt_every=5, keep_ckpts=2, progress=False)
  c.train.update(train)
  return c


def test_config_errors_name_the_key(tmp_path):
  bad = tiny_run_config()
  bad.train.stepz = 3
  with pytest.raises(configs.ConfigError, match=r"config\.train\.stepz"):
    loop.train_and_evaluate(bad, tmp_path / "w")
  bad = tiny_run_config().to_dict()  # ConfigDict itself refuses the bad type; a plain dict not.
  bad["train"]["steps"] = "ten"
  with pytest.raises(configs.ConfigError, match=r"config\.train\.steps='ten'"):
    loop.train_and_evaluate(bad, tmp_path / "w")
  bad = tiny_run_config()
  bad.data.digitz = (1,)
  with pytest.raises(configs.ConfigError, match=r"config\.data\.digitz"):
    loop.train_and_evaluate(bad, tmp_path / "w")
  bad = tiny_run_config()
  bad.model.n_kv_heads = 3
  with pytest.raises(configs.ConfigError, match="config.model"):
    loop.train_and_evaluate(bad, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # Rejected before any work or any file.
  # Overriding the width re-derives head_dim instead of keeping the preset's.
  run = loop.parse_config(tiny_run_config())
  assert run.model.head_dim == 32 // 2


def test_missing_workdir_parent_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loop.train_and_evaluate(tiny_run_config(), tmp_path / "nope" / "w")
  assert not (tmp_path / "nope").exists()


def _params(result):
  return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, loop.train_and_evaluate(tiny_run_config(), workdir)


def test_loop_writes_metrics_and_checkpoints(uninterrupted):
  workdir, result = uninterrupted
  assert result["step"] == 20 and not result["preempted"]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_lines = [x for x in lines if "loss" in x]
  assert [x["step"] for x in train_lines] == [5, 10, 15, 20]
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert any("eval_loss" in x for x in lines)
  assert list((workdir / "tb").iterdir())
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [15, 20]


def test_sigterm_then_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
  _, ref = uninterrupted
  workdir = tmp_path / "w"
  original = loop.RowSource.__call__

  def call(self, step):
    if step == 9 and self.batch_size == 8 and not getattr(call, "fired", False):
      call.fired = True
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 10 is being prepared.
    return original(self, step)

  monkeypatch.setattr(loop.RowSource, "__call__", call)
  first = loop.train_and_evaluate(tiny_run_config(), workdir)
  assert first["preempted"] and first["step"] == 10
  assert checkpoint.Checkpointer(workdir / "checkpoints", save_every=5).latest_step() == 10
  monkeypatch.setattr(loop.RowSource, "__call__", original)
  second = loop.train_and_evaluate(tiny_run_config(), workdir)
  assert second["step"] == 20 and not second["preempted"]
  for a, b in zip(_params(second), _params(ref)):
    np.testing.assert_array_equal(a, b)
  steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(x)]
  assert steps == [5, 10, 15, 20]  # No duplicated or lost metric lines across the restart.


def test_corrupt_checkpoint_is_reported_and_kept(uninterrupted, tmp_path):
  import shutil
  src, _ = uninterrupted
  workdir = tmp_path / "w"
  shutil.copytree(src, workdir)
  latest = workdir / "checkpoints" / "20"
  # Truncate the largest array data file (the parameters and moments live there).
  victim = max((p for p in (latest / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:100])
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  with pytest.raises(checkpoint.CheckpointError, match="checkpoints"):
    loop.train_and_evaluate(tiny_run_config(steps=25), workdir)
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@pytest.mark.slow
def test_cli_sigterm_and_resume(tmp_path):
  """The real command: SIGTERM mid-run exits cleanly with a checkpoint; a rerun finishes."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "starjax.train", "--config=experiments/pretrain_tiny.py",
         f"--workdir={workdir}", "--config.train.steps=400", "--config.train.ckpt_every=1000",
         "--config.train.log_every=1", "--config.train.progress=False",
         "--config.data.n_train_per_digit=50", "--config.train.batch_size=4",
         "--config.train.seq_len=64"]
  env = xla_env.env(devices=1)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  import time
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  summary = json.loads(out[out.rindex("{"):])
  assert summary["preempted"] and 3 <= summary["step"] < 400
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=1000)
  assert ckpt.latest_step() == summary["step"]
  ckpt.close()
  # Unknown keys are rejected up front by the CLI.
  bad = subprocess.run(cmd[:4] + ["--config.train.nope=1"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "nope" in bad.stderr
