"""``trainkit diagnose`` says what is wrong with a damaged run folder instead of hiding it:
a missing checkpoint folder, a missing or mistyped run_state.json, unreadable storage, an
empty hang folder; and a suggestion appears only for the run that earns it."""

from __future__ import annotations

import json
import shutil

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from trainkit import events as ev
from trainkit.diagnostics.checks import manifest_problems
from trainkit.diagnostics.render import render_text
from trainkit.diagnostics.run_report import DiagnoseError, load_report
from trainkit.storage import RunStore

from test_diagnose_report import _write_run


def _with_checkpoints(run, n=4):
    state = json.loads((run / "run_state.json").read_text())
    state["checkpoints"] = [{"index": i, "dir": f"checkpoint_{i}", "metrics": {}, "attempt": 1} for i in range(1, n + 1)]
    state["latest_checkpoint"] = f"checkpoint_{n}"
    (run / "run_state.json").write_text(json.dumps(state))
    for i in range(1, n + 1):
        (run / f"checkpoint_{i}").mkdir()
        (run / f"checkpoint_{i}" / "model.pt").write_bytes(b"x" * 10)
    return run


def test_a_checkpoint_named_by_the_manifest_whose_folder_is_gone_is_a_problem(tmp_path):
    run = _with_checkpoints(_write_run(tmp_path, status="finished", hang=False))
    assert load_report(str(run)).problems == ()
    shutil.rmtree(run / "checkpoint_4")
    rep = load_report(str(run))
    assert rep.problems == ("checkpoint_4 is in run_state.json but its folder is missing: a resume cannot use it",)
    assert "checkpoint_4 is in run_state.json but its folder is missing" in render_text(rep)


def test_a_checkpoint_whose_files_changed_since_its_commit_is_a_problem(tmp_path):
    run = _with_checkpoints(_write_run(tmp_path, status="finished", hang=False), n=2)
    state = json.loads((run / "run_state.json").read_text())
    for c in state["checkpoints"]:
        c["files"] = {"model.pt": 10}
    (run / "run_state.json").write_text(json.dumps(state))
    assert load_report(str(run)).problems == ()
    (run / "checkpoint_2" / "model.pt").write_bytes(b"xx")
    (rep_problem,) = load_report(str(run)).problems
    assert rep_problem == ("checkpoint_2 is damaged (model.pt has 2 bytes, 10 when it was committed): a resume skips "
                           "it for the latest intact checkpoint")


def test_a_missing_manifest_is_said_and_no_attempt_is_shown_running_in_an_ended_run(tmp_path):
    run = _write_run(tmp_path, status="failed", hang=False)
    (run / "run_state.json").unlink()
    rep = load_report(str(run))
    assert rep.status == "failed"  # from the run_finished event
    assert any(p.startswith("run_state.json is missing") for p in rep.problems), rep.problems
    assert [a.outcome for a in rep.attempts] == ["ended"]
    assert "(running)" not in render_text(rep)


def test_a_running_run_without_a_manifest_still_shows_its_attempt_running(tmp_path):
    run = _write_run(tmp_path, status="running", hang=False)
    (run / "run_state.json").unlink()
    rep = load_report(str(run))
    assert [a.outcome for a in rep.attempts] == [""] and "(running)" in render_text(rep)


def test_a_manifest_with_wrong_types_is_named_field_by_field_and_not_printed_as_is(tmp_path):
    run = _write_run(tmp_path, status="finished", hang=False)
    state = json.loads((run / "run_state.json").read_text())
    state.update(status=7, checkpoints="checkpoint_1", attempts=[{"attempt": 1}, "junk"], latest_checkpoint=["x"])
    (run / "run_state.json").write_text(json.dumps(state))
    rep = load_report(str(run))
    text = "\n".join(rep.problems)
    assert "run_state.json: status is int 7, expected a string: ignored" in text
    assert "run_state.json: checkpoints is str 'checkpoint_1', expected a list of checkpoint records" in text
    assert "run_state.json: latest_checkpoint is list" in text
    assert "1 of 2 attempts record(s) are damaged" in text
    assert rep.status == "unknown"  # no run_finished event in this run: the damaged status is not believed
    assert "7" not in render_text(rep).split("problems")[0].split("status:")[1].splitlines()[0]


@pytest.mark.parametrize("state,problem", [
    ([1, 2], "run_state.json is list, not an object: ignored"),
    ({"status": "exploded"}, "status 'exploded' is not one of running, finished, failed, aborted"),
])
def test_manifest_problems_refuse_what_is_not_a_manifest(state, problem):
    good, problems = manifest_problems(state)
    assert "status" not in good
    assert any(problem in p for p in problems), problems


class _NoCredentials(MemoryFileSystem):
    """A remote filesystem that answers every read with the error a store gives without credentials."""

    def cat_file(self, path, start=None, end=None, **kw):
        raise PermissionError("Unable to locate credentials")

    def open(self, path, mode="rb", **kw):
        raise PermissionError("Unable to locate credentials")


def test_unreadable_storage_is_a_clear_error_naming_the_cause_not_not_a_run(tmp_path):
    with pytest.raises(DiagnoseError, match="cannot read the run .*Unable to locate credentials") as info:
        load_report(RunStore("/bucket", "run1", _NoCredentials()))
    assert "credentials" in info.value.hint


def test_an_empty_hang_folder_is_a_problem_not_a_phantom_hang(tmp_path):
    run = _write_run(tmp_path, status="finished", hang=False)
    (run / "diagnostics" / "hang-1-x").mkdir()
    rep = load_report(str(run))
    assert rep.hangs == ()
    assert any("diagnostics/hang-1-x has no summary.json" in p for p in rep.problems), rep.problems
    assert "hang at report 0" not in render_text(rep)


def _died(run, *, recovered: bool):
    failure = {"world_rank": 1, "node_id": "n", "pid": 11, "kind": "died", "exc_type": "WorkerDied",
               "message": "the worker process died"}
    lines = [ev.WorkerFailed(attempt=1, failures=(failure,), kind="failure", will_retry=recovered).to_json()]
    if recovered:
        lines.append(ev.RunFinished(status="finished", attempts=2, last_index=2).to_json())
    with open(run / "events.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")
    return run


def test_raising_max_failures_is_suggested_for_a_run_a_death_failed_and_not_for_one_that_recovered(tmp_path):
    failed = _died(_write_run(tmp_path, "failed_run", status="failed", hang=False), recovered=False)
    assert any("raise FailureConfig(max_failures" in s for s in load_report(str(failed)).suggestions)
    recovered = _died(_write_run(tmp_path, "recovered_run", status="finished", hang=False), recovered=True)
    assert not any("max_failures" in s for s in load_report(str(recovered)).suggestions)
