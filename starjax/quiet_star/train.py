r"""Quiet-STaR training on a text corpus, resumable, with metrics, thought samples and evaluation.

Command line (any field can be overridden, e.g. `--config.train.steps=50`):
  python -m starjax.quiet_star.train --config=experiments/quiet_star_demo.py --workdir=DIR

Phases, each resumable from the workdir:
1. Base model: the built-in SmolLM2-135M or any checkpoint (`config.base.pretrained`, loaded with
   `starjax.models.load`), or a `config.model` preset initialised at random. A from-scratch model
   can first be pretrained with the plain LM loss (`config.warmup.steps` > 0), so thoughts have
   something to work with: that phase is an ordinary `starjax.train` run in DIR/warmup.
2. Quiet-STaR (`starjax.quiet_star.objective`) on windows of `train.seq_len` tokens of the corpus
   (`quiet_star.data`); AdamW from `starjax.train.optim`; checkpoints in DIR/checkpoints.
3. Evaluation at the end (`quiet_star.evaluate`, `config.eval`): DIR/eval/.

Resume: the batch of step s is a pure function of (data seed, s) and the thoughts of step s are
drawn with fold_in(key(train.seed), s), so a run killed at any point and rerun with the same
command produces exactly the parameters and metrics of an uninterrupted one. On SIGTERM (TPU
preemption) the loop finishes its step, saves, waits for the write and returns with
`preempted=True`. Unknown config keys and wrong types are errors that name the key, raised before
any work.

Files in the workdir: config.json (the run's config, read by tools), metrics.jsonl and tb/ (per
step: loss, base_loss = L_base, talk_loss_s = L_talk per talk step s, talk_loss (their mean),
talk0_minus_base, mixing_weight (mean w), mixing_weight_abs (mean |w|), policy_loss, lm_loss,
reward and advantage statistics, grad_norm, lr; every `eval.every` steps eval_base_loss / eval_thought_loss on held-out windows),
thoughts.jsonl (every `train.thoughts_every` steps: sampled thoughts decoded as text, with their
position, context, the following tokens, reward, advantage and mixing weight), samples.jsonl (the
same thoughts as readable text, also in TensorBoard).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import config_dict
from tqdm.auto import tqdm

from starjax import configs, tokenizers
from starjax.data import corpora
from starjax.models import llama
from starjax.models.config import PRESETS, ModelConfig
from starjax.parallel import mesh as mesh_lib
from starjax.parallel import sharding
from starjax.quiet_star import data as qs_data
from starjax.quiet_star import evaluate as qs_eval
from starjax.quiet_star import objective
from starjax.quiet_star.config import QuietStarConfig
from starjax.train import checkpoint, optim
from starjax.train import loop as train_loop
from starjax.train import metrics as metrics_lib
from starjax.train import state as state_lib
from starjax.train import step as step_lib
from starjax.train.state import TrainState
from starjax.utils_io import atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

THOUGHTS_FILE = "thoughts.jsonl"
SECTIONS = ("tokenizer", "model", "base", "warmup", "data", "quiet_star", "optimizer", "train",
            "eval", "mesh")
# Per-cell outputs of the train step kept for thought logging (first example of the batch).
_LOGGED = ("thoughts", "reward", "advantage", "mixing_weight", "talk_nll", "base_nll",
           "cell_mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The `train` section: the Quiet-STaR loop.

  Attributes:
    steps: total optimizer steps (a resumed run stops at the same total).
    batch_size: global windows per step.
    seq_len: tokens per window (L).
    log_every: write metrics every N steps.
    ckpt_every: save a checkpoint every N steps (and at the end, and on SIGTERM).
    keep_ckpts: checkpoints kept on disk.
    async_ckpt: write checkpoints in a background thread.
    seed: initialisation seed (mixing head) and thought-sampling seed.
    data_seed: window shuffling seed.
    progress: show a tqdm bar.
    thoughts_every: log decoded thoughts every N steps (and at step 1); 0 disables.
    thought_positions: evenly spaced positions logged per time (plus the best-rewarded thought).
    thought_context: tokens of context shown before each logged thought.
  """

  steps: int
  batch_size: int = 8
  seq_len: int = 128
  log_every: int = 1
  ckpt_every: int = 100
  keep_ckpts: int = 2
  async_ckpt: bool = True
  seed: int = 0
  data_seed: int = 0
  progress: bool = True
  thoughts_every: int = 50
  thought_positions: int = 4
  thought_context: int = 48

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_ckpts"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
    if self.seq_len < 2:
      raise ValueError(f"train.seq_len must be >= 2, got {self.seq_len}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseConfig:
  """The `base` section: where the decoder comes from.

  Attributes:
    pretrained: a name or path for `starjax.models.load` (e.g. "smollm2-135m"); "" initialises the
      `config.model` preset at random (then `config.warmup` can pretrain it).
    thought_init: the start/end-of-thought embeddings start as the embedding of this text's first
      token (the reference uses "---"); "" uses the mean embedding row.
  """

  pretrained: str = ""
  thought_init: str = "---"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A parsed Quiet-STaR experiment config (model and warm-up sections stay raw until the
  tokenizer is known)."""

  tokenizer: str
  model: dict[str, Any]
  base: BaseConfig
  warmup: dict[str, Any] | None
  data: dict[str, Any]
  quiet_star: QuietStarConfig
  optimizer: optim.OptimizerConfig
  train: TrainConfig
  eval: qs_eval.EvalConfig
  mesh: mesh_lib.MeshConfig


def _defaults(cls: type) -> dict[str, Any]:
  """A dataclass's defaults; None ones become typed placeholders, so the command line can set
  them (ml_collections refuses to override a plain None field)."""
  hints = typing.get_type_hints(cls)
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is dataclasses.MISSING:
      continue
    kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
    if f.default is None and len(kinds) == 1 and kinds[0] in (int, float, str, bool):
      out[f.name] = config_dict.placeholder(kinds[0])
    else:
      out[f.name] = f.default
  return out


def default_config() -> config_dict.ConfigDict:
  """Every section with its library defaults; experiment files start from this."""
  c = config_dict.ConfigDict()
  c.tokenizer = "byte"
  c.model = {"preset": "tiny", "dtype": "float32", "remat": "none"}
  c.base = _defaults(BaseConfig)
  c.warmup = {**_defaults(train_loop.TrainConfig), "steps": 0,
              "optimizer": _defaults(optim.OptimizerConfig)}
  c.data = {"task": "gsm8k_text"}
  c.quiet_star = _defaults(QuietStarConfig)
  c.optimizer = _defaults(optim.OptimizerConfig)
  c.train = {**_defaults(TrainConfig), "steps": 100}
  c.eval = _defaults(qs_eval.EvalConfig)
  c.mesh = _defaults(mesh_lib.MeshConfig)
  return c


def _as_dict(x: Any) -> dict[str, Any]:
  if x is None:
    return {}
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _warmup_section(raw: dict[str, Any], base: BaseConfig) -> dict[str, Any] | None:
  """Validates `config.warmup`; None when it is off (steps == 0)."""
  known = [f.name for f in dataclasses.fields(train_loop.TrainConfig)] + ["optimizer"]
  configs.check_keys(raw, known, "config.warmup")
  if not raw.get("steps"):
    return None
  if base.pretrained:
    raise configs.ConfigError("config.warmup.steps > 0 pretrains a model from scratch; it cannot "
                              "be combined with config.base.pretrained.")
  values = dict(raw)
  configs.to_dataclass(optim.OptimizerConfig, values.pop("optimizer", {}),
                       "config.warmup.optimizer")
  configs.to_dataclass(train_loop.TrainConfig, values, "config.warmup")
  return raw


def parse_config(config: Any) -> RunConfig:
  """Validates a ConfigDict (unknown keys and wrong types are errors naming the key)."""
  top = _as_dict(config)
  configs.check_keys(top, list(SECTIONS), "config")
  base = configs.to_dataclass(BaseConfig, top.get("base"), "config.base")
  model = _as_dict(top.get("model"))
  overrides = {k: v for k, v in model.items() if k != "preset"}
  if base.pretrained:
    # The checkpoint fixes the shape; only the numerics can be chosen (the preset is ignored).
    configs.check_keys(overrides, ["dtype", "remat"], "config.model")
    configs.to_dataclass(ModelConfig, {**PRESETS["tiny"], **overrides}, "config.model")
  else:
    name = model.get("preset")
    if name not in PRESETS:
      raise configs.ConfigError(f"config.model.preset={name!r}; known: {sorted(PRESETS)}.")
    configs.to_dataclass(ModelConfig, {**PRESETS[name], **overrides}, "config.model")
  data = _as_dict(top.get("data"))
  task = data.get("task")
  if task not in corpora.BUILDERS:
    raise configs.ConfigError(f"config.data.task={task!r}; known: {sorted(corpora.BUILDERS)}.")
  configs.check_call(corpora.BUILDERS[task], {k: v for k, v in data.items() if k != "task"},
                     "config.data", provided=("tok",))
  return RunConfig(
      tokenizer=str(top.get("tokenizer", "byte")),
      model=model,
      base=base,
      warmup=_warmup_section(_as_dict(top.get("warmup")), base),
      data=data,
      quiet_star=configs.to_dataclass(QuietStarConfig, top.get("quiet_star"),
                                      "config.quiet_star"),
      optimizer=configs.to_dataclass(optim.OptimizerConfig, top.get("optimizer"),
                                     "config.optimizer"),
      train=configs.to_dataclass(TrainConfig, top.get("train"), "config.train"),
      eval=configs.to_dataclass(qs_eval.EvalConfig, top.get("eval"), "config.eval"),
      mesh=configs.to_dataclass(mesh_lib.MeshConfig, top.get("mesh"), "config.mesh"),
  )


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data.


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before touching checkpoints."""

  run: RunConfig
  tok: Any
  model_cfg: ModelConfig
  cfg: QuietStarConfig
  pretrained_lm: Any
  mesh: Mesh


def thought_suppress_ids(cfg: QuietStarConfig, tok: Any, vocab_size: int) -> QuietStarConfig:
  """`cfg` with the thought markers and the embedding rows beyond the tokenizer never sampled."""
  ids = set(cfg.suppress_ids) | {tok.start_thought_id, tok.end_thought_id}
  ids |= set(range(tok.vocab_size, vocab_size))
  return cfg.replace(suppress_ids=tuple(sorted(ids)))


def setup(run: RunConfig) -> Setup:
  """Tokenizer, model config (and pretrained weights), objective settings and mesh."""
  pretrained_lm = None
  overrides = {k: v for k, v in run.model.items() if k != "preset"}
  if run.base.pretrained:
    from starjax import models  # pylint: disable=g-import-not-at-top

    loaded = models.load(run.base.pretrained, dtype=overrides.get("dtype", "float32"))
    if loaded.tokenizer is None:
      raise configs.ConfigError(f"config.base.pretrained={run.base.pretrained!r} has no "
                                "tokenizer.")
    tok, pretrained_lm = loaded.tokenizer, loaded.params
    model_cfg = loaded.cfg.replace(**overrides)
  else:
    tok = tokenizers.load_tokenizer(run.tokenizer)
    model_cfg = configs.to_dataclass(
        ModelConfig, {**PRESETS[run.model["preset"]], "vocab_size": tok.vocab_size, **overrides},
        "config.model")
  if model_cfg.vocab_size < tok.vocab_size:
    raise configs.ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than "
                              f"the tokenizer's {tok.vocab_size}.")
  cfg = thought_suppress_ids(run.quiet_star, tok, model_cfg.vocab_size)
  return Setup(run=run, tok=tok, model_cfg=model_cfg, cfg=cfg, pretrained_lm=pretrained_lm,
               mesh=mesh_lib.make_mesh(run.mesh))


