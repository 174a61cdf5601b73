"""Dataset shards for ``get_dataset_shard``: a deterministic function of (dataset, world size, rank).

Sequences (lists, torch map-style datasets) are split into contiguous blocks whose sizes
differ by at most one. Ray Data datasets are split with ``streaming_split`` by the
backend and arrive here already split. Runs in workers.
"""

from __future__ import annotations

from typing import Any


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s block of ``n`` rows; sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SequenceShard:
    """A rank's block of a sequence dataset, iterable and indexable."""

    def __init__(self, data: Any, start: int, stop: int):
        self._data = data
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._data[self.start + i]

    def __iter__(self):
        for i in range(self.start, self.stop):
            yield self._data[i]

    def iter_batches(self, batch_size: int = 256):
        batch = []
        for row in self:
            batch.append(row)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def make_shard(dataset: Any, world_rank: int, world_size: int):
    if hasattr(dataset, "iter_batches") and hasattr(dataset, "streaming_split"):
        return dataset  # a Ray Dataset given to a single rank (local mode)
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        start, stop = shard_bounds(len(dataset), world_size, world_rank)
        return SequenceShard(dataset, start, stop)
    return dataset  # already a per-rank iterator (e.g. a Ray Data split)
