"""Sources: where a shard's rows come from. Runs in the driver (prepare) and the workers (read).

* ``RayDataSource``: a Ray ``Dataset`` with an ``id`` column, executed once per fit. The driver
  streams its blocks (``iter_internal_ref_bundles``), reads each block's ``id`` column once,
  one block at a time, and keeps only the block references and their id ranges: the blocks
  stay in Ray's object store (spilled to local disk past its capacity), never all in the
  driver. Blocks that are not sorted and disjoint by id are sorted by Ray Data
  (``ds.sort("id")``, distributed, spilling), not in the driver.
* ``StreamingSource`` (``trainkit.data.stream``): a Ray ``Dataset`` without an ``id`` column,
  streamed to the ranks by ``streaming_split(world_size, equal=True)`` as Ray Train does.
* ``SequenceSource``: a list or a map-style dataset, used as it is.

A dataset with ``DataConfig`` settings comes wrapped in ``Ingest``; one that
``datasets_to_split`` leaves out is read in full by every rank.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from trainkit.data.stream import ADD_IDS_HINT, StreamingSource
from trainkit.errors import ConfigError

ID_COLUMN = "id"  # the column that identifies a row (what ray.data.range makes)
CACHE_BYTES = 256 * 1024 * 1024  # per rank and dataset: blocks kept for later reads (least recently used go)
CACHE_STORE_FRACTION = 0.1  # ... and at most this share of a node's object store (cached blocks stay pinned)


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

    def block_bounds(self) -> Optional[np.ndarray]:
        return None

    def read(self, positions: np.ndarray) -> list:
        return [self.data[int(i)] for i in positions]

    def ids(self, chunk: list, positions: np.ndarray) -> list:
        if self.columnar:
            return [_py(r[ID_COLUMN]) for r in chunk]
        return [int(i) for i in positions]

    def to_numpy(self, chunk: list) -> Any:
        if not self.columnar:
            return chunk
        return {k: _column([r[k] for r in chunk]) for k in chunk[0]} if chunk else {}

    def to_format(self, chunk: list, batch_format: str) -> Any:
        if batch_format == "pandas":
            import pandas as pd

            if not self.columnar:
                return pd.DataFrame({"item": chunk})
            return pd.DataFrame({k: list(v) if isinstance(v, np.ndarray) and v.ndim > 1 else v
                                 for k, v in self.to_numpy(chunk).items()})
        if batch_format == "pyarrow" and self.columnar:
            import pyarrow as pa

            return pa.Table.from_pylist([dict(r) for r in chunk])
        return self.to_numpy(chunk)

    def row(self, chunk: list, i: int) -> Any:
        return chunk[i]


def _column(values: list) -> np.ndarray:
    """One column of a batch: ndarray values of one shape stack to ``[B, *shape]`` (a tensor column,
    as Ray makes it); ragged ones give an object array of the arrays."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({(v.shape, v.dtype) for v in values}) == 1:
            return np.stack(values)
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values)


def _py(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) else v


