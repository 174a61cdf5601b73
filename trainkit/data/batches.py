"""Torch batches: numpy columns to tensors, with dtypes, ``collate_fn`` and the rank's device, as
Ray Data's ``iter_torch_batches`` makes them. Runs in the workers.

A tensor column (Ray's ``ArrowTensorType``, or a column of equal-shape ndarrays in a list of
dicts) arrives here as one ndarray of shape ``[B, *shape]`` and becomes one tensor of that
shape and dtype. Columns numpy cannot give a numeric dtype (strings, ragged tensors) are
passed through as their numpy arrays, where Ray raises (docs/data.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from trainkit.errors import ConfigError

# Ray's collate_fn base classes name the batch format their __call__ takes; a plain callable gets numpy.
_COLLATE_FORMATS = {"ArrowBatchCollateFn": "pyarrow", "NumpyBatchCollateFn": "numpy",
                    "PandasBatchCollateFn": "pandas"}


def collate_format(collate_fn: Optional[Callable]) -> str:
    """The batch format ``collate_fn`` receives, decided as Ray's ``iter_torch_batches`` does."""
    if collate_fn is None:
        return "numpy"
    for klass in type(collate_fn).__mro__:
        fmt = _COLLATE_FORMATS.get(klass.__name__)
        if fmt and klass.__module__.startswith("ray.data"):
            return fmt
    if not callable(collate_fn):
        raise ConfigError("iter_torch_batches(collate_fn)", type(collate_fn).__name__,
                          "a callable (or a ray.data.collate_fn ArrowBatchCollateFn / NumpyBatchCollateFn / "
                          "PandasBatchCollateFn instance)")
    return "numpy"


def torch_options(o: dict, default_device: Optional[Callable[[], Any]]) -> dict:
    import torch

    device = o.get("device", "auto")
    if device in (None, "auto"):
        device = default_device() if default_device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # a shard built outside a session
    collate_fn = o.get("collate_fn")
    if collate_fn is not None and o.get("dtypes") is not None:
        raise ConfigError("iter_torch_batches(dtypes)", o.get("dtypes"), "None when collate_fn is given",
                          hint="convert dtypes inside collate_fn (as Ray's iter_torch_batches requires)")
    return {"device": torch.device(device), "dtypes": o.get("dtypes"), "collate_fn": collate_fn,
            "collate_format": collate_format(collate_fn), "pin_memory": bool(o.get("pin_memory", False))}


def to_torch(batch: Any, opts: dict) -> Any:
    """``batch`` (the numpy dict, a list of plain rows, or what ``collate_fn`` takes) to tensors on the device."""
    import torch

    device = opts["device"]
    if opts["collate_fn"] is not None:
        return _finalize(opts["collate_fn"](batch), device, opts["pin_memory"])
    dtypes = opts["dtypes"]
    if isinstance(batch, dict):
        out = {}
        with warnings.catch_warnings():  # zero-copy views of object-store blocks are read-only, as in Ray Data
            warnings.simplefilter("ignore", UserWarning)
            for k, v in batch.items():
                dt = dtypes.get(k) if isinstance(dtypes, Mapping) else dtypes
                if isinstance(v, np.ndarray) and v.dtype.kind in "biufc":
                    t = torch.as_tensor(v, dtype=dt)
                    if opts["pin_memory"] and device.type == "cuda":
                        t = t.pin_memory()
                    out[k] = t.to(device) if t.device != device else t
                else:
                    out[k] = v
        return out
    from torch.utils.data import default_collate

    collated = default_collate(batch)
    return _move(collated, device, dtypes if not isinstance(dtypes, Mapping) else None)


def _finalize(batch: Any, device, pin_memory: bool) -> Any:
    """Move a tensor batch (a tensor, or a mapping / sequence of them) to ``device``, as Ray's
    finalize step does; anything else is returned as it is (the user moves it)."""
    if not _is_tensor_batch(batch):
        return batch
    if pin_memory and device.type == "cuda":
        batch = _map_tensors(batch, lambda t: t.pin_memory())
    return _map_tensors(batch, lambda t: t.to(device) if t.device != device else t)


def _is_tensor_batch(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return all(isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and v and
                                                   all(isinstance(x, torch.Tensor) for x in v))
                   for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(isinstance(x, torch.Tensor) for x in obj)
    return False


def _map_tensors(obj: Any, fn: Callable) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    return obj


def _move(obj: Any, device, dtype) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if dtype is not None or obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(x, device, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj
