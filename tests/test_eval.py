"""Repeated-sampling metrics against brute force, fits, plots, checkpoint loading and the CLI."""

import itertools
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starjax import models, tokenizers
from starjax import utils_io as fileio
from starjax.data.arithmetic_task import ArithmeticTask
from starjax.eval import checkpoints, passk, plots, repeated
from starjax.parallel import mesh as mesh_lib
from starjax.train import checkpoint as ckpt_lib
from starjax.train import loop, optim
from starjax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# pass@k


def _brute_pass_at_k(n, c, k):
  correct = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return np.mean([any(correct[i] for i in s) for s in subsets], dtype=np.float64)


def test_pass_at_k_equals_enumeration_of_all_subsets():
  for n in range(1, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        expected = _brute_pass_at_k(n, c, k)
        assert abs(passk.pass_at_k(n, c, k) - expected) < 1e-12, (n, c, k)
        assert abs(passk.pass_at_k(n, c, k) - (1 - math.comb(n - c, k) / math.comb(n, k))) < 1e-12


def test_pass_at_k_is_stable_for_large_n():
  # C(10000, 5000) overflows float64; the product form does not.
  value = passk.pass_at_k(10_000, 3, 5000)
  assert abs(value - (1 - 0.5 ** 3)) < 1e-3
  assert passk.pass_at_k(10_000, 0, 10_000) == 0.0
  assert passk.pass_at_k(10_000, 1, 10_000) == 1.0


def test_curve_is_mean_over_problems():
  rng = np.random.default_rng(0)
  m = rng.random((7, 8)) < np.linspace(0, 1, 7)[:, None]
  curve = passk.pass_at_k_curve(m)
  expected = [np.mean([passk.pass_at_k(8, int(row.sum()), k) for row in m]) for k in range(1, 9)]
  np.testing.assert_allclose(curve, expected, rtol=0, atol=1e-13)
  assert curve.dtype == np.float64
  np.testing.assert_allclose(passk.pass_at_k_curve(m, [2, 8]), [expected[1], expected[7]])
  np.testing.assert_allclose(passk.pass_at_k_curve(m.astype(int), [3]), [expected[2]])
  assert np.all(np.diff(curve) >= -1e-15)


@pytest.mark.parametrize("n,c,k", [(4, 0, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, 0),
                                   (0, 0, 1)])
def test_pass_at_k_bad_input(n, c, k):
  with pytest.raises(ValueError):
    passk.pass_at_k(n, c, k)


def test_pass_at_k_bad_types_and_curve_errors():
  with pytest.raises(TypeError):
    passk.pass_at_k(4, 1.5, 1)
  with pytest.raises(TypeError):
    passk.pass_at_k(True, 1, 1)
  m = np.ones((2, 4), bool)
  with pytest.raises(ValueError, match="k in"):
    passk.pass_at_k_curve(m, [5])
  with pytest.raises(ValueError, match="k in"):
    passk.pass_at_k_curve(m, [0, 1])
  with pytest.raises(ValueError, match="at least one"):
    passk.pass_at_k_curve(np.zeros((0, 4), bool))
  with pytest.raises(ValueError, match="at least one"):
    passk.pass_at_k_curve(np.zeros((3, 0), bool))
  with pytest.raises(ValueError, match="matrix"):
    passk.pass_at_k_curve([True, False])
  with pytest.raises(ValueError, match="booleans"):
    passk.pass_at_k_curve([[0, 2]])


# --------------------------------------------------------------------------------------------
# Majority vote and Best-of-k


def test_majority_vote_ties_and_none():
  assert passk.majority_vote(["1", "2", "2", "1"]) == "1"  # Tie: earliest first occurrence.
  assert passk.majority_vote(["2", "1", "1", "2"]) == "2"
  assert passk.majority_vote(["3", "1", "1"]) == "1"
  assert passk.majority_vote([None, None, None, "7"]) == "7"  # None never wins...
  assert passk.majority_vote([None, None]) is None  # ...unless all are None.
  assert passk.majority_vote([None, "a", None, "b", "b"]) == "b"
  for _ in range(3):  # Deterministic across calls.
    assert passk.majority_vote(["x", "y", "z"]) == "x"
  with pytest.raises(ValueError):
    passk.majority_vote([])


def test_majority_accuracy():
  answers = [["1", "2", "2"], [None, None], ["5", "4"], ["9"]]
  assert passk.majority_accuracy(answers, ["2", "0", "4", "9"]) == 0.5
  with pytest.raises(ValueError):
    passk.majority_accuracy(answers, ["1"])


def _brute_best_of_k(scores, correct, k):
  vals = []
  for s in itertools.combinations(range(len(scores)), k):
    best = s[int(np.argmax([scores[i] for i in s]))]  # argmax: first of the tied maxima.
    vals.append(correct[best])
  return np.mean(vals, dtype=np.float64)


def test_best_of_k_equals_enumeration():
  rng = np.random.default_rng(1)
  for n in range(1, 8):
    for _ in range(5):
      scores = rng.integers(0, 3, n).astype(float)  # Many ties.
      correct = rng.random(n) < 0.5
      for k in range(1, n + 1):
        assert abs(passk.best_of_k(scores, correct, k)
                   - _brute_best_of_k(scores, correct, k)) < 1e-12, (scores, correct, k)
  scores, correct = rng.normal(size=(4, 6)), rng.random((4, 6)) < 0.5
  expected = np.mean([_brute_best_of_k(s, z, 3) for s, z in zip(scores, correct)])
  assert abs(passk.best_of_k(scores, correct, 3) - expected) < 1e-12
  # k = 1 is the mean correctness; k = N picks the best-scored sample.
  assert abs(passk.best_of_k(scores[0], correct[0], 1) - correct[0].mean()) < 1e-12
  assert passk.best_of_k(scores[0], correct[0], 6) == float(correct[0][np.argmax(scores[0])])
  with pytest.raises(ValueError):
    passk.best_of_k(scores, correct, 7)
  with pytest.raises(ValueError):
    passk.best_of_k(scores[:, :3], correct, 2)
  with pytest.raises(ValueError):
    passk.best_of_k([np.nan, 1.0], [True, False], 1)


# --------------------------------------------------------------------------------------------
# Power-law fit


def test_power_law_fit_recovers_parameters():
  ks = np.unique(np.geomspace(1, 1000, 40).astype(int))
  a, b = -1.7, -0.35
  c = passk.power_law(ks, a, b)
  fa, fb = passk.fit_power_law(ks, c)
  assert abs(fa - a) < 1e-6 and abs(fb - b) < 1e-6
  # Noisy: 2% multiplicative noise on log c.
  noisy = np.exp(np.log(c) * (1 + 0.02 * np.random.default_rng(0).normal(size=ks.size)))
  fa, fb = passk.fit_power_law(ks, noisy)
  assert abs(fa - a) < 0.05 * abs(a) and abs(fb - b) < 0.05 * abs(b)


def test_power_law_fit_excludes_saturated_points_and_rejects_too_few():
  ks = np.arange(1, 21)
  c = passk.power_law(ks, -2.0, -0.5)
  c[0], c[-3:] = 0.0, 1.0  # Excluded, not fitted.
  fa, fb = passk.fit_power_law(ks, c)
  assert abs(fa + 2.0) < 1e-6 and abs(fb + 0.5) < 1e-6
  with pytest.raises(ValueError, match="at least 2"):
    passk.fit_power_law([1, 2, 3], [0.0, 0.5, 1.0])
  with pytest.raises(ValueError):
    passk.fit_power_law([0, 1], [0.2, 0.3])
  with pytest.raises(ValueError):
    passk.fit_power_law([1, 2], [0.2])


def test_plot_writes_png(tmp_path):
  ks = np.arange(1, 17)
  cov = passk.power_law(ks, -1.0, -0.5)
  path = plots.plot_coverage(tmp_path / "sub" / "coverage.png", ks, cov, fit=(-1.0, -0.5),
                             majority=0.4, title="t")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path / "sub") == ["coverage.png"]  # No temporary files left.
  assert path.stat().st_mode & 0o777 == 0o644
  plots.plot_coverage(tmp_path / "one.png", [1], [0.3])  # A single point also works.


