"""Offline subject-to-video metrics and the benchmark runner."""