class RayDataSource:
    """A Ray ``Dataset``'s blocks in the object store, in ``id`` order (see the module doc).

    Built in the driver by ``prepare_ray_dataset``; pickles to block references and offsets,
    so it is shipped to workers cheaply. Workers fetch only the blocks they read (zero-copy from
    the node's object store) and keep at most ``CACHE_BYTES`` of them for later reads.
    """

    def __init__(self, refs: list, bounds: list[int], columns: list[str], name: str = "",
                 offsets: Optional[list[int]] = None):
        self.refs = refs
        self.bounds = np.asarray(bounds, dtype=np.int64)  # block b holds positions [bounds[b], bounds[b+1])
        self.offsets = list(offsets) if offsets is not None else [0] * len(refs)  # first row in the object
        self.columns = columns
        self.name = name
        self.num_rows = int(self.bounds[-1]) if len(self.bounds) else 0
        self.columnar = True
        self._blocks: "OrderedDict[int, Any]" = OrderedDict()
        self._cached_bytes = 0
        self._cache_limit: Optional[int] = None

    def __getstate__(self):
        return {"refs": self.refs, "bounds": self.bounds, "columns": self.columns, "name": self.name,
                "offsets": self.offsets}

    def __setstate__(self, d):
        self.__init__(d["refs"], d["bounds"], d["columns"], d["name"], d.get("offsets"))

    def block_bounds(self) -> np.ndarray:
        return self.bounds

    def _block(self, b: int):
        t = self._blocks.get(b)
        if t is not None:
            self._blocks.move_to_end(b)
            return t
        import ray

        t = ray.get(self.refs[b])
        n = int(self.bounds[b + 1] - self.bounds[b])
        if self.offsets[b] or t.num_rows != n:
            t = t.slice(self.offsets[b], n)
        self._blocks[b] = t
        self._cached_bytes += t.nbytes
        if self._cache_limit is None:
            self._cache_limit = _cache_limit()
        while self._cached_bytes > self._cache_limit and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._cached_bytes -= old.nbytes
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
            return _concat(parts)
        used = np.unique(blocks)
        table = _concat([self._block(int(b)) for b in used])
        starts = np.zeros(len(used), dtype=np.int64)
        starts[1:] = np.cumsum([self.bounds[b + 1] - self.bounds[b] for b in used])[:-1]
        local = p - self.bounds[blocks] + starts[np.searchsorted(used, blocks)]
        return table.take(pa.array(local))

    def ids(self, chunk, positions: np.ndarray) -> list:
        return chunk.column(ID_COLUMN).to_numpy().tolist()

    def to_numpy(self, chunk) -> dict:
        return _arrow_to(chunk, "numpy")

    def to_format(self, chunk, batch_format: str) -> Any:
        if batch_format == "pyarrow":
            return chunk
        return _arrow_to(chunk, "pandas" if batch_format == "pandas" else "numpy")

    def row(self, chunk, i: int) -> dict:
        return {k: _py(v[0]) if isinstance(v, np.ndarray) and v.ndim == 1 else v[0]
                for k, v in _arrow_to(chunk.slice(i, 1), "numpy").items()}


def _cache_limit() -> int:
    """Bytes of blocks a rank keeps: zero-copy views pin their objects, so a share of the store."""
    import ray

    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        store = min(float(n["Resources"].get("object_store_memory", 0)) for n in nodes) if nodes else 0.0
    except Exception:  # noqa: BLE001 - no cluster view: the fixed bound
        store = 0.0
    return int(min(CACHE_BYTES, store * CACHE_STORE_FRACTION)) if store > 0 else CACHE_BYTES


def _arrow_to(table, batch_format: str) -> Any:
    """A pyarrow block as Ray Data converts it (tensor extension columns to ``[B, *shape]`` arrays).

    numpy: numeric and boolean columns directly (Ray's conversion is the same and 5x slower per
    batch); the other columns (tensors, strings, lists) through Ray's ``BlockAccessor``.
    """
    import pyarrow as pa

    if batch_format != "numpy":
        from ray.data.block import BlockAccessor

        return BlockAccessor.for_block(table).to_batch_format(batch_format)
    out: dict = {}
    other = []
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)) and not col.null_count:
            out[name] = col.to_numpy()
        else:
            out[name] = None  # keeps the column order
            other.append(name)
    if other:
        from ray.data.block import BlockAccessor

        out.update(BlockAccessor.for_block(table.select(other)).to_batch_format("numpy"))
    return out


def _concat(tables: list):
    """Concatenate blocks whose tensor column types may differ (fixed vs variable shape), as Ray does."""
    if len(tables) == 1:
        return tables[0]
    try:
        from ray.data._internal.arrow_ops.transform_pyarrow import concat
    except ImportError:  # pragma: no cover - a Ray without it: plain pyarrow (same-typed blocks)
        import pyarrow as pa

        return pa.concat_tables(tables)
    return concat(tables)