def test_atomic_writer_keeps_old_file_on_error(tmp_path):
  path = fileio.write_text_atomic(tmp_path / "a.json", "old")
  with pytest.raises(RuntimeError):
    with fileio.atomic_writer(path) as f:
      f.write("partial")
      raise RuntimeError("boom")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


# --------------------------------------------------------------------------------------------
# Scoring, checkpoint loading and end-to-end runs on a tiny random model.

TASK_KW = {"digits": (1, 2), "n_train_per_digit": 5, "n_test_per_digit": 2, "ood_digits": ()}


def test_score_samples_with_known_completions():
  task = ArithmeticTask(**TASK_KW)
  exs = task.load("test")
  ref = [task.reference_completion(ex) for ex in exs]
  wrong = "no answer here"
  rows = [[ref[0]] * 4,  # 4/4
          [wrong, ref[1], wrong, wrong],  # 1/4, majority is the only answer -> correct
          [wrong] * 4,  # 0/4
          [ref[2], ref[3], ref[3], ref[2]]]  # 2/4, tie -> first (ref[2] is wrong for ex 3)
  metrics, records = repeated.score_samples(task, exs, rows)
  assert [r["num_correct"] for r in records] == [4, 1, 0, 2]
  assert metrics["pass@1"] == pytest.approx((4 + 1 + 0 + 2) / 16)
  assert metrics["pass@4"] == pytest.approx(3 / 4)
  assert [r["majority_correct"] for r in records] == [True, True, False, False]
  assert metrics["majority_accuracy"] == 0.5
  assert metrics["per_group"]["1"]["pass@1"] == pytest.approx(5 / 8)
  assert metrics["per_group"]["2"]["majority_accuracy"] == 0.0
  assert metrics["no_answer_fraction"] == pytest.approx(7 / 16)
  with pytest.raises(ValueError, match="same"):
    repeated.score_samples(task, exs, rows[:3] + [rows[3][:2]])


