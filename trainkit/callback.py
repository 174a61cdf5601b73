"""``UserCallback``: Ray Train V2's callback interface, called where the run is coordinated.

Hooks run in the process that commits the run's reports: the driver in local mode, rank 0
under torchrun, the controller actor with the ``ray`` backend (as Ray runs them on its
controller). They are fed by the run's event stream (``trainkit.backends.api.subscribe_callbacks``).
Runs in that process; a callback must be picklable to reach the controller.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class UserCallback:
    """Subclass it and pass an instance in ``RunConfig(callbacks=[...])``.

    >>> class Printer(UserCallback):
    ...     def after_report(self, run_context, metrics, checkpoint):
    ...         print(metrics[0])
    """

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[Any]) -> None:
        """After a report round is committed: ``metrics[i]`` is what world rank i reported;
        ``checkpoint`` the committed ``Checkpoint``, or None for a metrics-only round."""

    def after_exception(self, run_context: Any, worker_exceptions: Dict[int, Any]) -> None:
        """After an attempt failed: world rank -> its failure (a ``trainkit.errors.WorkerFailure`` with
        the exception's type, message and traceback)."""


class TrainRunContext:
    """What a ``UserCallback`` is told about the run (Ray's ``TrainRunContext``)."""

    def __init__(self, run_config: Any, train_loop_config: Optional[dict] = None, scaling_config: Any = None,
                 backend_config: Any = None, dataset_config: Any = None):
        self.run_config = run_config
        self.train_loop_config = train_loop_config
        self.scaling_config = scaling_config
        self.backend_config = backend_config
        self.dataset_config = dataset_config

    def get_run_config(self) -> Any:
        return self.run_config


__all__ = ["UserCallback", "TrainRunContext"]
