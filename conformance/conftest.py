"""pytest configuration of the conformance suite: the backend under test, skips, xfails, fixtures.

``--trainkit-backend=NAME`` (declared by the trainkit pytest plugin; declared here too when
the plugin is absent) picks the backend: a registered name or ``module:attr``; default
``$TRAINKIT_BACKEND``, else ``ray``. For each case:

* a required capability the backend lacks -> skipped, reason ``missing capability: X``
  (unless a divergence is declared for the backend: then its behaviour is observed);
* a divergence declared for this backend -> the case runs and must end with the documented
  observation (the divergence's exception type and message): then it is ``xfail`` whose
  reason is the backend's observed behaviour; any other failure (an adapter crash) fails the
  case, and so does a pass (strict: the divergence is gone) unless the divergence is a race;
* a case that cannot reach the backend under test (checks of trainkit's own objects; local and
  torchrun cases on a backend that leaves local mode to trainkit's shared one) -> skipped,
  reason starting ``not this backend's:``, so it is never counted as the backend's pass;
* every case has a time bound (``CaseInfo.bound_s`` or ``DEFAULT_BOUND_S``): a fit that
  outlives it has its Ray job torn down and fails with ``CaseTimeout``; pytest-timeout is
  set a little above, for in-process backends;
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
import re
from typing import Optional

import pytest

import conformance.broken  # noqa: F401 - registers the broken-* backends before the plugin checks names
from conformance.case import info_of
from conformance import harness as _harness
from conformance.harness import DEFAULT_BOUND_S, Harness, moto_for_suite, ray_for, resolve_backend
from conformance.report import Collector
from trainkit.backends.api import ELASTIC, MULTI_WORKER


NAME_KEY = pytest.StashKey[str]()  # config.stash: the name of the backend under test
BACKEND_KEY = pytest.StashKey[object]()  # config.stash: the backend object, once it has loaded
DIV_KEY = pytest.StashKey[object]()  # item.stash: the divergence checked for this item
TIMEOUT_MARGIN_S = 60  # pytest-timeout above a case's bound: the bound fires first, with teardown


class ConformanceFailure(AssertionError):
    """A backend broke a rule of the contract; the message names the case and the rule."""


class DivergenceMismatch(Exception):
    """A case with a documented divergence did not show it: it crashed some other way, or passed."""


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
    if importlib.util.find_spec("hypothesis") is not None:
        # Import it now, at a shallow stack: its pytest plugin imports it (and pytest rewrites it) at the
        # end of the session otherwise, where CPython 3.11.7's ast.parse failed once with "AST constructor
        # recursion depth mismatch" and took the whole session (and its --json report) down.
        import hypothesis  # noqa: F401
    for line in ("requires(capability): a backend capability the case needs",
                 "extension: behaviour trainkit adds beyond Ray Train 2.60",
                 "fits(n): the case makes up to n bounded fits (its pytest-timeout is n bounds)"):
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
        item.add_marker(pytest.mark.timeout((info.bound_s or DEFAULT_BOUND_S) * _fits(item) + TIMEOUT_MARGIN_S))
        if not info.reaches(backend):
            where = ("it checks trainkit's own objects, the same whatever the backend (certified by "
                     "--trainkit-backend=local)" if info.shared else
                     f"backend {name} leaves local mode to trainkit's shared one, certified by "
                     "--trainkit-backend=local")
            item.add_marker(pytest.mark.skip(reason=f"not this backend's: {where}"))
            continue
        div = info.divergence_for(getattr(backend, "name", name)) or info.divergence_for(name)
        missing = [c for c in info.requires if c not in caps]
        if missing and div is None:  # a declared divergence is observed even where a capability is missing
            item.add_marker(pytest.mark.skip(reason=f"missing capability: {', '.join(missing)}"))
            continue
        if div is not None:
            if not div.run:  # a third-party case that declares without observing
                item.add_marker(pytest.mark.xfail(reason=div.reason, run=False, strict=True))
            else:
                item.stash[DIV_KEY] = div
            continue
        pending = _pending(info)
        if pending:
            item.add_marker(pytest.mark.xfail(reason=pending, run=False, strict=False))
    # Group cases by group shape: a warm worker group is reused only by a fit of the same shape.
    items.sort(key=_shape_order)


def _fits(item) -> int:
    """How many bounded fits a case makes at most (marker ``fits(n)``; 3 by default)."""
    m = item.get_closest_marker("fits")
    return int(m.args[0]) if m and m.args else 3


def _raises_class(div):
    r = div.raises
    return getattr(_harness, r) if isinstance(r, str) else r


def _check_divergence(info, div, exc: Optional[BaseException]) -> None:
    """The documented observation, or ``DivergenceMismatch``; ``exc`` is what the case raised (None: passed)."""
    if exc is None:
        if div.racy:
            return  # the race went the rule's way this time
        raise DivergenceMismatch(f"{info.id} passed on backend {div.backend}, which is documented to diverge "
                                 f"({div.reason}); the divergence is gone: remove it from the case")
    expected = _raises_class(div)
    cause = exc.__cause__ if isinstance(exc, ConformanceFailure) and exc.__cause__ is not None else exc
    text = str(cause)
    if isinstance(cause, expected) and (div.match is None or re.search(div.match, text)):
        pytest.xfail(div.reason)
    want = expected.__name__ + (f" matching {div.match!r}" if div.match else "")
    raise DivergenceMismatch(f"{info.id} on backend {div.backend}: expected the documented divergence ({want}: "
                             f"{div.reason}) but the case ended with {type(cause).__name__}: {text[:800]}") from cause


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
    div = item.stash.get(DIV_KEY, None)
    try:
        out = yield
    except Exception as e:  # noqa: BLE001 - pytest outcomes (skip, xfail) are BaseExceptions, not caught
        if info is None:
            raise
        if div is not None:
            _check_divergence(info, div, e)
        if isinstance(e, ConformanceFailure):
            raise
        detail = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        raise ConformanceFailure(f"{info.id} broken: {info.statement}\n{detail}") from e
    if info is not None and div is not None:
        _check_divergence(info, div, None)
    return out


@pytest.fixture(scope="session")
def conformance_env(request):
    """(name, backend object, Cluster or None, MotoS3 or None) of the session: one moto S3 server and,
    for a backend that needs Ray, one private Ray with virtual nodes that sees the moto endpoint."""
    config = request.config
    name = config.stash[NAME_KEY]
    backend = config.stash.get(BACKEND_KEY, None) or resolve_backend(name)
    with moto_for_suite() as s3:
        with ray_for(backend, env=s3.env if s3 is not None else None) as cluster:
            yield name, backend, cluster, s3


@pytest.fixture(scope="session")
def conformance_backend(conformance_env):
    """(name, backend object) under test; starts this process's Ray when the backend needs one."""
    return conformance_env[0], conformance_env[1]


@pytest.fixture
def tk(request, conformance_env, tmp_path):
    """This case's ``Harness``: ``tk.fit(fn, workers=..., config=...)``, ``tk.fails(...)``, ``tk.dir``."""
    name, backend, cluster, s3 = conformance_env
    info = info_of(request.node)
    bound = (info.bound_s if info is not None and info.bound_s else DEFAULT_BOUND_S)
    return Harness(name, backend, str(tmp_path), bound_s=bound, cluster=cluster, s3=s3)
