"""One driver per run: a second ``fit()`` on a run folder that another live driver owns fails at once.

The drivers are real processes (``python -c`` scripts) fitting the same ``RunConfig(name,
storage_path)``: two started 0.9 s apart, one started after the first committed 5
checkpoints, one started after the first was SIGKILLed (it takes the run over and resumes).
Local mode (``num_workers=0``) for most of it; one case on the session's Ray cluster, with
the first driver a subprocess joining the cluster as test_driver_exit.py does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainkit.events import read_run_dicts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NAME = "shared"

# argv: who, storage_path, steps, step_s, [ray address]. Every checkpoint holds model.json naming its driver.
_DRIVER = textwrap.dedent("""
    import json, os, sys, tempfile, time
    import trainkit
    from trainkit import Checkpoint, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    who, storage, steps, step_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    address = sys.argv[5] if len(sys.argv) > 5 else None

    def loop():
        start = 0
        ckpt = trainkit.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = json.load(open(os.path.join(d, "model.json")))["step"]
        for step in range(start + 1, steps + 1):
            time.sleep(step_s)
            with tempfile.TemporaryDirectory() as d:
                json.dump({"who": who, "step": step}, open(os.path.join(d, "model.json"), "w"))
                trainkit.report({"step": step, "who": who}, checkpoint=Checkpoint.from_directory(d))

    if address:
        import ray
        ray.init(address=address)
    print("STARTED", os.getpid(), flush=True)
    try:
        result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1 if address else 0),
                              run_config=RunConfig(name="shared", storage_path=storage)).fit()
        with result.checkpoint.as_directory() as d:
            model = json.load(open(os.path.join(d, "model.json")))
        out = {"ok": True, "model": model, "metrics": result.metrics}
    except Exception as e:
        out = {"ok": False, "type": type(e).__name__, "message": str(e)}
    print("RESULT " + json.dumps(out), flush=True)
""")


def _start(tmp_path, who: str, steps: int, step_s: float, address: str = "") -> subprocess.Popen:
    script = tmp_path / "driver.py"
    if not script.exists():
        script.write_text(_DRIVER)
    env = dict(os.environ, TRAINKIT_PROGRESS="0", PYTHONPATH=os.getcwd())
    args = [sys.executable, str(script), who, str(tmp_path / "runs"), str(steps), str(step_s)]
    return subprocess.Popen(args + ([address] if address else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen, timeout_s: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the driver printed no RESULT (exit code {proc.returncode}):\n{out[-3000:]}"
    return {**json.loads(lines[-1][len("RESULT "):]), "pid": proc.pid, "output": out}


def _run(tmp_path) -> str:
    return str(tmp_path / "runs" / NAME)


def _manifest(tmp_path) -> dict:
    with open(os.path.join(_run(tmp_path), "run_state.json")) as f:
        return json.load(f)


def _events(tmp_path) -> list[dict]:
    return read_run_dicts(_run(tmp_path))


def _wait_checkpoints(tmp_path, n: int, deadline_s: float = 90) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if len([e for e in _events(tmp_path) if e["type"] == "report_committed"]) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"the first driver committed fewer than {n} reports in {deadline_s} s")


def _assert_refused(loser: dict, winner_pid: int) -> None:
    assert not loser["ok"], f"the second driver succeeded too: {loser}"
    assert loser["type"] == "RunOwnedError", loser
    message = loser["message"]
    assert f"pid {winner_pid}" in message and "owner.json" in message and "RunConfig.name" in message, message


def _assert_one_clean_lineage(tmp_path, who: str, steps: int) -> None:
    """The run folder holds one driver's run: one attempt, finished, its own reports in order."""
    state = _manifest(tmp_path)
    assert state["status"] == "finished"
    assert [(a["attempt"], a["outcome"]) for a in state["attempts"]] == [(1, "finished")]
    events = _events(tmp_path)
    assert [e["type"] for e in events].count("run_started") == 1
    committed = [e for e in events if e["type"] == "report_committed"]
    assert [e["metrics"]["step"] for e in committed] == list(range(1, steps + 1))
    assert {e["metrics"]["who"] for e in committed} == {who}
    assert not os.path.exists(os.path.join(_run(tmp_path), "owner.json")), "the lease was not released"


