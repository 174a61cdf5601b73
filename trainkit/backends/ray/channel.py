"""The report channel: each rank reaches the controller's rounds over one TCP connection.

``report()`` and the trainkit collectives are the hot path: one round per step, every rank.
As Ray actor calls, a round of 8 ranks on 2 cores costs 5.1 ms before any trainkit code runs
(each call is about 0.3 ms of CPU on each side: task submission, gRPC, the core worker's
queues); the same round over plain sockets costs 0.19 ms. So the controller serves its
rounds on a socket too, and a rank sends its ``report``/``collective`` arrivals there. The
round itself is unchanged: the same ``Controller.report``/``collective`` coroutines, the same
barrier, mismatch checks, hang monitor and commit. Everything else (the run, pings, dumps,
preemption notices, faults, events, validations) stays an actor call.

Protocol, one connection per rank (``ChannelClient``; a lock serialises its calls, as a rank
is in one round at a time): frames of an 8-byte big-endian length and a pickle. The first
frame is the controller's token (16 random bytes, handed to the ranks with the address in
the ``run()`` call): the server compares bytes before it unpickles anything, and closes a
connection whose first frame is wrong. Then each request ``(method, args)`` gets one reply
frame, the coroutine's own ``(status, value)``.

If the channel cannot be reached (a firewall between nodes), the rank says so once on its
log and uses actor calls; nothing was sent, so nothing is counted twice. A connection lost
mid-call (the controller died: its workers die with it) raises ``ControllerError``.
``TRAINKIT_REPORT_CHANNEL=ray`` turns the channel off.

The server runs in the controller actor's event loop; the client in the rank's process.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import secrets
import socket
import struct
import threading
from typing import Awaitable, Callable, Optional

import cloudpickle

from trainkit.errors import ControllerError, WorkerFailure

METHODS = ("report", "collective")  # what a rank may call on the channel
CONNECT_TIMEOUT_S = 5.0
MAX_FRAME = 1 << 30  # a request larger than this is a broken peer, not a report
_LEN = struct.Struct("!Q")

logger = logging.getLogger("trainkit.channel")


class ChannelUnavailable(Exception):
    """The channel could not be reached; nothing was sent (the caller uses an actor call)."""


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def _controller_error(message: str) -> ControllerError:
    return ControllerError(message, [WorkerFailure(world_rank=-1, kind="controller", message=message)])


class ChannelServer:
    """The controller's side: serves ``METHODS`` through ``dispatch(method, args)``."""

    def __init__(self, dispatch: Callable[[str, tuple], Awaitable]):
        self._dispatch = dispatch
        self._server: Optional[asyncio.AbstractServer] = None
        self._token = secrets.token_bytes(16)
        self.address: Optional[tuple] = None  # (host, port, token): what a rank needs to connect

    async def start(self, host: str) -> tuple:
        self._server = await asyncio.start_server(self._serve, host, 0)
        self.address = (host, self._server.sockets[0].getsockname()[1], self._token)
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
            if n != len(self._token) or not secrets.compare_digest(await reader.readexactly(n), self._token):
                return  # not one of this controller's ranks: nothing of it is unpickled
            while True:
                (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                if n > MAX_FRAME:
                    return
                method, args = pickle.loads(await reader.readexactly(n))
                if method in METHODS:
                    try:
                        reply = await self._dispatch(method, args)
                    except Exception as e:  # noqa: BLE001 - the rank gets it as the controller's error
                        reply = ("error", _controller_error(f"{method} failed in the controller: "
                                                            f"{type(e).__name__}: {e}"))
                else:
                    reply = ("error", _controller_error(f"{method!r} is not a report channel method {METHODS}"))
                try:
                    body = cloudpickle.dumps(reply)
                except Exception as e:  # noqa: BLE001 - e.g. a value rank 0 broadcast that cannot be pickled
                    body = cloudpickle.dumps(("error", _controller_error(
                        f"the reply to {method} could not be pickled: {type(e).__name__}: {e}")))
                writer.write(_frame(body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the rank's process ended or closed its connection
        finally:
            writer.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the controller closed the connection")
        buf += chunk
    return bytes(buf)


class ChannelClient:
    """A rank's side: one connection, opened at the first call, closed by ``close()``."""

    def __init__(self, address: tuple):
        self.host, self.port, self._token = address
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        try:
            s = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(_frame(self._token))
        except OSError as e:
            raise ChannelUnavailable(f"the controller's report channel {self.host}:{self.port} cannot be "
                                     f"reached ({type(e).__name__}: {e})") from None
        return s

    def call(self, method: str, *args):
        """The reply of ``method(*args)`` in the controller; ``ChannelUnavailable`` when nothing was sent."""
        request = _frame(cloudpickle.dumps((method, args)))  # a metric that cannot be pickled fails here, as with Ray
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            # this call's socket: close() from another thread may clear self._sock at any moment; it
            # shuts the socket down first, so a recv here then ends (EOF or OSError), never hangs
            sock = self._sock
            try:
                sock.sendall(request)
                (n,) = _LEN.unpack(_recv(sock, _LEN.size))
                return pickle.loads(_recv(sock, n))
            except (OSError, EOFError) as e:
                self._close()
                raise _controller_error(f"the connection to the controller was lost during {method} "
                                        f"({type(e).__name__}: {e}); the controller (and the driver) may have "
                                        "died") from None

    def _close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread of this rank still waiting in recv
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        """End the connection (not under the lock: an ASYNC report's thread may still wait in a round)."""
        self._close()