def is_ray_dataset(obj: Any) -> bool:
    return hasattr(obj, "streaming_split") and hasattr(obj, "iter_batches")


_is_ray_dataset = is_ray_dataset  # the name other modules imported before
_prepared: "weakref.WeakKeyDictionary[Any, RayDataSource]" = weakref.WeakKeyDictionary()


def dataset_columns(ds: Any) -> list[str]:
    """The column names of a Ray Dataset (its schema: Ray may execute a first block to know it)."""
    schema = ds.schema()
    return list(schema.names) if schema is not None else []


def prepare_ray_dataset(ds: Any, name: str = "") -> RayDataSource:
    """Execute ``ds`` (which has an ``id`` column) once and index its blocks in ``id`` order. Driver side.

    Memory: the driver holds one block at a time (to read its ids) and, after, the block
    references and ``(first id, rows)`` per block; the blocks stay in the object store.
    """
    try:
        return _prepared[ds]
    except (KeyError, TypeError):
        pass
    entries, columns = _index_blocks(ds, name)
    if entries is None:  # blocks overlap or are unsorted: Ray Data sorts them (distributed, spilling)
        entries, columns = _index_blocks(ds.sort(ID_COLUMN), name)
        if entries is None:
            raise ConfigError(f"datasets[{name!r}]", "ids that ds.sort('id') did not order",
                              f"a unique, sortable {ID_COLUMN!r} column")
    if columns and ID_COLUMN not in columns:
        raise _no_id(name, columns)
    bounds = [0]
    for e in entries:
        bounds.append(bounds[-1] + e["rows"])
    src = RayDataSource([e["ref"] for e in entries], bounds, columns, name, [e["offset"] for e in entries])
    try:
        _prepared[ds] = src
    except TypeError:
        pass
    return src


def _no_id(name: str, columns: list) -> ConfigError:
    return ConfigError(f"datasets[{name!r}]", f"a Ray Dataset with columns {columns}",
                       f"a Dataset with a unique {ID_COLUMN!r} column here", hint=ADD_IDS_HINT)


def _bundle_blocks(bundle) -> list:
    """(ref, start row, rows or None) of each block of a Ray Data ``RefBundle``."""
    slices = getattr(bundle, "slices", None) or [None] * len(bundle.blocks)
    out = []
    for entry, sl in zip(bundle.blocks, slices):
        ref = entry.ref if hasattr(entry, "ref") else entry[0]
        if sl is None:
            out.append((ref, 0, None))
        else:
            out.append((ref, int(sl.start_offset), int(sl.end_offset - sl.start_offset)))
    return out


