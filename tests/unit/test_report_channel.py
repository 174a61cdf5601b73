"""The report channel's protocol (trainkit.backends.ray.channel): a real asyncio server in a
thread and real sockets, no Ray. The rounds it carries are tested through the ray backend in
tests/integration (every report there goes over it)."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
import threading

import pytest

from trainkit.backends.ray.channel import ChannelClient, ChannelServer, ChannelUnavailable
from trainkit.errors import ControllerError


class _Served:
    """A ChannelServer on 127.0.0.1 in its own event loop thread; ``calls`` what it dispatched."""

    def __init__(self, dispatch=None):
        self.calls = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def default(method, args):
            self.calls.append((method, args))
            return ("ok", (method, args))

        self.server = ChannelServer(dispatch or default)
        self.address = asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1"), self.loop).result(10)

    def close(self):
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:  # the connections' handlers
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served():
    s = _Served()
    yield s
    s.close()


def _raw(address, first: bytes) -> socket.socket:
    s = socket.create_connection(address[:2], timeout=5)
    s.sendall(struct.pack("!Q", len(first)) + first)
    return s


def test_a_call_reaches_the_dispatch_with_its_arguments_and_returns_its_reply(served):
    client = ChannelClient(served.address)
    try:
        assert client.call("report", "run", 1, 0, 3, {"loss": 0.5}, None, None) == \
            ("ok", ("report", ("run", 1, 0, 3, {"loss": 0.5}, None, None)))
        assert client.call("collective", "run", 1, 0, "barrier", 1, None)[0] == "ok"
        assert [m for m, _ in served.calls] == ["report", "collective"]
    finally:
        client.close()


def test_a_wrong_token_is_closed_before_anything_it_sent_is_unpickled(served, tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    host, port, token = served.address
    s = _raw(served.address, bytes(len(token)))  # right length, wrong bytes
    body = pickle.dumps(("report", (Evil(),)))
    s.sendall(struct.pack("!Q", len(body)) + body)
    assert s.recv(1) == b""  # closed without a reply
    s.close()
    assert not marker.exists() and served.calls == []


def test_a_method_outside_the_channel_gets_a_controller_error_not_a_call(served):
    client = ChannelClient(served.address)
    try:
        status, err = client.call("abort", "run")
        assert status == "error" and isinstance(err, ControllerError) and "'abort'" in str(err)
        assert served.calls == []
        assert client.call("report", "still", "usable")[0] == "ok"  # the connection survives
    finally:
        client.close()


def test_a_dispatch_that_raises_and_a_reply_that_cannot_be_pickled_are_errors_for_the_rank():
    async def dispatch(method, args):
        if args[0] == "raise":
            raise KeyError("boom")
        return ("ok", threading.Lock())  # not picklable

    s = _Served(dispatch)
    client = ChannelClient(s.address)
    try:
        status, err = client.call("report", "raise")
        assert status == "error" and isinstance(err, ControllerError) and "KeyError" in str(err)
        assert pickle.loads(pickle.dumps(err)).message == err.message
        status, err = client.call("report", "lock")
        assert status == "error" and "could not be pickled" in str(err)
    finally:
        client.close()
        s.close()


def test_an_unreachable_channel_says_so_before_sending_anything():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed once the block ends: nothing listens there
    client = ChannelClient(("127.0.0.1", port, os.urandom(16)))
    with pytest.raises(ChannelUnavailable, match=f"127.0.0.1:{port}"):
        client.call("report", "run")


def test_a_connection_lost_mid_call_raises_a_controller_error_that_names_the_call():
    entered = threading.Event()

    async def dispatch(method, args):
        entered.set()
        await asyncio.sleep(3600)

    s = _Served(dispatch)
    client = ChannelClient(s.address)
    out = {}

    def call():
        try:
            client.call("collective", "run", 1, 0, "barrier", 1, None)
        except ControllerError as e:
            out["err"] = e

    t = threading.Thread(target=call)
    t.start()
    assert entered.wait(10)
    client.close()  # as the worker's run() ends while an ASYNC report's thread still waits
    t.join(10)
    assert not t.is_alive() and "lost during collective" in str(out["err"])
    s.close()


def test_calls_from_two_threads_of_one_rank_are_serialised_on_its_connection(served):
    client = ChannelClient(served.address)
    replies = []

    def many(tag):
        for i in range(50):
            replies.append(client.call("report", tag, i) == ("ok", ("report", (tag, i))))

    threads = [threading.Thread(target=many, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client.close()
    assert len(replies) == 100 and all(replies)
