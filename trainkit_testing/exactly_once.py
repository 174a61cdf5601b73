"""Exactly-once epochs: record the row ids every rank consumed, then check them against the run.

Recording runs in the workers. ``ExactlyOnce()`` is a ``RunConfig`` callback; its worker
hook receives every batch a ``DataShard`` iterator hands to the training loop and appends
one line per batch to ``<run>/.exactly_once/attempt-<a>-rank-<r>.jsonl``::

    {"dataset": "train", "epoch": 0, "index": 4, "ids": [12, 13, ...]}

``index`` is the report the batch belongs to: the next report of that rank (its last
committed report index + 1). The folder starts with a dot, so the ledger's clean-up of
uncommitted folders leaves it alone.

Checking runs anywhere the run directory is readable (the driver, a test, CI).
``check_exactly_once(run_path, ids=..., epochs=...)`` reads the attempts from
``events.jsonl`` and counts, per attempt, only the batches that a committed checkpoint
covers and the next attempt resumed from:

* attempt ``a`` (not the last) counts the batches with ``index <= s(a+1)``, where
  ``s(a+1)`` is the report index of the checkpoint attempt ``a+1`` started from (its
  ``attempt_started.start_index``); what came later was lost with the failed attempt;
* the last attempt counts everything when the run finished, else the batches up to the
  latest committed checkpoint.

Then, per epoch, every expected id must have been counted exactly once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from trainkit.events import read_run_dicts

FOLDER = ".exactly_once"


def _file(attempt: int, world_rank: int) -> str:
    return f"attempt-{attempt}-rank-{world_rank}.jsonl"


class _Recorder:
    """Worker side: appends each handed-out batch's ids to this rank's file of this attempt."""

    def __init__(self):
        self._ready: set = set()

    def on_batch(self, ctx, dataset: str, epoch: int, ids: list) -> None:
        store = ctx.get_storage()
        key = (ctx.get_attempt(), ctx.get_world_rank())
        if key not in self._ready:
            store.makedirs(FOLDER)
            self._ready.add(key)
        line = json.dumps({"dataset": dataset, "epoch": int(epoch), "index": ctx.get_report_index() + 1,
                           "ids": ids}, default=_plain)
        store.append_text(f"{FOLDER}/{_file(*key)}", line + "\n")


def _plain(v: Any) -> Any:
    item = getattr(v, "item", None)
    return item() if callable(item) else str(v)


class ExactlyOnce:
    """A ``RunConfig`` callback that records the row ids each rank consumed.

    >>> rc = RunConfig(name="run", storage_path=tmp, callbacks=[ExactlyOnce()])  # doctest: +SKIP
    >>> result = TorchTrainer(loop, datasets={"train": ds}, run_config=rc, ...).fit()  # doctest: +SKIP
    >>> assert_exactly_once(result.path, ids=range(1000), epochs=2)  # doctest: +SKIP
    """

    def worker_hook(self) -> _Recorder:
        return _Recorder()


@dataclass
class EpochVerdict:
    dataset: str
    epoch: int
    rows: int  # ids counted
    duplicates: dict = field(default_factory=dict)  # id -> times counted (> 1)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.unexpected)

    def describe(self) -> str:
        if self.ok:
            return f"{self.dataset} epoch {self.epoch}: {self.rows} rows, each exactly once"
        parts = []
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} id(s) consumed more than once, e.g. "
                         f"{dict(list(sorted(self.duplicates.items()))[:5])}")
        if self.missing:
            parts.append(f"{len(self.missing)} id(s) never consumed, e.g. {self.missing[:5]}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected id(s), e.g. {self.unexpected[:5]}")
        return f"{self.dataset} epoch {self.epoch}: " + "; ".join(parts)


@dataclass
class ExactlyOnceReport:
    run_path: str
    attempts: list  # per attempt: {"attempt", "start_index", "counted_up_to" (None: all), "batches", "counted"}
    epochs: list  # EpochVerdict
    problems: list  # run-level problems (no records, run failed, missing epochs)

    @property
    def ok(self) -> bool:
        return not self.problems and all(e.ok for e in self.epochs)

    def describe(self) -> str:
        lines = [f"exactly-once check of {self.run_path}: {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  {e.describe()}" for e in self.epochs]
        for a in self.attempts:
            upto = "all" if a["counted_up_to"] is None else f"reports <= {a['counted_up_to']}"
            lines.append(f"  attempt {a['attempt']} (from report {a['start_index']}): {a['counted']} of "
                         f"{a['batches']} batches counted ({upto})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"run_path": self.run_path, "ok": self.ok, "attempts": self.attempts, "problems": self.problems,
                "epochs": [dict(asdict(e), ok=e.ok) for e in self.epochs]}


def _read_records(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a worker killed mid-write leaves a partial last line
    return out


def check_exactly_once(run_path: str, *, ids: Optional[Iterable] = None, epochs: Optional[int] = None,
                       dataset: Optional[str] = None, live: bool = False) -> ExactlyOnceReport:
    """Check a finished run's recorded consumption; see the module doc for what counts.

    ``ids``: the ids every epoch must contain (default: the union of all counted ids).
    ``epochs``: the number of epochs that must be complete (0..epochs-1; default: every
    epoch seen). ``dataset``: only this dataset (default: all recorded). ``live``: called from
    inside the run's last attempt after its last report: that attempt counts in full.
    """
    events = read_run_dicts(run_path)
    starts: dict[int, int] = {}
    for e in events:
        if e.get("type") == "attempt_started":
            starts.setdefault(int(e["attempt"]), int(e.get("start_index") or 0))
    finished = [e for e in events if e.get("type") == "run_finished"]
    status = finished[-1]["status"] if finished else "running"
    ckpt_indices = [int(e["index"]) for e in events if e.get("type") == "report_committed" and e.get("checkpoint")]
    problems: list[str] = []
    if live:
        status = "finished"
    if status != "finished":
        problems.append(f"the run did not finish (status {status!r}): only batches up to its latest committed "
                        "checkpoint are counted")
    folder = os.path.join(run_path, FOLDER)
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not files:
        problems.append(f"no consumption records under {folder}: pass RunConfig(callbacks=[ExactlyOnce()]) "
                        "and read the data through get_dataset_shard(...).iter_*")
    by_attempt: dict[int, list[dict]] = {}
    for f in files:
        attempt = int(f.split("-")[1])
        by_attempt.setdefault(attempt, []).extend(_read_records(os.path.join(folder, f)))
    order = sorted(set(starts) | set(by_attempt))
    counts: dict[tuple, Counter] = {}
    attempts = []
    for i, a in enumerate(order):
        if i + 1 < len(order):
            upto: Optional[int] = starts.get(order[i + 1], 0)
        elif status == "finished":
            upto = None
        else:
            upto = max(ckpt_indices, default=0)
        recs = by_attempt.get(a, [])
        counted = 0
        for r in recs:
            if dataset is not None and r["dataset"] != dataset:
                continue
            if upto is not None and r["index"] > upto:
                continue
            counted += 1
            counts.setdefault((r["dataset"], r["epoch"]), Counter()).update(_key(x) for x in r["ids"])
        attempts.append({"attempt": a, "start_index": starts.get(a, 0), "counted_up_to": upto,
                         "batches": len(recs), "counted": counted})
    expected = None if ids is None else Counter(_key(x) for x in ids)
    names = sorted({d for d, _ in counts}) or ([dataset] if dataset else [])
    verdicts = []
    for name in names:
        seen_epochs = sorted(e for d, e in counts if d == name)
        wanted = list(range(epochs)) if epochs is not None else seen_epochs
        extra = [e for e in seen_epochs if e not in wanted]
        if extra:
            problems.append(f"{name}: epochs {extra} were consumed beyond the {epochs} expected")
        universe = expected
        if universe is None:
            universe = Counter(set().union(*[set(c) for (d, _), c in counts.items() if d == name]))
        for e in wanted:
            c = counts.get((name, e), Counter())
            verdicts.append(EpochVerdict(
                dataset=name, epoch=e, rows=sum(c.values()),
                duplicates={k: v for k, v in c.items() if v > 1},
                missing=sorted((k for k in universe if k not in c), key=_sort_key),
                unexpected=sorted((k for k in c if k not in universe), key=_sort_key)))
    return ExactlyOnceReport(run_path=run_path, attempts=attempts, epochs=verdicts, problems=problems)


def _key(x: Any) -> Any:
    return x if isinstance(x, (int, str)) else _plain(x)


def _sort_key(x: Any):
    return (0, x) if isinstance(x, int) else (1, str(x))


def assert_exactly_once(run_path: str, *, ids: Optional[Iterable] = None, epochs: Optional[int] = None,
                        dataset: Optional[str] = None) -> ExactlyOnceReport:
    """``check_exactly_once`` that raises ``AssertionError`` with the full report when it fails."""
    report = check_exactly_once(run_path, ids=ids, epochs=epochs, dataset=dataset)
    if not report.ok:
        raise AssertionError(report.describe())
    return report


__all__ = ["ExactlyOnce", "check_exactly_once", "assert_exactly_once", "ExactlyOnceReport", "EpochVerdict",
           "epochs_workload"]


# -- a self-checking workload for chaos scenarios ------------------------------------------------
EPOCHS_DEFAULTS = {"rows": 96, "epochs": 2, "batch_size": 4, "step_s": 0.0}


def epochs_workload(config: dict) -> int:
    """Epochs over ``rows`` rows (``{"id": i}``) with a report and a checkpoint per batch; every rank
    saves its shard state and records what it consumed. Runs in every rank.

    Ranks stay in step after any resize: each pass runs as many steps as rank 0 (the rank
    with the most rows) has batches; a rank with no batch left reports without one. At
    the end rank 0 checks the run folder and raises ``AssertionError`` when a row was
    consumed twice or never in an epoch, so a scenario's ``expect: {status: finished}``
    fails with the check's report.

        {"entry": "trainkit_testing.exactly_once:epochs_workload", "config": {"rows": 96, "epochs": 2}}
    """
    import math
    import tempfile
    import time

    import trainkit
    from trainkit import Checkpoint
    from trainkit.collective import broadcast_from_rank_zero
    from trainkit.data import load_shard_states, make_shard, save_shard_state

    cfg = dict(EPOCHS_DEFAULTS, **(config or {}))
    ctx = trainkit.get_context()
    ckpt = trainkit.get_checkpoint()
    states = load_shard_states(ckpt.path, "train") if ckpt else None
    recorder = _Recorder()
    shard = make_shard([{"id": i} for i in range(int(cfg["rows"]))], ctx.get_world_rank(), ctx.get_world_size(),
                       name="train", state_dict=states,
                       listeners=[lambda n, e, ids: recorder.on_batch(ctx, n, e, ids)])
    while shard.epoch < int(cfg["epochs"]):
        it = shard.iter_batches(batch_size=int(cfg["batch_size"]), prefetch_batches=0)
        batches = iter(it)  # starts the pass first: before it, len(shard) is the previous pass's rows
        steps = math.ceil(broadcast_from_rank_zero(len(shard)) / int(cfg["batch_size"]))
        for _ in range(steps):
            next(batches, None)
            time.sleep(float(cfg["step_s"]))
            d = tempfile.mkdtemp()
            save_shard_state(d, it.state_dict())
            trainkit.report({"epoch": shard.epoch, "world_size": ctx.get_world_size()},
                            checkpoint=Checkpoint.from_directory(d))
        for _ in batches:  # pragma: no cover - steps covers every batch of rank 0, the largest shard
            pass
    if ctx.get_world_rank() == 0:
        report = check_exactly_once(ctx.get_storage().path(), ids=range(int(cfg["rows"])),
                                    epochs=int(cfg["epochs"]), live=True)
        if not report.ok:
            raise AssertionError(report.describe())
    return ctx.get_report_index()


epochs_workload.config_keys = tuple(EPOCHS_DEFAULTS)
