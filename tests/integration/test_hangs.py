"""Real hangs on a real local Ray: the watchdog names the missing ranks, their stacks and user frames.

Each training function below hangs in a different way (a rank stuck in a function of this
file, a rank that skips an ``all_reduce``, a rank stuck in a DataLoader worker, a rank
that reports one time fewer, all ranks stuck in a collective). For each, the summary in
``diagnostics/``, the ``hang_detected`` event, ``fit()``'s error and ``trainkit diagnose``
(text and ``--json``) must name the right ranks, classification and user frame. Stacks
come from real py-spy (and the faulthandler fallback in one test).

The stuck functions poll their parent process so that nothing outlives the test.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import pytest

import trainkit
from trainkit import FailureConfig, HangConfig, HangDetectedError, RunConfig, ScalingConfig
from trainkit.cli import diagnose
from trainkit.diagnostics.run_report import load_report
from trainkit.events import read_run_dicts
from trainkit.torch import TorchTrainer
from trainkit_testing.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_up"),
              pytest.mark.trainkit(workers=4, nodes=1), pytest.mark.timeout(240)]

THIS_FILE = os.path.basename(__file__)


# -- training functions that hang -----------------------------------------------------------------
def stuck_in_user_code(release_file=None):
    parent = os.getppid()
    while os.getppid() == parent:
        if release_file and os.path.exists(release_file):
            return
        time.sleep(0.02)


def train_stuck_rank(config):
    rank = trainkit.get_context().get_world_rank()
    for step in range(1, config.get("steps", 3) + 1):
        if rank == config["stuck_rank"] and step == config["stuck_at"] and trainkit.get_context().get_attempt() == 1:
            stuck_in_user_code(config.get("release_file"))
        if step == config["stuck_at"]:
            with open(os.path.join(config["out"], f"arrive-{rank}"), "w") as f:
                f.write(repr(time.time()))
        trainkit.report({"step": step})


def train_skip_allreduce(config):
    import torch
    import torch.distributed as dist

    rank = trainkit.get_context().get_world_rank()
    for step in range(1, 4):
        t = torch.ones(1)
        if not (rank == 1 and step == 2):
            dist.all_reduce(t)  # HANG-ALLREDUCE
        trainkit.report({"step": step})


def stuck_in_dataset():
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.02)


def _make_dataset(stuck: bool):
    import torch
    from torch.utils.data import Dataset

    class Items(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            if stuck and i >= 4:
                stuck_in_dataset()
            return torch.tensor([float(i)])

    return Items()


def train_stuck_loader(config):
    from torch.utils.data import DataLoader

    rank = trainkit.get_context().get_world_rank()
    loader = DataLoader(_make_dataset(rank == 1), batch_size=2, num_workers=1)
    for step, _batch in enumerate(loader, start=1):  # HANG-LOADER
        trainkit.report({"step": step})


def train_one_report_fewer(config):
    import torch.distributed as dist

    rank = trainkit.get_context().get_world_rank()
    for step in range(1, (2 if rank == 1 else 3) + 1):
        trainkit.report({"step": step})
    dist.barrier()  # HANG-FEWER


def train_all_in_collective(config):
    import torch
    import torch.distributed as dist

    trainkit.report({"step": 1})
    rank, size = dist.get_rank(), dist.get_world_size()
    t = torch.zeros(1)
    dist.recv(t, src=(rank + 1) % size)  # HANG-GROUP: everyone receives, nobody sends


# -- helpers --------------------------------------------------------------------------------------
def _line_of(fn, marker: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if marker in text:
            return start + i
    raise AssertionError(f"{marker} not in {fn.__name__}")


def _frame(fn, marker: str, name: str | None = None) -> str:
    return f"{name or fn.__name__} ({THIS_FILE}:{_line_of(fn, marker)})"


def _fit(fn, storage_path, name, *, workers=4, config=None, action="fail", dump="auto", timeout_s=2.0,
         max_failures=0):
    return TorchTrainer(
        fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             hang_config=HangConfig(timeout_s=timeout_s, action=action, dump=dump)),
    ).fit()


def _hang_events(run_path: str) -> list[dict]:
    return [e for e in read_run_dicts(run_path) if e["type"] == "hang_detected"]


def _summary(run_path: str, event: dict) -> dict:
    with open(os.path.join(run_path, event["diagnostics"], "summary.json")) as f:
        return json.load(f)


def _diagnose(run_path: str, tmp_path, capsys) -> tuple[int, str, dict]:
    out = str(tmp_path / "diag.json")
    capsys.readouterr()
    code = diagnose(argparse.Namespace(run=run_path, live=False, json=out))
    text = capsys.readouterr().out
    with open(out) as f:
        data = json.load(f)
    return code, text, data


def _missing_rows(summary: dict) -> dict[int, dict]:
    return {r["world_rank"]: r for r in summary["ranks"] if r["state"] == "missing"}


def _check_everywhere(run_path, tmp_path, capsys, *, missing, classification, frame):
    """The event, summary.json, diagnose text and diagnose --json all name the same ranks/class/frame."""
    ev = _hang_events(run_path)
    assert ev, "no hang_detected event"
    e = ev[0]
    assert sorted(e["missing_ranks"]) == missing
    ev_rows = {r["world_rank"]: r for r in e["ranks"] if r["state"] == "missing"}
    summary = _summary(run_path, e)
    rows = _missing_rows(summary)
    assert sorted(rows) == missing
    for r in missing:
        assert rows[r]["classification"] == classification, rows[r]
        assert rows[r]["user_frame"] == frame, rows[r]
        assert ev_rows[r]["classification"] == classification and ev_rows[r]["user_frame"] == frame
        stack = open(os.path.join(run_path, e["diagnostics"], f"rank-{r}.txt")).read()
        assert THIS_FILE in stack
    waiting = sorted(r["world_rank"] for r in summary["ranks"] if r["state"] == "waiting")
    assert sorted(missing + waiting) == list(range(len(summary["ranks"])))
    assert frame in e["summary"]

    code, text, data = _diagnose(run_path, tmp_path, capsys)
    assert code == 1
    assert ">> " in text and frame in text
    h = data["hangs"][0]
    assert sorted(h["missing_ranks"]) == missing
    drows = {r["world_rank"]: r for r in h["ranks"] if r["state"] == "missing"}
    assert {r: (drows[r]["classification"], drows[r]["user_frame"]) for r in missing} == \
        {r: (classification, frame) for r in missing}
    assert all(THIS_FILE in drows[r]["stack"] for r in missing)
    return e, summary, text, data


# -- the acceptance cases -------------------------------------------------------------------------
def test_a_rank_stuck_in_user_code_is_named_with_its_frame_and_fails_the_run(storage_path, tmp_path, capsys):
    out = str(tmp_path)
    with pytest.raises(HangDetectedError) as info:
        _fit(train_stuck_rank, storage_path, "stuck", config={"stuck_rank": 1, "stuck_at": 2, "out": out})
    frame = _frame(stuck_in_user_code, "time.sleep")
    assert "rank 1 has not arrived" in str(info.value) and frame in str(info.value)
    assert [f.world_rank for f in info.value.failures] == [1]
    assert frame.split(" (")[0] in info.value.failures[0].traceback
    run_path = os.path.join(storage_path, "stuck")
    e, summary, text, data = _check_everywhere(run_path, tmp_path, capsys, missing=[1],
                                               classification="user_code", frame=frame)
    assert e["index"] == 2 and summary["waiting_ranks"] == [0, 2, 3]
    assert summary["summary"].startswith("hang at report 2: rank 1 has not arrived after 2.")
    # evidence is written while the hang is live (timeout 2 s + one py-spy dump), not at teardown; the
    # 3.5 s target itself is a figure, measured by benchmarks/bench_hang.py, and a loaded 2-core CI box
    # must not turn it red here
    last_arrival = max(float(open(os.path.join(out, f"arrive-{r}")).read()) for r in (0, 2, 3))
    written = os.stat(os.path.join(run_path, e["diagnostics"], "summary.json")).st_mtime
    assert written - last_arrival < 8.0, f"summary written {written - last_arrival:.2f} s after the last arrival"
    result = trainkit.Result.from_path(run_path)
    assert isinstance(result.error, HangDetectedError)
    assert data["status"] == "failed" and data["failures"][0]["kind"] == "hang"


def test_a_rank_that_skips_an_all_reduce_leaves_the_others_named_in_a_collective(storage_path, tmp_path, capsys):
    with pytest.raises(HangDetectedError):
        _fit(train_skip_allreduce, storage_path, "skip")
    _check_everywhere(os.path.join(storage_path, "skip"), tmp_path, capsys, missing=[0, 2, 3],
                      classification="collective", frame=_frame(train_skip_allreduce, "HANG-ALLREDUCE"))


def test_a_rank_stuck_in_a_dataloader_worker_is_in_data_loading(storage_path, tmp_path, capsys):
    with pytest.raises(HangDetectedError):
        _fit(train_stuck_loader, storage_path, "loader")
    run_path = os.path.join(storage_path, "loader")
    e, summary, text, data = _check_everywhere(run_path, tmp_path, capsys, missing=[1],
                                               classification="data_loading",
                                               frame=_frame(train_stuck_loader, "HANG-LOADER"))
    subs = _missing_rows(summary)[1]["subprocesses"]
    inner = _frame(stuck_in_dataset, "time.sleep")
    assert any(s["user_frame"] == inner for s in subs), subs
    assert inner in text


def test_a_rank_that_reports_one_time_fewer_is_named_in_its_collective(storage_path, tmp_path, capsys):
    with pytest.raises(HangDetectedError):
        _fit(train_one_report_fewer, storage_path, "fewer")
    e, summary, _, _ = _check_everywhere(os.path.join(storage_path, "fewer"), tmp_path, capsys, missing=[1],
                                         classification="collective",
                                         frame=_frame(train_one_report_fewer, "HANG-FEWER"))
    assert e["index"] == 3


def test_a_group_with_every_rank_in_a_collective_is_a_hang_of_the_whole_group(storage_path, tmp_path, capsys):
    with pytest.raises(HangDetectedError) as info:
        _fit(train_all_in_collective, storage_path, "group", workers=2)
    assert "all 2 ranks are stuck" in str(info.value)
    e, summary, _, _ = _check_everywhere(os.path.join(storage_path, "group"), tmp_path, capsys, missing=[0, 1],
                                         classification="collective",
                                         frame=_frame(train_all_in_collective, "HANG-GROUP"))
    assert summary["kind"] == "group" and e["index"] == 2


# -- actions and fallbacks ------------------------------------------------------------------------
def test_warn_keeps_waiting_repeats_with_back_off_and_the_run_finishes(storage_path, tmp_path):
    release = str(tmp_path / "release")
    run_path = os.path.join(storage_path, "warn")
    import threading

    def release_after_two_warnings():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(_hang_events(run_path)) >= 2:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        open(release, "w").close()

    t = threading.Thread(target=release_after_two_warnings, daemon=True)
    t.start()
    result = _fit(train_stuck_rank, storage_path, "warn", workers=2, action="warn",
                  config={"stuck_rank": 1, "stuck_at": 2, "out": str(tmp_path), "release_file": release})
    t.join(5)
    assert result.error is None and result.metrics == {"step": 3}
    hangs = _hang_events(run_path)
    assert len(hangs) >= 2
    # back-off: the second report comes about 2 x timeout after the first arrival, not every tick
    assert hangs[1]["waited_s"] >= 2 * hangs[0]["waited_s"] - 0.2
    assert all(h["missing_ranks"] == [1] for h in hangs)


def test_restart_restarts_from_the_latest_checkpoint_and_counts_a_failure(storage_path, tmp_path):
    result = _fit(train_stuck_rank, storage_path, "restart", workers=2, action="restart", max_failures=1,
                  config={"stuck_rank": 1, "stuck_at": 2, "out": str(tmp_path)})
    assert result.error is None and result.metrics == {"step": 3} and result.attempts == 2
    events = read_run_dicts(os.path.join(storage_path, "restart"))
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert len(failed) == 1 and failed[0]["kind"] == "hang" and failed[0]["will_retry"]
    assert failed[0]["failures"][0]["world_rank"] == 1


def test_restart_past_max_failures_raises_hang_detected_error(storage_path, tmp_path):
    def always_stuck(config):
        rank = trainkit.get_context().get_world_rank()
        trainkit.report({"step": 1})
        if rank == 0:
            stuck_in_user_code()
        trainkit.report({"step": 2})

    with pytest.raises(HangDetectedError, match="max_failures=1"):
        _fit(always_stuck, storage_path, "restart2", workers=2, action="restart", max_failures=1)
    events = read_run_dicts(os.path.join(storage_path, "restart2"))
    assert [e["kind"] for e in events if e["type"] == "worker_failed"] == ["hang", "hang"]


def test_the_faulthandler_fallback_names_the_same_frame(storage_path, tmp_path, capsys):
    with pytest.raises(HangDetectedError):
        _fit(train_stuck_rank, storage_path, "fh", workers=2, dump="faulthandler",
             config={"stuck_rank": 1, "stuck_at": 2, "out": str(tmp_path)})
    run_path = os.path.join(storage_path, "fh")
    e = _hang_events(run_path)[0]
    rows = _missing_rows(_summary(run_path, e))
    assert rows[1]["dump"] == "faulthandler"
    assert rows[1]["classification"] == "user_code"
    assert rows[1]["user_frame"] == _frame(stuck_in_user_code, "time.sleep")


def test_no_hang_config_means_no_monitor_and_no_diagnostics(storage_path):
    result = TorchTrainer(train_stuck_rank, train_loop_config={"stuck_rank": -1, "stuck_at": 1, "out": storage_path},
                          scaling_config=ScalingConfig(num_workers=2),
                          run_config=RunConfig(name="plain", storage_path=storage_path)).fit()
    assert result.error is None
    assert not os.path.exists(os.path.join(storage_path, "plain", "diagnostics"))
    assert not _hang_events(os.path.join(storage_path, "plain"))


# -- debugpy ----------------------------------------------------------------------------------------
class _DapClient:
    """A minimal Debug Adapter Protocol client: what VS Code does to attach to debugpy."""

    def __init__(self, host: str, port: int, timeout_s: float = 60.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.buf = b""
        self.seq = 0

    def send(self, command: str, arguments: dict) -> None:
        self.seq += 1
        body = json.dumps({"seq": self.seq, "type": "request", "command": command, "arguments": arguments}).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def _read(self) -> dict:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "debug adapter closed the connection"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        n = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
        while len(self.buf) < n:
            self.buf += self.sock.recv(65536)
        msg, self.buf = self.buf[:n], self.buf[n:]
        return json.loads(msg)

    def until(self, kind: str, name: str) -> dict:
        while True:
            m = self._read()
            if m.get("type") == kind and (m.get("command") == name or m.get("event") == name):
                return m

    def attach(self) -> None:
        self.send("initialize", {"adapterID": "trainkit-test", "clientID": "trainkit-test", "pathFormat": "path",
                                 "linesStartAt1": True, "columnsStartAt1": True})
        self.until("response", "initialize")
        self.send("attach", {"justMyCode": False})
        self.until("event", "initialized")
        self.send("configurationDone", {})
        self.until("response", "configurationDone")

    def close(self) -> None:
        try:
            self.send("disconnect", {"terminateDebuggee": False})
        finally:
            self.sock.close()


def _wait_for_event(run_path: str, kind: str, timeout_s: float) -> dict:
    return wait_for(lambda: next((e for e in read_run_dicts(run_path) if e["type"] == kind), None), timeout_s,
                    f"a {kind} event in {run_path}")


def train_note_start(config):
    rank = trainkit.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"started-{rank}"), "w") as f:
        f.write(repr(time.time()))
    trainkit.report({"step": 1})
    if config.get("raise_on") == rank:
        raise ValueError("boom on purpose")


def test_trainkit_debug_rank_waits_for_a_real_debugger_before_running(storage_path, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("TRAINKIT_DEBUG_RANK", "1")
    run_path = os.path.join(storage_path, "dbg")
    box = {}

    def fit():
        try:
            box["result"] = _fit(train_note_start, storage_path, "dbg", workers=2, timeout_s=None,
                                 config={"out": str(tmp_path)})
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    e = _wait_for_event(run_path, "debugger_listening", 120)
    assert e["world_rank"] == 1 and e["host"] == "127.0.0.1" and e["port"] > 0
    assert e["reason"] == "TRAINKIT_DEBUG_RANK"
    time.sleep(0.5)  # not synchronisation: rank 1 must still be waiting after a while
    assert not os.path.exists(tmp_path / "started-1")
    client = _DapClient(e["host"], e["port"])
    attached = time.time()
    client.attach()
    t.join(120)
    client.close()
    assert "error" not in box, box.get("error")
    assert box["result"].metrics == {"step": 1}
    assert float((tmp_path / "started-1").read_text()) >= attached
    rep = load_report(run_path).to_dict()
    assert rep["debuggers"][0]["port"] == e["port"]


def test_post_mortem_opens_a_listener_when_a_rank_raises_and_waits_a_bounded_time(storage_path, tmp_path):
    import threading

    from trainkit.diagnostics import RankDebugger

    run_path = os.path.join(storage_path, "pm")
    box = {}

    def fit():
        try:
            TorchTrainer(train_note_start, train_loop_config={"out": str(tmp_path), "raise_on": 1},
                         scaling_config=ScalingConfig(num_workers=2),
                         run_config=RunConfig(name="pm", storage_path=storage_path,
                                              callbacks=[RankDebugger(post_mortem_s=60)])).fit()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=fit, daemon=True)
    t.start()
    e = _wait_for_event(run_path, "debugger_listening", 120)
    assert e["world_rank"] == 1 and e["reason"].startswith("post-mortem: ValueError: boom on purpose")
    client = _DapClient(e["host"], e["port"])
    client.attach()
    stopped = client.until("event", "stopped")  # the rank stops in the post-mortem breakpoint
    client.send("continue", {"threadId": stopped["body"]["threadId"]})
    client.close()
    t.join(120)
    assert isinstance(box.get("error"), trainkit.WorkerGroupError)
    assert "boom on purpose" in str(box["error"])
