"""``Result``: what ``fit()`` returns and what ``Result.from_path`` rebuilds from storage.

``metrics`` is the last reported metrics (any report, checkpoint or not) and
``metrics_dataframe`` the full report history of the run's final lineage, in every mode.
(Ray Train 2.60 gives the last *checkpointed* metrics in distributed mode.)
Runs in the driver.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from trainkit import events as ev
from trainkit.checkpoint import Checkpoint
from trainkit.errors import StorageError, TrainingFailedError
from trainkit.policies import CheckpointEntry, decide_retention
from trainkit.storage import EVENTS, MANIFEST, RunStore


class Result:
    """The outcome of a run.

    >>> result = trainer.fit()  # doctest: +SKIP
    >>> result.metrics["loss"], result.checkpoint, result.path  # doctest: +SKIP
    """

    def __init__(self, metrics: Optional[dict] = None, checkpoint: Optional[Checkpoint] = None,
                 path: Optional[str] = None, error: Optional[BaseException] = None,
                 best_checkpoints: Optional[list] = None, history: Optional[list] = None,
                 return_value: Any = None, filesystem: Any = None, attempts: int = 1):
        self.metrics = metrics
        self.checkpoint = checkpoint
        self.path = path
        self.error = error
        self.best_checkpoints = list(best_checkpoints or [])
        self.return_value = return_value
        self.attempts = attempts
        self._history = list(history or [])
        self._filesystem = filesystem
        self._df = None

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


def build_result(store: RunStore, state: dict, rows: list, *, return_value: Any = None,
                  error: Optional[BaseException] = None) -> Result:
    cfg = state.get("checkpoint_config") or {}
    retention = decide_retention(checkpoint_entries(state), cfg.get("num_to_keep"),
                                 cfg.get("checkpoint_score_attribute"),
                                 cfg.get("checkpoint_score_order", "max"))
    best = [(Checkpoint(store.path(e.dir), store.fs), dict(e.metrics)) for e in retention.best]
    latest = state.get("latest_checkpoint")
    if error is None and state.get("error"):
        error = TrainingFailedError.from_dict(state["error"])
    return Result(
        metrics=rows[-1][1] if rows else None,
        checkpoint=Checkpoint(store.path(latest), store.fs) if latest else None,
        path=store.run_path,
        error=error,
        best_checkpoints=best,
        history=[m for _, m in rows],
        return_value=return_value,
        filesystem=store.fs,
        attempts=len(state.get("attempts", [])),
    )


def split_run_path(path: str) -> tuple[str, str]:
    """``/a/b/run`` -> (``/a/b``, ``run``); ``s3://bucket/x/run/`` -> (``s3://bucket/x``, ``run``)."""
    p = path.rstrip("/")
    if "/" not in p.split("://", 1)[-1]:
        raise StorageError(f"{path!r} is not a run folder path (<storage_path>/<name>)")
    parent, name = p.rsplit("/", 1)
    return parent, name


def load_result(path: str, filesystem: Any = None) -> Result:
    parent, name = split_run_path(path)
    store = RunStore(parent, name, filesystem)
    state = store.read_json(MANIFEST)
    if state is None:
        raise StorageError(f"{store.uri} has no {MANIFEST}: it is not a trainkit run folder "
                           "(or the run never started)")
    read = ev.parse_events(store.read_bytes(EVENTS) or b"")
    return build_result(store, state, lineage(read.events))
