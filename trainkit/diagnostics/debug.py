"""debugpy for one rank: wait for a debugger before running, or open one post-mortem.

``RankDebugger`` is a run callback (``RunConfig(callbacks=[RankDebugger(rank=1)])``);
``TRAINKIT_DEBUG_RANK=r`` adds one in the driver when ``fit()`` resolves its
configuration (``with_env_debugger``). Its worker hook runs in the rank's process:

* ``rank=r``: before the training function starts, rank ``r`` listens on
  ``127.0.0.1`` (a free port), emits ``debugger_listening`` with host and port, and waits
  for a client (VS Code "attach", or any DAP client) before running.
* ``post_mortem_s=t``: when the training function raises on the rank (any rank with
  ``rank=None``), it listens, emits the event and waits up to ``t`` seconds for a client;
  if one attaches it stops at a breakpoint where ``exc`` is the exception, then the rank
  reports its failure as usual.

debugpy listens once per process; a warm worker reused by a later fit keeps its port.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from typing import Callable, Optional

from trainkit.errors import ConfigError

_listening: Optional[tuple] = None


def _listen(host: str, port: int) -> tuple:
    global _listening
    import debugpy

    if _listening is None:
        addr = debugpy.listen((host, port))
        _listening = (addr[0], int(addr[1])) if isinstance(addr, tuple) else (host, int(port))
    return _listening


class RankDebugger:
    """Attach a debugger to one rank (``rank``), or post-mortem to a rank that raises (``post_mortem_s``).

    >>> RunConfig(callbacks=[RankDebugger(rank=1)])  # doctest: +SKIP
    >>> RunConfig(callbacks=[RankDebugger(post_mortem_s=120)])  # doctest: +SKIP
    """

    def __init__(self, rank: Optional[int] = None, *, post_mortem_s: Optional[float] = None, wait: bool = True,
                 host: str = "127.0.0.1", port: int = 0, reason: str = ""):
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ConfigError("RankDebugger.rank", rank, "a world rank >= 0, or None (post-mortem on any rank)")
        if post_mortem_s is not None and (not isinstance(post_mortem_s, (int, float)) or post_mortem_s <= 0):
            raise ConfigError("RankDebugger.post_mortem_s", post_mortem_s, "seconds > 0, or None")
        if rank is None and post_mortem_s is None:
            raise ConfigError("RankDebugger", None, "rank=<world rank> and/or post_mortem_s=<seconds>")
        from trainkit.extras import require

        require("debug", "RankDebugger")
        self.rank = rank
        self.post_mortem_s = post_mortem_s
        self.wait = wait
        self.host = host
        self.port = port
        self.reason = reason or (f"RankDebugger(rank={rank})" if rank is not None else "post-mortem")

    def worker_hook(self) -> "RankDebugger":
        return self

    # report hooks: nothing to do
    def before_report(self, ctx, index, metrics) -> None:
        return None

    def after_report(self, ctx, index, metrics) -> None:
        return None

    def on_start(self, ctx, emit: Callable) -> None:
        """In the rank's process, before the training function runs."""
        if self.rank is None or ctx.get_world_rank() != self.rank:
            return
        import debugpy

        from trainkit.events import DebuggerListening

        host, port = _listen(self.host, self.port)
        emit(DebuggerListening(attempt=ctx.get_attempt(), world_rank=self.rank, host=host, port=port,
                               reason=self.reason))
        print(f"trainkit: rank {self.rank} waits for a debugger on {host}:{port} (attach with debugpy/VS Code)",
              file=sys.__stderr__, flush=True)
        if self.wait:
            debugpy.wait_for_client()

    def on_error(self, ctx, exc: BaseException, emit: Callable) -> None:
        """In the rank's process, when the training function raised: a bounded post-mortem window."""
        if not self.post_mortem_s or (self.rank is not None and ctx.get_world_rank() != self.rank):
            return
        import debugpy

        from trainkit.events import DebuggerListening

        host, port = _listen(self.host, self.port)
        emit(DebuggerListening(attempt=ctx.get_attempt(), world_rank=ctx.get_world_rank(), host=host, port=port,
                               reason=f"post-mortem: {type(exc).__name__}: {exc}"[:300]))
        print(f"trainkit: rank {ctx.get_world_rank()} raised {type(exc).__name__}; a debugger can attach on "
              f"{host}:{port} for {self.post_mortem_s:.0f} s", file=sys.__stderr__, flush=True)
        deadline = time.monotonic() + self.post_mortem_s
        while not debugpy.is_client_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        if debugpy.is_client_connected():
            tb = exc.__traceback__  # for the debugger: the frames of the exception
            debugpy.breakpoint()  # stopped here: inspect `exc` and `tb`, then continue
            del tb


def before_run(ctx, hooks: list, emit: Callable) -> None:
    for h in hooks or ():
        fn = getattr(h, "on_start", None)
        if fn is not None:
            fn(ctx, emit)


def after_error(ctx, hooks: list, exc: BaseException, emit: Callable) -> None:
    for h in hooks or ():
        fn = getattr(h, "on_error", None)
        if fn is not None:
            try:
                fn(ctx, exc, emit)
            except Exception as e:  # noqa: BLE001 - the original failure must still be reported
                print(f"trainkit: post-mortem hook failed: {type(e).__name__}: {e}", file=sys.__stderr__)


def with_env_debugger(spec):
    """Driver side, at ``fit()``: ``TRAINKIT_DEBUG_RANK=r`` adds ``RankDebugger(rank=r)`` to the callbacks.

    A run with a ``RankDebugger`` also gets fresh worker processes (a unique
    ``worker_runtime_env`` variable): debugpy serves one debugging session per process,
    so a worker that was debugged must not be handed to a later fit.
    """
    from trainkit import _env

    raw = _env.DEBUG_RANK.get().strip()
    rc = spec.run_config
    callbacks = tuple(rc.callbacks)
    if raw and not any(isinstance(cb, RankDebugger) for cb in callbacks):
        try:
            rank = int(raw)
        except ValueError:
            raise ConfigError("TRAINKIT_DEBUG_RANK", raw, "a world rank (an int >= 0)") from None
        n = spec.scaling_config.max_workers
        if rank < 0 or (n and rank >= n):
            raise ConfigError("TRAINKIT_DEBUG_RANK", raw, f"a world rank from 0 to {max(n - 1, 0)}")
        callbacks += (RankDebugger(rank=rank, reason="TRAINKIT_DEBUG_RANK"),)
    if not any(isinstance(cb, RankDebugger) for cb in callbacks):
        return spec
    env = dict(rc.worker_runtime_env or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), "TRAINKIT_DEBUG_SESSION": uuid.uuid4().hex}
    return dataclasses.replace(spec, run_config=dataclasses.replace(rc, callbacks=callbacks, worker_runtime_env=env))
