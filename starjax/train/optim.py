"""Optimizer: AdamW with warmup, a decay schedule and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """AdamW and learning-rate schedule settings.

  Attributes:
    lr: peak learning rate.
    warmup_steps: linear warmup from 0 to `lr`.
    schedule: "constant", "linear" or "cosine" decay after warmup, to `lr * end_lr_ratio` at
      `decay_steps`.
    decay_steps: length of warmup + decay; defaults to the run's total steps.
    end_lr_ratio: final learning rate as a fraction of `lr`.
    weight_decay: decoupled weight decay, applied to matrices only (not norms or biases).
    b1, b2, eps: Adam moments.
    clip_norm: global gradient-norm clip (None disables it).
  """

  lr: float = 1e-3
  warmup_steps: int = 0
  schedule: str = "cosine"
  decay_steps: int | None = None
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in ("constant", "linear", "cosine"):
      raise ValueError(f"schedule={self.schedule!r}; expected 'constant', 'linear' or 'cosine'.")
    if self.lr < 0 or self.warmup_steps < 0:
      raise ValueError("lr and warmup_steps must be >= 0.")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Warmup then constant/linear/cosine decay."""
  decay_steps = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, decay_steps, end)
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  else:
    after = optax.linear_schedule(cfg.lr, end, decay_steps - cfg.warmup_steps)
  if cfg.warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """clip -> AdamW(schedule), with weight decay on weight matrices only.

  Scanned layers add a leading "layers" axis, which makes norm scales and biases 2-D, so the decay
  mask goes by parameter name as well as rank.
  """
  def mask(params):
    def keep(path, p):
      name = getattr(path[-1], "key", "")
      return p.ndim >= 2 and name not in ("scale", "bias")
    return jax.tree_util.tree_map_with_path(keep, params)

  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*parts)
