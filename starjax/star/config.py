"""STaR outer-loop settings."""

from __future__ import annotations

import dataclasses

from starjax.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class STaRConfig:
  """Settings of the STaR loop (Zelikman et al. 2022, Algorithm 1).

  Attributes:
    iterations: outer iterations n = 1..iterations.
    samples_per_question: rationales drawn per training question (1 = the paper's greedy run).
    greedy: argmax decoding for rationale generation (the paper uses temperature 0.01 nucleus
      sampling, i.e. effectively greedy); with samples_per_question > 1 set greedy=False.
    temperature, top_p: sampling settings when not greedy.
    max_new_tokens: rationale length cap.
    gen_batch_size: prompts per sampler call.
    n_train_questions: questions per iteration (a fresh seeded subset each iteration); None = all.
    rationalize: retry wrong questions with the answer as a hint; keep those then right, saved
      without the hint.
    max_kept_per_question: distinct correct rationales kept per question.
    few_shot_train: also save the few-shot prefix into fine-tuning examples (paper: helps).
    union: fine-tune on the union of all iterations' kept sets (default: this iteration's only).
    base_steps, step_growth, max_steps: fine-tune steps int(base_steps * step_growth**(n-1)),
      capped at max_steps (paper: 40 * 1.2^(n-1)).
    batch_size, seq_len, pack: fine-tuning batches.
    position_jitter: fine-tune on randomised positions (`starjax.train.batching.jitter_positions`),
      e.g. to keep what a base model trained that way learned; 0 = contiguous.
    optimizer: fine-tuning optimizer (restarted from the base model every iteration).
    eval_splits: held-out splits evaluated after each iteration (never the train split).
    n_eval: examples per eval split (None = all).
    eval_batch_size: prompts per sampler call during evaluation.
    hash_params: record a hash of the params every fine-tune starts from (proves "from base").
    seed: seeds subsets, sampling and fine-tuning.
  """

  iterations: int = 8
  samples_per_question: int = 1
  greedy: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  max_new_tokens: int = 160
  gen_batch_size: int = 64
  n_train_questions: int | None = None
  rationalize: bool = True
  max_kept_per_question: int = 1
  few_shot_train: bool = False
  union: bool = False
  base_steps: int = 40
  step_growth: float = 1.2
  max_steps: int | None = None
  batch_size: int = 8
  seq_len: int = 512
  pack: bool = True
  position_jitter: float = 0.0
  optimizer: OptimizerConfig = dataclasses.field(
      default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_steps=10, schedule="constant"))
  eval_splits: tuple[str, ...] = ("test",)
  n_eval: int | None = None
  eval_batch_size: int = 128
  hash_params: bool = True
  seed: int = 0

  def __post_init__(self):
    if self.iterations < 1 or self.samples_per_question < 1 or self.base_steps < 1:
      raise ValueError("iterations, samples_per_question and base_steps must be >= 1.")
    if "train" in self.eval_splits:
      raise ValueError("STaR never evaluates on its training split; remove 'train' from "
                       "eval_splits.")
    if self.samples_per_question > 1 and self.greedy:
      raise ValueError("samples_per_question > 1 needs greedy=False (greedy samples are equal).")


def finetune_steps(cfg: STaRConfig, iteration: int) -> int:
  """Fine-tuning steps of iteration n (1-based): int(base * growth^(n-1)), capped."""
  steps = int(cfg.base_steps * cfg.step_growth ** (iteration - 1))
  return min(steps, cfg.max_steps) if cfg.max_steps else steps
