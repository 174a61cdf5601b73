"""``trainkit chaos | diagnose | conformance``: parse the command line, call, return the exit code.

Each subcommand lives with its subsystem and is imported only when it runs, so
``trainkit --help`` starts instantly and a broken optional dependency of one command
never breaks another:

    chaos        fault_injection.chaos.main(args)         exit 0 pass, 1 expectation failed, 2 bad scenario/usage
    diagnose     trainkit.diagnostics.report.main(args)   exit 0 readable, 1 run failed or hung, 2 usage
    conformance  conformance.runner.main(args)            exit 0 nothing failed, 1 some case failed, 2 usage

Every ``--json OUT`` writes its report to the file ``OUT`` (``-`` for stdout).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainkit", description=__doc__.splitlines()[0])
    from trainkit import __version__

    p.add_argument("--version", action="version", version=f"trainkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("chaos", help="run a fault-injection scenario and check its expectations",
                       description="Run a scenario YAML on a local cluster, inject its faults and "
                                   "check every expectation against the run's event stream.")
    c.add_argument("path", metavar="PATH", help="scenario file (YAML, version: 1)")
    c.add_argument("--backend", default=None, help="backend to run on (default: the scenario's, else ray)")
    c.add_argument("--seed", type=int, default=None, help="seed for random targets (default: the scenario's)")
    c.add_argument("--json", metavar="OUT", default=None, help="write the verdict as JSON to OUT (- for stdout)")
    c.add_argument("--plot", metavar="OUT.png", default=None, help="draw the timeline to a PNG file")
    c.add_argument("--storage", default=None, help="storage path for the run (default: a temporary folder)")
    c.set_defaults(entry="fault_injection.chaos:main")

    d = sub.add_parser("diagnose", help="explain a run: status, failures, hangs with stacks",
                       description="Read a run folder (local path, s3:// URL or run name under the "
                                   "default storage) and explain what happened. Reads JSON and text only.")
    d.add_argument("run", metavar="RUN", help="run folder, s3:// URL, or run name under $TRAINKIT_STORAGE_PATH")
    d.add_argument("--live", action="store_true", help="dump fresh stacks of every rank of a running run")
    d.add_argument("--json", metavar="OUT", default=None, help="write the report as JSON to OUT (- for stdout)")
    d.set_defaults(entry="trainkit.diagnostics.report:main")

    k = sub.add_parser("conformance", help="run the conformance suite against a backend",
                       description="Run the backend-agnostic conformance cases against one backend and "
                                   "print a table by category.")
    k.add_argument("--backend", required=True, help="backend name (ray, local, ray_train, or a registered one)")
    k.add_argument("-k", dest="keyword", metavar="EXPR", default=None, help="only cases matching EXPR (pytest -k)")
    k.add_argument("--json", metavar="OUT", default=None, help="write the outcome per case as JSON to OUT")
    k.set_defaults(entry="conformance.runner:main")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    module, _, func = args.entry.partition(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ImportError as e:
        print(f"trainkit {args.command}: cannot load {module} ({e})", file=sys.stderr)
        return USAGE_ERROR
    try:
        return int(entry(args) or 0)
    except KeyboardInterrupt:
        print(f"trainkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