def test_two_drivers_started_0_9_s_apart_one_runs_and_the_other_is_refused(tmp_path):
    steps = 12
    first = _start(tmp_path, "A", steps, 0.3)
    time.sleep(0.9)
    second = _start(tmp_path, "B", steps, 0.3)
    results = [_result(first), _result(second)]
    winners = [r for r in results if r["ok"]]
    assert len(winners) == 1, [{k: r[k] for k in r if k != "output"} for r in results]
    winner = winners[0]
    loser = next(r for r in results if r is not winner)
    _assert_refused(loser, winner["pid"])
    assert winner["model"] == {"who": winner["metrics"]["who"], "step": steps}
    _assert_one_clean_lineage(tmp_path, winner["metrics"]["who"], steps)


def test_a_driver_started_after_5_checkpoints_of_another_is_refused_and_touches_nothing(tmp_path):
    steps = 30
    first = _start(tmp_path, "A", steps, 0.25)
    try:
        _wait_checkpoints(tmp_path, 5)
        t0 = time.monotonic()
        second = _result(_start(tmp_path, "B", steps, 0.25))
        assert time.monotonic() - t0 < 60
        _assert_refused(second, first.pid)
        assert "A" == _manifest(tmp_path)["checkpoints"][-1]["metrics"]["who"]
        a = _result(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert a["ok"], a["output"][-3000:]
    assert a["model"] == {"who": "A", "step": steps}
    _assert_one_clean_lineage(tmp_path, "A", steps)


def test_a_driver_takes_over_the_run_of_a_sigkilled_one_and_marks_its_attempt_aborted(tmp_path):
    from trainkit.result import load_state

    first = _start(tmp_path, "A", 1000, 0.1)
    try:
        _wait_checkpoints(tmp_path, 3)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    shown = load_state(_run(tmp_path))  # a reader sees the gone driver's attempt as aborted
    assert shown["status"] == "aborted" and shown["attempts"][-1]["outcome"] == "aborted", shown
    assert _manifest(tmp_path)["status"] == "running"  # ... and writes nothing
    resumed_from = _manifest(tmp_path)["checkpoints"][-1]["index"]
    steps = resumed_from + 3
    b = _result(_start(tmp_path, "B", steps, 0.05))
    assert b["ok"], b["output"][-3000:]
    assert b["model"] == {"who": "B", "step": steps}
    state = _manifest(tmp_path)
    assert [(a["attempt"], a["outcome"]) for a in state["attempts"]] == [(1, "aborted"), (2, "finished")]
    assert state["status"] == "finished"
    types = [e["type"] for e in _events(tmp_path)]
    second_start = len(types) - 1 - types[::-1].index("run_started")
    gone = [e for e in _events(tmp_path)[:second_start] if e["type"] == "run_finished"]
    assert gone and gone[-1]["status"] == "aborted" and f"pid {first.pid}" in gone[-1]["error"]["message"]


_TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import trainkit
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    def loop():
        trainkit.report({"step": 1, "who": "torchrun"})

    try:
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name="shared", storage_path=sys.argv[1])).fit()
        out = {"ok": True}
    except Exception as e:
        out = {"ok": False, "type": type(e).__name__, "message": str(e)}
    print("RANK " + os.environ["RANK"] + " " + json.dumps(out), flush=True)