def load_corpus(run: RunConfig, tok: Any) -> corpora.Corpus:
  kwargs = {k: v for k, v in run.data.items() if k != "task"}
  return configs.call_with_config(corpora.BUILDERS[run.data["task"]], kwargs, "config.data",
                                  tok=tok)


def warmup_config(top: dict[str, Any]) -> dict[str, Any]:
  """The `starjax.train` config of the warm-up phase (same tokenizer, model, data and mesh)."""
  w = dict(top["warmup"])
  c = train_loop.default_config().to_dict()
  c["optimizer"].update(w.pop("optimizer", {}) or {})
  c["train"].update(w)
  c.update(tokenizer=top["tokenizer"], model=dict(top["model"]), data=dict(top["data"]),
           mesh=dict(top["mesh"]))
  return c


def _first_token_row(lm: Any, tok: Any, text: str) -> jax.Array | None:
  if not text:
    return None
  ids = tok.encode(text)
  return None if not ids else jnp.asarray(lm["embed"]["embedding"][ids[0]])


# ---------------------------------------------------------------------------------------------
# State and step.


def _mesh_or_none(mesh: Mesh) -> Mesh | None:
  """The mesh for `shard_map` over examples; None on one device (no collectives to set up)."""
  return mesh if mesh.size > 1 else None


