"""The user's training function, pickled for worker processes with its real file names.

Runs in the driver (``dumps_train_fn``) and in workers (``loads_train_fn``).

A function defined in ``__main__`` or in a test module is pickled *by value* (workers may
not be able to import that module). cloudpickle 3.1.3 writes ``"<dynamic-code>"`` in place
of every pickled code object's ``co_filename``; the rebuilt function then shows
``File "<dynamic-code>", line 39`` in tracebacks, py-spy stacks lose the user's file, and
hang classification cannot tell user code from library code. Ray's vendored cloudpickle
(3.1.2) keeps the name, so the difference appears only with the standalone package.

``_Pickler`` wraps whatever reducer cloudpickle registers for code objects and rebuilds each
code object with the file name it had in the driver. Every code object goes through the
pickler's dispatch table, so nested functions, lambdas, comprehensions and helper
functions pickled along with the training function keep their file too. The invariant,
checked by tests/unit/test_serialize.py against the installed cloudpickle and against a
pickler that behaves like 3.1.3: ``loads_train_fn(dumps_train_fn(f))`` has the same
``co_filename`` and line numbers as ``f`` in every code object.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
from collections import ChainMap
from typing import Any, Callable

import cloudpickle

_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table.get(types.CodeType)


def _rebuild_code(constructor: Callable[..., Any], args: tuple, filename: str) -> types.CodeType:
    """Worker side: build the code object as cloudpickle would, then give it back its file name."""
    code = constructor(*args)
    if code.co_filename != filename:
        code = code.replace(co_filename=filename)
    return code


def _reduce_code(code: types.CodeType):
    if _cloudpickle_code_reduce is None:  # a cloudpickle that no longer reduces code here
        raise pickle.PicklingError(
            f"cloudpickle {cloudpickle.__version__} does not register a reducer for code objects; "
            "trainkit supports cloudpickle>=3.0,<4 (see trainkit/_serialize.py)")
    constructor, args = _cloudpickle_code_reduce(code)
    return _rebuild_code, (constructor, args, code.co_filename)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, with code objects that keep ``co_filename``."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` that keeps the file names of pickled code objects."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps_train_fn(fn: Callable) -> bytes:
    """Pickle the training function, by value when it lives in a user's module (a test file, a script).

    Modules under site-packages, trainkit, torch and ray are pickled by reference: workers
    import them. ``__main__`` is always pickled by value by cloudpickle.
    """
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    by_value = (mod is not None and mod.__name__ != "__main__"
                and not mod.__name__.startswith(("trainkit.", "torch", "ray")) and _is_user_module(mod))
    if by_value:
        cloudpickle.register_pickle_by_value(mod)
    try:
        return dumps(fn)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(mod)


def loads_train_fn(data: bytes) -> Callable:
    """Worker side of ``dumps_train_fn``."""
    return pickle.loads(data)


def _is_user_module(mod: types.ModuleType) -> bool:
    path = getattr(mod, "__file__", None) or ""
    return bool(path) and "site-packages" not in path and "dist-packages" not in path
