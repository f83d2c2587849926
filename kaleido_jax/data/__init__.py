"""Synthetic multi-subject videos, reference preprocessing, the construction pipeline and Grain loading."""
