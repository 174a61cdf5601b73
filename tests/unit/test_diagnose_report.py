"""``trainkit diagnose`` on run folders written by hand: JSON and text only, damaged files tolerated.

The folders are built with the real event classes and file layout (run_state.json,
events.jsonl, diagnostics/hang-*/summary.json + rank-*.txt); no Ray.
"""

from __future__ import annotations

import argparse
import re
import json

import pytest

from trainkit import events as ev
from trainkit.cli import diagnose
from trainkit.cli import main as cli_main
from trainkit.diagnostics.render import render_short, render_text
from trainkit.diagnostics.run_report import DiagnoseError, load_report

STACK = ('Process 11: ray::RankWorker.run\n\nThread 12 (idle): "Thread-2"\n'
         "    stuck (/home/u/train.py:12)\n    train_fn (/home/u/train.py:30)\n"
         "    RankWorker.run (/work/main/trainkit/backends/ray/worker.py:188)\n")


def _write_run(root, name="run1", *, status="failed", hang=True, extra_lines=""):
    run = root / name
    (run / "diagnostics").mkdir(parents=True)
    ranks = ({"world_rank": 0, "local_rank": 0, "node_rank": 0, "node_id": "n" * 40, "pid": 10},
             {"world_rank": 1, "local_rank": 1, "node_rank": 0, "node_id": "n" * 40, "pid": 11})
    evs = [ev.RunStarted(name=name, path=str(run), backend="ray", num_workers=2),
           ev.AttemptStarted(attempt=1, world_size=2, ranks=ranks),
           ev.ReportCommitted(attempt=1, index=1, metrics={"loss": 1.0}, world_size=2),
           ev.ReportCommitted(attempt=1, index=2, metrics={"loss": 0.5}, world_size=2)]
    summary = ("hang at report 3: rank 1 has not arrived after 2.0 s (rank 0 waiting); it is in stuck (train.py:12), "
               "in user code")
    if hang:
        folder = "hang-3-20250101-000000-000"
        rows = [{"world_rank": 0, "state": "waiting", "classification": "report",
                 "user_frame": "train_fn (train.py:31)", "pid": 10, "node_id": "n" * 40, "dump": "py-spy",
                 "file": "rank-0.txt"},
                {"world_rank": 1, "state": "missing", "classification": "user_code",
                 "user_frame": "stuck (train.py:12)", "pid": 11, "node_id": "n" * 40, "dump": "py-spy",
                 "file": "rank-1.txt"}]
        (run / "diagnostics" / folder).mkdir()
        (run / "diagnostics" / folder / "summary.json").write_text(json.dumps(
            {"version": 1, "kind": "barrier", "attempt": 1, "index": 3, "missing_ranks": [1], "waiting_ranks": [0],
             "waited_s": 2.0, "summary": summary, "action": "fail", "dump_s": 0.05, "ranks": rows}))
        (run / "diagnostics" / folder / "rank-1.txt").write_text(STACK)
        (run / "diagnostics" / folder / "rank-0.txt").write_text("(no stack)\n")
        evs.append(ev.HangDetected(attempt=1, index=3, missing_ranks=(1,), waited_s=2.0, summary=summary,
                                   diagnostics=f"diagnostics/{folder}",
                                   ranks=tuple({k: r[k] for k in ("world_rank", "state", "classification",
                                                                  "user_frame")} for r in rows)))
    failure = {"world_rank": 1, "node_id": "n" * 40, "pid": 11, "kind": "hang", "exc_type": "HangDetected",
               "message": "not arrived at report 3 after 2.0 s; user_code in stuck (train.py:12)",
               "traceback": 'Stack of the training thread:\n  File "/home/u/train.py", line 12, in stuck\n'}
    error = {"type": "HangDetectedError", "message": summary, "failures": [failure]}
    if status == "failed":
        evs.append(ev.WorkerFailed(attempt=1, failures=(failure,), kind="hang", will_retry=False))
        evs.append(ev.RunFinished(status="failed", error=error, attempts=1, last_index=2))
    (run / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in evs) + extra_lines)
    state = {"version": 1, "name": name, "status": status, "checkpoints": [], "latest_checkpoint": None,
             "attempts": [{"attempt": 1, "world_size": 2, "outcome": status}],
             "error": error if status == "failed" else None}
    (run / "run_state.json").write_text(json.dumps(state))
    return run


