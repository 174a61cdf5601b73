"""One driver per run: the lease in owner.json is taken, refused, renewed, taken over and released."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

import trainkit
from trainkit import CheckpointConfig, Result, RunConfig, ScalingConfig
from trainkit import lease as L
from trainkit.errors import ConfigError, RunOwnedError, StorageError
from trainkit.ledger import RunLedger
from trainkit.result import load_state
from trainkit.storage import RunStore
from trainkit.torch import TorchTrainer


def _store(tmp_path, name: str = "run") -> RunStore:
    return RunStore(str(tmp_path), name)


def _owner_file(store: RunStore) -> dict:
    with open(store.path("owner.json")) as f:
        return json.load(f)


def _write_owner(store: RunStore, **fields) -> dict:
    """An owner.json of another driver (by default: this machine, a live pid, just renewed)."""
    now = time.time()
    d = {"host": socket.gethostname(), "pid": os.getppid(), "started": L.process_started(os.getppid()),
         "machine": L.machine(), "token": "other", "since": now - 60, "renewed_at": now, "lease_s": 30.0,
         "backend": "local", **fields}
    os.makedirs(store.run_path, exist_ok=True)
    with open(store.path("owner.json"), "w") as f:
        json.dump(d, f)
    return d


def _dead_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


@pytest.fixture
def lease(tmp_path):
    held = L.Lease.acquire(_store(tmp_path))
    yield held
    held.release()


def test_the_lease_names_this_process_and_is_taken_before_anything_else_is_written(tmp_path, lease):
    assert os.listdir(lease.store.run_path) == ["owner.json"]
    owner = _owner_file(lease.store)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert owner["lease_s"] == L.LEASE_S and owner["token"] == lease.owner.token
    assert owner["since"] == owner["renewed_at"] and owner["started"] == L.process_started(os.getpid())


def test_a_second_driver_is_refused_at_once_with_the_owner_and_what_to_do(tmp_path, lease):
    with pytest.raises(RunOwnedError) as info:
        L.Lease.acquire(_store(tmp_path))
    message = str(info.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "since" in message
    assert "RunConfig.name 'run'" in message and "Wait for that fit() to end" in message
    assert f"remove {lease.store.path('owner.json')}" in message
    assert info.value.owner["token"] == lease.owner.token
    assert isinstance(info.value, ConfigError) and isinstance(info.value, StorageError)
    assert _owner_file(lease.store)["token"] == lease.owner.token  # untouched


def test_a_live_driver_on_this_machine_keeps_the_run(tmp_path):
    store = _store(tmp_path)
    _write_owner(store)
    with pytest.raises(RunOwnedError, match=f"pid {os.getppid()}"):
        L.Lease.acquire(store)


@pytest.mark.parametrize("fields, reason", [
    ({"pid": _dead_pid()}, "is not running on"),
    ({"started": 1.0}, "is another process now"),  # the pid was reused
    ({"renewed_at": 0.0}, "lease was last renewed"),
    ({"machine": "elsewhere/boot/1", "renewed_at": time.time() - 31}, "more than its lease_s=30"),
])
def test_a_gone_owner_is_taken_over_and_remembered(tmp_path, fields, reason):
    store = _store(tmp_path)
    old = _write_owner(store, **fields)
    held = L.Lease.acquire(store)
    try:
        assert held.previous.token == "other" and held.previous.pid == old["pid"]
        assert reason in held.previous_gone
        assert _owner_file(store)["token"] == held.owner.token
        assert [n for n in os.listdir(store.run_path) if n != "owner.json"] == []  # nothing left aside
    finally:
        held.release()


def test_an_owner_elsewhere_is_alive_while_it_renews_within_lease_s():
    now = time.time()
    owner = L.Owner(host="other-host", pid=1, started=None, machine="other/boot/1", token="t", since=now,
                    renewed_at=now, lease_s=30.0)
    assert L.owner_gone(owner, now + 29.9) is None
    assert "renewed 31 s ago" in L.owner_gone(owner, now + 31)


def test_a_lease_left_behind_by_this_process_is_taken_over(tmp_path):
    store = _store(tmp_path)
    first = L.Lease.acquire(store)
    with L._held_lock:
        L._held.discard(first.owner.token)  # as if its release had failed
    second = L.Lease.acquire(store)
    try:
        assert "left behind by an earlier fit() of this process" in second.previous_gone
    finally:
        second.release()


def test_a_damaged_lease_is_taken_over(tmp_path):
    store = _store(tmp_path)
    os.makedirs(store.run_path)
    with open(store.path("owner.json"), "w") as f:
        f.write('{"host": ')
    held = L.Lease.acquire(store)
    held.release()
    assert held.previous is None and held.previous_gone == "owner.json is damaged"


def test_of_drivers_racing_for_a_stale_lease_exactly_one_wins(tmp_path):
    store = _store(tmp_path)
    _write_owner(store, pid=_dead_pid())
    won, refused, barrier = [], [], threading.Barrier(6)

    def take():
        barrier.wait()
        try:
            won.append(L.Lease.acquire(RunStore(str(tmp_path), "run")))
        except RunOwnedError as e:
            refused.append(e)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 5
        assert _owner_file(store)["token"] == won[0].owner.token
    finally:
        for held in won:
            held.release()


def test_renewal_moves_renewed_at_and_a_lease_taken_over_is_lost(tmp_path, lease):
    before = _owner_file(lease.store)["renewed_at"]
    time.sleep(0.01)
    lease.renew()
    assert _owner_file(lease.store)["renewed_at"] > before
    _write_owner(lease.store, token="thief")
    with pytest.raises(RunOwnedError, match="was taken over by another driver"):
        lease.renew()
    with pytest.raises(RunOwnedError):
        lease.check()
    lease.release()
    assert _owner_file(lease.store)["token"] == "thief"  # release removes only its own lease


def test_check_reads_the_lease_only_once_the_last_renewal_is_old(tmp_path):
    held = L.Lease.acquire(_store(tmp_path), lease_s=0.2)
    try:
        _write_owner(held.store, token="thief")
        held.check()  # confirmed just now: no read
        time.sleep(0.11)
        with pytest.raises(RunOwnedError, match="taken over"):
            held.check()
    finally:
        held.release()


def test_the_renewal_thread_keeps_the_lease_alive_and_release_removes_it(tmp_path):
    store = _store(tmp_path)
    with L.owned(store, lease_s=0.3) as held:
        first = _owner_file(store)["renewed_at"]
        time.sleep(0.5)
        assert _owner_file(store)["renewed_at"] > first
        assert L.owner_gone(held.owner) is None
        held.check()
    assert not os.path.exists(store.path("owner.json"))


def test_a_copy_for_another_process_checks_but_never_renews_or_releases(tmp_path, lease):
    import pickle

    copy = pickle.loads(pickle.dumps(lease))
    assert not copy.holder and copy.owner.token == lease.owner.token
    copy.check()
    copy.release()
    assert os.path.exists(lease.store.path("owner.json"))


def test_a_folder_that_is_not_a_run_is_refused_before_the_lease_is_written(tmp_path):
    os.makedirs(tmp_path / "run" / "src")
    with pytest.raises(ConfigError, match="not a trainkit run"):
        with L.owned(_store(tmp_path)):
            pass
    assert os.listdir(tmp_path / "run") == ["src"]


def test_memory_storage_takes_refuses_and_takes_over_leases():
    store = RunStore("memory://lease-test", f"run-{time.time_ns()}")
    held = L.Lease.acquire(store)
    with pytest.raises(RunOwnedError):
        L.Lease.acquire(RunStore(store.storage_path, store.name))
    with L._held_lock:
        L._held.discard(held.owner.token)
    again = L.Lease.acquire(RunStore(store.storage_path, store.name))
    assert again.previous.token == held.owner.token
    with pytest.raises(RunOwnedError):
        held.renew()
    again.release()
    assert store.fs.exists(store.path("owner.json")) is False


# -- the ledger and readers -------------------------------------------------------------------------
def _gone_run(tmp_path) -> RunStore:
    """A run whose driver died during attempt 1, after one checkpoint-less report."""
    store = _store(tmp_path)
    ledger = RunLedger(store, CheckpointConfig())
    ledger.commit(ledger.start_attempt(1), 1, {"step": 1})
    _write_owner(store, pid=_dead_pid())
    return store


def test_a_reader_shows_the_attempt_of_a_gone_driver_as_aborted_and_writes_nothing(tmp_path):
    store = _gone_run(tmp_path)
    before = sorted(os.listdir(store.run_path)), open(store.path("run_state.json")).read()
    state = load_state(store.run_path)
    assert state["status"] == "aborted" and state["attempts"][0]["outcome"] == "aborted"
    assert "its driver (pid" in state["error"]["message"] and "is not running" in state["error"]["message"]
    result = Result.from_path(store.run_path)
    assert type(result.error).__name__ == "ControllerError" and "is gone" in str(result.error)
    assert (sorted(os.listdir(store.run_path)), open(store.path("run_state.json")).read()) == before


def test_a_reader_shows_a_run_with_a_live_driver_as_running(tmp_path):
    store = _gone_run(tmp_path)
    _write_owner(store)  # a live owner
    assert load_state(store.run_path)["status"] == "running"
    assert Result.from_path(store.run_path).error is None


def test_a_ledger_that_takes_over_marks_the_gone_drivers_attempt_aborted(tmp_path):
    store = _gone_run(tmp_path)
    with L.owned(store) as held:
        ledger = RunLedger(store, CheckpointConfig(), lease=held)
        assert ledger.start_attempt(1) == 2
        ledger.finish("finished")
    state = json.load(open(store.path("run_state.json")))
    assert [(a["attempt"], a["outcome"]) for a in state["attempts"]] == [(1, "aborted"), (2, "finished")]
    assert state["attempts"][0]["ended"] == pytest.approx(held.previous.renewed_at)
    events = [json.loads(line) for line in open(store.path("events.jsonl"))]
    assert [e["type"] for e in events] == ["run_started", "attempt_started", "report_committed", "run_finished",
                                           "run_started", "attempt_started", "run_finished"]
    gone = events[3]
    assert gone["status"] == "aborted" and gone["attempts"] == 1 and gone["last_index"] == 1
    assert f"pid {held.previous.pid}" in gone["error"]["message"]


def test_a_local_fit_whose_run_is_taken_over_stops_writing_and_is_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "LEASE_S", 0.3)
    store = _store(tmp_path)

    def loop():
        for step in range(1, 100):
            if step == 3:
                _write_owner(store, token="thief")  # another driver took the run over
                time.sleep(0.4)
            trainkit.report({"step": step})

    with pytest.raises(RunOwnedError, match="taken over"):
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="run", storage_path=str(tmp_path),
                                          failure_config=trainkit.FailureConfig(max_failures=-1))).fit()
    events = [json.loads(line) for line in open(store.path("events.jsonl"))]
    assert [e["metrics"]["step"] for e in events if e["type"] == "report_committed"] == [1, 2]
    assert [e["type"] for e in events].count("attempt_started") == 1
    assert _owner_file(store)["token"] == "thief"
