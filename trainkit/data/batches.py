"""Torch batches: numpy columns to tensors, with dtypes and the rank's device. Runs in the workers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np


def torch_options(o: dict, default_device: Optional[Callable[[], Any]]) -> dict:
    import torch

    device = o.get("device", "auto")
    if device in (None, "auto"):
        device = default_device() if default_device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # a shard built outside a session
    return {"device": torch.device(device), "dtypes": o.get("dtypes"), "collate_fn": o.get("collate_fn")}


def to_torch(batch: Any, opts: dict) -> Any:
    import torch

    if opts["collate_fn"] is not None:
        return opts["collate_fn"](batch)
    device, dtypes = opts["device"], opts["dtypes"]
    if isinstance(batch, dict):
        out = {}
        with warnings.catch_warnings():  # zero-copy views of object-store blocks are read-only, as in Ray Data
            warnings.simplefilter("ignore", UserWarning)
            for k, v in batch.items():
                dt = dtypes.get(k) if isinstance(dtypes, Mapping) else dtypes
                if isinstance(v, np.ndarray) and v.dtype.kind in "biufc":
                    t = torch.as_tensor(v, dtype=dt)
                    out[k] = t.to(device) if t.device != device else t
                else:
                    out[k] = v
        return out
    from torch.utils.data import default_collate

    collated = default_collate(batch)
    return _move(collated, device, dtypes if not isinstance(dtypes, Mapping) else None)


def _move(obj: Any, device, dtype) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if dtype is not None or obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(x, device, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj
