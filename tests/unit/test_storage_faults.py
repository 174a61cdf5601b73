"""Storage faults end cleanly: a full, read-only or forbidden storage is a StorageError from fit(),
tried once, the run marked failed where that can still be written; the event stream never continues a
torn line, and a torn line in the middle is skipped with the rest read.

The faults come from a real seam of the product, ``RunConfig(storage_filesystem=...)``: an fsspec
memory filesystem whose writes fail like a real disk (``OSError(errno.ENOSPC)`` after N bytes, or
``EROFS``/``EACCES`` under some paths)."""

from __future__ import annotations

import errno
import json
import os
import pickle

import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

import trainkit
from trainkit import Checkpoint, FailureConfig, Result, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.errors import StorageError, TrainkitError
from trainkit.storage import NOT_RETRIED, WRITE_TRIES, RunStore, StorageIOError
from trainkit.trainer import DataParallelTrainer


class FaultyDisk(MemoryFileSystem):
    """A private in-memory disk: writes fail with ``error`` once ``limit_bytes`` are used up, or at once
    for paths containing ``fail_under``. ``failed_writes`` counts the writes refused."""

    protocol = ("faultydisk",)

    def __init__(self, limit_bytes: float = float("inf"), error: int = errno.ENOSPC, fail_under: str = ""):
        super().__init__(skip_instance_cache=True)
        self.store, self.pseudo_dirs = {}, [""]
        self.limit_bytes, self.error, self.fail_under = limit_bytes, error, fail_under
        self.used = self.failed_writes = 0

    def charge(self, path: str, n: int) -> None:
        if (self.fail_under and self.fail_under in path) or self.used + n > self.limit_bytes:
            self.failed_writes += 1
            raise OSError(self.error, os.strerror(self.error), path)
        self.used += n

    def _open(self, path, mode="rb", **kwargs):
        if mode in ("wb", "xb", "w+b"):
            self.charge(path, len(kwargs.get("data") or b""))
            path = self._strip_protocol(path)
            f = _CountingFile(self, path, kwargs.get("data"))
            f.commit()
            return f
        return super()._open(path, mode, **kwargs)


class _CountingFile(MemoryFile):
    def write(self, data):
        self.fs.charge(self.path, len(data))
        return super().write(data)


