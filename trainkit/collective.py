"""``trainkit.collective``: barrier and broadcast across the ranks of a run.

Every collective is keyed by its operation and sequence number, so a ``barrier()`` on
one rank never pairs with a ``report()`` on another (Ray Train 2.60 pairs them
silently); a mismatch ends the run with an error naming the ranks. Runs in workers.
"""

from __future__ import annotations

from typing import Any

from trainkit.session import current_session


def barrier() -> None:
    """Wait until every rank of the group called ``barrier()``."""
    current_session("collective.barrier").collective("barrier")


def broadcast_from_rank_zero(data: Any) -> Any:
    """Return rank 0's ``data`` on every rank (other ranks' ``data`` is ignored)."""
    return current_session("collective.broadcast_from_rank_zero").collective("broadcast", data)


__all__ = ["barrier", "broadcast_from_rank_zero"]
