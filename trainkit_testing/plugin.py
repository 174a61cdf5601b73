"""The trainkit pytest plugin (entry point ``pytest11``). Declares options, the marker, and hooks only.

Options (each also an ini key of the same name with ``-`` -> ``_``, the command line wins)::

    --trainkit-workers=N        ranks per run_training() fit (default 2)
    --trainkit-nodes=M          virtual nodes of the session's fake Ray cluster (default 2)
    --trainkit-backend=NAME     ray (default), local, ray_train or any registered backend
    --trainkit-hang-timeout=S   HangConfig.timeout_s default for runs in tests (default: off)
    --trainkit-keep-runs        keep the run folders of passing tests (failing tests' are always kept)

``@pytest.mark.trainkit(workers=..., nodes=..., backend=...)`` overrides them per test.
Bad values are a usage error (exit code 4) before any test runs.

The fixtures live in ``trainkit_testing.fixtures`` (registered here); the failure report
section is written by ``pytest_runtest_makereport`` below. Ray, torch and moto are imported
only inside the fixtures that need them. Runs in the pytest process (and each xdist worker).
"""

from __future__ import annotations

import pytest

from trainkit_testing.settings import (FAILED_KEY, RUNS_KEY, SETTINGS_KEY, Settings, item_settings, parse_backend,
                                       parse_hang_timeout, parse_nodes, parse_workers)

_OPTIONS = (
    # (option, dest/ini name, help, ini type, default)
    ("--trainkit-workers", "trainkit_workers", "ranks per run_training() fit (default 2)", "string", "2"),
    ("--trainkit-nodes", "trainkit_nodes", "virtual nodes of the fake Ray cluster (default 2)", "string", "2"),
    ("--trainkit-backend", "trainkit_backend",
     "backend for run_training(): ray (default), local, ray_train or a registered one", "string", "ray"),
    ("--trainkit-hang-timeout", "trainkit_hang_timeout",
     "seconds ranks may wait at a report barrier before a hang is declared (default: off)", "string", ""),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trainkit", "trainkit: distributed training tests")
    for opt, dest, help_, ini_type, default in _OPTIONS:
        group.addoption(opt, dest=dest, default=None, metavar=dest.split("_", 1)[1].upper(), help=help_)
        parser.addini(dest, help_, type=ini_type, default=default)
    group.addoption("--trainkit-keep-runs", dest="trainkit_keep_runs", action="store_true", default=None,
                    help="keep the run folders of passing tests (failing tests' run folders are always kept)")
    parser.addini("trainkit_keep_runs", "keep the run folders of passing tests", type="bool", default=False)


def _value(config: pytest.Config, dest: str):
    """Command line first, then the ini file; the raw value, not yet checked."""
    v = config.getoption(dest)
    return v if v is not None else config.getini(dest)


def _resolve(config: pytest.Config) -> Settings:
    try:
        settings = Settings(
            workers=parse_workers(_value(config, "trainkit_workers"), "--trainkit-workers"),
            nodes=parse_nodes(_value(config, "trainkit_nodes"), "--trainkit-nodes"),
            backend=parse_backend(_value(config, "trainkit_backend"), "--trainkit-backend"),
            hang_timeout_s=parse_hang_timeout(_value(config, "trainkit_hang_timeout"), "--trainkit-hang-timeout"),
            keep_runs=bool(_value(config, "trainkit_keep_runs")),
        )
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    # Everyone reads the checked values: config.getoption("trainkit_backend") is the backend in force.
    config.option.trainkit_workers = settings.workers
    config.option.trainkit_nodes = settings.nodes
    config.option.trainkit_backend = settings.backend
    config.option.trainkit_hang_timeout = settings.hang_timeout_s
    config.option.trainkit_keep_runs = settings.keep_runs
    return settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "trainkit(workers=None, nodes=None, backend=None): per-test trainkit settings "
        "(override --trainkit-workers, --trainkit-nodes, --trainkit-backend)")
    config.stash[SETTINGS_KEY] = _resolve(config)
    from trainkit_testing import fixtures

    if not config.pluginmanager.is_registered(fixtures):
        config.pluginmanager.register(fixtures, "trainkit_testing.fixtures")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Check every marker now (a typo fails the session before any test) and size the fake cluster."""
    from trainkit_testing.fixtures import plan_cluster

    per_item = [(item, item_settings(item)) for item in items]
    plan_cluster(config, per_item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.failed:
        item.stash[FAILED_KEY] = True
        runs = item.stash.get(RUNS_KEY, [])
        if runs:
            from trainkit_testing.diagnosis import failure_section

            report.sections.append(("trainkit run", failure_section(runs)))
    return report
