"""STaR loop: filtering, hint removal, fine-tune-from-base, step schedule, kill-and-resume."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from starjax import models, parallel, tokenizers
from starjax.data.tasks import Example, Task
from starjax.star import STaR, STaRConfig, finetune_steps, params_hash
from starjax.star import loop as star_loop
from starjax.train import finetune as finetune_lib
from starjax.train import optim

HINT = "(HINT"


class ToyTask(Task):
  """A task whose 'correctness' is a deterministic function of the completion text.

  With a random byte-level model this gives a mix of right and wrong answers, so every branch of
  the loop (keep, rationalize, drop) runs without training a model first.
  """

  name = "toy"
  stop = ("\n\n",)

  def load(self, split):
    n = {"train": 12, "test": 6}[split]
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    return [Example(id=f"{split}{i}", question=f"{i}", answer=str(int(rng.integers(0, 3))),
                    meta={"g": str(i % 2)}) for i in range(n)]

  def prompt(self, ex):
    return f"Q{ex.question}:"

  def prompt_with_hint(self, ex):
    return f"Q{ex.question} {HINT} {ex.answer}):"

  def extract_answer(self, completion):
    return str(sum(map(ord, completion)) % 3)

  def group(self, ex):
    return ex.meta["g"]


TOK = tokenizers.ByteTokenizer()
CFG = models.preset("tiny", vocab_size=TOK.vocab_size, dim=32, n_heads=2, n_kv_heads=1,
                    ffn_dim=64)
STAR_CFG = STaRConfig(iterations=2, greedy=False, temperature=1.0, samples_per_question=2,
                      max_new_tokens=8, gen_batch_size=16, eval_batch_size=16, base_steps=3,
                      batch_size=4, seq_len=32, eval_splits=("test",),
                      optimizer=optim.OptimizerConfig(lr=1e-2, schedule="constant"))


@pytest.fixture(scope="module")
def base_params():
  return models.init_params(CFG, jax.random.key(0))


def _runner(workdir, base_params, **overrides):
  return STaR(task=ToyTask(), model_cfg=CFG, base_params=base_params, tokenizer=TOK,
              config=dataclasses.replace(STAR_CFG, **overrides), workdir=workdir,
              mesh=parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1]),
              progress=False)


def _strip_times(history):
  out = []
  for h in history:
    h = {k: v for k, v in h.items() if k != "wall_s"}
    out.append(h)
  return out


@pytest.fixture(scope="module")
def uninterrupted(base_params, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("star_ref")
  return workdir, _runner(workdir, base_params).run()


def test_step_schedule():
  cfg = STaRConfig()
  assert [finetune_steps(cfg, n) for n in range(1, 6)] == [40, 48, 57, 69, 82]
  assert finetune_steps(dataclasses.replace(cfg, max_steps=50), 5) == 50
  with pytest.raises(ValueError, match="never evaluates on its training split"):
    STaRConfig(eval_splits=("train",))


def test_filtering_and_hint_removal(uninterrupted):
  workdir, history = uninterrupted
  task = ToyTask()
  by_id = {ex.id: ex for ex in task.load("train")}
  for n in (1, 2):
    d = workdir / f"iter_{n}"
    samples = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines()]
    rat = [json.loads(x) for x in (d / "rationalized.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in (d / "kept.jsonl").read_text().splitlines()]
    assert samples and kept
    correct = {(r["id"], r["completion"]) for r in samples + rat if r["correct"]}
    for r in kept:
      # Wrong answers are never saved; every kept completion was checked correct.
      assert (r["id"], r["completion"]) in correct
      assert task.is_correct(by_id[r["id"]], r["completion"])
      # The saved prompt is the hint-free one, also for rationalized examples.
      assert r["prompt"] == task.prompt(by_id[r["id"]])
      assert HINT not in r["prompt"] + r["completion"]
    # Rationalization only retries questions with no correct sample, with the hint.
    solved = {r["id"] for r in samples if r["correct"]}
    assert all(r["hint"] for r in rat)
    assert {r["id"] for r in rat} == set(by_id) - solved
    assert any(r["source"] == "rationalized" for r in kept) or not any(r["correct"] for r in rat)
    # At most max_kept_per_question per question.
    ids = [r["id"] for r in kept]
    assert len(ids) == len(set(ids))
    m = history[n]
    assert m["train_coverage"] == len(solved) / 12
    assert m["kept_examples"] == len(kept)


def test_every_finetune_starts_from_the_base(uninterrupted, base_params):
  workdir, history = uninterrupted
  base_hash = history[0]["base_params_hash"]
  assert base_hash == params_hash(base_params)
  for n in (1, 2):
    ft = json.loads((workdir / f"iter_{n}" / "finetune.json").read_text())
    assert ft["start_params_hash"] == base_hash
    assert ft["steps"] == finetune_steps(STAR_CFG, n)
  # ...and the fine-tuned models differ from the base (training happened).
  assert history[1]["start_params_hash"] == base_hash


def test_finetune_receives_base_params_each_iteration(base_params, tmp_path, monkeypatch):
  seen = []
  original = finetune_lib.finetune

  def spy(cfg, params, examples, **kw):
    seen.append(params_hash(params))
    return original(cfg, params, examples, **kw)

  monkeypatch.setattr(finetune_lib, "finetune", spy)
  _runner(tmp_path, base_params).run()
  assert seen == [params_hash(base_params)] * 2


def test_loss_mask_covers_exactly_the_completion(base_params, tmp_path):
  runner = _runner(tmp_path, base_params)
  rows = [{"prompt": "Q1:", "completion": " abc"}]
  ex = runner._encode(rows)[0]
  n_prompt = len(TOK.encode("Q1:", add_bos=True))
  n_completion = len(TOK.encode(" abc", add_eos=True))
  assert list(ex.loss_mask) == [0] * n_prompt + [1] * n_completion


STAGES = ["generate", "rationalize", "finetune", "save", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_resume_at_each_stage(stage, uninterrupted, base_params, tmp_path,
                                       monkeypatch):
  _, reference = uninterrupted
  calls = {"n": 0}

  def crash_on(target, name, nth):
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
      calls["n"] += 1
      if calls["n"] == nth:
        raise KeyboardInterrupt(f"killed in {stage}")
      return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)

  # Crash the second time the stage runs, i.e. inside iteration 2 (or the iteration-1 eval).
  if stage == "generate":
    original = STaR._generate

    def gen(self, params, examples, *, hint, seed):
      if not hint and (calls.setdefault("g", 0) or True):
        calls["g"] += 1
        if calls["g"] == 2:
          raise KeyboardInterrupt("killed in generate")
      return original(self, params, examples, hint=hint, seed=seed)

    monkeypatch.setattr(STaR, "_generate", gen)
  elif stage == "rationalize":
    original = STaR._generate

    def gen(self, params, examples, *, hint, seed):
      if hint:
        calls["r"] = calls.get("r", 0) + 1
        if calls["r"] == 2:
          raise KeyboardInterrupt("killed in rationalize")
      return original(self, params, examples, hint=hint, seed=seed)

    monkeypatch.setattr(STaR, "_generate", gen)
  elif stage == "finetune":
    crash_on(finetune_lib, "finetune", 2)
  elif stage == "save":
    crash_on(star_loop.params_io, "save_params", 2)
  else:
    crash_on(STaR, "evaluate", 3)  # base eval, iteration 1 eval, then iteration 2.

  with pytest.raises(KeyboardInterrupt):
    _runner(tmp_path, base_params).run()
  monkeypatch.undo()
  resumed = _runner(tmp_path, base_params).run()
  assert _strip_times(resumed) == _strip_times(reference)
  # Nothing half-written is left behind.
  assert not list(Path(tmp_path).rglob("*.tmp"))


def test_resuming_under_a_different_config_is_refused(tmp_path):
  import experiments.star_arithmetic as demo
  from starjax import configs
  from starjax.star import experiment
  cfg = demo.get_config()
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "config.json").write_text(json.dumps({"task": {"name": "other"}}))
  with pytest.raises(configs.ConfigError, match="different config"):
    experiment.run_experiment(cfg, tmp_path / "w")


def test_rationalizations_that_repeat_the_hint_are_not_kept(base_params, tmp_path):
  class Leaky(ToyTask):
    def hint_leaked(self, ex, completion):
      return True  # Every rationalization "leaks": none may be kept.

  runner = _runner(tmp_path, base_params, iterations=1)
  runner.task = Leaky()
  runner.run()
  kept = [json.loads(x) for x in (tmp_path / "iter_1" / "kept.jsonl").read_text().splitlines()]
  assert all(r["source"] == "generated" for r in kept)


def test_overlong_finetune_examples_are_dropped_not_truncated():
  from starjax.train import batching
  ok = batching.completion_example([1, 2], [3, 4])
  long = batching.completion_example([1] * 40, [3, 4])
  assert batching.fits(ok, 8) and not batching.fits(long, 8)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="fits seq_len"):
    finetune_lib.finetune(CFG, models.init_params(CFG, jax.random.key(0)), [long], steps=1,
                          batch_size=1, seq_len=8, opt=optim.OptimizerConfig(), mesh=mesh,
                          pad_id=0)
