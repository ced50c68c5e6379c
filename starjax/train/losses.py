"""Token-level losses with masks, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood (B, T) of `targets` under `logits` (B, T, V), in f32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean NLL over tokens where `mask` is nonzero; masked tokens add nothing, not even gradient.

  Returns:
    (loss, stats) with stats "loss_sum", "tokens" and "correct" (argmax hits) over masked tokens.
  """
  mask = mask.astype(jnp.float32)
  nll = token_nll(logits, targets)
  # `where`, not multiply: a masked position with a non-finite logit must not leak NaN.
  nll = jnp.where(mask > 0, nll, 0.0) * mask
  tokens = mask.sum()
  loss_sum = nll.sum()
  correct = ((jnp.argmax(logits, -1) == targets) * mask).sum()
  loss = loss_sum / jnp.maximum(tokens, 1.0)
  return loss, {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