def _tiny_run_config():
  c = loop.default_config()
  c.model.preset = "tiny"
  c.model.max_seq_len = 128
  c.data = {"task": "arithmetic", "digits": (1,)}
  c.train.steps = 1
  return c


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory):
  """A training workdir with one checkpoint of a randomly initialised tiny model."""
  workdir = tmp_path_factory.mktemp("run")
  config = _tiny_run_config()
  run = loop.parse_config(config, vocab_size=tokenizers.ByteTokenizer().vocab_size)
  tx = optim.make_optimizer(run.optimizer, 10)
  # Random weights of the right tree without compiling an init (slow on a busy CPU); the std is
  # larger than the 0.02 init so that logits are sharp enough for samples to differ.
  shapes = jax.eval_shape(lambda: models.init_params(run.model, jax.random.key(0)))
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.normal(0, 0.08, s.shape), s.dtype), shapes)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  with ckpt_lib.Checkpointer(workdir / "checkpoints", save_every=1, async_save=False) as ck:
    ck.save(7, state, {"config": config.to_dict()}, force=True)
  return workdir, run.model, jax.device_get(state.params)


def test_load_params_from_workdir(run_workdir):
  workdir, cfg, params = run_workdir
  got_cfg, got, spec = checkpoints.load_params_from_workdir(workdir)
  assert got_cfg == cfg and spec == "byte"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), params)
  with pytest.raises(FileNotFoundError, match="step 3"):
    checkpoints.load_params_from_workdir(workdir, step=3)
  with pytest.raises(FileNotFoundError):
    checkpoints.load_params_from_workdir(workdir / "missing")


def _check_outputs(out: Path, n_samples: int):
  results = json.loads((out / "results.json").read_text())
  records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
  assert (out / "coverage.png").read_bytes()[:4] == b"\x89PNG"
  assert len(records) == results["n_problems"]
  assert all(len(r["samples"]) == n_samples for r in records)
  frac = np.mean([np.mean([s["correct"] for s in r["samples"]]) for r in records])
  assert results["pass@1"] == pytest.approx(frac, abs=1e-12)
  assert results["pass_at_k"]["k"] == list(range(1, n_samples + 1))
  assert results["pass_at_k"]["value"][0] == results["pass@1"]
  return results, records


def test_run_repeated_sampling_end_to_end(run_workdir, tmp_path):
  workdir, cfg, _ = run_workdir
  task = ArithmeticTask(**TASK_KW)
  exs = task.load("test")[:3]
  _, params, _ = checkpoints.load_params_from_workdir(workdir)
  tok = tokenizers.ByteTokenizer()
  kw = dict(num_samples=4, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=0,
            mesh=mesh_lib.make_mesh(), batch_size=8, progress=False)
  results = repeated.run_repeated_sampling(task, exs, cfg, params, tok, out_dir=tmp_path, **kw)
  got, records = _check_outputs(tmp_path, 4)
  assert got["pass@1"] == results["pass@1"] and got["n_problems"] == 3
  assert len({s["text"] for r in records for s in r["samples"]}) > 1  # Samples differ.
  assert set(got["per_group"]) == {"1", "2"} and got["sampling"]["num_samples"] == 4


def test_run_from_config(run_workdir, tmp_path):
  workdir, _, _ = run_workdir
  c = repeated.default_config()
  c.task.kwargs = TASK_KW
  c.n_problems = 3
  c.sampling.update(num_samples=4, max_new_tokens=16, batch_size=8)
  c.model.checkpoint = str(workdir)
  c.progress = False
  results = repeated.run_from_config(c, tmp_path / "out")
  got, _ = _check_outputs(tmp_path / "out", 4)
  assert got["metadata"]["model"]["step"] == 7 and results["n_problems"] == 3
  bad = c.to_dict()
  bad["sampling"]["temprature"] = 0.5
  with pytest.raises(repeated.configs.ConfigError, match="temprature"):
    repeated.run_from_config(bad, tmp_path / "bad")
  c.model.pretrained = "some-model"
  with pytest.raises(repeated.configs.ConfigError, match="exactly one"):
    repeated.run_from_config(c, tmp_path / "bad")


def test_run_from_config_pretrained(run_workdir, tmp_path, monkeypatch):
  workdir, _, _ = run_workdir
  c = repeated.default_config()
  c.task.kwargs = TASK_KW
  c.n_problems = 3
  c.sampling.update(num_samples=4, max_new_tokens=16, batch_size=8)
  c.model.pretrained = "fake-model"
  c.progress = False
  monkeypatch.setattr(repeated, "find_pretrained_loader", lambda: None)
  with pytest.raises(repeated.configs.ConfigError, match="starjax.models.load"):
    repeated.run_from_config(c, tmp_path / "none")

  def fake_load(name, *, mesh=None):
    assert name == "fake-model"
    cfg, params, _ = checkpoints.load_params_from_workdir(workdir, mesh=mesh)
    return types.SimpleNamespace(cfg=cfg, params=params, tokenizer=tokenizers.ByteTokenizer())

  monkeypatch.setattr(repeated, "find_pretrained_loader", lambda: fake_load)
  repeated.run_from_config(c, tmp_path / "out")
  got, _ = _check_outputs(tmp_path / "out", 4)
  assert got["metadata"]["model"]["pretrained"] == "fake-model"


def test_cli_rejects_unknown_config_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "starjax.eval.repeated",
       "--config=experiments/repeated_arithmetic.py", "--config.sampling.bogus_key=1",
       f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "bogus_key" in proc.stderr
  assert not list(tmp_path.iterdir())
