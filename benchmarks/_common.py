"""What every benchmark script shares: writing its figures for ``--json OUT``.

The scripts run as ``python benchmarks/bench_*.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import json
from typing import Any, Optional


def write_json(data: Any, out: Optional[str]) -> None:
    """Write ``data`` as JSON to the file ``out``, to stdout when ``out`` is ``-``, nowhere when None."""
    if not out:
        return
    text = json.dumps(data, indent=2)
    if out == "-":
        print(text)
    else:
        with open(out, "w") as f:
            f.write(text + "\n")
