"""The one storage layer: a run directory ``<storage_path>/<name>/`` on any fsspec filesystem.

Layout::

    <storage_path>/<name>/
        run_state.json        the manifest: committed checkpoints, attempts, status, error
        events.jsonl          the one event stream (see trainkit.events)
        checkpoint_<index>/   one folder per committed checkpoint (report index)
        diagnostics/          hang dumps and other evidence
        logs/                 per attempt and rank stdout/stderr

Invariants: the manifest is replaced atomically (rename on local disk, one PUT on
object stores); a checkpoint folder is written in full before the manifest names it.
Local filesystems take a fast path through ``os``/``shutil``. Runs in the driver,
the controller and workers alike.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import tempfile
import uuid
from typing import Any

from trainkit.errors import StorageError

MANIFEST = "run_state.json"
EVENTS = "events.jsonl"
DIAGNOSTICS = "diagnostics"
LOGS = "logs"
RESERVED = frozenset({MANIFEST, EVENTS, DIAGNOSTICS, LOGS, ".trainkit_marker"})

# Writes are retried (object stores throttle and drop requests); every try passes the fault point,
# where fault_injection installs a hook (called with the operation and path) that may raise OSError.
WRITE_TRIES = 4
_fault_hook = None


def set_fault_hook(hook) -> None:
    """Install ``hook(operation, path)`` ("write" or "upload"), called before every try; None removes it."""
    global _fault_hook
    _fault_hook = hook


def _retrying(operation: str, path: str, fn):
    import time

    for attempt in range(WRITE_TRIES):
        try:
            if _fault_hook is not None:
                _fault_hook(operation, path)
            return fn()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError:
            if attempt == WRITE_TRIES - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)


def resolve_filesystem(path: str, filesystem: Any = None):
    """Return ``(fsspec filesystem, path without protocol)`` for a path or URI."""
    if filesystem is not None:
        return filesystem, path
    import fsspec.core

    if str(path).startswith(("s3://", "s3a://")):
        from trainkit.extras import require

        require("s3", f"storage {path!r}")
    try:
        fs, stripped = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage {path!r}: {e}") from e
    return fs, stripped


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _protocol(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def to_uri(fs, path: str) -> str:
    """A displayable URI (``s3://bucket/key``) for a filesystem path; plain paths stay plain."""
    proto = _protocol(fs)
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path.lstrip('/')}" if proto != "memory" else f"memory://{path}"


def copy_local_tree(src: str, dst: str) -> list[str]:
    """Copy a local folder into ``dst`` (created, merged). Returns the relative file names."""
    files = []
    for root, dirs, names in os.walk(src):
        rel_root = os.path.relpath(root, src)
        target_root = dst if rel_root == "." else os.path.join(dst, rel_root)
        os.makedirs(target_root, exist_ok=True)
        for n in names:
            # copy then rename: two ranks writing the same name never leave a torn file
            tmp = os.path.join(target_root, f".{n}.{os.getpid()}.{threading.get_ident()}.part")
            shutil.copyfile(os.path.join(root, n), tmp)
            os.replace(tmp, os.path.join(target_root, n))
            files.append(n if rel_root == "." else os.path.join(rel_root, n))
    return files


class RunStore:
    """A run directory on a filesystem. Picklable: workers build one from the same fields.

    >>> store = RunStore("/tmp/trainkit_results", "demo")
    >>> store.run_path
    '/tmp/trainkit_results/demo'
    """

    def __init__(self, storage_path: str, name: str, filesystem: Any = None):
        self.storage_path = storage_path
        self.name = name
        self.fs, root = resolve_filesystem(storage_path, filesystem)
        self._custom_fs = filesystem is not None
        self.local = is_local(self.fs)
        self.run_path = f"{root.rstrip('/')}/{name}" if root.rstrip("/") else name
        if self.local:
            self.run_path = os.path.abspath(self.run_path)

    def __reduce__(self):
        return (RunStore, (self.storage_path, self.name, self.fs if self._custom_fs else None))

    # Ray Train's StorageContext spelling, for users who read get_context().get_storage().
    @property
    def experiment_fs_path(self) -> str:
        return self.run_path

    @property
    def storage_filesystem(self):
        return self.fs

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.run_path)

    def path(self, *parts: str) -> str:
        return "/".join([self.run_path, *parts]) if not self.local else os.path.join(self.run_path, *parts)

    # -- basic operations -------------------------------------------------------------
    def ensure(self) -> None:
        """Create the run directory and check that it is writable."""
        try:
            if self.local:
                os.makedirs(self.run_path, exist_ok=True)
                probe = self.path(".trainkit_marker")
                with open(probe, "w") as f:
                    f.write("trainkit\n")
            else:
                self.fs.makedirs(self.run_path, exist_ok=True)
                self.fs.pipe_file(self.path(".trainkit_marker"), b"trainkit\n")
        except Exception as e:  # noqa: BLE001 - any backend error means unusable storage
            raise StorageError(
                f"storage {self.uri!r} is not writable: {type(e).__name__}: {e}. "
                "Check RunConfig.storage_path (and credentials / AWS_ENDPOINT_URL for s3://)."
            ) from e

    def read_bytes(self, rel: str) -> bytes | None:
        p = self.path(rel)
        try:
            if self.local:
                with open(p, "rb") as f:
                    return f.read()
            return self.fs.cat_file(p)
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"{self.path(rel)} is not valid JSON: {e}") from e

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        _retrying("write", self.path(rel), lambda: self._write_bytes_atomic(rel, data))

    def _write_bytes_atomic(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        if self.local:
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(p, data)  # one PUT: atomic on object stores

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_bytes_atomic(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def append_text(self, rel: str, text: str) -> None:
        """Append on local disk; rewrite the whole object elsewhere (object stores cannot append)."""
        _retrying("write", self.path(rel), lambda: self._append_text(rel, text))

    def _append_text(self, rel: str, text: str) -> None:
        p = self.path(rel)
        if self.local:
            with open(p, "a") as f:
                f.write(text)
        else:
            old = self.read_bytes(rel) or b""
            self.fs.pipe_file(p, old + text.encode())

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly in the run directory, or in its folder ``rel``; none if it does not exist."""
        base = self.path(rel) if rel else self.run_path
        try:
            if self.local:
                return sorted(e.name for e in os.scandir(base) if e.is_dir())
            entries = self.fs.ls(base, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def delete_dir(self, rel: str) -> None:
        p = self.path(rel)
        try:
            if self.local:
                shutil.rmtree(p)
            else:
                self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass

    def makedirs(self, rel: str) -> str:
        p = self.path(rel)
        if self.local:
            os.makedirs(p, exist_ok=True)
        else:
            self.fs.makedirs(p, exist_ok=True)
        return p

    # -- checkpoints --------------------------------------------------------------------
    def upload_dir(self, src_fs, src_path: str, rel_dest: str) -> list[str]:
        """Copy a checkpoint folder into ``<run>/<rel_dest>/`` (merged). Returns relative file names."""
        dest = self.path(rel_dest)
        try:
            return _retrying("upload", dest, lambda: self._upload_dir(src_fs, src_path, dest, rel_dest))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"uploading checkpoint to {to_uri(self.fs, dest)} failed: "
                               f"{type(e).__name__}: {e}") from e

    def _upload_dir(self, src_fs, src_path: str, dest: str, rel_dest: str) -> list[str]:
        if is_local(src_fs) and not os.path.isdir(src_path):
            raise FileNotFoundError(f"checkpoint folder {src_path!r} does not exist")
        if self.local and is_local(src_fs):
            return copy_local_tree(src_path, dest)
        if is_local(src_fs):
            files = _walk_local(src_path)
            self.fs.makedirs(dest, exist_ok=True)
            if files:
                self.fs.put([os.path.join(src_path, f) for f in files],
                            [f"{dest}/{f.replace(os.sep, '/')}" for f in files])
            return files
        # remote -> anywhere: go through a local temp folder
        with tempfile.TemporaryDirectory(prefix="trainkit_ckpt_") as tmp:
            src_fs.get(src_path.rstrip("/") + "/", tmp + "/", recursive=True)
            return self.upload_dir(_local_fs(), tmp, rel_dest)


def _walk_local(src: str) -> list[str]:
    out = []
    for root, _dirs, names in os.walk(src):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), src))
    return out


def _local_fs():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def download_tree(fs, src: str, dst: str) -> None:
    """Copy a folder from any filesystem into a local folder."""
    os.makedirs(dst, exist_ok=True)
    if is_local(fs):
        copy_local_tree(src, dst)
        return
    fs.get(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