def _index_blocks(ds: Any, name: str) -> tuple[Optional[list], list]:
    """Stream ``ds``'s blocks; ``(entries, columns)``, entries None when they are not sorted and disjoint."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    entries: list = []
    columns: list = []
    ordered = True
    for bundle in ds.iter_internal_ref_bundles():
        for ref, start, rows in _bundle_blocks(bundle):
            t = ray.get(ref)
            if not isinstance(t, pa.Table):  # a pandas block
                from ray.data.block import BlockAccessor

                t = BlockAccessor.for_block(t).to_arrow()
            if rows is None:
                rows = t.num_rows - start
            if rows <= 0:
                continue
            if not columns:
                columns = list(t.column_names)
                if ID_COLUMN not in columns:
                    raise _no_id(name, columns)
            ids = t.column(ID_COLUMN).slice(start, rows)
            del t  # one block in the driver at a time
            if ids.null_count:
                raise ConfigError(f"datasets[{name!r}]", f"a null {ID_COLUMN!r}", f"a unique {ID_COLUMN!r} per row")
            if ordered and rows > 1 and not pc.all(pc.less(ids.slice(0, rows - 1), ids.slice(1))).as_py():
                ordered = False
            entries.append({"ref": ref, "offset": start, "rows": rows, "first": ids[0].as_py(),
                            "last": ids[rows - 1].as_py()})
    if not ordered:
        return None, columns
    try:
        entries.sort(key=lambda e: e["first"])
    except TypeError:
        raise ConfigError(f"datasets[{name!r}]", "ids of mixed types", f"a unique, sortable {ID_COLUMN!r}") from None
    for prev, nxt in zip(entries, entries[1:]):
        if prev["last"] == nxt["first"]:
            raise ConfigError(f"datasets[{name!r}]", f"duplicate {ID_COLUMN}={_py(nxt['first'])!r}",
                              f"a unique {ID_COLUMN!r} per row")
        if prev["last"] > nxt["first"]:
            return None, columns
    return entries, columns


class Ingest:
    """A dataset with its ``DataConfig`` settings that are not the default: ``split=False`` (every
    rank reads all of it: ``datasets_to_split`` leaves it out) or ``locality=False``
    (``enable_shard_locality``). Made by ``trainkit.data.config.apply_data_config`` in the driver;
    ``prepare_datasets`` and ``make_shard`` look inside it.
    """

    def __init__(self, dataset: Any, split: bool = True, locality: bool = True):
        self.dataset = dataset
        self.split = split
        self.locality = locality

    def wrap(self, dataset: Any) -> "Ingest":
        return Ingest(dataset, self.split, self.locality)

    def __len__(self) -> int:  # a backend that passes sequences through to the ranks passes this too
        return len(self.dataset) if hasattr(self.dataset, "__len__") else 0

    def __getitem__(self, i):
        return self.dataset[i]


def prepare_datasets(datasets: dict, make_room: Optional[Callable[[], None]] = None) -> dict:
    """Driver side, before workers start: Ray Datasets (or callables returning one) with an ``id``
    column become ``RayDataSource``s, without one ``StreamingSource``s; sequences pass through.
    ``make_room`` frees CPUs (warm idle workers) when Ray Data would have none to execute on."""
    out = {}
    for name, ds in datasets.items():
        ingest = ds if isinstance(ds, Ingest) else None
        if ingest is not None:
            ds = ingest.dataset
        if callable(ds) and not is_ray_dataset(ds) and not hasattr(ds, "__len__"):
            ds = ds()
        if is_ray_dataset(ds):
            if make_room is not None and ds not in _prepared:
                import ray

                if ray.available_resources().get("CPU", 0) < 1:
                    make_room()
            # a dataset every rank reads in full is executed by each rank (as Ray's ds.iterator())
            ds = _prepare_ray(ds, name, broker=ingest is None or ingest.split,
                              locality=ingest is None or ingest.locality)
        out[name] = ingest.wrap(ds) if ingest is not None else ds
    return out


def _prepare_ray(ds: Any, name: str, *, broker: bool, locality: bool = True):
    try:
        return _prepared[ds]
    except (KeyError, TypeError):
        pass
    if ID_COLUMN in dataset_columns(ds):
        return prepare_ray_dataset(ds, name)
    return StreamingSource(ds, name, broker=broker, locality=locality)


def as_source(dataset: Any, name: str):
    """The source a rank reads ``dataset`` from (in a worker: what the driver prepared; in local mode
    and under torchrun: this process prepares it)."""
    if isinstance(dataset, (RayDataSource, SequenceSource, StreamingSource)):
        return dataset
    if is_ray_dataset(dataset):
        return _prepare_ray(dataset, name, broker=False)  # local mode / torchrun: this process executes it
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return SequenceSource(dataset, name)
    raise ConfigError(f"datasets[{name!r}]", type(dataset).__name__,
                      "a ray.data.Dataset, a list, or a map-style torch Dataset (with __len__ and __getitem__)")
