"""``Result``: what ``fit()`` returns and what ``Result.from_path`` rebuilds from storage.

``metrics`` is the last reported metrics (any report, checkpoint or not) and
``metrics_dataframe`` the full report history of the run's final lineage, in every mode.
(Ray Train 2.60 gives the last *checkpointed* metrics in distributed mode.)
``checkpoint`` and ``best_checkpoints`` are verified against the file lists of the
manifest (``resolve_checkpoints``: one listing, sizes only): a damaged or missing one is
skipped with a warning, and ``checkpoint`` falls back to the latest intact one.
A reader shows a ``running`` run whose driver is gone (``trainkit.lease.stale_owner``) as
``aborted``, with the error that says so (``shown_state``), and writes nothing.
Runs in the driver (and in the process that keeps the ledger, which builds ``fit()``'s).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from trainkit import events as ev
from trainkit.checkpoint import Checkpoint, checkpoint_problem
from trainkit.errors import StorageError, TrainingFailedError
from trainkit.lease import driver_gone_error, stale_owner
from trainkit.policies import CheckpointEntry, decide_retention
from trainkit.storage import EVENTS, MANIFEST, RunStore


class Result:
    """The outcome of a run.

    >>> result = trainer.fit()  # doctest: +SKIP
    >>> result.metrics["loss"], result.checkpoint, result.path  # doctest: +SKIP
    """

    def __init__(self, metrics: Optional[dict] = None, checkpoint: Optional[Checkpoint] = None,
                 error: Optional[BaseException] = None, path: Optional[str] = None, metrics_dataframe: Any = None,
                 best_checkpoints: Optional[list] = None, _storage_filesystem: Any = None, return_value: Any = None,
                 *, history: Optional[list] = None, filesystem: Any = None, attempts: int = 1):
        # Ray's parameters, in Ray's order; history (the report rows), filesystem and attempts are trainkit's.
        filesystem = filesystem if filesystem is not None else _storage_filesystem
        self.metrics = metrics
        self.checkpoint = checkpoint
        self.path = path
        self.error = error
        self.best_checkpoints = list(best_checkpoints or [])
        self.return_value = return_value
        self.attempts = attempts
        self._history = list(history or [])
        self._filesystem = filesystem
        self._df = metrics_dataframe if history is None else None
        if history is None and metrics_dataframe is not None and hasattr(metrics_dataframe, "to_dict"):
            self._history = metrics_dataframe.to_dict("records")

    @property
    def config(self):
        """Removed in Ray Train V2: raises, as Ray's does."""
        from trainkit.errors import DeprecatedSettingError

        raise DeprecatedSettingError("Result.config", "removed in Ray Train V2 (Ray 2.60 raises too); keep the "
                                     "train_loop_config you passed to the trainer")

    @property
    def filesystem(self):
        if self._filesystem is None:
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem()
        return self._filesystem

    @property
    def metrics_dataframe(self):
        """One row per report of the run's final lineage (pandas), or None before any report."""
        if not self._history:
            return None
        if self._df is None:
            import pandas as pd

            self._df = pd.DataFrame(self._history)
        return self._df

    def get_best_checkpoint(self, metric: str, mode: str) -> Optional[Checkpoint]:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is invalid: expected 'min' or 'max'")
        if not self.best_checkpoints:
            raise RuntimeError("No checkpoint exists in the run folder.")
        scored = [(c, m[metric]) for c, m in self.best_checkpoints if metric in m]
        if not scored:
            raise RuntimeError(f"Invalid metric name {metric!r}: no checkpoint reported it.")
        pick = max if mode == "max" else min
        return pick(scored, key=lambda t: t[1])[0]

    def __repr__(self) -> str:
        return (f"Result(metrics={self.metrics!r}, checkpoint={self.checkpoint!r}, path={self.path!r}, "
                f"error={type(self.error).__name__ if self.error else None})")

    @classmethod
    def from_path(cls, path: str | os.PathLike, storage_filesystem: Any = None) -> "Result":
        """Load a run from its folder (local path or URI). Reads JSON only; unpickles nothing."""
        return load_result(os.fspath(path), storage_filesystem)


