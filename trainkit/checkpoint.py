"""``Checkpoint``: a folder on any fsspec filesystem (local, NFS, ``s3://``, ``memory://``).

Same API as Ray Train's ``ray.train.Checkpoint``. Metadata lives in the folder as
``.metadata.json``. Runs in the driver and in workers; picklable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional

from trainkit.storage import download_tree, is_local, resolve_filesystem, to_uri

_METADATA = ".metadata.json"


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

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> "Checkpoint":
        """A checkpoint backed by a local folder (no copy is made)."""
        from fsspec.implementations.local import LocalFileSystem

        return cls(os.path.abspath(os.fspath(path)), LocalFileSystem())

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
        try:
            with self.filesystem.open(self._meta_path(), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return {}

    def set_metadata(self, metadata: dict) -> None:
        data = json.dumps(metadata).encode()  # fails early on values JSON cannot hold
        self.filesystem.makedirs(self.path, exist_ok=True)
        with self.filesystem.open(self._meta_path(), "wb") as f:
            f.write(data)

    def update_metadata(self, metadata: dict) -> None:
        merged = self.get_metadata()
        merged.update(metadata)
        self.set_metadata(merged)