""")


def _torchrun(tmp_path) -> dict:
    import socket

    script = tmp_path / "torchrun_driver.py"
    script.write_text(_TORCHRUN_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={port}", str(script), str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=120)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RANK "):
            rank, payload = line[5:].split(" ", 1)
            out[int(rank)] = json.loads(payload)
    assert sorted(out) == [0, 1], proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_under_torchrun_every_rank_is_refused_while_a_driver_owns_the_run_then_it_takes_over(tmp_path):
    first = _start(tmp_path, "A", 1000, 0.1)
    try:
        _wait_checkpoints(tmp_path, 2)
        ranks = _torchrun(tmp_path)
        for out in ranks.values():  # rank 0 is refused, and so is rank 1: not left waiting for rank 0
            _assert_refused(out, first.pid)
        assert [a["outcome"] for a in _manifest(tmp_path)["attempts"]] == ["running"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert all(out["ok"] for out in _torchrun(tmp_path).values())
    assert [a["outcome"] for a in _manifest(tmp_path)["attempts"]] == ["aborted", "finished"]


@pytest.mark.usefixtures("ray_up")
@pytest.mark.trainkit(workers=4, nodes=1)
def test_on_ray_a_second_driver_is_refused_and_a_dead_drivers_run_is_taken_over(tmp_path):
    import ray

    import trainkit
    from trainkit import Checkpoint, RunConfig, ScalingConfig
    from trainkit.errors import RunOwnedError
    from trainkit.torch import TorchTrainer

    first = _start(tmp_path, "A", 100000, 0.2, ray.get_runtime_context().gcs_address)
    try:
        _wait_checkpoints(tmp_path, 5, deadline_s=120)

        def loop():
            trainkit.report({"step": -1, "who": "B"})

        def fit():
            return TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                                run_config=RunConfig(name=NAME, storage_path=str(tmp_path / "runs"))).fit()

        t0 = time.monotonic()
        with pytest.raises(RunOwnedError, match=f"pid {first.pid}"):
            fit()
        assert time.monotonic() - t0 < 20, "the second driver was not refused at once"
        assert [a["outcome"] for a in _manifest(tmp_path)["attempts"]] == ["running"]
        assert {e["metrics"]["who"] for e in _events(tmp_path) if e["type"] == "report_committed"} == {"A"}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    time.sleep(1.0)  # Ray ends the dead driver's controller and workers

    def resume():
        ckpt = trainkit.get_checkpoint()
        with ckpt.as_directory() as d:
            step = json.load(open(os.path.join(d, "model.json")))["step"]
        trainkit.report({"step": step + 1, "who": "B"}, checkpoint=Checkpoint.from_directory(d))

    result = TorchTrainer(resume, scaling_config=ScalingConfig(num_workers=1),
                          run_config=RunConfig(name=NAME, storage_path=str(tmp_path / "runs"))).fit()
    assert result.metrics["who"] == "B"
    state = _manifest(tmp_path)
    assert [a["outcome"] for a in state["attempts"]] == ["aborted", "finished"]
    gone = [e for e in _events(tmp_path) if e["type"] == "run_finished"][0]
    assert gone["status"] == "aborted" and f"pid {first.pid} is not running" in gone["error"]["message"]
    assert not os.path.exists(os.path.join(_run(tmp_path), "owner.json"))


def test_on_s3_the_lease_is_exclusive_renewed_with_if_match_and_taken_over_once_expired(s3_storage):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from trainkit import lease as L
    from trainkit.errors import RunOwnedError
    from trainkit.storage import RunStore

    def store():
        return RunStore(s3_storage.path, NAME)

    def owner_json():
        return json.loads(s3_storage.fs.cat_file(f"{store().path('owner.json')}"))

    held = L.Lease.acquire(store())
    with pytest.raises(RunOwnedError, match=f"pid {os.getpid()}"):
        L.Lease.acquire(store())
    held.renew()
    assert owner_json()["renewed_at"] > owner_json()["since"]
    # the driver stops renewing (another machine's lease, 31 s old): of four racing takers exactly one wins
    stale = dict(owner_json(), machine="elsewhere/boot/1", renewed_at=time.time() - 31)
    s3_storage.fs.pipe_file(store().path("owner.json"), json.dumps(stale).encode())
    barrier = threading.Barrier(4)

    def take(_):
        barrier.wait()
        try:
            return L.Lease.acquire(store())
        except RunOwnedError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(take, range(4)))
    won = [o for o in outcomes if isinstance(o, L.Lease)]
    refused = [o for o in outcomes if isinstance(o, RunOwnedError)]
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert won[0].previous.token == held.owner.token and "more than its lease_s=30" in won[0].previous_gone
    assert owner_json()["token"] == won[0].owner.token
    with pytest.raises(RunOwnedError, match="taken over"):
        held.renew()  # the old driver finds out at its next renewal
    held.release()
    assert owner_json()["token"] == won[0].owner.token
    won[0].release()
    assert not s3_storage.fs.exists(store().path("owner.json"))
