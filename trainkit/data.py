"""Dataset shards for ``get_dataset_shard``, with mid-epoch resumption.

What runs where:

* driver: ``prepare_datasets`` turns each Ray ``Dataset`` into a ``RayDataSource``: the
  dataset is executed once per fit, its blocks are put in id order (rows are identified
  by the column ``id``) and kept in the object store. Errors (no ``id`` column, duplicate
  ids) are raised here, before any worker starts. Sequences (lists, map-style torch
  datasets) are used as they are.
* worker (each rank): ``make_shard`` builds this rank's ``DataShard``; it reads only the
  blocks that hold its rows.

Row order and positions: the rows of a source have a fixed order (id order for a Ray
``Dataset``, index order for a sequence); a row's *position* is its place in that order.
An epoch pass of rank ``r`` of ``W`` reads a *plan*: a list of position ranges. A fresh
epoch splits ``[0, N)`` into ``W`` contiguous blocks whose sizes differ by at most one
(``shard_bounds``), so a shard is a deterministic function of (dataset, world size, rank).

Resumption state (``state_dict()``, JSON): the epoch, this rank's plan, the number of
rows of the plan already handed to the training loop (``consumed``) and the local shuffle
parameters. The iteration order is a pure function of (plan, shuffle, epoch), so the set
of consumed positions is recomputed from the state; the state stays small. Restoring:

* one rank's own state (same world size and rank): that rank continues with the rows of
  its plan it has not consumed;
* the list of every rank's state (any world size): the rows of the epoch not consumed by
  any rank are gathered in position order and split again into ``W'`` blocks. None is
  dropped, none repeated. A state whose plan was fully consumed means "epoch done": the
  next pass is the next epoch.

The remaining rows then form the first pass after the restore; every later
``iter_batches`` call is a full new epoch. See docs/data.md.
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from trainkit.errors import ConfigError

STATE_VERSION = 1
ID_COLUMN = "id"
_PUT_ROWS = 65536  # rows per block when a dataset has to be re-sorted by id


# -- pure helpers: position ranges -------------------------------------------------------------
def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s block of ``n`` rows; sizes differ by at most one.

    >>> [shard_bounds(10, 3, r) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def to_ranges(positions: np.ndarray) -> list[list[int]]:
    """Sorted unique positions -> ``[[start, stop), ...]`` runs."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return []
    breaks = np.nonzero(np.diff(p) != 1)[0]
    starts = np.concatenate(([p[0]], p[breaks + 1]))
    stops = np.concatenate((p[breaks] + 1, [p[-1] + 1]))
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def from_ranges(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    if not ranges:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def ranges_len(ranges: Sequence[Sequence[int]]) -> int:
    return int(sum(b - a for a, b in ranges))


def iteration_order(plan: Sequence[Sequence[int]], shuffle: Optional[dict], epoch: int) -> np.ndarray:
    """Positions of ``plan`` in the order a pass hands them out.

    Without shuffle: plan order. With ``{"buffer_size": s, "seed": k}``: the plan is cut
    into windows of ``s`` rows and each window is permuted by a generator seeded with
    ``(k, epoch)``; a pure function of its arguments, so a restore can recompute it.
    """
    pos = from_ranges(plan)
    if shuffle and pos.size:
        s = max(1, int(shuffle["buffer_size"]))
        rng = np.random.default_rng([int(shuffle["seed"]), int(epoch)])
        for i in range(0, pos.size, s):
            pos[i:i + s] = rng.permutation(pos[i:i + s])
    return pos


def remaining_positions(state: dict) -> np.ndarray:
    """Sorted positions of ``state``'s plan that were not handed out yet."""
    order = iteration_order(state["plan"], state.get("shuffle"), state["epoch"])
    return np.sort(order[int(state["consumed"]):])


def _bad_state(what: str, value: Any, hint: str = "") -> ConfigError:
    return ConfigError("get_dataset_shard(state_dict)", value, what, hint=hint)


def _check_state(s: Any, num_rows: int, name: str) -> dict:
    if not isinstance(s, Mapping) or s.get("version") != STATE_VERSION or "plan" not in s:
        raise _bad_state("a dict from shard.state_dict() or iterator.state_dict() (or a list of them)",
                         type(s).__name__ if not isinstance(s, Mapping) else {k: s[k] for k in list(s)[:4]})
    if int(s["num_rows"]) != num_rows:
        raise _bad_state(f"a state of a dataset with {num_rows} rows", f"a state saved with {s['num_rows']} rows",
                         hint=f"the dataset {name!r} changed between save and restore; resume needs the same rows")
    return dict(s)


def plan_after_restore(states: Any, num_rows: int, world_size: int, world_rank: int,
                       name: str = "") -> tuple[int, Optional[list[list[int]]]]:
    """The (epoch, plan) of this rank's first pass after restoring from ``states``.

    ``plan`` is None when the saved epoch was fully consumed: the next pass is a fresh
    epoch. Pure: every rank computes its own part of the same split.
    """
    if isinstance(states, Mapping):
        s = _check_state(states, num_rows, name)
        if int(s["world_size"]) != world_size or int(s["world_rank"]) != world_rank:
            raise _bad_state(
                f"this rank's own state (world_rank={world_rank}, world_size={world_size})",
                f"the state of world_rank={s['world_rank']} of world_size={s['world_size']}",
                hint="save every rank's state (trainkit.data.save_shard_state in each rank's checkpoint folder) "
                     "and pass the list of all of them (trainkit.data.load_shard_states) to resume after a "
                     "world-size change")
        states = [s]
        all_ranks = False
    else:
        if not isinstance(states, (list, tuple)) or not states:
            raise _bad_state("a state dict or a non-empty list of every rank's state dicts", states)
        states = [_check_state(s, num_rows, name) for s in states]
        all_ranks = True
    if all_ranks:
        sizes = {int(s["world_size"]) for s in states}
        ranks = sorted(int(s["world_rank"]) for s in states)
        if len(sizes) != 1 or ranks != list(range(sizes.pop())):
            raise _bad_state("one state per rank of the saved group (ranks 0..W-1, same world_size)",
                             [(s["world_rank"], s["world_size"]) for s in states],
                             hint="load every rank's file (trainkit.data.load_shard_states) of one checkpoint")
    # A rank that finished its plan of epoch E-1 and has not started epoch E yet holds its
    # fresh block of epoch E: nothing of it was consumed.
    epoch = max(int(s["epoch"]) for s in states)
    norm = []
    for s in states:
        if int(s["epoch"]) == epoch - 1 and int(s["consumed"]) >= ranges_len(s["plan"]):
            a, b = shard_bounds(num_rows, int(s["world_size"]), int(s["world_rank"]))
            s = dict(s, epoch=epoch, plan=[[a, b]] if b > a else [], consumed=0, shuffle=None)
        elif int(s["epoch"]) != epoch:
            raise _bad_state("states of one epoch", sorted({int(x["epoch"]) for x in states}),
                             hint="ranks were more than one epoch apart; save the states at the same report")
        norm.append(s)
    left = np.concatenate([remaining_positions(s) for s in norm]) if norm else np.empty(0, np.int64)
    left.sort()
    if left.size > 1 and np.any(np.diff(left) == 0):
        raise _bad_state("states whose plans do not overlap", "overlapping plans",
                         hint="pass the states of one checkpoint only")
    if left.size == 0:  # the epoch is done: the next pass is a fresh epoch
        return epoch + 1, None
    if not all_ranks:
        return epoch, to_ranges(left)
    a, b = shard_bounds(int(left.size), world_size, world_rank)
    return epoch, to_ranges(left[a:b])


# -- sources: where rows come from ---------------------------------------------------------------
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


def _source(dataset: Any, name: str):
    if isinstance(dataset, (RayDataSource, SequenceSource)):
        return dataset
    if _is_ray_dataset(dataset):
        return prepare_ray_dataset(dataset, name)  # local mode / torchrun: this process executes it
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return SequenceSource(dataset, name)
    raise ConfigError(f"datasets[{name!r}]", type(dataset).__name__,
                      "a ray.data.Dataset, a list, or a map-style torch Dataset (with __len__ and __getitem__)")


# -- the shard and its iterables (worker side) ---------------------------------------------------
class _Pass:
    """One epoch pass of one rank: its plan, order and how many rows were handed out."""

    def __init__(self, epoch: int, plan: list, shuffle: Optional[dict]):
        self.epoch = epoch
        self.plan = plan
        self.shuffle = shuffle
        self.order = iteration_order(plan, shuffle, epoch)
        self.consumed = 0


class DataShard:
    """This rank's shard of one dataset (``trainkit.get_dataset_shard(name)``).

    >>> shard = trainkit.get_dataset_shard("train")  # doctest: +SKIP
    >>> for batch in shard.iter_torch_batches(batch_size=32):  # doctest: +SKIP
    ...     trainkit.report({...}, checkpoint=...)  # save shard.state_dict() in each rank's checkpoint

    Each ``iter_*`` call starts a pass over this rank's rows of the next epoch (the first
    pass after a restore reads the rows the saved epoch has left).
    """

    def __init__(self, source, world_rank: int, world_size: int, *, name: str = "",
                 state_dict: Any = None, listeners: Sequence[Callable] = (),
                 default_device: Optional[Callable[[], Any]] = None):
        self.source = source
        self.default_device = default_device
        self.name = name
        self.world_rank = world_rank
        self.world_size = world_size
        self._listeners = list(listeners)
        self._pass: Optional[_Pass] = None
        self._resume_plan: Optional[list] = None
        self._first_epoch = 0
        if state_dict is not None:
            self._first_epoch, self._resume_plan = plan_after_restore(state_dict, source.num_rows, world_size,
                                                                      world_rank, name)

    @property
    def epoch(self) -> int:
        """The epoch a restore from ``state_dict()`` would continue now: the current pass's
        epoch while it has rows left, the next one once all were handed out.

        >>> while shard.epoch < num_epochs:  # doctest: +SKIP
        ...     for batch in shard.iter_batches(): ...
        """
        p = self._pass
        if p is None:
            return self._first_epoch
        return p.epoch + 1 if p.consumed >= p.order.size else p.epoch

    # -- epoch bookkeeping
    def _fresh_plan(self) -> list:
        a, b = shard_bounds(self.source.num_rows, self.world_size, self.world_rank)
        return [[a, b]] if b > a else []

    def _next_plan(self) -> list:
        return self._resume_plan if self._resume_plan is not None else self._fresh_plan()

    def _start_pass(self, shuffle: Optional[dict]) -> _Pass:
        if self._pass is not None:  # every further iter_* call is the next epoch, in full
            epoch, plan = self._pass.epoch + 1, self._fresh_plan()
        else:
            epoch, plan = self._first_epoch, self._next_plan()
        self._resume_plan = None
        self._pass = _Pass(epoch, plan, shuffle)
        return self._pass

    def state_dict(self) -> dict:
        """The position reached in the current epoch (JSON-serialisable); see the module doc."""
        p = self._pass
        if p is None:
            return _state(self, self._first_epoch, self._next_plan(), 0, None)
        return _state(self, p.epoch, p.plan, p.consumed, p.shuffle)

    def __len__(self) -> int:
        """Rows of this rank in the current (or next) pass."""
        return ranges_len(self._pass.plan if self._pass is not None else self._next_plan())

    def count(self) -> int:
        return len(self)

    def __getitem__(self, i: int):
        plan = self._pass.plan if self._pass is not None else self._next_plan()
        if not 0 <= i < ranges_len(plan):
            raise IndexError(i)
        for a, b in plan:
            if i < b - a:
                return self.source.row(self.source.read(np.array([a + i], dtype=np.int64)), 0)
            i -= b - a

    def __iter__(self):
        return iter(self.iter_rows())

    # -- iteration
    def iter_rows(self, *, local_shuffle_buffer_size: Optional[int] = None,
                  local_shuffle_seed: Optional[int] = None) -> "ShardIterable":
        """Rows one by one (a dict per row for columnar data, the item itself for plain sequences)."""
        return ShardIterable(self, dict(batch_size=None, batch_format="rows", drop_last=False, prefetch_batches=0),
                             _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def iter_batches(self, *, batch_size: int = 256, batch_format: str = "numpy", drop_last: bool = False,
                     prefetch_batches: int = 1, local_shuffle_buffer_size: Optional[int] = None,
                     local_shuffle_seed: Optional[int] = None) -> "ShardIterable":
        """Batches as ``{column: numpy array}`` (``batch_format="numpy"``), pandas or pyarrow.

        Plain (non-mapping) sequence rows come as lists of rows. ``local_shuffle_buffer_size``
        shuffles within windows of that many rows, reproducibly for a given seed.
        """
        _check_batch_args(batch_size, prefetch_batches, batch_format)
        return ShardIterable(self, dict(batch_size=batch_size, batch_format=batch_format, drop_last=drop_last,
                                        prefetch_batches=prefetch_batches),
                             _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def iter_torch_batches(self, *, batch_size: int = 256, dtypes: Any = None, device: Any = "auto",
                           collate_fn: Optional[Callable] = None, drop_last: bool = False,
                           prefetch_batches: int = 1, local_shuffle_buffer_size: Optional[int] = None,
                           local_shuffle_seed: Optional[int] = None) -> "ShardIterable":
        """Batches as ``{column: torch.Tensor}`` on ``device`` (``"auto"``: this rank's device).

        ``dtypes`` is one torch dtype or ``{column: dtype}``; ``collate_fn`` replaces the
        conversion and receives the numpy batch.
        """
        _check_batch_args(batch_size, prefetch_batches, "numpy")
        return ShardIterable(self, dict(batch_size=batch_size, batch_format="torch", drop_last=drop_last,
                                        prefetch_batches=prefetch_batches, dtypes=dtypes, device=device,
                                        collate_fn=collate_fn),
                             _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def _notify(self, epoch: int, ids: list) -> None:
        for fn in self._listeners:
            fn(self.name, epoch, ids)


def _state(shard: DataShard, epoch: int, plan: list, consumed: int, shuffle: Optional[dict]) -> dict:
    return {"version": STATE_VERSION, "dataset": shard.name, "epoch": int(epoch),
            "world_rank": shard.world_rank, "world_size": shard.world_size, "num_rows": shard.source.num_rows,
            "plan": [list(r) for r in plan], "consumed": int(consumed),
            "shuffle": dict(shuffle) if shuffle else None}


def _shuffle(buffer_size: Optional[int], seed: Optional[int]) -> Optional[dict]:
    if buffer_size is None:
        return None
    if not isinstance(buffer_size, int) or buffer_size < 1:
        raise ConfigError("local_shuffle_buffer_size", buffer_size, "an int >= 1 or None")
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)  # recorded in the state, so a restore replays it
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError("local_shuffle_seed", seed, "an int >= 0 or None")
    return {"buffer_size": buffer_size, "seed": seed}


def _check_batch_args(batch_size: Any, prefetch_batches: Any, batch_format: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an int >= 1")
    if not isinstance(prefetch_batches, int) or prefetch_batches < 0:
        raise ConfigError("prefetch_batches", prefetch_batches, "an int >= 0")
    if batch_format not in ("numpy", "pandas", "pyarrow", "default"):
        raise ConfigError("batch_format", batch_format, "'numpy', 'pandas' or 'pyarrow'")


_END = object()


class ShardIterable:
    """What ``iter_batches`` / ``iter_torch_batches`` / ``iter_rows`` return.

    Iterating it runs one epoch pass; iterating it again runs the next epoch.
    ``state_dict()`` is the shard's position (counting the batches handed out so far).
    """

    def __init__(self, shard: DataShard, opts: dict, shuffle: Optional[dict]):
        self._shard = shard
        self._opts = opts
        self._shuffle = shuffle

    def state_dict(self) -> dict:
        return self._shard.state_dict()

    def __iter__(self) -> Iterator:
        p = self._shard._start_pass(self._shuffle)
        return self._run(p)

    def _chunks(self, p: _Pass) -> Iterator[tuple]:
        """(rows, ids or None, batch) in order, computed in the producer."""
        src = self._shard.source
        o = self._opts
        want_ids = bool(self._shard._listeners)
        n = p.order.size
        bs = o["batch_size"] or 1
        stop = n - n % bs if o["drop_last"] else n
        torch_opts = _torch_opts(o, self._shard.default_device) if o["batch_format"] == "torch" else None
        for i in range(0, stop, bs):
            pos = p.order[i:i + bs]
            chunk = src.read(pos)
            ids = src.ids(chunk, pos) if want_ids else None
            if o["batch_format"] == "rows":
                yield 1, ids, src.row(chunk, 0)
            elif torch_opts is not None:
                yield pos.size, ids, _to_torch(src.to_numpy(chunk), torch_opts)
            else:
                yield pos.size, ids, src.to_format(chunk, o["batch_format"])

    def _run(self, p: _Pass) -> Iterator:
        shard = self._shard
        if self._opts["prefetch_batches"] > 0:
            items = _prefetched(self._chunks(p), self._opts["prefetch_batches"])
        else:
            items = self._chunks(p)
        try:
            for rows, ids, batch in items:
                p.consumed += rows  # handed to the loop: counted before it runs
                if ids is not None:
                    shard._notify(p.epoch, ids)
                yield batch
        finally:
            close = getattr(items, "close", None)
            if close:
                close()


def _prefetched(gen: Iterator, depth: int) -> Iterator:
    """Run ``gen`` in a thread, ``depth`` items ahead; stops the thread when closed."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(("error", e))

    t = threading.Thread(target=produce, name="trainkit-data-prefetch", daemon=True)
    t.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _torch_opts(o: dict, default_device: Optional[Callable[[], Any]]) -> dict:
    import torch

    device = o.get("device", "auto")
    if device in (None, "auto"):
        device = default_device() if default_device is not None else (
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # a shard built outside a session
    return {"device": torch.device(device), "dtypes": o.get("dtypes"), "collate_fn": o.get("collate_fn")}


def _to_torch(batch: Any, opts: dict) -> Any:
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


def make_shard(dataset: Any, world_rank: int, world_size: int, *, name: str = "", state_dict: Any = None,
               listeners: Sequence[Callable] = (), default_device: Optional[Callable[[], Any]] = None) -> DataShard:
    """This rank's ``DataShard`` of ``dataset`` (called by ``get_dataset_shard`` in the worker).

    ``default_device()`` gives the device of ``iter_torch_batches(device="auto")`` (the session
    passes the rank's; without one, CUDA when available, else CPU)."""
    return DataShard(_source(dataset, name), world_rank, world_size, name=name, state_dict=state_dict,
                     listeners=listeners, default_device=default_device)


# -- saving states beside a checkpoint -----------------------------------------------------------
def state_file_name(dataset_name: str, world_rank: int) -> str:
    return f"dataset_state-{dataset_name}-rank{world_rank}.json"


def save_shard_state(directory: str, state: dict) -> str:
    """Write one rank's shard state into a checkpoint folder it is about to report.

    Every rank reports its own folder; trainkit merges them, so the committed checkpoint
    holds every rank's file. Returns the file's path.

    >>> save_shard_state(tmpdir, shard.state_dict())  # doctest: +SKIP
    """
    path = os.path.join(directory, state_file_name(state.get("dataset") or "data", int(state["world_rank"])))
    with open(path, "w") as f:
        json.dump(state, f)
    return path


def load_shard_states(directory: str, dataset_name: str) -> Optional[list[dict]]:
    """Every rank's saved state of ``dataset_name`` in a checkpoint folder (None if there is none).

    >>> with ckpt.as_directory() as d:  # doctest: +SKIP
    ...     shard = trainkit.get_dataset_shard("train", state_dict=load_shard_states(d, "train"))
    """
    prefix = f"dataset_state-{dataset_name}-rank"
    found = sorted(f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(".json"))
    if not found:
        return None
    states = []
    for f in found:
        with open(os.path.join(directory, f)) as fh:
            states.append(json.load(fh))
    return states


__all__ = ["DataShard", "ShardIterable", "RayDataSource", "SequenceSource", "make_shard", "prepare_datasets",
           "prepare_ray_dataset", "shard_bounds", "plan_after_restore", "iteration_order", "save_shard_state",
           "load_shard_states", "state_file_name", "STATE_VERSION"]
