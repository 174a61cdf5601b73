"""Shared fixtures, tiers and Hypothesis profiles for trainkit's own tests.

Tiers: every test is marked with its tier, from its folder: ``unit`` (tests/unit: pure
logic, no Ray, no subprocess), ``integration`` (tests/integration and tests/conformance: a
real local Ray, moto, py-spy, subprocesses), ``property`` (tests/property) and ``plugin``
(tests/plugin). A test under tests/unit that needs a subprocess or a binary says so with
``@pytest.mark.integration`` and runs in the integration tier. ``.ci/run`` runs the unit tier
first (``-m unit``) and stops there on a failure.

Hypothesis: the ``deterministic`` profile (the default) derives every example from the test
itself (``derandomize=True``), so the suite gives the same answer on every run and every
machine. Random exploration is ``--hypothesis-profile=explore`` (``.ci/explore``).

Clusters and S3 come from the trainkit pytest plugin itself (``trainkit_cluster``,
``s3_storage``: one moto server per test process, a fresh bucket per test, the endpoint in
every Ray process of the cluster), as in a user's suite; tests/integration/conftest.py
adds ``ray_up`` on top of the cluster fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

TIERS = ("unit", "integration", "property", "plugin")
_FOLDER_TIER = {"unit": "unit", "integration": "integration", "conformance": "integration",
                "property": "property", "plugin": "plugin"}
_TESTS = Path(__file__).parent

settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile("deterministic")  # `--hypothesis-profile=explore` replaces it at configure time


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        except ValueError:  # a test outside tests/ (pytester's inner sessions)
            continue
        tier = _FOLDER_TIER.get(folder)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests/{folder} has no tier; add it to tests/conftest.py")
        if tier == "unit" and item.get_closest_marker("integration"):
            tier = "integration"
        item.add_marker(tier)
    # The longest tests first (property runs take minutes), each module kept together: with
    # --maxschedchunk=1 (below) xdist hands them out one at a time, so no worker idles at the end
    # while the other works through the property tests.
    items.sort(key=lambda item: _RUN_ORDER.get(_tier_of(item), len(_RUN_ORDER)))


_RUN_ORDER = {"property": 0, "integration": 1, "plugin": 2, "unit": 3}


def _tier_of(item) -> str:
    return next((m.name for m in item.iter_markers() if m.name in TIERS), "")


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "maxschedchunk", 1) is None:
        config.option.maxschedchunk = 1

pytest_plugins = ["pytester"]  # the plugin tests in tests/plugin run pytest inside pytest

# Many Ray processes start at once under pytest -n 2 on 2 cores: give GCS longer than Ray's default
# 30 s to come up rather than fail a test's cluster start (inherited by every Ray this suite starts).
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture
def storage_path(tmp_path):
    """An absolute local storage_path for a run, private to the test."""
    path = tmp_path / "storage"
    path.mkdir()
    return str(path)


@pytest.fixture(autouse=True)
def _no_ambient_storage_env(monkeypatch, tmp_path):
    """A run that forgets storage_path writes under tmp_path, never into ~/trainkit_results."""
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", os.fspath(tmp_path / "default_storage"))
