"""pytest configuration of the conformance suite: the backend under test, skips, xfails, fixtures.

``--trainkit-backend=NAME`` (declared by the trainkit pytest plugin; declared here too when
the plugin is absent) picks the backend: a registered name or ``module:attr``; default
``$TRAINKIT_BACKEND``, else ``ray``. For each case:

* a required capability the backend lacks -> skipped, reason ``missing capability: X``;
* a divergence declared for this backend -> ``xfail`` whose reason is the backend's
  observed behaviour;
* a case whose feature is not in this checkout yet (hang diagnosis before the watchdog)
  -> ``xfail`` with a reason starting ``pending:``;
* a failure is re-raised as ``ConformanceFailure`` naming the case id and its rule.

Fixture ``tk`` gives a case its ``Harness``. A private local Ray is started once per
process for backends that need one. The ``Collector`` prints the table by category.
Runs in the pytest process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest

import conformance.broken  # noqa: F401 - registers the broken-* backends before the plugin checks names
from conformance.case import info_of
from conformance.harness import Harness, ray_for, resolve_backend
from conformance.report import Collector
from trainkit.backends.api import ELASTIC, MULTI_WORKER


NAME_KEY = pytest.StashKey[str]()  # config.stash: the name of the backend under test
BACKEND_KEY = pytest.StashKey[object]()  # config.stash: the backend object, once it has loaded


class ConformanceFailure(AssertionError):
    """A backend broke a rule of the contract; the message names the case and the rule."""


def pytest_addoption(parser):
    try:
        parser.addoption("--trainkit-backend", dest="trainkit_backend", default=None,
                         help="backend for the conformance suite (registered name or module:attr)")
    except (ValueError, argparse.ArgumentError):
        pass  # the trainkit pytest plugin already declares it


def _backend_name(config) -> str:
    return (config.getoption("trainkit_backend", default=None) or os.environ.get("TRAINKIT_BACKEND")
            or "ray")


def pytest_configure(config):
    for line in ("requires(capability): a backend capability the case needs",
                 "extension: behaviour trainkit adds beyond Ray Train 2.60"):
        config.addinivalue_line("markers", line)
    name = _backend_name(config)
    config.stash[NAME_KEY] = name
    if _collector(config) is None:  # the runner passes its own
        config.pluginmanager.register(Collector(name), Collector.name)


def _collector(config):
    for plugin in config.pluginmanager.get_plugins():
        if isinstance(plugin, Collector):
            return plugin
    return None


def _pending(info) -> str | None:
    if info.pending == "hang_watchdog":
        has = importlib.util.find_spec("trainkit.diagnostics") is not None
        if not has:
            return ("pending: the hang watchdog (HangConfig -> hang_detected events, diagnostics/ "
                    "folder, HangDetectedError) is not in this checkout yet")
    return None


def pytest_itemcollected(item):
    info = info_of(item)
    if info is not None:  # -k REPORT-003 and -k "report barrier" select by case id and category
        item.extra_keyword_matches.update({info.id, info.category})
        for cap in info.requires:
            item.add_marker(pytest.mark.requires(cap))
        if info.extension:
            item.add_marker(pytest.mark.extension)


def pytest_collection_modifyitems(config, items):
    name = config.stash[NAME_KEY]
    try:
        backend = resolve_backend(name)
    except Exception as e:  # noqa: BLE001 - every case reports the same clear error
        reason = f"backend {name!r} cannot be loaded: {type(e).__name__}: {e}"
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))
        return
    config.stash[BACKEND_KEY] = backend
    collector = _collector(config)
    if collector is not None:
        collector.backend = name
        collector.version = backend_version(name, backend)
    caps = frozenset(getattr(backend, "capabilities", ()))
    for item in items:
        info = info_of(item)
        if info is None:
            continue
        missing = [c for c in info.requires if c not in caps]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"missing capability: {', '.join(missing)}"))
            continue
        div = info.divergence_for(getattr(backend, "name", name)) or info.divergence_for(name)
        if div is not None:
            item.add_marker(pytest.mark.xfail(reason=div.reason, run=div.run, strict=False))
            continue
        pending = _pending(info)
        if pending:
            item.add_marker(pytest.mark.xfail(reason=pending, run=False, strict=False))
    # Group cases by group shape: a warm worker group is reused only by a fit of the same shape.
    items.sort(key=_shape_order)


def _shape_order(item) -> int:
    info = info_of(item)
    if info is None:
        return 1
    if ELASTIC in info.requires:
        return 3  # elastic groups take every CPU: last
    return 0 if MULTI_WORKER in info.requires else 2


def backend_version(name: str, backend) -> str:
    v = getattr(backend, "version", None)
    if v:
        return str(v)
    import trainkit

    return f"trainkit {trainkit.__version__}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    info = info_of(item)
    try:
        return (yield)
    except Exception as e:  # noqa: BLE001 - pytest outcomes (skip, xfail) are BaseExceptions, not caught
        if info is None or isinstance(e, ConformanceFailure):
            raise
        detail = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        raise ConformanceFailure(f"{info.id} broken: {info.statement}\n{detail}") from e


@pytest.fixture(scope="session")
def conformance_backend(request):
    """(name, backend object) under test; starts this process's Ray when the backend needs one."""
    config = request.config
    name = config.stash[NAME_KEY]
    backend = config.stash.get(BACKEND_KEY, None) or resolve_backend(name)
    with ray_for(backend):
        yield name, backend


@pytest.fixture
def tk(conformance_backend, tmp_path):
    """This case's ``Harness``: ``tk.fit(fn, workers=..., config=...)``, ``tk.fails(...)``, ``tk.dir``."""
    name, backend = conformance_backend
    return Harness(name, backend, str(tmp_path))
