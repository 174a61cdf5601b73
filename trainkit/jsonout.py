"""The one writer behind every ``--json OUT`` of the ``trainkit`` commands.

``write_json(doc, out)`` writes ``doc`` to the file ``out``, or to stdout when ``out`` is
``-`` (``STDOUT``), so that ``trainkit diagnose``, ``trainkit chaos`` and ``trainkit
conformance`` treat the option alike. A file that cannot be written is an ``OutputError``
(a ``TrainkitError``): the CLI's error boundary prints it as ``error:`` and exits 2.
``check_writable(out)`` raises the same error before a command does its work, so that a
typo in a path is found before a cluster starts, not after the run.
Values JSON has no type for are written as their ``str()``. Runs in the process of the
command (the user's shell).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional, TextIO

from trainkit.errors import OutputError

STDOUT = "-"  # the OUT that means standard output


def write_json(doc: Any, out: str, *, indent: int = 2, stdout: Optional[TextIO] = None) -> None:
    """Write ``doc`` as JSON and a newline to the file ``out``; ``-`` writes to ``stdout`` (default ``sys.stdout``).

    >>> write_json({"status": "finished"}, "-", indent=None)
    {"status": "finished"}
    """
    text = json.dumps(doc, indent=indent, default=str) + "\n"
    if out == STDOUT:
        stream = sys.stdout if stdout is None else stdout
        stream.write(text)
        stream.flush()
        return
    try:
        with open(out, "w") as f:
            f.write(text)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e}") from e


def check_writable(path: str, option: str = "") -> None:
    """``OutputError`` unless a file can be written at ``path``: its folder exists and is writable, and it
    is not itself a folder. ``-`` (stdout) always passes. ``option`` (``--json``) prefixes the message.

    >>> check_writable("/no/such/folder/verdict.json", "--json")
    Traceback (most recent call last):
    ...
    trainkit.errors.OutputError: --json /no/such/folder/verdict.json: the folder /no/such/folder does not exist
    """
    if path == STDOUT:
        return
    what = f"{option} {path}" if option else str(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{what} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise OutputError(f"{what}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise OutputError(f"{what}: not writable (permission denied)")
