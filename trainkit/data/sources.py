"""Sources: where a shard's rows come from. A Ray ``Dataset`` is executed once in the driver and
kept in the object store in id order (``RayDataSource``); sequences are used as they are
(``SequenceSource``). Runs in the driver (prepare) and the workers (read).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from trainkit.errors import ConfigError

ID_COLUMN = "id"  # the column that identifies a row (what ray.data.range makes)
_PUT_ROWS = 65536  # rows per block when a dataset has to be re-sorted by id


class SequenceSource:
    """A list or map-style dataset; positions are indices. Row id: ``row["id"]`` for mapping rows,
    else the index."""

    def __init__(self, data: Any, name: str = ""):
        self.data = data
        self.num_rows = len(data)
        first = data[0] if self.num_rows else None
        self.columnar = isinstance(first, Mapping)
        if self.columnar and ID_COLUMN not in first:
            raise ConfigError(f"datasets[{name!r}]", f"rows with keys {sorted(first)[:8]}",
                              f"rows with a unique {ID_COLUMN!r} key (row ids make shards and resumption "
                              "exact)", hint=f"add an {ID_COLUMN!r} field to every row")

    def read(self, positions: np.ndarray) -> list:
        return [self.data[int(i)] for i in positions]

    def ids(self, chunk: list, positions: np.ndarray) -> list:
        if self.columnar:
            return [_py(r[ID_COLUMN]) for r in chunk]
        return [int(i) for i in positions]

    def to_numpy(self, chunk: list) -> Any:
        if not self.columnar:
            return chunk
        return {k: np.asarray([r[k] for r in chunk]) for k in chunk[0]} if chunk else {}

    def to_format(self, chunk: list, batch_format: str) -> Any:
        if batch_format == "pandas":
            import pandas as pd

            return pd.DataFrame(list(chunk)) if self.columnar else pd.DataFrame({"item": chunk})
        return self.to_numpy(chunk)

    def row(self, chunk: list, i: int) -> Any:
        return chunk[i]


def _py(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) else v


class RayDataSource:
    """A Ray ``Dataset`` executed once, as pyarrow blocks in the object store, sorted by ``id``.

    Built in the driver by ``prepare_datasets``; pickles to block references, so it is
    shipped to workers cheaply. Workers fetch only the blocks they read (zero-copy from
    the node's object store) and keep them for later epochs.
    """

    def __init__(self, refs: list, bounds: list[int], columns: list[str], name: str = ""):
        self.refs = refs
        self.bounds = np.asarray(bounds, dtype=np.int64)  # block b holds positions [bounds[b], bounds[b+1])
        self.columns = columns
        self.name = name
        self.num_rows = int(self.bounds[-1]) if len(self.bounds) else 0
        self.columnar = True
        self._blocks: dict[int, Any] = {}

    def __getstate__(self):
        return {"refs": self.refs, "bounds": self.bounds, "columns": self.columns, "name": self.name}

    def __setstate__(self, d):
        self.__init__(d["refs"], d["bounds"], d["columns"], d["name"])

    def _block(self, b: int):
        t = self._blocks.get(b)
        if t is None:
            import ray

            t = self._blocks[b] = ray.get(self.refs[b])
        return t

    def read(self, positions: np.ndarray):
        import pyarrow as pa

        p = positions
        if p.size == 0:
            return self._block(0).slice(0, 0) if self.refs else pa.table({})
        blocks = np.searchsorted(self.bounds, p, side="right") - 1
        contiguous = bool(np.all(np.diff(p) == 1))
        if contiguous and blocks[0] == blocks[-1]:  # one block: a zero-copy slice
            return self._block(int(blocks[0])).slice(int(p[0] - self.bounds[blocks[0]]), int(p.size))
        if contiguous:
            parts = []
            for b in range(int(blocks[0]), int(blocks[-1]) + 1):
                lo = max(int(p[0]), int(self.bounds[b]))
                hi = min(int(p[-1]) + 1, int(self.bounds[b + 1]))
                parts.append(self._block(b).slice(lo - int(self.bounds[b]), hi - lo))
            return pa.concat_tables(parts)
        used = np.unique(blocks)
        table = pa.concat_tables([self._block(int(b)) for b in used])
        starts = np.zeros(len(used), dtype=np.int64)
        starts[1:] = np.cumsum([self.bounds[b + 1] - self.bounds[b] for b in used])[:-1]
        local = p - self.bounds[blocks] + starts[np.searchsorted(used, blocks)]
        return table.take(pa.array(local))

    def ids(self, chunk, positions: np.ndarray) -> list:
        return chunk.column(ID_COLUMN).to_numpy().tolist()

    def to_numpy(self, chunk) -> dict:
        return {c: chunk.column(c).to_numpy() for c in chunk.column_names}

    def to_format(self, chunk, batch_format: str) -> Any:
        if batch_format == "pyarrow":
            return chunk
        if batch_format == "pandas":
            return chunk.to_pandas()
        return self.to_numpy(chunk)

    def row(self, chunk, i: int) -> dict:
        return {c: _py(chunk.column(c)[i].as_py()) for c in chunk.column_names}


def _is_ray_dataset(obj: Any) -> bool:
    return hasattr(obj, "streaming_split") and hasattr(obj, "iter_batches")


_prepared: "weakref.WeakKeyDictionary[Any, RayDataSource]" = weakref.WeakKeyDictionary()


def prepare_ray_dataset(ds: Any, name: str = "") -> RayDataSource:
    """Execute ``ds`` once and keep its rows in the object store in ``id`` order. Driver side."""
    try:
        return _prepared[ds]
    except (KeyError, TypeError):
        pass
    import pyarrow as pa
    import ray

    refs = ds.to_arrow_refs()
    tables = ray.get(refs)
    keep = [(r, t) for r, t in zip(refs, tables) if t.num_rows]
    columns = list(tables[0].column_names) if tables else []
    if ID_COLUMN not in columns:
        raise ConfigError(f"datasets[{name!r}]", f"a Ray Dataset with columns {columns}",
                          f"a Dataset with a unique {ID_COLUMN!r} column (as ray.data.range() makes): trainkit "
                          "orders, shards and resumes by row id",
                          hint=f"add one, e.g. ds = ds.map_batches(add_ids) or build it with an {ID_COLUMN!r} field")
    ordered = _ordered_blocks(keep)
    if ordered is None:  # blocks overlap or are unsorted: sort the whole table once
        full = pa.concat_tables([t for _, t in keep]).sort_by(ID_COLUMN) if keep else None
        ids = full.column(ID_COLUMN).to_numpy(zero_copy_only=False) if full is not None else np.empty(0)
        _check_unique(ids, name)
        ordered = []
        for start in range(0, full.num_rows if full is not None else 0, _PUT_ROWS):
            t = full.slice(start, _PUT_ROWS)
            ordered.append((ray.put(t), t))
    bounds = [0]
    for _, t in ordered:
        bounds.append(bounds[-1] + t.num_rows)
    src = RayDataSource([r for r, _ in ordered], bounds, columns, name)
    try:
        _prepared[ds] = src
    except TypeError:
        pass
    return src


def _check_unique(ids: np.ndarray, name: str) -> None:
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
        dup = ids[1:][ids[1:] == ids[:-1]][0]
        raise ConfigError(f"datasets[{name!r}]", f"duplicate {ID_COLUMN}={_py(dup)!r}",
                          f"a unique {ID_COLUMN!r} per row")


def _ordered_blocks(blocks: list) -> Optional[list]:
    """Blocks in id order when each is sorted and they do not overlap (as ray.data.range makes); else None."""
    info = []
    for ref, t in blocks:
        ids = t.column(ID_COLUMN).to_numpy(zero_copy_only=False)
        if ids.dtype.kind not in "iuf":
            return None
        d = np.diff(ids)
        if d.size and d.min() <= 0:
            return None
        info.append((ids[0], ids[-1], ref, t))
    info.sort(key=lambda x: x[0])
    for prev, nxt in zip(info, info[1:]):
        if prev[1] >= nxt[0]:
            return None
    return [(ref, t) for _, _, ref, t in info]


def prepare_datasets(datasets: dict, make_room: Optional[Callable[[], None]] = None) -> dict:
    """Driver side, before workers start: Ray Datasets (or callables returning one) become
    ``RayDataSource``s; sequences pass through. ``make_room`` frees CPUs (warm idle workers)
    when Ray Data would have none to execute on."""
    out = {}
    for name, ds in datasets.items():
        if callable(ds) and not _is_ray_dataset(ds) and not hasattr(ds, "__len__"):
            ds = ds()
        if _is_ray_dataset(ds):
            if make_room is not None and ds not in _prepared:
                import ray

                if ray.available_resources().get("CPU", 0) < 1:
                    make_room()
            out[name] = prepare_ray_dataset(ds, name)
        else:
            out[name] = ds
    return out


def as_source(dataset: Any, name: str):
    if isinstance(dataset, (RayDataSource, SequenceSource)):
        return dataset
    if _is_ray_dataset(dataset):
        return prepare_ray_dataset(dataset, name)  # local mode / torchrun: this process executes it
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return SequenceSource(dataset, name)
    raise ConfigError(f"datasets[{name!r}]", type(dataset).__name__,
                      "a ray.data.Dataset, a list, or a map-style torch Dataset (with __len__ and __getitem__)")
