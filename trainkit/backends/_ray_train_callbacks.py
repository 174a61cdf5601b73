"""trainkit's ``UserCallback``s on real Ray Train: each forwarded by a ``ray.train.UserCallback``.

Ray Train calls its callbacks on its controller; ``RayUserCallback`` hands each hook on to the
trainkit callback it wraps, with Ray's checkpoint as a ``trainkit.Checkpoint`` and a failed
attempt's exceptions as ``WorkerFailure`` records, as trainkit's own backends give them. What
a hook raises is Ray Train's to handle (a controller failure, fatal, as in trainkit).

Imported only by the ``ray_train`` backend (it needs ``ray[train]``); runs in the driver (made)
and in Ray Train's controller actor (called).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import ray.train


class RayUserCallback(ray.train.UserCallback):
    """``callback``'s hooks, called by Ray Train; ``checkpoint_of`` and ``failure_of`` convert Ray's
    checkpoint and a rank's exception (the ``ray_train`` backend's converters)."""

    def __init__(self, callback: Any, checkpoint_of: Callable, failure_of: Callable):
        self.callback = callback
        self.checkpoint_of = checkpoint_of
        self.failure_of = failure_of

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[Any]) -> None:
        self.callback.after_report(run_context, metrics, self.checkpoint_of(checkpoint))

    def after_exception(self, run_context: Any, worker_exceptions: Dict[int, Exception]) -> None:
        self.callback.after_exception(run_context, {r: self.failure_of(r, e) for r, e in worker_exceptions.items()})


def forwarded(callbacks, checkpoint_of: Callable, failure_of: Callable) -> list:
    """The ``ray.train.UserCallback``s for a trainkit run's callbacks (trainkit's other callbacks,
    such as fault plans, reach the ranks as worker hooks instead)."""
    from trainkit.callback import UserCallback

    return [RayUserCallback(cb, checkpoint_of, failure_of) for cb in callbacks if isinstance(cb, UserCallback)]
