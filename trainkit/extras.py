"""Optional dependency groups ("extras") and the one error a missing one gives.

``pip install trainkit`` holds what ``fit()`` needs; commands and features with heavier
dependencies check for their extra before they import anything from it, and raise
``MissingExtraError`` naming the extra and the exact pip command (the CLI prints it as one
``error:`` line without a traceback). Other packages of this repository (fault_injection)
call ``require`` too. The groups match ``pyproject.toml``'s
``[project.optional-dependencies]``; tests/unit/test_cli.py keeps the two in step.
Looks modules up with ``importlib.util.find_spec``: imports nothing. Runs in any process.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional, Sequence

from trainkit.errors import MissingExtraError

# extra -> the top-level modules of it that trainkit imports (import names, not distribution names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "s3": ("s3fs",),
    "testing": ("pytest", "filelock", "moto", "boto3", "s3fs", "faker", "hypothesis", "pydantic", "yaml", "rich"),
    "chaos": ("pydantic", "yaml", "rich", "matplotlib", "sklearn", "moto", "boto3", "s3fs"),
    "debug": ("debugpy",),
    "ray-train": ("pyarrow",),
    "examples": ("sklearn", "matplotlib"),
    "lightning": ("lightning",),
    "transformers": ("transformers", "accelerate"),
}


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (checked without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, feature: str, modules: Optional[Sequence[str]] = None) -> None:
    """Raise ``MissingExtraError`` for ``feature`` unless every module of ``extra`` is importable."""
    missing = missing_modules(modules if modules is not None else EXTRAS[extra])
    if missing:
        raise MissingExtraError(feature, extra, missing, pip_command(extra))


def pip_command(extra: str) -> str:
    """The exact command that installs ``extra`` for this installation of trainkit.

    A checkout installed with ``pip install -e`` gets the editable form with the checkout's
    constraints file; an installed release gets ``pip install 'trainkit[extra]'``.
    """
    root = _editable_root()
    if root is None:
        return f"pip install 'trainkit[{extra}]'"
    where = os.path.relpath(root)
    where = "." if where == "." else (where if not where.startswith("..") else root)
    constraints = os.path.normpath(os.path.join(where, ".ci", "constraints.txt"))
    pin = f" -c {constraints}" if os.path.exists(os.path.join(root, ".ci", "constraints.txt")) else ""
    return f"pip install{pin} -e \"{where}[{extra}]\""


def _editable_root() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        text = distribution("trainkit").read_text("direct_url.json")
    except (ImportError, PackageNotFoundError, OSError):
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = info.get("url", "")
    if not info.get("dir_info", {}).get("editable") or not url.startswith("file://"):
        return None
    return url[len("file://"):]
