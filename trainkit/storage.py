"""The one storage layer: a run directory ``<storage_path>/<name>/`` on any fsspec filesystem.

Layout::

    <storage_path>/<name>/
        run_state.json        the manifest: committed checkpoints (with their files), attempts, status, error
        events.jsonl          the one event stream (see trainkit.events)
        checkpoint_<index>/   one folder per committed checkpoint (report index)
        diagnostics/          hang dumps and other evidence
        logs/                 per attempt and rank stdout/stderr
        owner.json            the lease of the driver that owns the run while it runs (trainkit.lease)

Invariants: the manifest is replaced atomically (rename on local disk, one PUT on
object stores); a checkpoint folder is written in full before the manifest names it.
A run folder belongs to its run: ``ensure`` refuses an existing folder that holds other
things and no trainkit run (``check_owned``), and nothing outside the names trainkit
writes is ever deleted. Every failure of the storage is a ``StorageError``
(``StorageIOError`` for reads and writes: the path, the errno text, what to change);
a full, read-only or forbidden storage is not retried and is remembered in
``RunStore.unusable``. Local filesystems take a fast path through ``os``/``shutil``.
Runs in the driver, the controller and workers alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import tempfile
import uuid
from typing import Any, Optional

from trainkit.errors import ConfigError, StorageError
# The storage layer's error and retry names, re-exported: callers import them from here.
from trainkit.storage_io import (NOT_RETRIED, WRITE_TRIES, StorageIOError, errno_of, fault_hook,  # noqa: F401
                                 hint_for, retryable, retrying, set_fault_hook, storage_io_error)


MANIFEST = "run_state.json"
EVENTS = "events.jsonl"
DIAGNOSTICS = "diagnostics"
LOGS = "logs"
MARKER = ".trainkit_marker"
OWNER = "owner.json"  # the lease of the driver that owns the run (trainkit.lease)
RESERVED = frozenset({MANIFEST, EVENTS, DIAGNOSTICS, LOGS, MARKER, OWNER})
# Temporary names trainkit writes and renames away: ``<file>.tmp-<8 hex>`` (an atomic local write) and
# ``.<file>.<pid>.<thread>.part`` (a checkpoint file being copied). Only these are removed as leftovers.
TEMP_NAME = re.compile(r"(?:.+\.tmp-[0-9a-f]{8}|\..+\.\d+\.\d+\.part)")
CHECKPOINT_NAME = re.compile(r"checkpoint_\d+")  # the default checkpoint folder of report k

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
            try:
                shutil.copyfile(os.path.join(root, n), tmp)
                os.replace(tmp, os.path.join(target_root, n))
            except BaseException:
                _remove_quietly(tmp)
                raise
            files.append(n if rel_root == "." else os.path.join(rel_root, n))
    return files


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def check_checkpoint_dir_name(name: Any) -> None:
    """Refuse a ``checkpoint_dir_name`` that is not a plain folder name, or that trainkit itself uses in
    the run folder (``logs``, ``diagnostics``, ``run_state.json``, ``events.jsonl``, its temp names)."""
    allowed = "a folder name without '/', not starting with '.', and not one trainkit uses in the run folder"
    if not isinstance(name, str) or not name:
        raise ConfigError("report(checkpoint_dir_name)", name, allowed + " (or None for checkpoint_<index>)")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ConfigError("report(checkpoint_dir_name)", name, allowed)
    if name in RESERVED or TEMP_NAME.fullmatch(name):
        raise ConfigError("report(checkpoint_dir_name)", name, allowed,
                          hint=f"{', '.join(sorted(RESERVED - {MARKER}))} and temporary names are trainkit's")


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
        # The first failure that retrying cannot fix (full, read-only, forbidden), seen by this process.
        self.unusable: Optional[StorageIOError] = None

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

    def _failed(self, action: str, path: str, e: BaseException) -> StorageIOError:
        err = storage_io_error(action, to_uri(self.fs, path), e)
        if err.errno in NOT_RETRIED and self.unusable is None:
            self.unusable = err
        return err

    def _io(self, operation: str, action: str, path: str, fn):
        """Run ``fn`` with retries; any failure becomes a ``StorageIOError`` naming ``path``."""
        try:
            return retrying(operation, path, fn)
        except (StorageError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - every backend's failure is the storage's failure
            raise self._failed(action, path, e) from e

    # -- the run folder -----------------------------------------------------------------
    def entries(self) -> Optional[list[str]]:
        """Names directly in the run folder (folders with a trailing ``/``); None if it does not exist."""
        try:
            if self.local:
                if os.path.isfile(self.run_path):
                    return [""]  # a file where the folder should be
                return sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(self.run_path))
            found = self.fs.ls(self.run_path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as e:  # noqa: BLE001
            raise self._failed("listing", self.run_path, e) from e
        out = []
        for info in found:
            name = info["name"].rstrip("/")
            if name == self.run_path.rstrip("/"):
                return [""] if info.get("type") == "file" else []
            out.append(name.rsplit("/", 1)[-1] + ("/" if info.get("type") == "directory" else ""))
        return sorted(out)

    def check_owned(self) -> None:
        """Refuse (``ConfigError``, touching nothing) a run folder that exists and holds things but no
        trainkit run: no ``run_state.json``, ``events.jsonl``, ``.trainkit_marker`` or ``owner.json``."""
        names = self.entries()
        if not names:
            return
        if names == [""]:
            raise ConfigError("RunConfig.name", self.name, f"the name of a run folder, but {self.uri} is a file",
                              hint="choose another RunConfig.name or RunConfig.storage_path")
        if {MANIFEST, EVENTS, MARKER, OWNER} & set(names):
            return
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError("RunConfig.name", self.name,
                          f"a new run or a trainkit run folder (one with {MANIFEST} or {EVENTS}); {self.uri} "
                          f"holds {shown} but no {MANIFEST} or {EVENTS}, so it is not a trainkit run",
                          hint="trainkit left it untouched: choose another RunConfig.name or RunConfig.storage_path")

    # -- basic operations -------------------------------------------------------------
    def ensure(self) -> None:
        """Check that the run folder is new or a trainkit run's (``check_owned``), create it, and check
        that it is writable."""
        self.check_owned()
        try:
            if self.local:
                os.makedirs(self.run_path, exist_ok=True)
                probe = self.path(MARKER)
                with open(probe, "w") as f:
                    f.write("trainkit\n")
            else:
                self.fs.makedirs(self.run_path, exist_ok=True)
                self.fs.pipe_file(self.path(MARKER), b"trainkit\n")
        except Exception as e:  # noqa: BLE001 - any backend error means unusable storage
            err = self._failed("writing", self.path(MARKER), e)
            hint = hint_for(err.errno)
            raise StorageIOError(f"storage {self.uri!r} is not writable: {type(e).__name__}: {e}. "
                                 f"{hint[0].upper()}{hint[1:]}.", err.errno, err.filename) from e

    def read_bytes(self, rel: str) -> bytes | None:
        p = self.path(rel)
        try:
            if self.local:
                with open(p, "rb") as f:
                    return f.read()
            return self.fs.cat_file(p)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise storage_io_error("reading", to_uri(self.fs, p), e) from e

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"{self.path(rel)} is not valid JSON: {e}") from e

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        self._io("write", "writing", self.path(rel), lambda: self._write_bytes_atomic(rel, data))

    def _write_bytes_atomic(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        if self.local:
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, p)
            except BaseException:
                _remove_quietly(tmp)
                raise
        else:
            self.fs.pipe_file(p, data)  # one PUT: atomic on object stores

    def write_json_atomic(self, rel: str, obj: Any) -> None:
        self.write_bytes_atomic(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def append_text(self, rel: str, text: str) -> None:
        """Append on local disk; rewrite the whole object elsewhere (object stores cannot append).

        A try after a failed one starts with a newline: a local append that failed half-way left a
        torn line, and the text must not continue it."""
        failed = []

        def once():
            try:
                self._append_text(rel, "\n" + text if failed and self.local else text)
            except BaseException:
                failed.append(True)
                raise

        self._io("write", "writing", self.path(rel), once)

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
        except Exception as e:  # noqa: BLE001
            raise self._failed("listing", base, e) from e
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def file_sizes(self, rel: str = "") -> Optional[dict[str, int]]:
        """Relative name (``/``-separated) -> size in bytes of every file under the run folder's ``rel``
        (the run folder itself for ""), from one listing; None when that folder does not exist."""
        base = self.path(rel) if rel else self.run_path
        try:
            if self.local:
                if not os.path.isdir(base):
                    return None
                out = {}
                for root, _dirs, names in os.walk(base):
                    for n in names:
                        full = os.path.join(root, n)
                        try:
                            out[os.path.relpath(full, base).replace(os.sep, "/")] = os.stat(full).st_size
                        except FileNotFoundError:  # removed while listing
                            pass
                return out
            found = self.fs.find(base, detail=True)
            prefix = base.rstrip("/") + "/"
            out = {name[len(prefix):]: int(info.get("size") or 0) for name, info in found.items()
                   if name.startswith(prefix) and info.get("type") != "directory"}
            if not out and not self.fs.isdir(base):
                return None
            return out
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as e:  # noqa: BLE001
            raise self._failed("listing", base, e) from e

    def remove_temp_files(self, dirs: tuple = ()) -> list[str]:
        """Delete trainkit's own leftover temporary files (``TEMP_NAME``) in the run folder and in its
        folders ``dirs``. Only local disk has them (object stores are written in one PUT per file).
        Returns the relative names removed."""
        if not self.local:
            return []
        removed = []
        for rel in ("", *dirs):
            base = self.path(rel) if rel else self.run_path
            for root, sub, names in os.walk(base):
                if not rel:
                    sub[:] = []  # the run folder's own files only; checkpoint folders are given in dirs
                for n in names:
                    if TEMP_NAME.fullmatch(n):
                        full = os.path.join(root, n)
                        _remove_quietly(full)
                        removed.append(os.path.relpath(full, self.run_path))
        return removed

    def delete_dir(self, rel: str) -> None:
        p = self.path(rel)
        try:
            if self.local:
                shutil.rmtree(p)
            else:
                self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise self._failed("deleting", p, e) from e

    def makedirs(self, rel: str) -> str:
        p = self.path(rel)
        try:
            if self.local:
                os.makedirs(p, exist_ok=True)
            else:
                self.fs.makedirs(p, exist_ok=True)
        except Exception as e:  # noqa: BLE001
            raise self._failed("creating", p, e) from e
        return p

    # -- checkpoints --------------------------------------------------------------------
    def upload_dir(self, src_fs, src_path: str, rel_dest: str) -> list[str]:
        """Copy a checkpoint folder into ``<run>/<rel_dest>/`` (merged). Returns relative file names.

        A missing source folder raises ``FileNotFoundError``; a failed copy, ``StorageIOError``."""
        check_checkpoint_dir_name(rel_dest)
        if is_local(src_fs):
            if os.path.isfile(src_path):
                raise ConfigError("report(checkpoint)", src_path, "a checkpoint folder",
                                  hint="it is a file: pass the folder that holds it to Checkpoint.from_directory()")
            if not os.path.isdir(src_path):
                raise FileNotFoundError(f"checkpoint folder {src_path!r} does not exist")
        dest = self.path(rel_dest)
        return self._io("upload", "uploading the checkpoint to", dest,
                        lambda: self._upload_dir(src_fs, src_path, dest, rel_dest))

    def _upload_dir(self, src_fs, src_path: str, dest: str, rel_dest: str) -> list[str]:
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
            return self._upload_dir(_local_fs(), tmp, dest, rel_dest)


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