def _train_fn(steps: int, src: str):
    def train_fn():
        for step in range(1, steps + 1):
            d = os.path.join(src, f"step-{step}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "model.bin"), "wb") as f:
                f.write(b"w" * 1000)
            trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
    return train_fn


def _fit(fs, tmp_path, steps=3, max_failures=0):
    return DataParallelTrainer(_train_fn(steps, str(tmp_path / "src")), scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(name="run", storage_path="/storage", storage_filesystem=fs,
                                                    failure_config=FailureConfig(max_failures=max_failures))).fit()


def _manifest(fs):
    return json.loads(fs.cat_file("/storage/run/run_state.json"))


def test_a_full_disk_is_a_storage_error_from_fit_tried_once_and_not_retried_by_attempts(tmp_path):
    fs = FaultyDisk(limit_bytes=4000)  # room for the run folder and one checkpoint, not two
    with pytest.raises(StorageError) as info:
        _fit(fs, tmp_path, max_failures=-1)  # unlimited retries would spin forever on a full disk
    err = info.value
    assert isinstance(err, TrainkitError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert "No space left on device" in str(err) and "ENOSPC, not retried" in str(err)
    assert "/storage/run/checkpoint_2" in str(err) and "RunConfig.storage_path" in str(err)
    assert _manifest(fs)["latest_checkpoint"] == "checkpoint_1"  # what was committed stays committed
    assert len(_manifest(fs)["attempts"]) == 1


def test_a_read_only_checkpoint_folder_fails_the_run_and_the_status_says_failed(tmp_path):
    fs = FaultyDisk(error=errno.EROFS, fail_under="checkpoint_2")
    with pytest.raises(StorageError, match="Read-only file system.*EROFS, not retried.*read-only"):
        _fit(fs, tmp_path, max_failures=3)
    assert fs.failed_writes == 1  # one try: trying again cannot help
    state = _manifest(fs)
    assert state["status"] == "failed" and "Read-only" in state["error"]["message"]
    assert len(state["attempts"]) == 1
    read = ev.parse_events(fs.cat_file("/storage/run/events.jsonl"))
    assert [e.type for e in read.events][-2:] == ["worker_failed", "run_finished"]
    assert read.events[-2].will_retry is False
    assert Result.from_path("/storage/run", storage_filesystem=fs).checkpoint.path.endswith("checkpoint_1")


@pytest.mark.parametrize("code", sorted(NOT_RETRIED))
def test_full_read_only_and_forbidden_writes_are_not_retried(tmp_path, code):
    fs = FaultyDisk(error=code, fail_under="run_state.json")
    store = RunStore("/storage", "run", fs)
    with pytest.raises(StorageIOError) as info:
        store.write_json_atomic("run_state.json", {"a": 1})
    assert fs.failed_writes == 1 and info.value.errno == code
    assert store.unusable is info.value


def test_other_write_errors_are_retried_and_then_named(tmp_path):
    fs = FaultyDisk(error=errno.EIO, fail_under="run_state.json")
    store = RunStore("/storage", "run", fs)
    with pytest.raises(StorageIOError, match=f"EIO, after {WRITE_TRIES} tries"):
        store.write_json_atomic("run_state.json", {"a": 1})
    assert fs.failed_writes == WRITE_TRIES and store.unusable is None


def test_a_storage_error_pickles_with_its_errno_and_path():
    err = StorageIOError("writing /r/x failed: no space", errno.ENOSPC, "/r/x")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.errno, back.filename) == (str(err), errno.ENOSPC, "/r/x")
    assert isinstance(back, StorageError) and isinstance(back, OSError)


def test_a_local_write_error_is_a_storage_error_naming_the_path(tmp_path):
    store = RunStore(str(tmp_path), "run")
    store.ensure()
    os.makedirs(store.path("run_state.json"))  # a folder where the manifest should be: not writable
    with pytest.raises(StorageError, match="run_state.json"):
        store.write_json_atomic("run_state.json", {"a": 1})
    assert [n for n in os.listdir(store.run_path) if ".tmp-" in n] == []  # the temp file is removed


def test_the_event_writer_never_appends_after_a_torn_line(tmp_path):
    from trainkit import CheckpointConfig
    from trainkit.ledger import RunLedger

    store = RunStore(str(tmp_path), "run")
    RunLedger(store, CheckpointConfig()).start_attempt(1)
    path = store.path("events.jsonl")
    with open(path, "a") as f:
        f.write('{"type": "report_committed", "time": 1.0, "attempt": 1, "ind')  # the writer died here
    ledger = RunLedger(store, CheckpointConfig())
    ledger.start_attempt(1)
    data = open(path, "rb").read()
    read = ev.parse_events(data)
    # the next start repaired the file: the torn tail is gone, every complete event is there, byte for byte
    assert read.bad_line is None and read.skipped == () and read.problem == ""
    assert b'"ind' not in data and data.endswith(b"\n")
    # the first fit never ended: the second closes it (run_finished, aborted) before its own run_started
    assert [e.type for e in read.events] == ["run_started", "attempt_started", "run_finished", "run_started",
                                             "attempt_started"]


def test_a_torn_line_in_the_middle_is_skipped_and_the_rest_is_read():
    sample = [ev.RunStarted(name="a"), ev.AttemptStarted(attempt=1), ev.RunFinished()]
    text = sample[0].to_json() + "\n" + sample[1].to_json()[:30] + "\n" + sample[1].to_json() + "\n" + \
        sample[2].to_json() + "\n"
    read = ev.parse_events(text)
    assert read.events == sample and read.skipped == (2,) and read.bad_line is None
    assert "line 2" in read.problem


def test_a_failed_append_is_followed_by_a_newline(tmp_path):
    calls = []

    class FlakyStore:
        local = True

        def append_text(self, rel, text):
            calls.append(text)
            if len(calls) == 1:
                raise StorageError("disk hiccup")

    log = ev.EventLog(FlakyStore())
    with pytest.raises(StorageError):
        log.emit(ev.RunStarted(name="a"))
    log.emit(ev.RunFinished())
    assert calls[1].startswith("\n") and calls[1].count("\n") == 3  # repair, then both events


def test_torn_lines_in_the_middle_are_removed_at_the_next_start_and_the_rest_kept_byte_for_byte(tmp_path):
    from trainkit import CheckpointConfig
    from trainkit.ledger import RunLedger

    store = RunStore(str(tmp_path), "run")
    RunLedger(store, CheckpointConfig()).start_attempt(1)
    path = store.path("events.jsonl")
    good = open(path, "rb").read()
    with open(path, "ab") as f:  # an append that stopped half-way, then a writer that started a new line
        f.write(b'{"type": "report_committed", "time": 1.0, "att\n' + ev.FaultInjected(action="raise").to_json().encode()
                + b"\n")
    RunLedger(store, CheckpointConfig())
    data = open(path, "rb").read()
    assert data.startswith(good) and b'"att\n' not in data  # complete events untouched, the torn line gone
    read = ev.parse_events(data)
    assert read.skipped == () and read.problem == "" and "fault_injected" in [e.type for e in read.events]
