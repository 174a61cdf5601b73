"""The one writer behind every ``--json OUT`` of the ``trainkit`` commands.

``write_json(doc, out)`` writes ``doc`` to the file ``out``, or to stdout when ``out`` is
``-`` (``STDOUT``), so that ``trainkit diagnose``, ``trainkit chaos`` and ``trainkit
conformance`` treat the option alike. A file that cannot be written is an ``OutputError``
(a ``TrainkitError``): the CLI's error boundary prints it as ``error:`` and exits 2.
Values JSON has no type for are written as their ``str()``. Runs in the process of the
command (the user's shell).
"""

from __future__ import annotations

import json
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