def test_a_hung_run_reports_status_failure_hang_frames_and_rank_indices(tmp_path):
    rep = load_report(str(_write_run(tmp_path))).to_dict()
    assert rep["status"] == "failed" and rep["last_index"] == 2
    assert rep["failures"][0]["world_rank"] == 1 and rep["failures"][0]["root_cause"]
    (h,) = rep["hangs"]
    assert h["missing_ranks"] == [1] and h["index"] == 3
    missing = [r for r in h["ranks"] if r["state"] == "missing"]
    assert missing[0]["user_frame"] == "stuck (train.py:12)" and "stuck (/home/u/train.py:12)" in missing[0]["stack"]
    assert {r["world_rank"]: r["reached_index"] for r in rep["ranks"]} == {0: 3, 1: 2}
    assert any("rank 1 is busy or blocked in stuck (train.py:12)" in s for s in rep["suggestions"])
    json.dumps(rep)  # JSON-ready


def test_render_short_is_a_few_lines_naming_run_status_root_cause_and_hang(tmp_path):
    run = _write_run(tmp_path)
    text = render_short(load_report(str(run)))
    lines = text.splitlines()
    assert len(lines) <= 6
    assert lines[0].startswith(f"run {run}: failed (1 attempt, last report 2)")
    assert "root cause: rank 1 (node nnnnnnnnnnnn, pid 11): HangDetected: not arrived at report 3" in text
    assert "hang at report 3 (attempt 1, 2.0 s): rank 1 user_code at stuck (train.py:12)" in text


def test_render_text_highlights_the_user_frame_in_the_stack(tmp_path):
    text = render_text(load_report(str(_write_run(tmp_path))))
    assert ">>     stuck (/home/u/train.py:12)" in text
    assert "rank 1 [missing] user_code at stuck (train.py:12): in user code" in text
    assert "suggestions:" in text


@pytest.mark.parametrize("damage,line", [
    ('{"type": "report_committed", "attempt": 1, "ind', 6),  # truncated last line
    ('not json at all\n{"type": "run_finished"}\n', 6),
    ('{"type": "no_such_event"}\n', 6),
])
def test_a_damaged_events_file_is_read_up_to_the_bad_line_and_said_so(tmp_path, capsys, damage, line):
    run = _write_run(tmp_path, status="running", extra_lines=damage)
    rep = load_report(str(run)).to_dict()
    assert rep["events"]["stopped_at_line"] == line and rep["events"]["read"] == 5
    assert rep["hangs"] and rep["hangs"][0]["missing_ranks"] == [1]
    code = diagnose(argparse.Namespace(run=str(run), live=False, json=None))
    out = capsys.readouterr().out
    assert f"events.jsonl line {line} is" in out
    assert code == 1  # a hang was found


def test_garbage_in_every_file_never_raises(tmp_path, capsys):
    run = _write_run(tmp_path)
    (run / "run_state.json").write_bytes(b"\x00\xff{{{")
    (run / "events.jsonl").write_bytes(b"\xff\xfe garbage\n" * 3)
    (run / "diagnostics" / "hang-3-20250101-000000-000" / "summary.json").write_text("[1, 2")
    code = diagnose(argparse.Namespace(run=str(run), live=False, json="-"))
    data = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    assert data["events"]["stopped_at_line"] == 1
    assert any("run_state.json is not valid JSON" in p for p in data["problems"])
    assert any("summary.json is not valid JSON" in p for p in data["problems"])


def test_json_output_goes_to_a_file_and_text_to_stdout(tmp_path, capsys):
    run = _write_run(tmp_path)
    out = tmp_path / "report.json"
    assert cli_main(["diagnose", str(run), "--json", str(out)]) == 1
    assert "rank 1 [missing]" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["hangs"][0]["ranks"][1]["user_frame"] == "stuck (train.py:12)"


def test_a_run_name_is_found_under_the_default_storage(tmp_path, monkeypatch, capsys):
    _write_run(tmp_path, name="named", status="finished", hang=False)
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", str(tmp_path))
    assert cli_main(["diagnose", "named"]) == 0
    assert "status:   finished" in capsys.readouterr().out


