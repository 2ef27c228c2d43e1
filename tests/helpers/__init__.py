"""Helpers shared by the tests: generated checkpoints, running the CLI, reference formulas,
and fault injection for Dask workers."""
