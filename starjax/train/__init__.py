"""Training: optimizer, train state, steps, checkpoints, metrics."""
