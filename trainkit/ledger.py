"""The run ledger: commits reports and checkpoints, keeps the manifest and the event stream.

One ledger per run, in the process that coordinates it (the driver in local mode,
rank 0 under torchrun, the controller actor with the ``ray`` backend). It is the only
writer of ``run_state.json`` and ``events.jsonl``.

Commit protocol: every rank has copied its checkpoint files into
``<run>/<checkpoint dir>/`` before arriving at the report barrier; the ledger then
checks the ranks' file lists against one listing of the folder, records every file's
name and size in the checkpoint's manifest entry, writes the manifest atomically (the
commit point), applies retention and only then deletes dropped folders. Folders the
manifest does not name are never handed out; when an attempt starts, the ones trainkit
wrote (the event stream or the naming shows it) are removed with its temporary files, and
nothing else is. Before a run resumes, its latest checkpoint is checked against its file
list; a damaged one is dropped (``checkpoint_skipped``) and the run resumes from the
newest intact one.

The ledger writes only while its driver owns the run (``trainkit.lease``): every manifest
write and event goes through ``Lease.check``, and a run another driver took over ends with
``RunOwnedError`` instead of being retried. When it opens a run whose previous ``fit()``
never recorded its end (its driver is gone), that fit's ``running`` attempts become
``aborted`` and a ``run_finished`` (``aborted``, with the reason) closes it before the new
``run_started``.

A storage that cannot take the run any more (full, read-only, forbidden: ``RunStore.unusable``)
ends it: ``record_failure`` records what it still can, marks the run ``failed`` where that
can be written and raises the ``StorageError`` instead of letting the attempt be retried.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from trainkit import events as ev
from trainkit.checkpoint import Checkpoint
from trainkit.config import CheckpointConfig
from trainkit.errors import (CheckpointError, RunOwnedError, StorageError, TrainingFailedError, WorkerFailure,
                             WorkerGroupError)
from trainkit.lease import Lease, driver_gone_error
from trainkit.policies import decide_retention
from trainkit.result import (Result, Skipped, aborted_state, build_result, checkpoint_entries, checkpoint_of,
                             lineage, resolve_checkpoints, verify_entries)
from trainkit.storage import (CHECKPOINT_NAME, EVENTS, MANIFEST, OWNER, RESERVED, TEMP_NAME, RunStore,
                              check_checkpoint_dir_name)

logger = logging.getLogger("trainkit")

MANIFEST_VERSION = 1


def _new_state(name: str, ckpt_cfg: CheckpointConfig) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "name": name,
        "status": "running",
        "checkpoints": [],  # retained, commit order: {"index", "dir", "metrics", "attempt", "time"}
        "latest_checkpoint": None,
        "attempts": [],
        "error": None,
        "checkpoint_config": _ckpt_cfg_dict(ckpt_cfg),
    }


def _ckpt_cfg_dict(c: CheckpointConfig) -> dict:
    return {"num_to_keep": c.num_to_keep, "checkpoint_score_attribute": c.checkpoint_score_attribute,
            "checkpoint_score_order": c.checkpoint_score_order}


class RunLedger:
    """Commits reports for one run. Not thread-safe: one coordinator calls it.

    ``lease``: the run's lease (``trainkit.lease``), taken by the driver before the ledger opens;
    None only where the caller owns the folder otherwise (tests)."""

    def __init__(self, store: RunStore, checkpoint_config: CheckpointConfig, *, backend: str = "",
                 num_workers: Any = None, lease: Optional[Lease] = None):
        self.store = store
        self.config = checkpoint_config
        self.lease = lease
        self._warned_shared = False
        store.ensure()  # refuses a folder that is not a trainkit run's, touching nothing
        state = store.read_json(MANIFEST)
        data = store.read_bytes(EVENTS)
        read = ev.parse_events(data or b"")
        data = self._repair_torn_events(data, read)
        self.events = ev.EventLog(store, read.events, torn=bool(data) and not data.endswith(b"\n"))
        if state is None:
            state = _new_state(store.name, checkpoint_config)
        else:
            state = self._close_gone_fit(state, read.events)
        state["status"] = "running"
        state["error"] = None
        state["checkpoint_config"] = _ckpt_cfg_dict(checkpoint_config)
        self.state = state
        self._finished = False
        self.rank_metrics: Optional[list] = None  # every rank's metrics of the report being committed
        self._pending_validation: set = set()  # checkpoint folders whose validation has not ended
        self._resolved = None  # resolve_checkpoints' answer at finish(), for result()
        self._lineage = lineage(read.events)
        skipped = self._fall_back_to_intact()
        self._verified = True  # the latest checkpoint was just checked: the first attempt need not again
        self._drop_lineage_after(self.latest_index)
        self._write()
        self._repair_history()
        self._emit(ev.RunStarted(name=store.name, path=store.uri, backend=backend, num_workers=num_workers,
                                 resumed_from_index=self.latest_index or None))
        self._report_skipped(skipped)

    def _repair_torn_events(self, data: Optional[bytes], read) -> Optional[bytes]:
        """Rewrite ``events.jsonl`` without the torn lines that interrupted writes left (the ones
        readers skip, and a cut-off last line), keeping every complete event byte for byte. Only for
        that damage: a file that stops at another unreadable line is left as it is, for diagnose."""
        if not data:
            return data
        lines = data.split(b"\n")
        tail = not data.endswith(b"\n")
        if read.bad_line is not None and not (tail and read.bad_line == len(lines)):
            return data
        torn = set(read.skipped) | ({len(lines)} if tail else set())
        if not torn:
            return data
        fixed = b"".join(line + b"\n" for i, line in enumerate(lines, start=1) if i not in torn and line.strip())
        self.store.write_bytes_atomic(EVENTS, fixed)
        logger.warning("%s: removed %d torn line(s) an interrupted write left in %s", self.store.uri, len(torn),
                       EVENTS)
        return fixed

    def _repair_history(self) -> None:
        """Put back into the event stream a report whose checkpoint the manifest committed but whose
        ``report_committed`` event was never written (the event write failed after the commit point:
        a full disk, a driver killed in between), from its manifest entry: the history then holds
        every committed report, and a resume from that checkpoint continues it without a gap."""
        last = self._lineage[-1][0] if self._lineage else 0
        for c in sorted(self.state["checkpoints"], key=lambda c: c["index"]):
            if c["index"] > last:
                metrics = c.get("metrics") or {}
                self._emit(ev.ReportCommitted(attempt=c.get("attempt", 0), index=c["index"], metrics=metrics,
                                              checkpoint=c["dir"], world_size=0), flush=True)
                self._lineage.append((c["index"], metrics))
                last = c["index"]

    def _close_gone_fit(self, state: dict, events: list) -> dict:
        """A previous fit() that did not record its end (its driver is gone: the lease is this driver's now):
        its ``running`` attempts become ``aborted``, and a ``run_finished`` (``aborted``) says why."""
        running = state.get("status") == "running"
        if not running and not any(a.get("outcome") == "running" for a in state.get("attempts") or []):
            return state
        previous = self.lease.previous if self.lease is not None else None
        reason = (self.lease.previous_gone if self.lease is not None and self.lease.previous_gone
                  else f"no driver held its lease ({OWNER})")
        error = driver_gone_error(reason, previous)
        ended = previous.renewed_at if previous is not None else (events[-1].time if events else None)
        state = aborted_state(state, error, ended)
        if running:
            logger.warning("%s: the previous fit() did not end: %s", self.store.uri, error.message)
            rows = lineage(events)
            self._emit(ev.RunFinished(status="aborted", error=error.to_dict(), attempts=len(state["attempts"]),
                                      last_index=rows[-1][0] if rows else 0), flush=True)
        return state

    # -- reading ------------------------------------------------------------------------
    @property
    def latest_index(self) -> int:
        """Report index of the latest committed checkpoint (0: none)."""
        entry = self._entry(self.state["latest_checkpoint"])
        return entry["index"] if entry is not None else 0

    def _entry(self, d: Optional[str]) -> Optional[dict]:
        for c in self.state["checkpoints"]:
            if c["dir"] == d:
                return c
        return None

    def latest_checkpoint(self) -> Optional[Checkpoint]:
        """The checkpoint to resume from: the latest committed one, checked at the start of the attempt."""
        entry = self._entry(self.state["latest_checkpoint"])
        return checkpoint_of(self.store, entry) if entry is not None else None

    @property
    def attempt(self) -> int:
        return len(self.state["attempts"])

    @property
    def last_metrics(self) -> Optional[dict]:
        return self._lineage[-1][1] if self._lineage else None

    # -- integrity ----------------------------------------------------------------------
    def _fall_back_to_intact(self) -> list:
        """Check the latest checkpoint against its file list; while it is damaged or missing, drop it
        from the manifest (its folder is then removed with the other uncommitted ones) and take the
        one committed before it. Returns the ``Skipped`` records; the caller reports them."""
        skipped = []
        while True:
            latest = self._entry(self.state["latest_checkpoint"])
            if latest is None:
                break
            problem = verify_entries(self.store, [latest])[latest["dir"]]
            if problem is None:
                break
            self.state["checkpoints"] = [c for c in self.state["checkpoints"] if c is not latest]
            remaining = self.state["checkpoints"]
            self.state["latest_checkpoint"] = remaining[-1]["dir"] if remaining else None
            skipped.append(Skipped(latest, problem, self.state["latest_checkpoint"]))
        for i, s in enumerate(skipped):  # each record names the checkpoint finally used
            skipped[i] = Skipped(s.entry, s.problem, self.state["latest_checkpoint"])
        return skipped

    def _report_skipped(self, skipped: list) -> None:
        for s in skipped:
            logger.warning("%s", s.message(self.store))
            self._emit(s.event(), flush=True)

    # -- attempts -------------------------------------------------------------------------
    def start_attempt(self, world_size: int, ranks: list[dict] | None = None) -> int:
        """Begin an attempt: fall back from a damaged latest checkpoint, remove trainkit's uncommitted
        folders and temporary files, record it. Returns its number (1-based)."""
        self.store.unusable = None
        skipped = [] if self._verified else self._fall_back_to_intact()
        self._verified = False
        self._report_skipped(skipped)
        self.clean_uncommitted()
        self._drop_lineage_after(self.latest_index)
        n = self.attempt + 1
        self.state["attempts"].append({"attempt": n, "world_size": world_size, "started": time.time(),
                                       "outcome": "running"})
        self._write()
        # flushed: on object stores too, the stream shows that this attempt may write checkpoint folders
        self._emit(ev.AttemptStarted(attempt=n, world_size=world_size, ranks=tuple(ranks or ()),
                                     start_index=self.latest_index), flush=True)
        return n

    def end_attempt(self, outcome: str) -> None:
        if self.state["attempts"]:
            self.state["attempts"][-1].update(outcome=outcome, ended=time.time())

    def trainkit_dirs(self) -> set:
        """Checkpoint folders the manifest or a ``report_committed`` event names (committed once, maybe
        dropped since). ``clean_uncommitted`` adds every ``checkpoint_<k>`` once the run has had an
        attempt: the default folder of report k, written before its commit."""
        known = {c["dir"] for c in self.state["checkpoints"]}
        known |= {e.checkpoint for e in self.events.events if isinstance(e, ev.ReportCommitted) and e.checkpoint}
        return known

    def clean_uncommitted(self) -> list[str]:
        """Delete what trainkit wrote and the manifest does not name: uncommitted checkpoint folders
        (``trainkit_dirs``) and temporary files (``TEMP_NAME``). Other folders are never touched.
        Returns the names removed."""
        committed = {c["dir"] for c in self.state["checkpoints"]}
        known = self.trainkit_dirs()
        attempted = bool(self.state["attempts"]) or any(isinstance(e, ev.AttemptStarted) for e in self.events.events)
        removed, kept = [], []
        for d in self.store.list_dirs():
            if d in committed or d in RESERVED or d.startswith("."):
                continue
            if d in known or (attempted and CHECKPOINT_NAME.fullmatch(d)):
                self.store.delete_dir(d)
                removed.append(d)
            else:
                kept.append(d)
        if kept:
            logger.info("left %s in %s untouched: trainkit did not write %s", ", ".join(kept), self.store.uri,
                        "it" if len(kept) == 1 else "them")
        return removed + self.store.remove_temp_files(tuple(sorted(committed)))

    def _drop_lineage_after(self, index: int) -> None:
        while self._lineage and self._lineage[-1][0] > index:
            self._lineage.pop()

    # -- commits ------------------------------------------------------------------------
    def commit(self, attempt: int, index: int, metrics: dict, checkpoint_dir: Optional[str] = None,
               rank_files: Optional[dict] = None, world_size: int = 1, barrier_s: float = 0.0,
               step_s: tuple = (), rank_metrics: Optional[list] = None) -> None:
        """Commit report ``index``. ``rank_files`` maps world rank -> files it wrote; ``step_s`` is each
        rank's step time (world rank order), for the straggler table; ``rank_metrics`` every rank's
        metrics (world rank order), for ``UserCallback.after_report``."""
        metrics = ev.jsonable(metrics)
        self.rank_metrics = list(rank_metrics) if rank_metrics is not None else None
        self._guard()  # before the checkpoint's manifest entry and its event: the run is still this driver's
        if checkpoint_dir is not None:
            check_checkpoint_dir_name(checkpoint_dir)
            self._warn_shared_names(rank_files or {}, checkpoint_dir)
            entry = {"index": index, "dir": checkpoint_dir, "metrics": metrics, "attempt": attempt,
                     "time": time.time(), "files": self._committed_files(index, checkpoint_dir, rank_files or {})}
            if checkpoint_dir in self._pending_validation:
                entry["status"] = "PENDING_VALIDATION"
            ckpts = [c for c in self.state["checkpoints"] if c["index"] < index or c["dir"] != checkpoint_dir]
            ckpts.append(entry)
            self.state["checkpoints"] = ckpts
            self.state["latest_checkpoint"] = checkpoint_dir
            self._retain()  # the commit point is its manifest write
        while self._lineage and self._lineage[-1][0] >= index:
            self._lineage.pop()
        self._lineage.append((index, metrics))
        self._emit(ev.ReportCommitted(attempt=attempt, index=index, metrics=metrics, checkpoint=checkpoint_dir,
                                      world_size=world_size, barrier_s=round(barrier_s, 6), step_s=tuple(step_s)),
                   flush=checkpoint_dir is not None)

    def _retain(self) -> None:
        """Apply ``CheckpointConfig`` retention, write the manifest, then delete the dropped folders. A
        checkpoint whose validation has not ended is kept (as Ray keeps it) until it has."""
        ckpts = self.state["checkpoints"]
        entries = checkpoint_entries(self.state)
        retention = decide_retention(entries, self.config.num_to_keep,
                                     self.config.checkpoint_score_attribute,
                                     self.config.checkpoint_score_order)
        kept = {id(e) for e in retention.keep}
        self.state["checkpoints"] = [c for c, e in zip(ckpts, entries)
                                     if id(e) in kept or c.get("status") == "PENDING_VALIDATION"]
        keep_dirs = {c["dir"] for c in self.state["checkpoints"]}
        self._write()
        for e in retention.delete:
            if e.dir not in keep_dirs:
                try:
                    self.store.delete_dir(e.dir)
                except StorageError as err:  # committed already; the next attempt's clean-up tries again
                    logger.warning("could not delete %s, dropped by CheckpointConfig: %s", e.dir, err)

    def reported_checkpoints(self) -> list:
        """``(folder, metrics, status)`` of every retained checkpoint, in manifest order."""
        return [(c["dir"], c["metrics"], c.get("status", "COMMITTED")) for c in self.state["checkpoints"]]

    def validated(self, checkpoint_dir: str, metrics: dict, status: str) -> None:
        """A validation of ``checkpoint_dir`` is pending (``PENDING_VALIDATION``, said before its report
        is committed) or ended: its metrics join the checkpoint's, retention is applied again."""
        if status == "PENDING_VALIDATION":
            self._pending_validation.add(checkpoint_dir)
            return
        self._pending_validation.discard(checkpoint_dir)
        entry = self._entry(checkpoint_dir)
        if entry is None:
            return
        entry["metrics"] = {**(entry.get("metrics") or {}), **ev.jsonable(metrics)}
        entry["status"] = status
        self._retain()

    def _committed_files(self, index: int, checkpoint_dir: str, rank_files: dict) -> dict:
        """Name -> size of every file in the checkpoint folder (one listing), after checking that every
        file a rank says it wrote is there."""
        found = self.store.file_sizes(checkpoint_dir) or {}
        for rank in sorted(rank_files):
            missing = sorted(f.replace("\\", "/") for f in rank_files[rank] or ()
                             if f.replace("\\", "/") not in found)
            if missing:
                raise CheckpointError(f"report {index}: rank {rank} wrote {missing[:3]} into {checkpoint_dir}, "
                                      f"but {self.store.uri}/{checkpoint_dir} does not hold "
                                      f"{'it' if len(missing) == 1 else 'them'}; the checkpoint is not committed")
        return {n: size for n, size in sorted(found.items()) if not TEMP_NAME.fullmatch(n.rsplit("/", 1)[-1])}

    # -- failures and the end ------------------------------------------------------------
    def record_failure(self, attempt: int, failures: list[WorkerFailure], *, kind: str = "failure",
                       will_retry: bool) -> None:
        """Record a failed attempt. When the storage cannot take the run any more (``RunStore.unusable``:
        full, read-only, forbidden), no retry could succeed: the run is marked ``failed`` where that can
        still be written and the ``StorageError`` is raised."""
        self.end_attempt(kind)
        unusable = self.store.unusable
        try:
            self._emit(ev.WorkerFailed(attempt=attempt, failures=tuple(f.to_dict() for f in failures),
                                       kind=kind, will_retry=will_retry and unusable is None), flush=True)
        except StorageError:
            if self.store.unusable is None:
                raise
        unusable = self.store.unusable
        if unusable is not None:
            self.finish("failed", WorkerGroupError(f"the storage cannot take the run any more: {unusable}",
                                                   failures))
            raise unusable

    def emit(self, event: ev.Event, flush: bool = False) -> None:
        self._emit(event, flush=flush)

    def record_fault(self, fields: dict) -> bool:
        """Emit a ``fault_injected`` event from its fields, unless one with the same ``detail["key"]`` is
        already in the stream (a fault fires once per run, across attempts and ranks). Returns whether emitted."""
        key = (fields.get("detail") or {}).get("key")
        if key is not None and any(isinstance(e, ev.FaultInjected) and e.detail.get("key") == key
                                   for e in self.events.events):
            return False
        self._emit(ev.FaultInjected(**fields), flush=True)
        return True

    def _warn_shared_names(self, rank_files: dict, checkpoint_dir: str) -> None:
        """Several ranks saving the same file (the Ray docs' DDP loop saves model.pt on every rank)
        is allowed, as in Ray Train: each file is written atomically and one rank's copy is kept.
        Said once per run, since the copies are usually identical and the extra uploads are waste."""
        shared = shared_names(rank_files)
        if shared and not self._warned_shared:
            self._warned_shared = True
            name, ranks = next(iter(sorted(shared.items())))
            logger.warning("ranks %s all wrote %r (and %d more shared name(s)) into %s; one copy is kept. "
                           "Save checkpoint files on rank 0 only, or give each rank its own file names.",
                           ranks, name, len(shared) - 1, checkpoint_dir)

    def finish(self, status: str, error: Optional[TrainingFailedError] = None) -> None:
        """Record the run's end. A failed or aborted run is recorded where the storage still takes it
        (a storage failure is logged, not raised: the run's own error is what the caller raises); a
        finished run whose status cannot be written raises the ``StorageError``. Once failed (or aborted),
        a second failing ``finish`` changes nothing: the first error is the run's."""
        if self._finished and status != "finished" and self.state["status"] in ("failed", "aborted"):
            return
        self._finished = True
        self.end_attempt(status)
        self.state["status"] = status
        self.state["error"] = error.to_dict() if error is not None else None
        try:
            try:
                self._resolved = resolve_checkpoints(self.store, self.state)
                self._report_skipped(self._resolved[2])
            except StorageError:
                if status == "finished":
                    raise
            self._write()
            self._emit(ev.RunFinished(status=status, error=self.state["error"], attempts=self.attempt,
                                      last_index=self._lineage[-1][0] if self._lineage else 0), flush=True)
        except StorageError as e:
            if status == "finished":
                raise
            logger.warning("could not record status %r of %s: %s", status, self.store.uri, e)

    def result(self, return_value: Any = None, error: Optional[BaseException] = None) -> Result:
        resolved = self._resolved
        if resolved is None:
            resolved = resolve_checkpoints(self.store, self.state)
            self._report_skipped(resolved[2])
        return build_result(self.store, self.state, self._lineage, return_value=return_value, error=error,
                            resolved=resolved)

    def _guard(self) -> None:
        """Raise ``RunOwnedError`` once the run is no longer this driver's (another took it over): remembered
        as the storage's ``unusable``, so that the attempt is not retried and nothing more is written."""
        if self.lease is None:
            return
        try:
            self.lease.check()
        except RunOwnedError as e:
            self.store.unusable = e
            raise

    def _emit(self, event: ev.Event, flush: bool = False) -> None:
        self._guard()
        self.events.emit(event, flush=flush)

    def _write(self) -> None:
        self._guard()
        self.store.write_json_atomic(MANIFEST, self.state)


def shared_names(rank_files: dict) -> dict[str, list[int]]:
    """File names that more than one rank wrote into one checkpoint folder -> those ranks."""
    by_name: dict[str, list[int]] = {}
    for rank in sorted(rank_files):
        for f in rank_files[rank] or ():
            by_name.setdefault(f, []).append(rank)
    return {f: ranks for f, ranks in by_name.items() if len(ranks) > 1}
