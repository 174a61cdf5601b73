"""Property: under any fault schedule, every row is consumed exactly once per epoch.

A schedule is a list of attempts; each but the last ends with a fault at a report:
``kill`` (same world size), ``node_loss`` (the next attempt has a different world size)
or ``preempt`` (one more checkpoint is committed, then the group stops and resizes).
The run is driven in this process without Ray so that Hypothesis can try many
schedules quickly: real ``DataShard``s of a columnar dataset per rank, real shard
states saved per rank in real checkpoint folders of a real ``RunLedger`` (manifest and
``events.jsonl``), and the real ``ExactlyOnce`` recorder and checker. Ranks advance one
batch per report, in step; a rank whose epochs are done idles at the barrier.

The Ray-backed versions of the same properties (a kill, a 3 -> 2 restart) are in
tests/integration/test_data.py.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainkit.config import CheckpointConfig
from trainkit.data import load_shard_states, make_shard, save_shard_state
from trainkit.errors import WorkerFailure
from trainkit.ledger import RunLedger
from trainkit.storage import RunStore
from trainkit_testing.exactly_once import ExactlyOnce, check_exactly_once


class _RankContext:
    """The part of ``TrainContext`` the recorder reads, for one simulated rank."""

    def __init__(self, store, attempt: int, world_rank: int, ledger: RunLedger):
        self._store, self._attempt, self._rank, self._ledger = store, attempt, world_rank, ledger
        self.index = ledger.latest_index

    def get_storage(self):
        return self._store

    def get_attempt(self) -> int:
        return self._attempt

    def get_world_rank(self) -> int:
        return self._rank

    def get_report_index(self) -> int:
        return self.index


def _stream(shard, epochs: int, batch_size: int, shuffle: bool):
    """A rank's training loop, one yielded iterable per batch handed out."""
    while shard.epoch < epochs:
        kw = {"local_shuffle_buffer_size": 4, "local_shuffle_seed": 9} if shuffle else {}
        it = shard.iter_batches(batch_size=batch_size, prefetch_batches=1, **kw)
        for _ in it:
            yield it


def run_schedule(root: str, rows: int, epochs: int, batch_size: int, ckpt_every: int, shuffle: bool,
                 attempts: list[tuple[int, int, str]], final_world_size: int) -> str:
    """Drive one run through ``attempts`` ((world_size, fault report offset, kind), ...); returns its path."""
    data = [{"id": 1000 + i, "x": i} for i in range(rows)]
    store = RunStore(root, "run")
    ledger = RunLedger(store, CheckpointConfig(num_to_keep=2))
    hook = ExactlyOnce().worker_hook()
    plan = list(attempts) + [(final_world_size, None, "")]
    for world_size, fault_at, kind in plan:
        attempt = ledger.start_attempt(world_size)
        ckpt = ledger.latest_checkpoint()
        states = load_shard_states(ckpt.path, "train") if ckpt else None
        ctxs = [_RankContext(store, attempt, r, ledger) for r in range(world_size)]
        shards = [make_shard(data, r, world_size, name="train", state_dict=states,
                             listeners=[lambda n, e, ids, c=ctxs[r]: hook.on_batch(c, n, e, ids)])
                  for r in range(world_size)]
        streams = [_stream(s, epochs, batch_size, shuffle) for s in shards]
        step = 0
        while True:
            handed = [next(s, None) for s in streams]
            if all(h is None for h in handed):
                break
            step += 1
            index = ctxs[0].index + 1
            failing = fault_at is not None and step == fault_at
            if failing and kind != "preempt":
                ledger.record_failure(attempt, [WorkerFailure(world_rank=0, kind="died", message=kind)],
                                      will_retry=True)
                break
            ckpt_dir = None
            if index % ckpt_every == 0 or failing:
                ckpt_dir = f"checkpoint_{index}"
                d = store.makedirs(ckpt_dir)
                for sh in shards:
                    save_shard_state(d, sh.state_dict())
            ledger.commit(attempt, index, {"step": index}, ckpt_dir, {r: [] for r in range(world_size)}
                          if ckpt_dir else None, world_size=world_size)
            for c in ctxs:
                c.index = index
            if failing:  # preempted: stopped after this committed checkpoint
                ledger.record_failure(attempt, [WorkerFailure(world_rank=0, kind="preempted", message=kind)],
                                      kind="preemption", will_retry=True)
                break
    ledger.finish("finished")
    return store.path()


attempt_st = st.tuples(st.integers(1, 4), st.integers(1, 9), st.sampled_from(["kill", "node_loss", "preempt"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 30), epochs=st.integers(1, 2), batch_size=st.integers(1, 4),
       ckpt_every=st.integers(1, 3), shuffle=st.booleans(), attempts=st.lists(attempt_st, max_size=3),
       final_world_size=st.integers(1, 4))
def test_any_fault_schedule_keeps_every_epoch_exactly_once(rows, epochs, batch_size, ckpt_every, shuffle,
                                                          attempts, final_world_size):
    with tempfile.TemporaryDirectory() as root:
        path = run_schedule(root, rows, epochs, batch_size, ckpt_every, shuffle, attempts, final_world_size)
        report = check_exactly_once(path, ids=[1000 + i for i in range(rows)], epochs=epochs)
        assert report.ok, report.describe()


def test_the_property_fails_when_restarts_ignore_the_saved_position(tmp_path):
    """The checker is not vacuous: a run that restarts its epoch from scratch is caught."""
    data = [{"id": i} for i in range(8)]
    store = RunStore(str(tmp_path), "run")
    ledger = RunLedger(store, CheckpointConfig())
    hook = ExactlyOnce().worker_hook()
    for fault in (True, False):
        attempt = ledger.start_attempt(1)
        ctx = _RankContext(store, attempt, 0, ledger)
        shard = make_shard(data, 0, 1, name="train", listeners=[lambda n, e, ids: hook.on_batch(ctx, n, e, ids)])
        for i, _ in enumerate(shard.iter_batches(batch_size=2)):
            if fault and i == 2:
                ledger.record_failure(attempt, [WorkerFailure(world_rank=0)], will_retry=True)
                break
            ctx.index += 1
            d = store.makedirs(f"checkpoint_{ctx.index}")
            save_shard_state(d, shard.state_dict())
            ledger.commit(attempt, ctx.index, {}, f"checkpoint_{ctx.index}", {0: []})
    ledger.finish("finished")
    report = check_exactly_once(store.path(), ids=range(8), epochs=1)
    assert not report.ok and sorted(report.epochs[0].duplicates) == [0, 1, 2, 3]
    assert os.path.isdir(os.path.join(store.path(), ".exactly_once"))
