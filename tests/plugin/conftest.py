"""Tests of the trainkit pytest plugin run pytest inside pytest (``pytester``).

Tests that start Ray run the inner session in a subprocess (``runpytest_subprocess``) so
that its cluster lives and dies with that process; the others run in-process.
"""

# pytester is enabled in tests/conftest.py (pytest_plugins is only allowed in the top-level conftest)
