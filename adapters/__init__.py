"""Framework glue, installed as ``driftloss.adapters``: ``.torch`` and ``.jax``.

Each adapter provides the hooks the Array API lacks (stop-gradient, exact matmul) and calls the
core with its namespace passed explicitly, which keeps compiled graphs free of namespace lookups.
"""
