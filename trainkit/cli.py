"""The ``trainkit`` command: parse the command line, run one subcommand, map errors to exit codes.

Every subcommand's options are declared here. What a command does is imported only when
it runs (chaos and conformance live with their subsystems; diagnose is a few lines below,
over trainkit.diagnostics), so ``trainkit --help`` starts instantly and a missing optional
dependency of one command never breaks another (it is named, with the pip command, before
anything is imported):

    chaos        fault_injection.chaos.main(args)   extra: chaos
    diagnose     diagnose(args) below: trainkit.diagnostics.run_report, .render (.live for --live)
    conformance  conformance.runner.main(args)      extra: testing
    migrate      trainkit.migrate.run(args)         (also ``python -m trainkit.migrate``)

The one error boundary: a ``TrainkitError`` is printed as ``error:`` (and ``hint:``) and
exits 2, with a traceback only under ``-v``; a closed pipe (``trainkit diagnose RUN | head``)
ends the command quietly. Every ``--json OUT`` writes its report to ``OUT`` (``-``: stdout)
through ``trainkit.jsonout.write_json``. Runs in the user's shell process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Optional, Sequence

USAGE_ERROR = 2
BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell tool killed by a closed pipe returns

DESCRIPTION = "Test, break and debug distributed PyTorch training: the trainkit runtime's command line."
EPILOG = """exit codes: 0 ok; 1 the run, scenario or check failed; 2 bad input or a missing extra.
Run `trainkit COMMAND --help` for a command's options. Docs: docs/index.md"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainkit", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from trainkit import __version__

    p.add_argument("--version", action="version", version=f"trainkit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("chaos", help="run a fault-injection scenario on a local Ray cluster and check its expectations",
                       description="Run a scenario YAML on a local cluster, inject its faults and "
                                   "check every expectation against the run's event stream.")
    c.add_argument("path", metavar="PATH", help="scenario file (YAML, version: 1)")
    c.add_argument("--backend", default=None, help="backend to run on (default: the scenario's, else ray)")
    c.add_argument("--seed", type=int, default=None, help="seed for random targets (default: the scenario's)")
    _json_option(c, "the verdict")
    c.add_argument("--plot", metavar="OUT.png", default=None, help="draw the timeline to a PNG file")
    c.add_argument("--storage", default=None, help="storage path for the run (default: a temporary folder)")
    c.set_defaults(entry="fault_injection.chaos:main", extra="chaos")

    d = sub.add_parser("diagnose", help="explain a run: status, failures, hangs with the stuck ranks' stacks",
                       description="Read a run folder (local path, s3:// URL or run name under the "
                                   "default storage) and explain what happened. Reads JSON and text only.")
    d.add_argument("run", metavar="RUN", help="run folder, s3:// URL, or run name under $TRAINKIT_STORAGE_PATH")
    d.add_argument("--live", action="store_true", help="dump fresh stacks of every rank of a running run")
    d.add_argument("--plot", metavar="OUT.png", default=None,
                   help="draw the run's timeline per rank (attempts, downtime, reports, faults, failures, hangs, "
                        "stragglers) to a PNG file")
    _json_option(d, "the report")
    d.set_defaults(entry=diagnose, extra=None)

    k = sub.add_parser("conformance", help="run the conformance suite against a backend (ray, local, ray_train, ...)",
                       description="Run the backend-agnostic conformance cases against one backend and "
                                   "print a table by category.")
    k.add_argument("--backend", required=True, help="backend name (ray, local, ray_train, or a registered one)")
    k.add_argument("-k", dest="keyword", metavar="EXPR", default=None, help="only cases matching EXPR (pytest -k)")
    _json_option(k, "the outcome per case")
    k.set_defaults(entry="conformance.runner:main", extra="testing")

    m = sub.add_parser("migrate", help="rewrite Ray Train programs to use trainkit (the import swap), in place",
                       description="Rewrite ray.train imports and uses to trainkit in Python files, on tokens "
                                   "(never in strings or comments); both `from ray.train import ...` and "
                                   "`import ray` ... `ray.train.report(...)` work afterwards.")
    m.add_argument("files", nargs="+", metavar="FILE", help="Python files to rewrite")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--diff", action="store_true", help="print a unified diff; write nothing")
    mode.add_argument("--check", action="store_true", help="exit 1 when a file would change; write nothing")
    m.set_defaults(entry="trainkit.migrate:run", extra=None)
    return p


def _json_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", metavar="OUT", default=None, help=f"write {what} as JSON to OUT (- for stdout)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = argparse.Namespace(command="", verbose=False)
    try:
        try:
            args = _parser().parse_args(argv)
            code = _run(args)
        except SystemExit as e:  # --help, --version and usage errors: argparse prints, then exits
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_ERROR)
        sys.stdout.flush()  # a closed pipe shows here, inside the boundary, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"trainkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one error boundary: trainkit's own errors are user-facing
        from trainkit.errors import TrainkitError

        if not isinstance(e, TrainkitError):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        hint = getattr(e, "hint", "")
        if hint and hint not in str(e):
            print(f"hint: {hint}", file=sys.stderr)
        return USAGE_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.extra:
        from trainkit.extras import require

        require(args.extra, f"trainkit {args.command}")
    entry = args.entry
    if isinstance(entry, str):  # "module:function", imported now
        module, _, func = entry.partition(":")
        entry = getattr(importlib.import_module(module), func)
    return int(entry(args) or 0)


def diagnose(args: argparse.Namespace) -> int:
    """``trainkit diagnose RUN [--live] [--json OUT] [--plot OUT.png]``: 0 the run is readable and did not fail,
    1 it failed or hung.

    A run that cannot be found raises ``DiagnoseError`` (exit 2 at the boundary). Imports
    no Ray or torch: ``--live`` alone runs py-spy.

    >>> diagnose(argparse.Namespace(run="/tmp/trainkit_results/my_run", live=False, json=None))  # doctest: +SKIP
    1
    """
    from trainkit.diagnostics.render import render_text
    from trainkit.diagnostics.run_report import DiagnoseError, load_report
    from trainkit.errors import StorageError
    from trainkit.diagnostics.run_report import open_run
    from trainkit.jsonout import STDOUT, check_writable, write_json

    plot = getattr(args, "plot", None)
    if plot:  # before any work: the extra, and a file that can be written
        from trainkit.extras import require

        require("chaos", "trainkit diagnose --plot", ["matplotlib"])
        check_writable(plot, "--plot")
    try:
        store = open_run(args.run)
        report = load_report(store)
    except StorageError as e:  # the RUN given cannot be opened: a usage error, with diagnose's hint
        raise DiagnoseError(str(e)) from e
    if getattr(args, "live", False):
        from dataclasses import replace

        from trainkit.diagnostics.live import live_stacks

        report = replace(report, live=live_stacks(report))
    out = getattr(args, "json", None)
    if out:
        write_json(report.to_dict(), out, indent=1)
    if out != STDOUT:
        print(render_text(report))
    if plot:
        from trainkit import events as ev
        from trainkit.diagnostics.plot import plot_run
        from trainkit.storage import EVENTS

        plot_run(ev.parse_events(store.read_bytes(EVENTS) or b"").events, plot, title=f"trainkit run {store.name}")
        print(f"timeline: {plot}", file=sys.stderr if out == STDOUT else sys.stdout)
    return 1 if report.failed_or_hung else 0


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so that Python's exit-time flush raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
