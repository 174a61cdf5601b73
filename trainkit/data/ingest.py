"""Driver-side ingest settings: ``DataConfig`` applied to the trainer's datasets, and ``add_ids``.

``apply_data_config`` runs in ``TorchTrainer(...)`` (before any worker starts), so a bad
``DataConfig`` is a ``ConfigError`` there. It returns the datasets to hand to the backend:
unchanged for the default ``DataConfig()``; a dataset with other settings wrapped in
``Ingest``; a Ray Dataset with ``execution_options`` copied with them (as Ray Train does).
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

from trainkit.data.sources import ID_COLUMN, Ingest, dataset_columns, is_ray_dataset
from trainkit.errors import ConfigError


def _did_you_mean(name: str, names: list) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _check_execution_options(opts: Any, names: list) -> None:
    def is_options(o: Any) -> bool:
        return type(o).__name__ == "ExecutionOptions" and type(o).__module__.startswith("ray.data")

    if opts is None or is_options(opts):
        return
    if isinstance(opts, dict):
        for k, v in opts.items():
            if k not in names:
                raise ConfigError("DataConfig.execution_options", k, f"names of the trainer's datasets {names}",
                                  hint=_did_you_mean(str(k), names).strip())
            if not is_options(v):
                raise ConfigError(f"DataConfig.execution_options[{k!r}]", type(v).__name__,
                                  "a ray.data.ExecutionOptions")
        return
    raise ConfigError("DataConfig.execution_options", type(opts).__name__,
                      "None, a ray.data.ExecutionOptions, or a dict of dataset name -> ExecutionOptions")


def apply_data_config(datasets: dict, dataset_config: Any) -> dict:
    """The datasets as the backend gets them under ``dataset_config`` (a ``trainkit.DataConfig`` or None).

    >>> apply_data_config({"train": [{"id": 0}], "val": [{"id": 0}]}, DataConfig(datasets_to_split=["train"]))
    ... # doctest: +SKIP
    """
    from trainkit.config import DataConfig

    if dataset_config is None:
        return datasets
    if not isinstance(dataset_config, DataConfig):
        raise ConfigError("dataset_config", type(dataset_config).__name__, "a trainkit.DataConfig or None",
                          hint="build it with trainkit.DataConfig(datasets_to_split=..., execution_options=..., "
                               "enable_shard_locality=...)")
    names = list(datasets)
    to_split = dataset_config.datasets_to_split
    if to_split != "all":
        for n in to_split:
            if n not in datasets:
                raise ConfigError("DataConfig.datasets_to_split", n, f"names of the trainer's datasets {names}",
                                  hint=(_did_you_mean(n, names) + "a name not in datasets= would split nothing")
                                  .strip())
    locality = dataset_config.enable_shard_locality
    if not isinstance(locality, bool):
        raise ConfigError("DataConfig.enable_shard_locality", locality, "True or False")
    opts = dataset_config.execution_options
    _check_execution_options(opts, names)
    out = {}
    for name, ds in datasets.items():
        o = opts.get(name) if isinstance(opts, dict) else opts
        if o is not None and is_ray_dataset(ds):
            # Ray Train's way, a copy whose context carries the options; a deep copy, so that the
            # user's dataset (whose context Ray's shallow copy shares) keeps its own
            ds = ds.copy(ds, _deep_copy=True)
            ds.context.execution_options = copy.deepcopy(o)
        split = to_split == "all" or name in to_split
        out[name] = ds if split and locality else Ingest(ds, split=split, locality=locality)
    return out


def add_ids(ds: Any, column: str = ID_COLUMN) -> Any:
    """``ds`` with a unique int64 ``id`` column, so that trainkit can resume it mid-epoch exactly once.

    The id of a row is ``(index of the task that numbered it) << 33 | (row number within that
    task)``. The returned dataset executes with ``preserve_order=True`` (on its own copy of the
    ``DataContext``; ``ds`` is left as it is), so blocks reach the numbering step in the same
    order in every execution and a row gets the same id every time, after any chain of maps,
    filters and reads, provided ``ds`` itself yields its rows in a deterministic order (not
    after ``random_shuffle`` without a seed, for example). Lazy: nothing is executed here.
    A ``DataConfig(execution_options=...)`` given for this dataset should keep
    ``preserve_order=True``.

    >>> from trainkit.data import add_ids  # doctest: +SKIP
    >>> ds = add_ids(ray.data.read_parquet(path))  # doctest: +SKIP
    """
    if not is_ray_dataset(ds):
        raise ConfigError("add_ids(ds)", type(ds).__name__, "a ray.data.Dataset",
                          hint="for a list of dicts, give every row an 'id' key")
    if column in dataset_columns(ds):
        raise ConfigError("add_ids(ds)", f"a Dataset that already has a {column!r} column",
                          f"a Dataset without a {column!r} column", hint="use it as it is, or rename the column")
    ordered = type(ds).copy(ds, _deep_copy=True)  # datasets share their context: change only this one's
    ordered.context.execution_options.preserve_order = True
    return ordered.map_batches(_AddIds(column), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


class _AddIds:
    """The map step of ``add_ids``: runs in Ray Data's tasks."""

    def __init__(self, column: str):
        self.column = column

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        from ray.data._internal.execution.interfaces import TaskContext

        ctx = TaskContext.get_current()
        key = f"_trainkit_add_ids_{self.column}"
        start = ctx.kwargs.get(key, 0)  # rows this task already numbered (a task may make several blocks)
        n = batch.num_rows
        ctx.kwargs[key] = start + n
        ids = (np.int64(ctx.task_idx) << np.int64(33)) + np.arange(start, start + n, dtype=np.int64)
        return batch.append_column(self.column, pa.array(ids))
