"""Storage I/O errors and retries: what a failed read or write of a run folder becomes.

``StorageIOError`` (a ``StorageError`` and an ``OSError``) names the path, the errno text,
whether trainkit retried, and what to change. Writes are tried ``WRITE_TRIES`` times
(object stores throttle and drop requests), except failures that trying again cannot fix
(``NOT_RETRIED``: a full, read-only or forbidden storage). Every try passes the fault
point, where fault injection installs a hook (``set_fault_hook``). Used by
``trainkit.storage``; runs in the driver, the controller and workers alike.
"""

from __future__ import annotations

import errno
import time
from typing import Optional

from trainkit.errors import StorageError


class StorageIOError(StorageError, OSError):
    """A read or write of the run's storage failed; also an ``OSError``, as the failure under it was.

    ``errno`` is that failure's error number (None when the filesystem gave none) and
    ``filename`` the path; the message names both, says whether trainkit retried, and what
    to change. Survives pickling (it crosses from the controller and workers to the driver).

    >>> str(StorageIOError("writing /r/run_state.json failed: no space", 28, "/r/run_state.json"))
    'writing /r/run_state.json failed: no space'
    """

    def __init__(self, message: str, errno: Optional[int] = None, filename: Optional[str] = None):
        StorageError.__init__(self, message)
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return (type(self), (str(self), self.errno, self.filename))


# Writes are retried (object stores throttle and drop requests); every try passes the fault point,
# where fault_injection installs a hook (called with the operation and path) that may raise OSError.
WRITE_TRIES = 4
# Failures that trying again cannot fix: a full, read-only or forbidden storage.
NOT_RETRIED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_HINTS = {
    errno.ENOSPC: "the storage is full: free space there, or set RunConfig.storage_path to a filesystem with room",
    errno.EDQUOT: "the storage quota is used up: free space there, or set RunConfig.storage_path elsewhere",
    errno.EROFS: "the storage is read-only: set RunConfig.storage_path to a writable location",
    errno.EACCES: "permission denied: check the permissions of RunConfig.storage_path (and the credentials, "
                  "for s3://)",
}
_HINTS[errno.EPERM] = _HINTS[errno.EACCES]
_DEFAULT_HINT = "check RunConfig.storage_path (and credentials / AWS_ENDPOINT_URL for s3://)"
_fault_hook = None


def set_fault_hook(hook) -> None:
    """Install ``hook(operation, path)`` ("write" or "upload"), called before every try; None removes it."""
    global _fault_hook
    _fault_hook = hook


def retryable(e: BaseException) -> bool:
    """Whether trying again may help: OSErrors other than a missing path, a full, read-only or
    forbidden storage."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(e, OSError) and e.errno not in NOT_RETRIED


def fault_hook():
    """The hook ``set_fault_hook`` installed (None: none)."""
    return _fault_hook


def retrying(operation: str, path: str, fn):
    """``fn()``, tried up to ``WRITE_TRIES`` times while its ``OSError`` is ``retryable``; the fault hook
    is called before every try."""
    for attempt in range(WRITE_TRIES):
        try:
            if _fault_hook is not None:
                _fault_hook(operation, path)
            return fn()
        except OSError as e:
            if attempt == WRITE_TRIES - 1 or not retryable(e):
                raise
            time.sleep(0.05 * 2 ** attempt)


def errno_of(e: BaseException) -> Optional[int]:
    code = getattr(e, "errno", None)
    if code is None and isinstance(e, PermissionError):
        return errno.EACCES
    return code if isinstance(code, int) else None


def hint_for(code: Optional[int]) -> str:
    """What to change for a storage failure with this errno."""
    return _HINTS.get(code, _DEFAULT_HINT)


def storage_io_error(action: str, uri: str, e: BaseException) -> StorageIOError:
    """The ``StorageIOError`` for ``action`` ("writing", "reading", ...) of ``uri`` that failed with ``e``:
    the path, the errno text, whether it was retried, and what to change."""
    code = errno_of(e)
    name = errno.errorcode.get(code, str(code)) if code is not None else None
    tried = "not retried" if not retryable(e) else f"after {WRITE_TRIES} tries"
    detail = f"{name}, {tried}" if name else tried
    return StorageIOError(f"{action} {uri} failed: {type(e).__name__}: {e} ({detail}); "
                          f"{_HINTS.get(code, _DEFAULT_HINT)}", code, uri)
