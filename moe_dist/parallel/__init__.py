"""Parallel layout, launcher bootstrap and the collectives of expert, tensor and data parallelism."""