# -- building a Result from a run folder's files (shared with the ledger, which builds fit()'s) --
def lineage(events: list) -> list[tuple[int, dict]]:
    """(index, metrics) of the run's final lineage: a re-committed index drops what came after it."""
    rows: list[tuple[int, dict]] = []
    for e in events:
        if isinstance(e, ev.ReportCommitted):
            while rows and rows[-1][0] >= e.index:
                rows.pop()
            rows.append((e.index, dict(e.metrics)))
    return rows


def checkpoint_entries(state: dict) -> list[CheckpointEntry]:
    return [CheckpointEntry(c["index"], c["dir"], c.get("metrics") or {}) for c in state["checkpoints"]]


def checkpoint_of(store: RunStore, entry: dict) -> Checkpoint:
    """The ``Checkpoint`` of a manifest entry, carrying the file list recorded at its commit."""
    return Checkpoint._committed(store.path(entry["dir"]), store.fs, entry.get("files"))


def verify_entries(store: RunStore, entries: list) -> dict:
    """``dir -> problem`` (None: intact) for manifest entries: one listing of the run folder (of the
    one folder, for a single entry), sizes only, no hashing."""
    entries = [e for e in entries if e is not None]
    if not entries:
        return {}
    if len(entries) == 1:
        listings = {entries[0]["dir"]: store.file_sizes(entries[0]["dir"])}
    else:
        listings: dict = {}
        for name, size in (store.file_sizes("") or {}).items():
            top, _, rest = name.partition("/")
            if rest:
                listings.setdefault(top, {})[rest] = size
        for e in entries:  # a folder without files is not in the listing: empty, or missing
            if e["dir"] not in listings:
                listings[e["dir"]] = store.file_sizes(e["dir"])
    return {e["dir"]: checkpoint_problem(e.get("files"), listings.get(e["dir"])) for e in entries}


@dataclass(frozen=True)
class Skipped:
    """A committed checkpoint that is not handed out: its manifest entry, what is wrong, and the
    folder used instead (None: no intact one was left)."""

    entry: dict
    problem: str
    fallback: Optional[str] = None

    def message(self, store: RunStore) -> str:
        instead = f"using {self.fallback} instead" if self.fallback else "no intact checkpoint is left"
        return (f"checkpoint {self.entry['dir']} (report {self.entry['index']}) of {store.uri} is damaged: "
                f"{self.problem}; {instead}")

    def event(self) -> ev.CheckpointSkipped:
        return ev.CheckpointSkipped(dir=self.entry["dir"], index=self.entry["index"], problem=self.problem,
                                    fallback=self.fallback)


def resolve_checkpoints(store: RunStore, state: dict) -> tuple[Optional[dict], list, list]:
    """``(latest intact entry or None, best intact entries worst -> best, skipped)`` of a manifest.

    Verifies the latest checkpoint and the best ones (one listing); a damaged latest falls back
    to the newest intact one in commit order."""
    cfg = state.get("checkpoint_config") or {}
    entries = list(state.get("checkpoints") or [])
    retention = decide_retention(checkpoint_entries(state), cfg.get("num_to_keep"),
                                 cfg.get("checkpoint_score_attribute"),
                                 cfg.get("checkpoint_score_order", "max"))
    by_dir = {c["dir"]: c for c in entries}
    latest_dir = state.get("latest_checkpoint")
    wanted = [by_dir[e.dir] for e in retention.best if e.dir in by_dir]
    if latest_dir in by_dir and by_dir[latest_dir] not in wanted:
        wanted.append(by_dir[latest_dir])
    problems = verify_entries(store, wanted)
    latest = by_dir.get(latest_dir)
    if latest is not None and problems.get(latest_dir):
        latest = None
        for c in reversed(entries):
            if c["dir"] == latest_dir:
                continue
            if c["dir"] not in problems:
                problems.update(verify_entries(store, [c]))
            if not problems[c["dir"]]:
                latest = c
                break
    fallback = latest["dir"] if latest is not None else None
    skipped = [Skipped(by_dir[d], p, fallback if d == latest_dir else None)
               for d, p in problems.items() if p]
    best = [by_dir[e.dir] for e in retention.best if e.dir in by_dir and not problems.get(e.dir)]
    return latest, best, skipped


