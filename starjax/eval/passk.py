"""Repeated-sampling metrics: unbiased pass@k, majority vote, Best-of-k and coverage fits.

All estimators work in float64 and follow `docs/algorithms.md` section 5 (Large Language Monkeys,
V-STaR). With N samples per problem of which C are correct:

* pass@k = 1 - C(N-C, k) / C(N, k), the probability that a uniformly random k-subset of the N
  samples contains a correct one, computed as the product 1 - prod_{j=N-C+1}^{N} (1 - k/j)
  (exactly 1 when N - C < k). Binomial coefficients are never formed, so nothing overflows.
* Best-of-k = (1 / C(N, k)) sum_{i=0}^{N-k} C(N-i-1, k-1) alpha_i, the expected correctness of
  the highest-scored sample of a random k-subset (alpha_i: correctness of the i-th best).
* Coverage c(k) follows an exponentiated power law c(k) = exp(a k^b), a < 0, b < 0.
"""

from __future__ import annotations

import collections
import numbers
from collections.abc import Sequence

import numpy as np


def _check_int(name: str, value: object, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem from `n` samples with `c` correct (float64).

  Raises:
    ValueError: unless 1 <= k <= n and 0 <= c <= n.
  """
  n = _check_int("n", n, 1)
  c = _check_int("c", c, 0)
  k = _check_int("k", k, 1)
  if c > n:
    raise ValueError(f"c={c} correct samples is more than n={n} samples.")
  if k > n:
    raise ValueError(f"pass@{k} needs at least k samples per problem, but n={n}.")
  if n - c < k:
    return 1.0
  j = np.arange(n - c + 1, n + 1, dtype=np.float64)
  return float(1.0 - np.prod(1.0 - k / j))


def _check_ks(ks: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
  if ks is None:
    return np.arange(1, n + 1)
  ks = np.asarray(ks)
  if ks.ndim != 1 or ks.size == 0:
    raise ValueError(f"ks must be a non-empty 1-D sequence of ints, got shape {ks.shape}.")
  if not np.issubdtype(ks.dtype, np.integer):
    raise TypeError(f"ks must be integers, got dtype {ks.dtype}.")
  if ks.min() < 1 or ks.max() > n:
    raise ValueError(f"Every k must be in [1, N={n}] (N = samples per problem); got "
                     f"k in [{ks.min()}, {ks.max()}].")
  return ks


def _as_correct_matrix(correct: np.ndarray | Sequence[Sequence[bool]]) -> np.ndarray:
  m = np.asarray(correct)
  if m.ndim != 2:
    raise ValueError(f"Expected a (problems, samples) matrix, got shape {m.shape}.")
  if m.shape[0] == 0 or m.shape[1] == 0:
    raise ValueError(f"Need at least one problem and one sample, got shape {m.shape}.")
  if m.dtype != bool:
    if not np.isin(m, (0, 1)).all():
      raise ValueError("The correctness matrix must hold booleans (or 0/1).")
    m = m.astype(bool)
  return m


def pass_at_k_curve(correct: np.ndarray | Sequence[Sequence[bool]],
                    ks: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
  """Mean unbiased pass@k over problems for each k in `ks` (default 1..N), float64.

  Args:
    correct: bool (P, N): sample j of problem i is correct.
    ks: sample budgets, each in [1, N].

  Returns:
    float64 (len(ks),).

  Per problem, C(N-C, k)/C(N, k) = prod_{i=0}^{k-1} (1 - C/(N-i)), the same product as in
  `pass_at_k` regrouped so that one cumulative product gives every k; problems with equal C share
  the computation, so the cost is O(N x distinct C).
  """
  m = _as_correct_matrix(correct)
  n = m.shape[1]
  ks = _check_ks(ks, n)
  counts, multiplicity = np.unique(m.sum(axis=1), return_counts=True)
  i = np.arange(n, dtype=np.float64)
  total = np.zeros(n, np.float64)  # Sum over problems of pass@k, for k = 1..n.
  for c, mult in zip(counts, multiplicity):
    # Factor i is (N-C-i)/(N-i); it hits 0 at i = N-C, which makes pass@k = 1 for k > N-C.
    ratio = np.cumprod(np.clip(1.0 - c / (n - i), 0.0, 1.0))
    total += mult * (1.0 - ratio)
  return total[ks - 1] / m.shape[0]


def majority_vote(answers: Sequence[str | None]) -> str | None:
  """The most frequent non-None answer (self-consistency).

  Tie rule (deterministic): among the answers with the highest count, the one whose first
  occurrence in `answers` is earliest wins. None (no answer extracted) is never counted, so it
  only comes out when every answer is None.

  Raises:
    ValueError: `answers` is empty.
  """
  if len(answers) == 0:
    raise ValueError("majority_vote needs at least one answer.")
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  # Counter preserves first-insertion order and max() returns the first maximal item.
  return max(counts, key=counts.__getitem__)


def majority_accuracy(answers: Sequence[Sequence[str | None]], gold: Sequence[str]) -> float:
  """Fraction of problems whose majority-vote answer equals the gold answer.

  Args:
    answers: per problem, the extracted (canonical) answer of each sample; None = no answer.
    gold: per problem, the canonical gold answer.
  """
  if len(answers) != len(gold):
    raise ValueError(f"{len(answers)} answer lists but {len(gold)} gold answers.")
  if len(gold) == 0:
    raise ValueError("majority_accuracy needs at least one problem.")
  return float(np.mean([majority_vote(a) == g for a, g in zip(answers, gold)]))


def best_of_k(scores: np.ndarray | Sequence, correct: np.ndarray | Sequence, k: int) -> float:
  """Unbiased Best-of-k (V-STaR): expected correctness of the top-scored of k random samples.

  Args:
    scores: float (N,) or (P, N) verifier scores, higher is better.
    correct: bool, same shape as `scores`.
    k: subset size, 1 <= k <= N.

  Returns:
    The estimate, averaged over problems for 2-D inputs.

  Tie rule (deterministic): among equal scores the sample with the lower index ranks higher, i.e.
  within a subset the first of the tied top-scored samples is picked. NaN scores are an error.
  """
  s = np.asarray(scores, np.float64)
  z = np.asarray(correct)
  if s.shape != z.shape:
    raise ValueError(f"scores {s.shape} and correct {z.shape} must have the same shape.")
  if s.ndim == 1:
    s, z = s[None], z[None]
  z = _as_correct_matrix(z)
  if np.isnan(s).any():
    raise ValueError("scores contain NaN.")
  n = s.shape[1]
  k = _check_int("k", k, 1)
  if k > n:
    raise ValueError(f"Best-of-{k} needs at least k samples per problem, but N={n}.")
  # w_i = C(N-i-1, k-1) / C(N, k): w_0 = k/N and w_{i+1}/w_i = (N-k-i)/(N-1-i).
  i = np.arange(n - k, dtype=np.float64)
  w = np.zeros(n, np.float64)
  w[0] = k / n
  w[1:n - k + 1] = w[0] * np.cumprod((n - k - i) / (n - 1 - i))
  order = np.argsort(-s, axis=1, kind="stable")  # Stable: ties keep index order.
  ranked = np.take_along_axis(z, order, axis=1)
  return float(np.mean(ranked @ w))


def power_law(k: np.ndarray | float, a: float, b: float) -> np.ndarray:
  """Exponentiated power law c(k) = exp(a k^b)."""
  return np.exp(a * np.power(np.asarray(k, np.float64), b))


def fit_power_law(ks: Sequence[float] | np.ndarray,
                  coverage: Sequence[float] | np.ndarray) -> tuple[float, float]:
  """Fits log c(k) = a k^b to a coverage curve; returns (a, b).

  Points with c <= 0 (log undefined) or c >= 1 (saturated: they carry no information about the
  approach to 1 and break the linearisation) are excluded. The remaining points give a first
  estimate from the linear least-squares fit log(-log c) = log(-a) + b log k, refined by
  scipy's `curve_fit` of log c against a k^b (least squares in log-coverage space). Without scipy
  the linear estimate is returned.

  Raises:
    ValueError: shapes differ, a k is not positive, or fewer than 2 usable points remain.
  """
  k = np.asarray(ks, np.float64)
  c = np.asarray(coverage, np.float64)
  if k.ndim != 1 or k.shape != c.shape:
    raise ValueError(f"ks {k.shape} and coverage {c.shape} must be 1-D of equal length.")
  if not np.all(np.isfinite(k)) or np.any(k <= 0):
    raise ValueError("Every k must be positive and finite.")
  keep = np.isfinite(c) & (c > 0) & (c < 1)
  if np.unique(k[keep]).size < 2:
    raise ValueError(f"Need at least 2 distinct k with 0 < coverage < 1 to fit, got "
                     f"{np.unique(k[keep]).size} (of {k.size} points).")
  k, log_c = k[keep], np.log(c[keep])
  b0, log_neg_a0 = np.polyfit(np.log(k), np.log(-log_c), 1)
  a0 = -float(np.exp(log_neg_a0))
  try:
    from scipy import optimize  # pylint: disable=g-import-not-at-top
  except ImportError:
    return a0, float(b0)
  try:
    (a, b), _ = optimize.curve_fit(lambda x, a, b: a * np.power(x, b), k, log_c,
                                   p0=(a0, float(b0)), maxfev=10_000)
  except (RuntimeError, optimize.OptimizeWarning):
    return a0, float(b0)
  return float(a), float(b)
