"""Mesh and logical axis rules, train state and step, checkpoints, the training loop and metrics."""