def abstract_params(cfg: QuietStarConfig, model_cfg: ModelConfig) -> Any:
  return jax.eval_shape(lambda: objective.init_params(jax.random.key(0), cfg, model_cfg))


def state_shardings(cfg: QuietStarConfig, model_cfg: ModelConfig,
                    tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """Decoder params by the logical-axis rules, thought embeddings and mixing head replicated,
  optimizer moments like their parameters."""
  shapes = abstract_params(cfg, model_cfg)
  rep = sharding.replicated(mesh)
  params = {"lm": sharding.tree_shardings(shapes["lm"], state_lib.param_logical_names(model_cfg),
                                          mesh),
            "thought": jax.tree.map(lambda _: rep, shapes["thought"]),
            "mixer": jax.tree.map(lambda _: rep, shapes["mixer"])}
  opt = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), params,
      transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return TrainState(step=rep, params=params, opt_state=opt)


def _init_state(params: Any, tx: optax.GradientTransformation, shardings: TrainState
                ) -> TrainState:
  def init(p):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
  return jax.jit(init, out_shardings=shardings)(params)


def abstract_state(cfg: QuietStarConfig, model_cfg: ModelConfig, tx: optax.GradientTransformation,
                   mesh: Mesh) -> Any:
  """ShapeDtypeStructs with shardings: the restore target."""
  shapes = abstract_params(cfg, model_cfg)
  tree = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                             opt_state=tx.init(p)), shapes)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree,
                      state_shardings(cfg, model_cfg, tx, mesh))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, cfg: QuietStarConfig,
               model_cfg: ModelConfig, tx: optax.GradientTransformation, schedule: Any,
               seed: int, mesh: Mesh | None) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
  """One AdamW update on the Quiet-STaR loss; thoughts of step s use fold_in(key(seed), s).

  Returns the new state, scalar metrics and the per-cell outputs of the batch's first example
  (for thought logging).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    cells = objective.quiet_star_cells(params, batch, key, cfg, model_cfg, mesh)
    loss, metrics = objective.reduce_cells(cells, cfg)
    talk_w = cells["talk_mask"][:, None].astype(jnp.float32)  # (B, 1, T, L)
    metrics["mixing_weight_abs"] = jax.lax.stop_gradient(
        jnp.sum(jnp.abs(cells["mixing_weight"]) * talk_w)
        / jnp.maximum(talk_w.sum() * cells["mixing_weight"].shape[1], 1.0))
    logged = {k: jax.lax.stop_gradient(cells[k][:1]) for k in _LOGGED}
    logged.update(tokens=batch["tokens"][:1], example_ids=batch["example_ids"][:1])
    return loss, (metrics, logged)

  (_, (metrics, logged)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
             "talk0_minus_base": metrics["talk_loss_0"] - metrics["base_loss"]}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics, logged


def jit_train_step(s: Setup, tx: optax.GradientTransformation, schedule: Any,
                   shardings: TrainState) -> Any:
  """`train_step` jitted with explicit shardings and the old state donated."""
  tc, mesh = s.run.train, s.mesh
  batch_sh = {"tokens": step_lib.batch_sharding(mesh, 2, tc.batch_size),
              "mask": step_lib.batch_sharding(mesh, 2, tc.batch_size),
              "example_ids": step_lib.batch_sharding(mesh, 1, tc.batch_size)}
  rep = sharding.replicated(mesh)

  def step(state, batch):
    with sharding.use_mesh(mesh):
      return train_step(state, batch, cfg=s.cfg, model_cfg=s.model_cfg, tx=tx, schedule=schedule,
                        seed=tc.seed, mesh=_mesh_or_none(mesh))

  return jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep, rep),
                 donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Thought logging.


def thought_records(step: int, logged: dict[str, np.ndarray], tok: Any, cfg: QuietStarConfig,
                    tc: TrainConfig) -> list[dict[str, Any]]:
  """Decoded thoughts of the batch's first window: evenly spaced reward cells (pass 0) and the
  thought with the highest reward."""
  tokens = np.asarray(logged["tokens"][0])
  cells = np.flatnonzero(np.asarray(logged["cell_mask"][0]))
  if len(cells) == 0:
    return []
  reward = np.asarray(logged["reward"][0])  # (P, L)
  picks = [("spaced", 0, int(cells[i])) for i in
           np.unique(np.linspace(0, len(cells) - 1, tc.thought_positions).round().astype(int))]
  p_best, t_best = np.unravel_index(np.argmax(np.where(np.isin(np.arange(len(tokens)), cells),
                                                       reward, -np.inf)), reward.shape)
  picks.append(("best", int(p_best), int(t_best)))
  out = []
  for kind, p, t in picks:
    out.append({
        "step": int(step), "kind": kind, "example_id": int(logged["example_ids"][0]),
        "pass": p, "position": t,
        "context": tok.decode(tokens[max(0, t + 1 - tc.thought_context):t + 1].tolist()),
        "thought": tok.decode(np.asarray(logged["thoughts"][0, p, :, t]).tolist()),
        "next": tok.decode(tokens[t + 1:t + 1 + cfg.n_ahead_talk].tolist()),
        "reward": float(reward[p, t]),
        "advantage": float(logged["advantage"][0, p, t]),
        "mixing_weight": float(logged["mixing_weight"][0, p, 0, t]),
        "base_nll": float(logged["base_nll"][0, t]),
        "talk_nll": float(logged["talk_nll"][0, p, 0, t]),
    })
  return out


def _format_thoughts(records: list[dict[str, Any]]) -> str:
  return "\n\n".join(
      f"[{r['kind']} t={r['position']} p={r['pass']}] ...{r['context']!r} "
      f"<|startthought|>{r['thought']!r}<|endthought|> -> {r['next']!r} "
      f"(reward {r['reward']:+.3f}, w {r['mixing_weight']:+.3f})" for r in records)


def _truncate_jsonl(path: Path, step: int) -> None:
  """Drops the lines of `path` logged after `step` (a resumed run logs them again)."""
  if path.exists():
    atomic_write_jsonl(path, [r for r in metrics_lib.read_metrics(path)
                              if not isinstance(r.get("step"), int) or r["step"] <= step])


# ---------------------------------------------------------------------------------------------
# The run.


def _check_workdir(workdir: Path) -> None:
  if not workdir.parent.is_dir():
    raise FileNotFoundError(f"The parent of the workdir {str(workdir)!r} does not exist: "
                            f"{str(workdir.parent)!r}. Create it or fix --workdir.")
  workdir.mkdir(exist_ok=True)


def _eval_windows(s: Setup, corpus: corpora.Corpus) -> np.ndarray | None:
  if not corpus.eval:
    return None
  try:
    return qs_data.make_windows(corpus.eval, s.run.train.seq_len, s.run.eval.n_windows)
  except ValueError:
    log.warning("The eval text is shorter than one window; no held-out evaluation.")
    return None


def _window_eval(s: Setup, params: Any, windows: np.ndarray) -> dict[str, float]:
  ec = s.run.eval
  losses = qs_eval.window_losses(params, windows, jax.random.key(ec.seed), s.cfg, s.model_cfg,
                                 batch_size=ec.batch_size, mesh=_mesh_or_none(s.mesh))
  base, thought = losses["base_nll"].mean(), losses["thought_nll"].mean()
  return {"eval_base_loss": float(base), "eval_thought_loss": float(thought),
          "eval_thought_minus_base": float(thought - base),
          "eval_mixing_weight": float(losses["mixing_weight"].mean())}


def _initial_params(s: Setup, workdir: Path, top: dict[str, Any]) -> tuple[Any, bool]:
  """(Quiet-STaR params, preempted): pretrained, warmed-up or random decoder + fresh heads."""
  lm = s.pretrained_lm
  if lm is None and s.run.warmup is not None:
    log.info("warm-up: plain LM pretraining into %s", workdir / "warmup")
    res = train_loop.train_and_evaluate(warmup_config(top), workdir / "warmup")
    if res["preempted"]:
      return None, True
    lm = res["state"].params
  if lm is None:
    lm = llama.init_params(s.model_cfg, jax.random.key(s.run.train.seed))
  params = objective.init_params(jax.random.key(s.run.train.seed), s.cfg, s.model_cfg,
                                 lm_params=lm,
                                 init_vector=_first_token_row(lm, s.tok, s.run.base.thought_init))
  return params, False


def train_and_evaluate(config: Any, workdir: str | Path) -> dict[str, Any]:
  """Runs (or resumes) a Quiet-STaR experiment; returns the last metrics and run facts.

  Returns:
    dict with "step", "preempted", "phase" ("warmup" or "quiet_star"), the last logged train
    metrics, "eval" (the final evaluation summary, if it ran) and "state".
  """
  workdir = Path(workdir)
  run = parse_config(config)  # Fail on bad keys before touching the disk.
  top = _as_dict(config)
  _check_workdir(workdir)
  atomic_write_json(workdir / "config.json", json.loads(json.dumps(top, default=str)))
  s = setup(run)
  tc, ec = run.train, run.eval
  if ec.at_end:
    qs_eval.check_task_data(ec)
  corpus = load_corpus(run, s.tok)
  train_windows = qs_data.make_windows(corpus.train, tc.seq_len)
  eval_windows = _eval_windows(s, corpus)
  src = train_loop.RowSource(qs_data.window_rows(train_windows), tc.batch_size, tc.data_seed,
                             s.mesh)
  log.info("data: %d train windows, %d eval windows of %d tokens", len(train_windows),
           0 if eval_windows is None else len(eval_windows), tc.seq_len)

  tx = optim.make_optimizer(run.optimizer, tc.steps)
  schedule = optim.learning_rate_schedule(run.optimizer, tc.steps)
  shardings = state_shardings(s.cfg, s.model_cfg, tx, s.mesh)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=tc.ckpt_every,
                                 keep=tc.keep_ckpts, async_save=tc.async_ckpt)
  writer = metrics_lib.MetricsWriter(workdir)
  thoughts_path = workdir / THOUGHTS_FILE
  meta = {"config": json.loads(json.dumps(top, default=str))}
  result: dict[str, Any] = {"preempted": False, "phase": "quiet_star"}
  thoughts_file = None
  bar = None
  try:
    with checkpoint.PreemptionFlag() as flag:
      start = ckpt.latest_step()
      if start is not None:
        state, _ = ckpt.restore(abstract_state(s.cfg, s.model_cfg, tx, s.mesh))
        log.info("resumed from %s at step %d", ckpt.directory, start)
      else:
        params, preempted = _initial_params(s, workdir, top)
        if preempted:
          return {"preempted": True, "phase": "warmup", "step": 0}
        state = _init_state(params, tx, shardings)
        start = 0
      writer.truncate_after(start)  # Lines of steps after the checkpoint are logged again.
      if jax.process_index() == 0:
        _truncate_jsonl(thoughts_path, start)
        thoughts_file = open(thoughts_path, "a", encoding="utf-8")
      train_fn = jit_train_step(s, tx, schedule, shardings)
      step, steps_done, t0 = start, 0, time.perf_counter()
      bar = tqdm(total=tc.steps, initial=start, desc="quiet-star", disable=not tc.progress,
                 dynamic_ncols=True)
      while step < tc.steps:
        batch = step_lib.device_batch(qs_data.as_batch(src(step)), s.mesh, tc.batch_size)
        state, m, logged = train_fn(state, batch)
        step += 1
        steps_done += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          m["steps_per_s"] = steps_done / (time.perf_counter() - t0)
          writer.write(step, m)
          bar.set_postfix(base=f"{m['base_loss']:.3f}", talk0=f"{m['talk_loss_0']:.3f}",
                          w=f"{m['mixing_weight']:+.3f}", pol=f"{m['policy_loss']:.2e}")
          result.update(train_loss=m["loss"], steps_per_s=m["steps_per_s"], metrics=m)
        if tc.thoughts_every and (step % tc.thoughts_every == 0 or step == 1):
          records = thought_records(step, jax.device_get(logged), s.tok, s.cfg, tc)
          if thoughts_file is not None:
            thoughts_file.writelines(json.dumps(r) + "\n" for r in records)
            thoughts_file.flush()
          writer.write_text(step, "thoughts", _format_thoughts(records))
        if ec.every and eval_windows is not None and step % ec.every == 0:
          writer.write(step, _window_eval(s, state.params, eval_windows))
        ckpt.save(step, state, meta)
        if flag.should_stop(step):
          log.warning("stop signal: saving step %d and exiting", step)
          ckpt.save(step, state, meta, force=True)
          result["preempted"] = True
          break
      else:
        ckpt.save(step, state, meta, force=True)
      bar.close()
      result.update(step=step, state=state)
      if not result["preempted"] and ec.at_end:
        result["eval"] = _final_eval(s, state.params, eval_windows, workdir / "eval", step,
                                     writer)
  finally:
    if bar is not None:
      bar.close()
    if thoughts_file is not None:
      thoughts_file.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return result


def _final_eval(s: Setup, params: Any, windows: np.ndarray | None, out_dir: Path, step: int,
                writer: metrics_lib.MetricsWriter) -> dict[str, Any]:
  """All configured evaluations, once per final step (a rerun of a finished run reuses them)."""
  summary_path = out_dir / "summary.json"
  if summary_path.exists():
    old = json.loads(summary_path.read_text())
    if old.get("step") == step:
      return old
  summary = qs_eval.run_evaluations(s.run.eval, params, s.cfg, s.model_cfg, s.tok, out_dir,
                                    windows=windows, mesh=_mesh_or_none(s.mesh), step=step,
                                    progress=s.run.train.progress)
  writer.write(step, {k: v for k, v in summary.items()
                      if k != "step" and isinstance(v, (int, float))})
  return summary


def evaluate_checkpoint(config: Any, workdir: str | Path, *, step: int | None = None,
                        out_dir: str | Path | None = None) -> dict[str, Any]:
  """Runs `config.eval` on a checkpoint of a finished or running training run."""
  workdir = Path(workdir)
  run = parse_config(config)
  s = setup(run)
  tx = optim.make_optimizer(run.optimizer, run.train.steps)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=run.train.ckpt_every,
                                 keep=run.train.keep_ckpts, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"No Quiet-STaR checkpoint in {workdir / 'checkpoints'}.")
    state, _ = ckpt.restore(abstract_state(s.cfg, s.model_cfg, tx, s.mesh), step=step)
  finally:
    ckpt.close()
  windows = _eval_windows(s, load_corpus(run, s.tok))
  step = int(state.step)
  out = Path(out_dir) if out_dir else workdir / ("eval" if step == run.train.steps
                                                 else f"eval_step_{step}")
  return qs_eval.run_evaluations(run.eval, state.params, s.cfg, s.model_cfg, s.tok, out,
                                 windows=windows, mesh=_mesh_or_none(s.mesh), step=step,
                                 progress=run.train.progress)


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  """`python -m starjax.quiet_star.train --config=experiments/x.py --workdir=DIR`."""
  del argv
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from starjax import parallel  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save phase at INFO.
  parallel.initialize()
  try:
    result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (configs.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  summary = {k: v for k, v in result.items() if k not in ("state", "metrics")}
  print(json.dumps(summary, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags as _config_flags  # pylint: disable=g-import-not-at-top

  _config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  _flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, thoughts, eval).")
  _flags.mark_flags_as_required(["config", "workdir"])
  _app.run(main)