def test_a_missing_run_is_a_usage_error_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAINKIT_STORAGE_PATH", str(tmp_path))
    assert cli_main(["diagnose", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folder 'nope'") and "hint:" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiagnoseError, match="neither run_state.json nor events.jsonl"):
        load_report(str(tmp_path / "empty"))


def test_a_hang_folder_without_its_event_still_shows(tmp_path):
    run = _write_run(tmp_path)
    lines = (run / "events.jsonl").read_text().splitlines()
    (run / "events.jsonl").write_text("\n".join(l for l in lines if "hang_detected" not in l) + "\n")
    rep = load_report(str(run)).to_dict()
    assert [h["missing_ranks"] for h in rep["hangs"]] == [[1]]


def test_debugger_events_are_shown(tmp_path):
    run = _write_run(tmp_path, status="running", hang=False)
    with open(run / "events.jsonl", "a") as f:
        f.write(ev.DebuggerListening(attempt=1, world_rank=1, port=5678, reason="TRAINKIT_DEBUG_RANK").to_json() + "\n")
    rep = load_report(str(run))
    assert rep.to_dict()["debuggers"][0]["port"] == 5678
    assert "debugger: rank 1 listens on 127.0.0.1:5678" in render_short(rep)


def _owned_by(run, pid: int) -> None:
    """A live driver's lease on the hand-written run: ``pid`` (a live process of this machine) owns it."""
    import dataclasses
    import time

    from trainkit.owner import machine, process_started, this_owner

    me = dataclasses.replace(this_owner(30.0, "ray"), pid=pid, started=process_started(pid), renewed_at=time.time())
    (run / "owner.json").write_bytes(me.to_json())
    assert me.machine == machine()


@pytest.mark.integration  # a subprocess and the py-spy binary: not in the unit tier
def test_live_dumps_fresh_stacks_of_the_running_ranks_with_py_spy(tmp_path, capsys):
    import subprocess
    import sys

    run = _write_run(tmp_path, status="running", hang=False)
    script = tmp_path / "stuck.py"
    script.write_text("import sys, time\nfrom trainkit.diagnostics import claims\n\ndef stuck_here():\n"
                      "    while True:\n        time.sleep(0.02)\n\n"
                      "with claims.claim(sys.argv[1], 1, 1):\n    print('ready', flush=True)\n    stuck_here()\n")
    proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _owned_by(run, proc.pid)
        text = (run / "events.jsonl").read_text().replace('"pid": 11', f'"pid": {proc.pid}')
        (run / "events.jsonl").write_text(text)
        code = diagnose(argparse.Namespace(run=str(run), live=True, json="-"))
        data = json.loads(capsys.readouterr().out)
        live = {r["world_rank"]: r for r in data["live"]}
        assert live[1]["classification"] == "user_code"
        assert live[1]["user_frame"] == "stuck_here (stuck.py:6)"
        assert live[0]["error"].startswith("refused: pid 10 ")
        assert code == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration  # subprocesses and the py-spy binary: not in the unit tier
def test_live_refuses_a_pid_that_is_not_a_rank_of_the_run_and_names_it(tmp_path, capsys):
    import subprocess
    import sys

    run = _write_run(tmp_path, status="running", hang=False)
    other = tmp_path / "other"
    other.mkdir()
    script = tmp_path / "bystander.py"
    script.write_text("import sys, time\nfrom trainkit.diagnostics import claims\n\n"
                      "with claims.claim(sys.argv[1], 0, 1):\n    print('ready', flush=True)\n    time.sleep(60)\n")
    claimed_elsewhere = subprocess.Popen([sys.executable, str(script), str(other)], stdout=subprocess.PIPE,
                                         text=True)
    secret = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--token=SECRET-123"])
    try:
        assert claimed_elsewhere.stdout.readline().strip() == "ready"
        _owned_by(run, secret.pid)
        text = (run / "events.jsonl").read_text()
        # one pass: a replaced pid that starts with 11 (pid 11514) must not be replaced again
        text = re.sub(r'"pid": (10|11)\b', lambda m: f'"pid": {claimed_elsewhere.pid if m.group(1) == "10" else secret.pid}',
                      text)
        (run / "events.jsonl").write_text(text)
        assert diagnose(argparse.Namespace(run=str(run), live=True, json=None)) == 0
        out = capsys.readouterr().out
        assert f"refused: pid {claimed_elsewhere.pid} is a rank of another run" in out
        assert f"refused: pid {secret.pid} is not a rank of this run" in out
        assert "SECRET-123" not in out and "time.sleep" not in out  # nothing of those processes is shown
    finally:
        for p in (claimed_elsewhere, secret):
            p.kill()
            p.wait()
