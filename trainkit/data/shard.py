"""``DataShard``: one rank's shard of one dataset, its epoch passes, batches and ``state_dict()``.
Runs in the workers.
"""

from __future__ import annotations

import queue
import random
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from trainkit.data.batches import to_torch, torch_options
from trainkit.data.plan import STATE_VERSION, iteration_order, plan_after_restore, ranges_len, shard_bounds
from trainkit.data.sources import as_source
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
        torch_opts = torch_options(o, self._shard.default_device) if o["batch_format"] == "torch" else None
        for i in range(0, stop, bs):
            pos = p.order[i:i + bs]
            chunk = src.read(pos)
            ids = src.ids(chunk, pos) if want_ids else None
            if o["batch_format"] == "rows":
                yield 1, ids, src.row(chunk, 0)
            elif torch_opts is not None:
                yield pos.size, ids, to_torch(src.to_numpy(chunk), torch_opts)
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


def make_shard(dataset: Any, world_rank: int, world_size: int, *, name: str = "", state_dict: Any = None,
               listeners: Sequence[Callable] = (), default_device: Optional[Callable[[], Any]] = None) -> DataShard:
    """This rank's ``DataShard`` of ``dataset`` (called by ``get_dataset_shard`` in the worker).

    ``default_device()`` gives the device of ``iter_torch_batches(device="auto")`` (the session
    passes the rank's; without one, CUDA when available, else CPU)."""
    return DataShard(as_source(dataset, name), world_rank, world_size, name=name, state_dict=state_dict,
                     listeners=listeners, default_device=default_device)
