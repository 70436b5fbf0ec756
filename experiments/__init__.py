"""Experiment runner, statistics and the generated results page (never imported by the library)."""
