"""Quiet-STaR objective settings: one frozen dataclass (static under `jax.jit`).

Step layout for one thought branch (row t of the sequence), with M sampled thought tokens and
T talk steps (S = M + T + 2 forward steps, k = 0..S-1):

  k = 0              the ordinary causal pass over x ("base")
  k = 1              <start-of-thought> (a learned embedding)
  k = 2 .. M+1       sampled thought tokens c_1..c_M (token k is drawn from step k-1's logits)
  k = M+2            <end-of-thought> (a learned embedding); talk step s = 0
  k = M+2+s, s >= 1  teacher-forced x_{t+s}; talk step s predicts x_{t+1+s}

Row t at step k has position id t + k, so every branch equals the explicit sequence
x_0..x_t, start, c_1..c_M, end, x_{t+1}.. run through the plain decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuietStarConfig:
  """Hyperparameters and reference-compatibility switches.

  The defaults reproduce the intended behaviour of the reference implementation
  (ezelikman/quiet-star `modeling_mistral.py`, training script). Each switch that differs between
  the reference and the paper, or fixes a reference bug (spec §1.8), is named "reference" or "fix"
  below.

  Attributes:
    n_ahead: N. The reference samples N - 3 thought tokens in training (start and end included,
      a thought block is N - 1 tokens long).
    n_ahead_talk: T, the number of teacher-forced talk steps (tokens predicted after a thought).
    n_passes: P, thoughts sampled per position (the REINFORCE baseline is taken over them).
    sampled_thought_len_fix: False (reference training): N - 3 sampled tokens. True (fix, matches
      the reference's `infer()`): N - 2 sampled tokens.
    n_thought_tokens: explicit number of sampled thought tokens M; overrides the two above.
    original_loss_weight: w0 in L_LM = w0 * L_base + (1 - w0) * mean_s L_talk_s.
    policy_loss_beta: weight of the REINFORCE loss (reference: 1e6).
    reinforce_temperature: temperature of the log-probabilities in the policy loss (reference: 3).
    thought_temperature: sampling temperature of thought tokens. 1.0 is the reference's effective
      behaviour (its hard Gumbel-softmax ignores tau, so thoughts are always drawn at temperature
      1 even where the code asks for tau = 0.001).
    greedy_thoughts: argmax thoughts (an explicit flag; the reference has no working greedy mode).
    embedding_scale: the start/end embeddings are stored divided by this and used multiplied by it,
      which under Adam is ~scale x the learning rate on them (reference: 100).
    mixing_sigmoid: False (reference): the mixing weight w is the raw head output, unbounded.
      True (fix, as in third-party replications): w = sigmoid(head); then w = 0.5 at init and the
      mixed logits no longer equal the base logits at init.
    clamp_negative_advantage: True (reference `remove_negative_rewards`): A <- max(A, 0).
    policy_mean_over_padding: True (reference): the policy loss is averaged over all
      B * P * (L - 1 - T) cells, padded ones included, so its scale depends on padding.
      False (fix): averaged over the cells that carry a reward.
    include_self_in_baseline: True (reference): the baseline is the mean reward of all P thoughts of
      a position, the thought itself included, i.e. the leave-one-out advantage times (P - 1) / P.
      False (fix): leave-one-out mean (needs P >= 2).
    suppress_ids: token ids never sampled as thought tokens and masked (-1e10) in the policy
      log-probabilities, e.g. the ids of <|startthought|> / <|endthought|> when the vocabulary has
      them (the reference masks them only there, not in the LM losses).
    fill_id: token fed to teacher-forced talk steps whose input lies past the end of the sequence
      (those steps only predict past-the-end targets, which the losses ignore).
    remat_steps: rematerialise each thought/talk step in the backward pass (`jax.checkpoint`).
    step_vjp: differentiate the thought/talk steps through a custom VJP that recomputes each step
      from the final thought K/V buffers (`forward._thought_steps`): one buffer in memory instead
      of one per step. Overrides `remat_steps` for those steps (it recomputes them anyway).
    mixer_init_std: std of the mixing head's first two layers (None: the model's init_std).
    row_blocks: the thought/talk steps run the sequence's rows in this many blocks (speed only;
      results do not depend on it). Rows are independent given the base keys, so each block is
      its own chain of ops, which XLA runs side by side, and attends to base keys up to its last
      row only (2 blocks skip a quarter of the causal block).
  """

  n_ahead: int = 8
  n_ahead_talk: int = 4
  n_passes: int = 2
  sampled_thought_len_fix: bool = False
  n_thought_tokens: int | None = None
  original_loss_weight: float = 0.5
  policy_loss_beta: float = 1e6
  reinforce_temperature: float = 3.0
  thought_temperature: float = 1.0
  greedy_thoughts: bool = False
  embedding_scale: float = 100.0
  mixing_sigmoid: bool = False
  clamp_negative_advantage: bool = True
  policy_mean_over_padding: bool = True
  include_self_in_baseline: bool = True
  suppress_ids: tuple[int, ...] = ()
  fill_id: int = 0
  remat_steps: bool = True
  step_vjp: bool = True
  mixer_init_std: float | None = None
  row_blocks: int = 2

  def __post_init__(self):
    if self.n_sampled < 1:
      raise ValueError(f"Quiet-STaR needs >= 1 sampled thought token, got {self.n_sampled} "
                       f"(n_ahead={self.n_ahead}, n_thought_tokens={self.n_thought_tokens}).")
    if self.n_ahead_talk < 1 or self.n_passes < 1:
      raise ValueError(f"n_ahead_talk and n_passes must be >= 1, got {self.n_ahead_talk}, "
                       f"{self.n_passes}.")
    if not self.include_self_in_baseline and self.n_passes < 2:
      raise ValueError("A leave-one-out baseline (include_self_in_baseline=False) needs "
                       "n_passes >= 2.")
    if self.reinforce_temperature <= 0 or (not self.greedy_thoughts
                                           and self.thought_temperature <= 0):
      raise ValueError("Temperatures must be > 0 (use greedy_thoughts=True for argmax thoughts).")
    if not 0.0 <= self.original_loss_weight <= 1.0:
      raise ValueError(f"original_loss_weight must be in [0, 1], got {self.original_loss_weight}.")
    if self.row_blocks < 1:
      raise ValueError(f"row_blocks must be >= 1, got {self.row_blocks}.")
    if self.embedding_scale <= 0:
      raise ValueError(f"embedding_scale must be > 0, got {self.embedding_scale}.")
    object.__setattr__(self, "suppress_ids", tuple(int(i) for i in self.suppress_ids))

  @property
  def n_sampled(self) -> int:
    """M, the number of sampled thought tokens per branch."""
    if self.n_thought_tokens is not None:
      return self.n_thought_tokens
    return self.n_ahead - (2 if self.sampled_thought_len_fix else 3)

  @property
  def n_steps(self) -> int:
    """S = M + T + 2 forward steps, the base pass included."""
    return self.n_sampled + self.n_ahead_talk + 2

  @property
  def end_step(self) -> int:
    """The step that reads <end-of-thought> (talk step 0)."""
    return self.n_sampled + 2

  def replace(self, **changes: Any) -> QuietStarConfig:
    return dataclasses.replace(self, **changes)
