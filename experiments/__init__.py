"""Experiments and benchmarks that use `lminf_jax`, `models` and `converters`."""
