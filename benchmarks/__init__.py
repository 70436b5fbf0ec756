"""Benchmarks of the train step, sampling, the input pipeline, memory and device scaling."""
