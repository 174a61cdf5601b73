"""Dataset shards for ``get_dataset_shard``, with mid-epoch resumption.

What runs where:

* driver: ``TorchTrainer(dataset_config=DataConfig(...))`` is applied by ``ingest.apply_data_config``
  (bad settings fail there). Before workers start, ``prepare_datasets`` turns each Ray
  ``Dataset`` with an ``id`` column into a ``RayDataSource``: the dataset is executed once
  per fit, streamed through the driver one block at a time to index its blocks in id order
  (the blocks stay in the object store, spilled to disk past its capacity). Errors
  (duplicate ids) are raised here, before any worker starts. A Ray ``Dataset`` without an
  ``id`` column becomes a ``StreamingSource`` (``stream``): Ray Train's
  ``streaming_split(world_size, equal=True)``, epochs restart on resume; ``add_ids`` gives a
  dataset a stable ``id``. Sequences (lists, map-style torch datasets) are used as they are.
* worker (each rank): ``make_shard`` builds this rank's ``DataShard`` (it reads only the
  blocks that hold its rows, keeping at most ``sources.CACHE_BYTES`` of them) or
  ``StreamingShard``.

What follows is the ``id`` path (``DataShard``).

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

The package, bottom up: ``plan`` (positions and plans, pure), ``batches`` (torch tensors on
the rank's device, as Ray makes them), ``sources`` (where rows come from), ``stream`` (the
no-id path), ``ingest`` (``DataConfig`` and ``add_ids``), ``shard`` (``DataShard`` and its
iterables), ``state`` (state files beside a checkpoint).
"""

from trainkit.data.ingest import add_ids, apply_data_config
from trainkit.data.plan import (STATE_VERSION, from_ranges, iteration_order, plan_after_restore, ranges_len,
                                remaining_positions, shard_bounds, to_ranges)
from trainkit.data.shard import DataShard, ShardIterable, StreamingShard, make_shard
from trainkit.data.sources import (ID_COLUMN, Ingest, RayDataSource, SequenceSource, prepare_datasets,
                                   prepare_ray_dataset)
from trainkit.data.state import load_shard_states, save_shard_state, state_file_name
from trainkit.data.stream import StreamingSource

__all__ = ["DataShard", "ShardIterable", "RayDataSource", "SequenceSource", "make_shard", "prepare_datasets",
           "prepare_ray_dataset", "shard_bounds", "plan_after_restore", "iteration_order", "save_shard_state",
           "load_shard_states", "state_file_name", "STATE_VERSION", "ID_COLUMN", "to_ranges", "from_ranges",
           "ranges_len", "remaining_positions", "add_ids", "apply_data_config", "Ingest", "StreamingShard",
           "StreamingSource"]
