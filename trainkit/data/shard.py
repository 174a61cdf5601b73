"""``DataShard``: one rank's shard of one dataset, its epoch passes, batches and ``state_dict()``;
``StreamingShard``: a rank's stream of a Ray Dataset without ids (``trainkit.data.stream``).
Runs in the workers.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from trainkit.data.batches import to_torch, torch_options
from trainkit.data.plan import STATE_VERSION, iteration_order, plan_after_restore, ranges_len, shard_bounds
from trainkit.data.sources import Ingest, as_source
from trainkit.data.stream import ADD_IDS_HINT, StreamingSource, streamed_start_epoch
from trainkit.errors import ConfigError


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
                 default_device: Optional[Callable[[], Any]] = None, split: bool = True):
        self.source = source
        self.default_device = default_device
        self.name = name
        self.world_rank = world_rank
        self.world_size = world_size
        self._listeners = list(listeners)
        self._pass: Optional[_Pass] = None
        self._resume_plan: Optional[list] = None
        self._first_epoch = 0
        # Rows are split over (world_size, world_rank); a dataset every rank reads in full is one block.
        self.split = split
        self._plan_size, self._plan_rank = (world_size, world_rank) if split else (1, 0)
        if state_dict is not None:
            if not split:
                state_dict = _own_state(state_dict, world_rank)
            elif any(isinstance(x, Mapping) and x.get("split") is False
                     for x in ([state_dict] if isinstance(state_dict, Mapping) else state_dict or [])):
                raise ConfigError("get_dataset_shard(state_dict)", "a state of a dataset every rank read in full",
                                  "a state of this dataset split across ranks",
                                  hint="restore with the DataConfig the state was saved with")
            self._first_epoch, self._resume_plan = plan_after_restore(state_dict, source.num_rows, self._plan_size,
                                                                      self._plan_rank, name)

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
        a, b = shard_bounds(self.source.num_rows, self._plan_size, self._plan_rank)
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
        return ShardIterable(self, dict(batch_size=1, batch_format="rows", drop_last=False, prefetch_batches=0),
                             _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def iter_batches(self, *, prefetch_batches: int = 1, batch_size: Optional[int] = 256,
                     batch_format: Optional[str] = "default", drop_last: bool = False,
                     local_shuffle_buffer_size: Optional[int] = None,
                     local_shuffle_seed: Optional[int] = None) -> "ShardIterable":
        """Batches as ``{column: numpy array}`` (``"default"`` / ``"numpy"``), ``"pandas"`` or ``"pyarrow"``.

        A tensor column is one array of shape ``[B, *shape]`` (as Ray Data gives it). Plain
        (non-mapping) sequence rows come as lists of rows. ``batch_size=None``: one batch per
        block of the source. ``local_shuffle_buffer_size`` shuffles within windows of that many
        rows, reproducibly for a given seed.
        """
        _check_batch_args(batch_size, prefetch_batches, batch_format)
        return ShardIterable(self, dict(batch_size=batch_size, batch_format=batch_format or "numpy",
                                        drop_last=drop_last, prefetch_batches=prefetch_batches),
                             _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def iter_torch_batches(self, *, prefetch_batches: int = 1, batch_size: Optional[int] = 256, dtypes: Any = None,
                           device: Any = "auto", collate_fn: Optional[Callable] = None, drop_last: bool = False,
                           local_shuffle_buffer_size: Optional[int] = None,
                           local_shuffle_seed: Optional[int] = None, pin_memory: bool = False) -> "ShardIterable":
        """Batches as ``{column: torch.Tensor}`` on ``device`` (``"auto"``: this rank's device).

        A tensor column of shape ``s`` becomes one tensor ``[B, *s]`` of its dtype. ``dtypes``
        is one torch dtype or ``{column: dtype}`` (columns not named keep theirs); ``collate_fn``
        replaces the conversion: it receives the numpy batch, or the pyarrow / pandas one for
        a ``ray.data.collate_fn`` ``ArrowBatchCollateFn`` / ``PandasBatchCollateFn``, and a
        tensor (or dict / list of tensors) it returns is moved to ``device``.
        """
        _check_batch_args(batch_size, prefetch_batches, "numpy")
        opts = dict(batch_size=batch_size, batch_format="torch", drop_last=drop_last,
                    prefetch_batches=prefetch_batches, dtypes=dtypes, device=device, collate_fn=collate_fn,
                    pin_memory=pin_memory)
        torch_options(opts, self.default_device)  # bad combinations fail here, not in the loop
        return ShardIterable(self, opts, _shuffle(local_shuffle_buffer_size, local_shuffle_seed))

    def _notify(self, epoch: int, ids: list) -> None:
        for fn in self._listeners:
            fn(self.name, epoch, ids)


def _state(shard: DataShard, epoch: int, plan: list, consumed: int, shuffle: Optional[dict]) -> dict:
    s = {"version": STATE_VERSION, "dataset": shard.name, "epoch": int(epoch),
         "world_rank": shard.world_rank, "world_size": shard.world_size, "num_rows": shard.source.num_rows,
         "plan": [list(r) for r in plan], "consumed": int(consumed),
         "shuffle": dict(shuffle) if shuffle else None}
    if not shard.split:
        s["split"] = False
    return s


def _own_state(states: Any, world_rank: int) -> Any:
    """A dataset every rank reads in full: this rank's saved state (else rank 0's, after a resize),
    as the state of a one-rank group."""
    if isinstance(states, Mapping):
        mine = states
    elif isinstance(states, (list, tuple)) and states and all(isinstance(s, Mapping) for s in states):
        by_rank = {int(s.get("world_rank", -1)): s for s in states}
        mine = by_rank.get(world_rank) or by_rank.get(0) or states[0]
    else:
        return states  # plan_after_restore names what is wrong
    if mine.get("split", True) is not False:
        raise ConfigError("get_dataset_shard(state_dict)", "a state of a dataset split across ranks",
                          "a state saved while DataConfig(datasets_to_split=...) left this dataset whole",
                          hint="restore with the DataConfig the state was saved with")
    return dict(mine, world_size=1, world_rank=0)


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


def _check_batch_args(batch_size: Any, prefetch_batches: Any, batch_format: Optional[str]) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ConfigError("batch_size", batch_size, "an int >= 1, or None (one batch per block)")
    if not isinstance(prefetch_batches, int) or prefetch_batches < 0:
        raise ConfigError("prefetch_batches", prefetch_batches, "an int >= 0")
    if batch_format not in ("numpy", "pandas", "pyarrow", "default", None):
        raise ConfigError("batch_format", batch_format, "'default', 'numpy', 'pandas' or 'pyarrow'")


_END = object()


def _batch_cuts(order: np.ndarray, batch_size: Optional[int], drop_last: bool, src) -> list:
    """[start, stop) of each batch of a pass over ``order``; ``batch_size=None``: one batch per
    run of rows from one block of the source (the whole pass for a sequence)."""
    n = order.size
    if batch_size is None:
        bounds = src.block_bounds()
        if bounds is None or n == 0:
            return [(0, n)] if n else []
        blocks = np.searchsorted(bounds, order, side="right") - 1
        edges = np.concatenate(([0], np.nonzero(np.diff(blocks))[0] + 1, [n]))
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    stop = n - n % batch_size if drop_last else n
    return [(i, min(i + batch_size, stop)) for i in range(0, stop, batch_size)]


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
        torch_opts = torch_options(o, self._shard.default_device) if o["batch_format"] == "torch" else None
        for a, b in _batch_cuts(p.order, o["batch_size"], o["drop_last"], src):
            pos = p.order[a:b]
            chunk = src.read(pos)
            ids = src.ids(chunk, pos) if want_ids else None
            if o["batch_format"] == "rows":
                yield 1, ids, src.row(chunk, 0)
            elif torch_opts is not None:
                fmt = torch_opts["collate_format"]
                batch = src.to_numpy(chunk) if fmt == "numpy" else src.to_format(chunk, fmt)
                yield pos.size, ids, to_torch(batch, torch_opts)
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


class StreamingShard:
    """This rank's stream of a Ray ``Dataset`` without an ``id`` column (``get_dataset_shard``).

    >>> shard = trainkit.get_dataset_shard("train")  # doctest: +SKIP
    >>> for batch in shard.iter_torch_batches(batch_size=32): ...  # doctest: +SKIP

    Every ``iter_*`` pass is one epoch of Ray's ``streaming_split(world_size, equal=True)``;
    other ``DataIterator`` methods (``schema``, ``stats``, ``materialize``, ...) are Ray's.
    """

    def __init__(self, source: StreamingSource, world_rank: int, world_size: int, *, name: str = "",
                 state_dict: Any = None, split: bool = True, default_device: Optional[Callable[[], Any]] = None):
        self.source = source
        self.name = name
        self.world_rank = world_rank
        self.world_size = world_size
        self.split = split
        self.default_device = default_device
        self._iterator_obj = None
        self._epoch = streamed_start_epoch(state_dict, name) if state_dict is not None else 0
        self._running = False  # a pass started and not finished
        self._batches = 0

    # -- the Ray iterator
    def _iterator(self):
        if self._iterator_obj is not None:
            return self._iterator_obj
        src = self.source
        if not self.split or self.world_size == 1 and src.broker is None:
            self._iterator_obj = src.dataset.iterator()  # this rank executes the dataset in full
        elif src.broker is None:
            raise ConfigError(f"datasets[{self.name!r}]", "a Ray Dataset without an 'id' column under torchrun",
                              "a Dataset with an 'id' column when several processes each execute it (only ids "
                              "make their splits agree)", hint=ADD_IDS_HINT)
        else:
            self._iterator_obj = src.rank_split(self.world_size, self.world_rank)
        return self._iterator_obj

    def __getattr__(self, item: str):
        if item.startswith("_"):
            raise AttributeError(item)
        return getattr(self._iterator(), item)

    @property
    def epoch(self) -> int:
        """The epoch a restore from ``state_dict()`` would start (the current one while a pass runs)."""
        return self._epoch

    def state_dict(self) -> dict:
        """The epoch reached (JSON-serialisable); a restore restarts this epoch from its start."""
        return {"version": STATE_VERSION, "dataset": self.name, "streaming": True, "epoch": int(self._epoch),
                "world_rank": self.world_rank, "world_size": self.world_size, "batches": int(self._batches)}

    # -- iteration
    def iter_rows(self) -> "StreamIterable":
        return StreamIterable(self, "iter_rows", {})

    def iter_batches(self, *, prefetch_batches: int = 1, batch_size: Optional[int] = 256,
                     batch_format: Optional[str] = "default", drop_last: bool = False,
                     local_shuffle_buffer_size: Optional[int] = None,
                     local_shuffle_seed: Optional[int] = None) -> "StreamIterable":
        return StreamIterable(self, "iter_batches", dict(
            prefetch_batches=prefetch_batches, batch_size=batch_size, batch_format=batch_format,
            drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
            local_shuffle_seed=local_shuffle_seed))

    def iter_torch_batches(self, *, prefetch_batches: int = 1, batch_size: Optional[int] = 256, dtypes: Any = None,
                           device: Any = "auto", collate_fn: Optional[Callable] = None, drop_last: bool = False,
                           local_shuffle_buffer_size: Optional[int] = None, local_shuffle_seed: Optional[int] = None,
                           pin_memory: bool = False) -> "StreamIterable":
        opts = torch_options(dict(device=device, dtypes=dtypes, collate_fn=collate_fn), self.default_device)
        return StreamIterable(self, "iter_torch_batches", dict(
            prefetch_batches=prefetch_batches, batch_size=batch_size, dtypes=dtypes, device=opts["device"],
            collate_fn=collate_fn, drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
            local_shuffle_seed=local_shuffle_seed, pin_memory=pin_memory))

    def __iter__(self):
        return iter(self.iter_rows())


class StreamIterable(ShardIterable):
    """What a ``StreamingShard``'s ``iter_*`` returns: iterating it runs one epoch of Ray's iterator."""

    def __init__(self, shard: StreamingShard, method: str, kwargs: dict):  # Ray's iterator replaces the plan
        self._shard = shard
        self._method = method
        self._kwargs = kwargs

    def state_dict(self) -> dict:
        return self._shard.state_dict()

    def __iter__(self):
        shard = self._shard
        if shard._running:  # the previous pass was left early: this is the next epoch
            shard._epoch += 1
        inner = getattr(shard._iterator(), self._method)(**self._kwargs)
        shard._running = True
        shard._batches = 0
        return self._run(inner)

    def _run(self, inner):
        shard = self._shard
        for batch in inner:
            shard._batches += 1
            yield batch
        shard._running = False
        shard._epoch += 1  # every row of this epoch was handed out


def make_shard(dataset: Any, world_rank: int, world_size: int, *, name: str = "", state_dict: Any = None,
               listeners: Sequence[Callable] = (), default_device: Optional[Callable[[], Any]] = None):
    """This rank's shard of ``dataset`` (called by ``get_dataset_shard`` in the worker): a ``DataShard``,
    or a ``StreamingShard`` for a Ray Dataset without an ``id`` column.

    ``default_device()`` gives the device of ``iter_torch_batches(device="auto")`` (the session
    passes the rank's; without one, CUDA when available, else CPU)."""
    split = True
    if isinstance(dataset, Ingest):
        split, dataset = dataset.split, dataset.dataset
    source = as_source(dataset, name)
    if isinstance(source, StreamingSource):
        return StreamingShard(source, world_rank, world_size, name=name, state_dict=state_dict, split=split,
                              default_device=default_device)
    return DataShard(source, world_rank, world_size, name=name, state_dict=state_dict,
                     listeners=listeners, default_device=default_device, split=split)
