"""``Checkpoint``: a folder on any fsspec filesystem (local, NFS, ``s3://``, ``memory://``).

Same API as Ray Train's ``ray.train.Checkpoint``. Metadata lives in the folder as
``.metadata.json``. A checkpoint handed out from a run's manifest carries the file list
(name -> size) recorded at its commit, so that a damaged one is never read as an
intact one (``checkpoint_problem``; ``get_metadata`` raises ``CheckpointError`` instead of
returning ``{}``). Runs in the driver and in workers; picklable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional

from trainkit.errors import CheckpointError, ConfigError
from trainkit.storage import download_tree, is_local, resolve_filesystem, to_uri

_METADATA = ".metadata.json"
METADATA = _METADATA


def checkpoint_problem(expected: Optional[dict], found: Optional[dict]) -> Optional[str]:
    """What is wrong with a committed checkpoint folder, or None when it is intact.

    ``expected``: name -> size recorded at the commit (None for a manifest written before file
    lists were recorded: then only the folder's existence is checked); ``found``: name -> size
    listed now (None: the folder is missing). Files added since are fine; ``.metadata.json`` must
    be there but may have changed size (``set_metadata`` on a committed checkpoint is allowed).

    >>> checkpoint_problem({"model.pt": 10}, {"model.pt": 7})
    'model.pt has 7 bytes, 10 when it was committed'
    """
    if found is None:
        return "its folder is missing"
    if expected is None:
        return None
    problems = []
    for name, size in sorted(expected.items()):
        if name not in found:
            problems.append(f"{name} is missing")
        elif name != _METADATA and found[name] != size:
            problems.append(f"{name} has {found[name]} bytes, {size} when it was committed")
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


class Checkpoint:
    """A checkpoint folder.

    >>> import tempfile, torch  # doctest: +SKIP
    >>> d = tempfile.mkdtemp(); torch.save({"w": 1}, f"{d}/model.pt")  # doctest: +SKIP
    >>> ckpt = Checkpoint.from_directory(d)  # doctest: +SKIP
    >>> with ckpt.as_directory() as path: ...  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, filesystem: Any = None):
        path = os.fspath(path)
        fs, stripped = resolve_filesystem(path, filesystem)
        self.filesystem = fs
        self.path = os.path.abspath(stripped) if is_local(fs) else stripped
        self._local_copy: Optional[str] = None
        self._files: Optional[dict] = None  # name -> size recorded at the commit, for a run's checkpoint

    @classmethod
    def _committed(cls, path: str, filesystem: Any, files: Optional[dict]) -> "Checkpoint":
        """A run's committed checkpoint, with the file list of its manifest entry."""
        ckpt = cls(path, filesystem)
        ckpt._files = dict(files) if files is not None else None
        return ckpt

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> "Checkpoint":
        """A checkpoint backed by a local folder (no copy is made)."""
        from fsspec.implementations.local import LocalFileSystem

        path = os.path.abspath(os.fspath(path))
        if os.path.isfile(path):
            raise ConfigError("Checkpoint.from_directory(path)", path, "a folder",
                              hint="it is a file: pass the folder that holds it")
        return cls(path, LocalFileSystem())

    @property
    def uri(self) -> str:
        return to_uri(self.filesystem, self.path)

    def __repr__(self) -> str:
        return f"Checkpoint(filesystem={type(self.filesystem).__name__}, path={self.path})"

    def __fspath__(self):
        raise TypeError("You cannot use a trainkit Checkpoint as a path. Use checkpoint.path, or "
                        "`with checkpoint.as_directory() as d:` to get a local folder.")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_local_copy"] = None
        return state

    def to_directory(self, path: str | os.PathLike | None = None) -> str:
        """Copy the checkpoint's files into ``path`` (a new temp folder if None); return it."""
        if path is None:
            path = os.path.join(tempfile.gettempdir(), f"checkpoint_tmp_{uuid.uuid4().hex}")
        path = os.fspath(path)
        download_tree(self.filesystem, self.path, path)
        return path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """Yield a local folder with the checkpoint's files.

        Local checkpoints yield their own folder (no copy: do not write into it);
        remote ones are downloaded to a temp folder removed on exit.
        """
        if is_local(self.filesystem):
            yield self.path
            return
        tmp = self.to_directory()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- metadata -------------------------------------------------------------------
    def _meta_path(self) -> str:
        return f"{self.path.rstrip('/')}/{_METADATA}"

    def get_metadata(self) -> dict:
        """The checkpoint's metadata; ``{}`` if none was set. A run's checkpoint whose metadata was
        recorded at the commit but is gone (or whose folder is gone) raises ``CheckpointError``."""
        try:
            with self.filesystem.open(self._meta_path(), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            files = getattr(self, "_files", None)
            if files is not None and not self.filesystem.isdir(self.path):
                raise CheckpointError(f"checkpoint {self.uri} is damaged: its folder is missing") from None
            if files is not None and _METADATA in files:
                raise CheckpointError(f"checkpoint {self.uri} is damaged: its {_METADATA}, recorded when it was "
                                      "committed, is missing") from None
            return {}
        try:
            return json.loads(data)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {self.uri} is damaged: {_METADATA} is not valid JSON ({e})") from e

    def set_metadata(self, metadata: dict) -> None:
        data = json.dumps(metadata).encode()  # fails early on values JSON cannot hold
        self.filesystem.makedirs(self.path, exist_ok=True)
        with self.filesystem.open(self._meta_path(), "wb") as f:
            f.write(data)

    def update_metadata(self, metadata: dict) -> None:
        merged = self.get_metadata()
        merged.update(metadata)
        self.set_metadata(merged)
