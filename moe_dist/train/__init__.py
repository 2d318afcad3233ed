"""Training: data, loop, checkpoints."""
