"""Command-line tools (AOT compilation for abstract TPU slices)."""
