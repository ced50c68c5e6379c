"""`train_and_evaluate(config, workdir)`: the language-model training run behind
`python -m starjax.train`, importable from Colab.

Resume order: the latest checkpoint in `workdir/checkpoints` if there is one, otherwise a fresh
initialisation. The batch of step s is a pure function of (data seed, s) (grain random access), so
a resumed run sees exactly the batches an uninterrupted one would, with no iterator state to save.
On SIGTERM (TPU preemption) the loop finishes the current step, saves, waits for the write and
returns with `preempted=True`; rerunning the same command continues from there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import config_dict
from tqdm.auto import tqdm

from starjax import configs, tokenizers
from starjax.data import corpora
from starjax.models import abacus
from starjax.models import positions as positions_lib
from starjax.models.config import PRESETS, ModelConfig
from starjax.parallel import mesh as mesh_lib
from starjax.parallel import multihost
from starjax.train import batching, checkpoint, optim
from starjax.train import metrics as metrics_lib
from starjax.train import state as state_lib
from starjax.train import step as step_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Loop settings (the `train` section of an experiment config).

  Attributes:
    steps: total optimizer steps of the run (a resumed run stops at the same total).
    batch_size: global rows per step.
    seq_len: tokens per row.
    pack: pack several examples per row (segment ids keep them apart) instead of padding.
    eval_every: evaluate every N steps (and at the end); 0 disables periodic eval.
    eval_batches: batches per evaluation (the eval split is cycled if smaller).
    log_every: write metrics every N steps.
    ckpt_every: save a checkpoint every N steps (and at the end, and on SIGTERM).
    keep_ckpts: checkpoints kept on disk.
    async_ckpt: write checkpoints in a background thread.
    seed: parameter initialisation seed.
    data_seed: shuffling seed.
    progress: show a tqdm bar.
    position_jitter: train on randomised positions, each token skipping a position id with this
      probability (`batching.jitter_positions`); 0 keeps them contiguous.
  """

  steps: int
  batch_size: int = 16
  seq_len: int = 256
  pack: bool = True
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10
  ckpt_every: int = 100
  keep_ckpts: int = 3
  async_ckpt: bool = True
  seed: int = 0
  data_seed: int = 0
  progress: bool = True
  position_jitter: float = 0.0

  def __post_init__(self):
    if not 0 <= self.position_jitter < 1:
      raise ValueError(f"train.position_jitter must be in [0, 1), got {self.position_jitter}.")
    for name in ("steps", "batch_size", "seq_len", "log_every", "ckpt_every", "keep_ckpts"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A parsed experiment config."""

  model: ModelConfig
  mesh: mesh_lib.MeshConfig
  optimizer: optim.OptimizerConfig
  train: TrainConfig
  tokenizer: str
  data: dict[str, Any]


_SECTIONS = ("model", "mesh", "optimizer", "train", "tokenizer", "data")


def _defaults(cls: type) -> dict[str, Any]:
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


def default_config() -> config_dict.ConfigDict:
  """Every section with its library defaults, so any field can be overridden from the CLI.

  Experiment files start from this and change what they need:
  `c = loop.default_config(); c.train.steps = 300; ...`.
  """
  c = config_dict.ConfigDict()
  c.tokenizer = "byte"
  c.model = {"preset": "tiny", "dtype": "float32", "remat": "none"}
  c.mesh = _defaults(mesh_lib.MeshConfig)
  c.optimizer = _defaults(optim.OptimizerConfig)
  c.train = {"steps": 1000, **_defaults(TrainConfig)}
  c.data = {"task": "arithmetic"}
  return c


def parse_config(config: Any, vocab_size: int | None = None) -> RunConfig:
  """Validates a ConfigDict (unknown keys and wrong types are errors) into a RunConfig."""
  top = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  configs.check_keys(top, list(_SECTIONS), "config")
  model_section = dict(top.get("model") or {})
  name = model_section.pop("preset", None)
  if name is None:
    raise configs.ConfigError("config.model.preset is required (e.g. 'tiny').")
  if vocab_size is not None:
    model_section.setdefault("vocab_size", vocab_size)
  if name not in PRESETS:
    raise configs.ConfigError(f"config.model.preset={name!r}; known: {sorted(PRESETS)}.")
  # Merge with the preset's raw fields, not a built config, so derived fields (head_dim)
  # follow overrides of dim or n_heads.
  model = configs.to_dataclass(ModelConfig, {**PRESETS[name], **model_section}, "config.model")
  data = dict(top.get("data") or {})
  task = data.get("task")
  if task not in corpora.BUILDERS:
    raise configs.ConfigError(f"config.data.task={task!r}; known tasks: {sorted(corpora.BUILDERS)}.")
  configs.check_call(corpora.BUILDERS[task], {k: v for k, v in data.items() if k != "task"},
                     "config.data", provided=("tok",))
  return RunConfig(
      model=model,
      mesh=configs.to_dataclass(mesh_lib.MeshConfig, top.get("mesh"), "config.mesh"),
      optimizer=configs.to_dataclass(optim.OptimizerConfig, top.get("optimizer"),
                                     "config.optimizer"),
      train=configs.to_dataclass(TrainConfig, top.get("train"), "config.train"),
      tokenizer=str(top.get("tokenizer", "byte")),
      data=data,
  )


class RowSource:
  """Deterministic batches: the rows of step s depend only on (seed, s) and the process.

  Each process returns only its own rows of the global batch: those its devices hold on `mesh`
  (`step.process_rows`), or without a mesh an equal contiguous slice per process.
  """

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int,
               mesh: Mesh | None = None, position_jitter: float = 0.0, digit_offset: int = 0):
    n = len(rows["inputs"])
    if n == 0:
      raise ValueError("The dataset produced no rows.")
    self.rows = rows
    self.batch_size = batch_size
    self.mesh = mesh
    self.seed = seed
    self.position_jitter = position_jitter
    self.digit_offset = digit_offset
    self._index = grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(
        batch_size, drop_remainder=True)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = np.asarray(self._index[step])
    if self.mesh is not None:
      local = step_lib.process_rows(self.mesh, self.batch_size)
    else:
      n = self.batch_size // jax.process_count()
      local = slice(jax.process_index() * n, (jax.process_index() + 1) * n)
    batch = {k: v[idx[local]] for k, v in self.rows.items()}
    if self.position_jitter:  # Drawn for the global batch: the same on any number of processes.
      rng = np.random.default_rng([self.seed, step])
      batch["positions"] = batching.jitter_positions(self.rows["positions"][idx], rng,
                                                     self.position_jitter)[local]
    if self.digit_offset:  # One offset per example, also drawn for the global batch.
      rng = np.random.default_rng([self.seed, step, 1])
      batch["digit_offset"] = abacus.example_offsets(self.rows["segment_ids"][idx], rng,
                                                     self.digit_offset)[local]
    return batch


def _check_workdir(workdir: Path) -> None:
  if not workdir.parent.is_dir():
    raise FileNotFoundError(f"The parent of the workdir {str(workdir)!r} does not exist: "
                            f"{str(workdir.parent)!r}. Create it or fix --workdir.")
  workdir.mkdir(exist_ok=True)


def evaluate(eval_fn, params, source: RowSource, n_batches: int, mesh) -> dict[str, float]:
  """Token-weighted loss and accuracy over `n_batches` eval batches."""
  totals = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
  for i in range(n_batches):
    stats = jax.device_get(eval_fn(params, step_lib.device_batch(source(i), mesh,
                                                                  source.batch_size)))
    for k in totals:
      totals[k] += float(stats[k])
  n = max(totals["tokens"], 1.0)
  return {"eval_loss": totals["loss_sum"] / n, "eval_accuracy": totals["correct"] / n}


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
  """Trains a language model as configured; returns the last metrics and run facts.

  Returns:
    dict with "step", "preempted", "train_loss" (last logged), eval metrics and
    "steps_per_s".
  """
  workdir = Path(workdir)
  tmp = parse_config(config)  # Fail on bad keys before touching the disk.
  tok = tokenizers.load_tokenizer(tmp.tokenizer)
  run = parse_config(config, vocab_size=tok.vocab_size)
  if run.model.vocab_size < tok.vocab_size:
    raise configs.ConfigError(f"config.model.vocab_size={run.model.vocab_size} is smaller than "
                              f"the tokenizer's {tok.vocab_size}.")
  tc = run.train
  if run.model.position_coupling and not isinstance(tok, tokenizers.ByteTokenizer):
    raise configs.ConfigError(f"config.model.position_coupling={run.model.position_coupling!r} "
                              f"needs the byte tokenizer, not {run.tokenizer!r}.")
  if run.model.position_coupling and tc.position_jitter:
    raise configs.ConfigError("config.train.position_jitter would scramble the coupled positions "
                              "of config.model.position_coupling; set one of them only.")
  _check_workdir(workdir)

  data_kwargs = {k: v for k, v in run.data.items() if k != "task"}
  corpus = configs.call_with_config(corpora.BUILDERS[run.data["task"]], data_kwargs, "config.data",
                                    tok=tok)
  position_fn = positions_lib.position_fn(run.model)
  train_rows = batching.make_rows(corpus.train, tc.seq_len, tok.pad_id, pack=tc.pack,
                                  position_fn=position_fn)
  eval_rows = batching.make_rows(corpus.eval, tc.seq_len, tok.pad_id, pack=tc.pack,
                                 position_fn=position_fn)
  mesh = mesh_lib.make_mesh(run.mesh)
  train_src = RowSource(train_rows, tc.batch_size, tc.data_seed, mesh, tc.position_jitter,
                        run.model.digit_offset)
  eval_src = RowSource(eval_rows, tc.batch_size, tc.data_seed + 1, mesh) if len(
      eval_rows["inputs"]) >= tc.batch_size else None
  log.info("data: %d train rows, %d eval rows", len(train_rows["inputs"]),
           len(eval_rows["inputs"]))

  tx = optim.make_optimizer(run.optimizer, tc.steps)
  schedule = optim.learning_rate_schedule(run.optimizer, tc.steps)
  shardings = state_lib.state_shardings(run.model, tx, mesh)
  train_fn = step_lib.jit_train_step(run.model, tx, mesh, shardings, tc.batch_size, schedule)
  eval_fn = step_lib.jit_eval_step(run.model, mesh, shardings.params, tc.batch_size)

  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=tc.ckpt_every,
                                 keep=tc.keep_ckpts, async_save=tc.async_ckpt)
  writer = metrics_lib.MetricsWriter(workdir)
  meta = {"config": config.to_dict() if hasattr(config, "to_dict") else dict(config)}
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(state_lib.abstract_train_state(run.model, tx, mesh))
    writer.truncate_after(start)
    log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    state = state_lib.create_train_state(run.model, tx, mesh, jax.random.key(tc.seed))
    start = 0
    writer.truncate_after(0)  # Lines from a run killed before its first checkpoint.

  result: dict[str, Any] = {"preempted": False}
  step = start
  t0, steps_done = time.perf_counter(), 0
  bar = tqdm(total=tc.steps, initial=start, desc="train",
             disable=not tc.progress or not multihost.is_primary(), dynamic_ncols=True)
  try:
    with checkpoint.PreemptionFlag() as flag:
      while step < tc.steps:
        state, m = train_fn(state, step_lib.device_batch(train_src(step), mesh, tc.batch_size))
        step += 1
        steps_done += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          m["steps_per_s"] = steps_done / (time.perf_counter() - t0)
          writer.write(step, m)
          bar.set_postfix(loss=f"{m['loss']:.4f}")
          result["train_loss"] = m["loss"]
          result["steps_per_s"] = m["steps_per_s"]
        if eval_src is not None and ((tc.eval_every and step % tc.eval_every == 0)
                                     or step == tc.steps):
          ev = evaluate(eval_fn, state.params, eval_src, tc.eval_batches, mesh)
          writer.write(step, ev)
          result.update(ev)
        ckpt.save(step, state, meta)
        if flag.should_stop(step):
          log.warning("stop signal: saving step %d and exiting", step)
          ckpt.save(step, state, meta, force=True)
          result["preempted"] = True
          break
      else:
        ckpt.save(step, state, meta, force=True)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  result["step"] = step
  result["state"] = state
  return result
