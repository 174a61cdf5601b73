"""Tests of the trainkit pytest plugin run pytest inside pytest (``pytester``).

Tests that start Ray run the inner session in a subprocess (``runpytest_subprocess``) so
that its cluster lives and dies with that process; the others run in-process.
"""

import pytest

# pytester is enabled in tests/conftest.py (pytest_plugins is only allowed in the top-level conftest)


@pytest.fixture(autouse=True)
def _no_inherited_ray_auth_mode(monkeypatch):
    """Inner pytest sessions must start as from a shell. A ``ray.init()`` earlier in this (outer)
    process sets ``RAY_AUTH_MODE=token`` in os.environ; inherited by an inner session whose HOME
    pytester moved, it makes Ray demand a token file that is not there and the inner Ray dies."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
