"""The run ledger: commits reports and checkpoints, keeps the manifest and the event stream.

One ledger per run, in the process that coordinates it (the driver in local mode,
rank 0 under torchrun, the controller actor with the ``ray`` backend). It is the only
writer of ``run_state.json`` and ``events.jsonl``.

Commit protocol: every rank has copied its checkpoint files into
``<run>/<checkpoint dir>/`` before arriving at the report barrier; the ledger then
checks the ranks' file lists, writes the manifest atomically (the commit point), applies
retention and only then deletes dropped folders. Folders the manifest does not name are
never handed out, and are removed when an attempt starts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from trainkit import events as ev
from trainkit.checkpoint import Checkpoint
from trainkit.config import CheckpointConfig
from trainkit.errors import TrainingFailedError, WorkerFailure
from trainkit.policies import decide_retention
from trainkit.result import Result, build_result, checkpoint_entries, lineage
from trainkit.storage import EVENTS, MANIFEST, RESERVED, RunStore

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
    """Commits reports for one run. Not thread-safe: one coordinator calls it."""

    def __init__(self, store: RunStore, checkpoint_config: CheckpointConfig, *, backend: str = "",
                 num_workers: Any = None):
        self.store = store
        self.config = checkpoint_config
        self._warned_shared = False
        store.ensure()
        state = store.read_json(MANIFEST)
        read = ev.parse_events(store.read_bytes(EVENTS) or b"")
        self.events = ev.EventLog(store, read.events)
        if state is None:
            state = _new_state(store.name, checkpoint_config)
        state["status"] = "running"
        state["error"] = None
        state["checkpoint_config"] = _ckpt_cfg_dict(checkpoint_config)
        self.state = state
        self._lineage = lineage(read.events)
        self._drop_lineage_after(self.latest_index)
        self._write()
        self.events.emit(ev.RunStarted(name=store.name, path=store.uri, backend=backend,
                                       num_workers=num_workers,
                                       resumed_from_index=self.latest_index or None))

    # -- reading ------------------------------------------------------------------------
    @property
    def latest_index(self) -> int:
        """Report index of the latest committed checkpoint (0: none)."""
        d = self.state["latest_checkpoint"]
        for c in self.state["checkpoints"]:
            if c["dir"] == d:
                return c["index"]
        return 0

    def latest_checkpoint(self) -> Optional[Checkpoint]:
        d = self.state["latest_checkpoint"]
        return Checkpoint(self.store.path(d), self.store.fs) if d else None

    @property
    def attempt(self) -> int:
        return len(self.state["attempts"])

    @property
    def last_metrics(self) -> Optional[dict]:
        return self._lineage[-1][1] if self._lineage else None

    # -- attempts -------------------------------------------------------------------------
    def start_attempt(self, world_size: int, ranks: list[dict] | None = None) -> int:
        """Begin an attempt: remove uncommitted folders, record it. Returns its number (1-based)."""
        self.clean_uncommitted()
        self._drop_lineage_after(self.latest_index)
        n = self.attempt + 1
        self.state["attempts"].append({"attempt": n, "world_size": world_size, "started": time.time(),
                                       "outcome": "running"})
        self._write()
        self.events.emit(ev.AttemptStarted(attempt=n, world_size=world_size, ranks=tuple(ranks or ()),
                                           start_index=self.latest_index))
        return n

    def end_attempt(self, outcome: str) -> None:
        if self.state["attempts"]:
            self.state["attempts"][-1].update(outcome=outcome, ended=time.time())

    def clean_uncommitted(self) -> list[str]:
        """Delete folders in the run directory that the manifest does not name."""
        committed = {c["dir"] for c in self.state["checkpoints"]}
        removed = []
        for d in self.store.list_dirs():
            if d not in committed and d not in RESERVED and not d.startswith("."):
                self.store.delete_dir(d)
                removed.append(d)
        return removed

    def _drop_lineage_after(self, index: int) -> None:
        while self._lineage and self._lineage[-1][0] > index:
            self._lineage.pop()

    # -- commits ------------------------------------------------------------------------
    def commit(self, attempt: int, index: int, metrics: dict, checkpoint_dir: Optional[str] = None,
               rank_files: Optional[dict] = None, world_size: int = 1, barrier_s: float = 0.0) -> None:
        """Commit report ``index``. ``rank_files`` maps world rank -> files it wrote."""
        metrics = ev.jsonable(metrics)
        if checkpoint_dir is not None:
            self._warn_shared_names(rank_files or {}, checkpoint_dir)
            entry = {"index": index, "dir": checkpoint_dir, "metrics": metrics, "attempt": attempt,
                     "time": time.time()}
            ckpts = [c for c in self.state["checkpoints"] if c["index"] < index or c["dir"] != checkpoint_dir]
            ckpts.append(entry)
            self.state["checkpoints"] = ckpts
            self.state["latest_checkpoint"] = checkpoint_dir
            entries = checkpoint_entries(self.state)
            retention = decide_retention(entries, self.config.num_to_keep,
                                         self.config.checkpoint_score_attribute,
                                         self.config.checkpoint_score_order)
            kept = {id(e) for e in retention.keep}
            self.state["checkpoints"] = [c for c, e in zip(ckpts, entries) if id(e) in kept]
            keep_dirs = {e.dir for e in retention.keep}
            self._write()  # the commit point
            for e in retention.delete:
                if e.dir not in keep_dirs:
                    self.store.delete_dir(e.dir)
        while self._lineage and self._lineage[-1][0] >= index:
            self._lineage.pop()
        self._lineage.append((index, metrics))
        self.events.emit(ev.ReportCommitted(attempt=attempt, index=index, metrics=metrics,
                                            checkpoint=checkpoint_dir, world_size=world_size,
                                            barrier_s=round(barrier_s, 6)),
                         flush=checkpoint_dir is not None)

    # -- failures and the end ------------------------------------------------------------
    def record_failure(self, attempt: int, failures: list[WorkerFailure], *, kind: str = "failure",
                       will_retry: bool) -> None:
        self.end_attempt(kind)
        self.events.emit(ev.WorkerFailed(attempt=attempt, failures=tuple(f.to_dict() for f in failures),
                                         kind=kind, will_retry=will_retry), flush=True)

    def emit(self, event: ev.Event, flush: bool = False) -> None:
        self.events.emit(event, flush=flush)

    def record_fault(self, fields: dict) -> bool:
        """Emit a ``fault_injected`` event from its fields, unless one with the same ``detail["key"]`` is
        already in the stream (a fault fires once per run, across attempts and ranks). Returns whether emitted."""
        key = (fields.get("detail") or {}).get("key")
        if key is not None and any(isinstance(e, ev.FaultInjected) and e.detail.get("key") == key
                                   for e in self.events.events):
            return False
        self.events.emit(ev.FaultInjected(**fields), flush=True)
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
        self.end_attempt(status)
        self.state["status"] = status
        self.state["error"] = error.to_dict() if error is not None else None
        self._write()
        self.events.emit(ev.RunFinished(status=status, error=self.state["error"], attempts=self.attempt,
                                        last_index=self._lineage[-1][0] if self._lineage else 0),
                         flush=True)

    def result(self, return_value: Any = None, error: Optional[BaseException] = None) -> Result:
        return build_result(self.store, self.state, self._lineage, return_value=return_value, error=error)

    def _write(self) -> None:
        self.store.write_json_atomic(MANIFEST, self.state)


def shared_names(rank_files: dict) -> dict[str, list[int]]:
    """File names that more than one rank wrote into one checkpoint folder -> those ranks."""
    by_name: dict[str, list[int]] = {}
    for rank in sorted(rank_files):
        for f in rank_files[rank] or ():
            by_name.setdefault(f, []).append(rank)
    return {f: ranks for f, ranks in by_name.items() if len(ranks) > 1}
