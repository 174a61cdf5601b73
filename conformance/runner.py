"""``trainkit conformance --backend NAME [-k EXPR] [--json OUT]``: run the suite, print the table, exit.

Runs pytest in this process on the conformance package with ``--trainkit-backend=NAME``,
collects one outcome per case (passed / failed / xfailed with reason / xpassed / skipped
for a missing capability), prints the table by category, writes
``{backend, version, cases: [{id, category, outcome, reason}]}`` to ``OUT`` (``-``:
stdout) and returns 0 only when no case failed; 1 when some case failed; 2 for a usage
error (unknown backend, ``-k`` matching nothing, pytest usage error).
Runs in the driver (the CLI process).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

USAGE_ERROR = 2
SUITE_DIR = os.path.dirname(os.path.abspath(__file__))


def pytest_args(backend: str, keyword: Optional[str] = None, extra: Sequence[str] = ()) -> list[str]:
    """The pytest command line the runner uses (also what to type to reproduce a case)."""
    args = [SUITE_DIR, f"--trainkit-backend={backend}", "-p", "no:cacheprovider", "-q", "-rN",
            f"--rootdir={os.path.dirname(SUITE_DIR)}",
            # this process imported trainkit and conformance before pytest started: nothing to rewrite
            "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if keyword:
        args += ["-k", keyword]
    return args + list(extra)


def main(args) -> int:
    """Entry point of ``trainkit conformance`` (``args``: backend, keyword, json)."""
    import pytest

    from trainkit.errors import OutputError
    from trainkit.jsonout import check_writable, write_json

    from conformance.harness import resolve_backend
    from conformance.report import Collector

    backend = args.backend
    out = getattr(args, "json", None)
    try:  # before any case runs: a path that cannot be written is found now, not after the suite
        if out:
            check_writable(out, "--json")
    except OutputError as e:
        print(f"error: {e}\nhint: give a file in an existing folder you can write to (--json - for stdout)",
              file=sys.stderr)
        return USAGE_ERROR
    try:
        obj = resolve_backend(backend)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's backend name or package
        print(f"error: backend {backend!r} cannot be loaded: {e}", file=sys.stderr)
        print("hint: use ray, local, ray_train, a backend registered under the entry point group "
              "trainkit.backends, or module:attr", file=sys.stderr)
        return USAGE_ERROR
    collector = Collector(backend)
    from conformance.conftest import backend_version

    collector.version = backend_version(backend, obj)
    rc = pytest.main(pytest_args(backend, getattr(args, "keyword", None)), plugins=[collector])
    if out:
        try:
            write_json(collector.document(), out, indent=2)
        except OutputError as e:  # the folder went away during the suite
            print(f"error: {e}", file=sys.stderr)
            return USAGE_ERROR
    if rc in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.INTERRUPTED):
        print(f"error: pytest ended with {rc!r}", file=sys.stderr)
        return USAGE_ERROR
    if not collector.cases:
        print(f"error: no conformance case matched -k {args.keyword!r}" if getattr(args, "keyword", None)
              else "error: no conformance case was collected", file=sys.stderr)
        return USAGE_ERROR
    failed = collector.failed()
    if failed:
        print(f"{len(failed)} case(s) failed on backend {backend}: " + ", ".join(sorted(r["id"] for r in failed)),
              file=sys.stderr)
        return 1
    return 0


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.runner")
    p.add_argument("--backend", required=True)
    p.add_argument("-k", dest="keyword", default=None)
    p.add_argument("--json", default=None)
    return main(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli())