def build_result(store: RunStore, state: dict, rows: list, *, return_value: Any = None,
                 error: Optional[BaseException] = None, resolved: Optional[tuple] = None) -> Result:
    """The ``Result`` of a manifest and a lineage; ``resolved``: ``resolve_checkpoints``' answer, if
    the caller has it (it is computed, and skipped checkpoints warned about, otherwise)."""
    if resolved is None:
        resolved = resolve_checkpoints(store, state)
        warn_skipped(store, resolved[2], stacklevel=5)  # the caller of Result.from_path
    latest, best_entries, _skipped = resolved
    best = [(checkpoint_of(store, e), dict(e.get("metrics") or {})) for e in best_entries]
    if error is None and state.get("error"):
        error = TrainingFailedError.from_dict(state["error"])
    return Result(
        metrics=rows[-1][1] if rows else None,
        checkpoint=checkpoint_of(store, latest) if latest is not None else None,
        path=store.run_path,
        error=error,
        best_checkpoints=best,
        history=[m for _, m in rows],
        return_value=return_value,
        filesystem=store.fs,
        attempts=len(state.get("attempts", [])),
    )


def warn_skipped(store: RunStore, skipped: list, stacklevel: int = 2) -> None:
    """A ``RuntimeWarning`` per skipped checkpoint, naming it and what is wrong."""
    for s in skipped:
        warnings.warn(s.message(store), RuntimeWarning, stacklevel=stacklevel)


def split_run_path(path: str) -> tuple[str, str]:
    """``/a/b/run`` -> (``/a/b``, ``run``); ``s3://bucket/x/run/`` -> (``s3://bucket/x``, ``run``)."""
    p = path.rstrip("/")
    if "/" not in p.split("://", 1)[-1]:
        raise StorageError(f"{path!r} is not a run folder path (<storage_path>/<name>)")
    parent, name = p.rsplit("/", 1)
    return parent, name


def aborted_state(state: dict, error: TrainingFailedError, ended: Optional[float]) -> dict:
    """A copy of the manifest of a run whose driver is gone, as that driver would have ended it: its
    ``running`` attempts ``aborted`` (``ended`` when unknown), a ``running`` status ``aborted`` with ``error``."""
    out = dict(state)
    out["attempts"] = [dict(a, outcome="aborted", ended=a.get("ended") or ended) if a.get("outcome") == "running"
                       else a for a in state.get("attempts") or []]
    if out.get("status") == "running":
        out["status"] = "aborted"
        out["error"] = out.get("error") or error.to_dict()
    return out


def shown_state(store: RunStore, state: dict) -> dict:
    """The manifest as a reader should see it: unchanged while a driver may hold the run's lease; with the
    ``running`` status and attempts ``aborted`` (``aborted_state``) when its driver is gone. Writes nothing."""
    if state.get("status") != "running" and not any(a.get("outcome") == "running"
                                                    for a in state.get("attempts") or []):
        return state
    stale = stale_owner(store)
    if stale is None:
        return state
    owner, reason = stale
    return aborted_state(state, driver_gone_error(reason, owner), owner.renewed_at if owner else None)


def load_state(path: str, filesystem: Any = None) -> dict:
    """``run_state.json`` of the run folder ``path``, as ``shown_state`` shows it.

    >>> load_state("/tmp/trainkit_results/my_run")["status"]  # doctest: +SKIP
    'aborted'
    """
    store, state = _open(path, filesystem)
    return shown_state(store, state)


def _open(path: str, filesystem: Any) -> tuple[RunStore, dict]:
    parent, name = split_run_path(path)
    store = RunStore(parent, name, filesystem)
    state = store.read_json(MANIFEST)
    if state is None:
        raise StorageError(f"{store.uri} has no {MANIFEST}: it is not a trainkit run folder "
                           "(or the run never started)")
    return store, state


def load_result(path: str, filesystem: Any = None) -> Result:
    store, state = _open(path, filesystem)
    read = ev.parse_events(store.read_bytes(EVENTS) or b"")
    return build_result(store, shown_state(store, state), lineage(read.events))
