"""``Result``: what ``fit()`` returns and what ``Result.from_path`` rebuilds from storage.

``metrics`` is the last reported metrics (any report, checkpoint or not) and
``metrics_dataframe`` the full report history of the run's final lineage, in every mode.
(Ray Train 2.60 gives the last *checkpointed* metrics in distributed mode.)
Runs in the driver.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from trainkit.checkpoint import Checkpoint


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
        from trainkit.ledger import load_result

        return load_result(os.fspath(path), storage_filesystem)
