"""Scenario files: every shipped scenario loads, typos name file/line/key, the schema is current, verdicts."""

from __future__ import annotations

import json
import pathlib

import pytest

from trainkit import events as ev
from trainkit.errors import ScenarioError

from fault_injection import verdicts
from fault_injection.scenario import Expect, load_scenario, parse_scenario, schema_json

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
REQUIRED = {"preempt", "worker_crash", "node_loss_elastic", "max_failures_exhausted", "hang_restart",
            "flaky_storage", "exception"}


def test_every_required_scenario_ships_and_loads():
    assert REQUIRED <= {p.stem for p in SCENARIOS}
    for p in SCENARIOS:
        s = load_scenario(str(p))
        assert s.name == p.stem and s.faults and s.expect.status


def test_a_typo_in_a_key_names_the_file_the_line_and_the_key_it_meant(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("version: 1\nname: typo\nworkload:\n  entry: trainkit.workloads:counter\n"
                    "faults:\n  - action: kill_worker\n    rnak: 1\n    at: {report: 2}\n")
    with pytest.raises(ScenarioError) as e:
        load_scenario(str(path))
    err = e.value
    assert (err.path, err.line, err.key, err.suggestion) == (str(path), 7, "faults[0].rnak", "rank")
    assert str(err).startswith(f"{path}:7: ") and "did you mean 'rank'?" in str(err)


@pytest.mark.parametrize("text, line, key, suggestion", [
    ("version: 1\nname: x\nexpcet: {status: finished}\n", 3, "expcet", "expect"),
    ("version: 1\nname: x\nfaults:\n  - {action: kil_node, node: 0, at: {report: 1}}\n", 4, "faults[0].action",
     "kill_node"),
    ("version: 1\nname: x\nworkload:\n  config: {step: 3}\n", 4, "workload.config.step", "steps"),
    ("version: 1\nname: x\nrun:\n  max_failures: 1\n  storage: gcs\n", 5, "run.storage", None),
    ("version: 1\nname: x\nscaling: {num_workers: 9}\n", 3, "scaling.num_workers", None),
    ("version: 1\nname: x\ncluster: {nodes: 2}\nfaults:\n  - {action: kill_node, node: 5, at: {report: 1}}\n", 5,
     "faults[0].node", None),
    ("version: 2\nname: x\n", 1, "version", None),
])
def test_bad_values_point_at_their_line(text, line, key, suggestion):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "s.yaml")
    assert (e.value.line, e.value.key, e.value.suggestion) == (line, key, suggestion), str(e.value)


def test_invalid_yaml_and_missing_files_are_scenario_errors(tmp_path):
    with pytest.raises(ScenarioError, match=r"s.yaml:[23]: not valid YAML"):
        parse_scenario("version: 1\nname: [x\n", "s.yaml")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(tmp_path / "nope.yaml"))


def test_the_published_json_schema_is_up_to_date():
    published = (ROOT / "docs" / "scenario.schema.json").read_text()
    assert published == schema_json(), "regenerate: python -m fault_injection.scenario --schema > docs/scenario.schema.json"


def test_the_json_schema_accepts_every_shipped_scenario():
    import jsonschema
    import yaml

    schema = json.loads(schema_json())
    for p in SCENARIOS:
        jsonschema.validate(yaml.safe_load(p.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "name": "x", "faluts": []}, schema)


# -- verdicts from a synthetic event stream ------------------------------------------------------
def _stream(kill_at=3, resume_from=2, steps=5):
    t = 100.0
    out = [ev.RunStarted(time=t), ev.AttemptStarted(time=t, attempt=1, world_size=2, start_index=0)]
    for i in range(1, kill_at):
        out.append(ev.ReportCommitted(time=t + i, attempt=1, index=i, checkpoint=f"checkpoint_{i}", world_size=2))
    out += [ev.FaultInjected(time=t + kill_at, attempt=1, action="kill_worker", world_rank=1, index=kill_at),
            ev.WorkerFailed(time=t + kill_at + 0.5, attempt=1, will_retry=True),
            ev.GroupRestarted(time=t + kill_at + 0.5, attempt=2, from_index=resume_from),
            ev.AttemptStarted(time=t + kill_at + 1, attempt=2, world_size=1, start_index=resume_from)]
    for i in range(resume_from + 1, steps + 1):
        out.append(ev.ReportCommitted(time=t + kill_at + 2 + i, attempt=2, index=i, checkpoint=f"checkpoint_{i}",
                                      world_size=1))
    out.append(ev.RunFinished(time=t + 20, status="finished", attempts=2, last_index=steps))
    state = {"latest_checkpoint": f"checkpoint_{steps}", "checkpoints": [{"dir": f"checkpoint_{steps}", "index": steps}]}
    return out, state


def test_verdicts_pass_on_a_good_run_and_name_what_is_wrong_otherwise():
    events, state = _stream()
    expect = Expect(status="finished", restarts=1, final_world_size=1, min_world_size=1, reports=5,
                    no_lost_checkpoints=True, max_recovery_s=10)
    rows = verdicts.check(expect, events, state, {"checkpoint_5"})
    assert all(r.passed for r in rows), rows
    assert [r.name for r in rows] == ["status", "restarts", "final_world_size", "min_world_size", "reports",
                                      "no_lost_checkpoints", "max_recovery_s"]
    # resuming from an older checkpoint than the latest committed one is a lost checkpoint
    bad, state = _stream(resume_from=1)
    row = verdicts.check(Expect(no_lost_checkpoints=True), bad, state, {"checkpoint_5"})[0]
    assert not row.passed and "attempt 2 resumed from report 1" in row.observed
    # a manifest entry whose folder is gone is lost too
    row = verdicts.check(Expect(no_lost_checkpoints=True), events, state, set())[0]
    assert not row.passed and "not in storage" in row.observed
    wrong = verdicts.check(Expect(restarts=0, reports=6, max_recovery_s=1), events, state)
    assert [r.passed for r in wrong] == [False, False, False]
    assert wrong[1].observed == "5 reports (1..5)"


def test_recovery_time_runs_from_the_fault_to_the_first_report_of_the_next_attempt():
    events, _ = _stream(kill_at=3, resume_from=2)
    (rec,) = verdicts.recovery_times(events)
    assert rec["fault"] == "kill_worker" and rec["recovery_s"] == pytest.approx(5 + 3 - 3, abs=1e-6)


def test_chaos_exits_2_on_a_typo_naming_file_line_and_key_before_anything_starts(tmp_path, capsys):
    import argparse

    from fault_injection.chaos import main

    path = tmp_path / "typo.yaml"
    path.write_text("version: 1\nname: typo\nscaling: {num_wokers: 2}\n")
    args = argparse.Namespace(path=str(path), backend=None, seed=None, json=None, plot=None, storage=None)
    assert main(args) == 2
    out = capsys.readouterr().err
    assert f"error: {path}:3: unknown key 'scaling.num_wokers'" in out and "did you mean 'num_workers'?" in out
    assert "hint:" in out


def _fired(fid, index=3):
    return ev.FaultInjected(attempt=1, action="kill_worker", world_rank=1, node=None, index=index,
                            detail={"key": f"{fid}@r{index}", "fault": fid, "when": "before"})


def test_each_fault_gets_its_own_row_and_one_that_never_fired_fails_it():
    s = parse_scenario("version: 1\nname: x\nworkload: {config: {steps: 6}}\nfaults:\n"
                       "  - {action: kill_worker, rank: 1, at: {report: 3}}\n"
                       "  - {action: raise, name: late, at: {report: 6}}\n")
    rows = verdicts.fault_rows(s.faults, [_fired("fault0")])
    assert [(r.name, r.expected, r.observed, r.passed) for r in rows] == [
        ("fault0 kill_worker rank 1 at report 3", "fired", "fired", True),
        ("late raise rank 0 at report 6", "fired", "never fired", False)]
    assert [r.passed for r in verdicts.fault_rows(s.faults, [])] == [False, False]
    again = verdicts.fault_rows(s.faults[:1], [_fired("fault0", 3), _fired("fault0", 5)])[0]
    assert again.observed == "fired 2 times" and again.passed


def test_an_optional_fault_that_never_fired_passes_its_row():
    s = parse_scenario("version: 1\nname: x\nfaults:\n  - {action: hang, at: {report: 3}, optional: true}\n")
    (row,) = verdicts.fault_rows(s.faults, [])
    assert (row.expected, row.observed, row.passed) == ("fired (optional)", "never fired", True)
    assert '"optional"' in schema_json()


def test_a_scenario_without_expectations_is_judged_on_the_run_finishing():
    events, state = _stream()
    (row,) = verdicts.check(Expect(), events, state)
    assert (row.name, row.expected, row.observed, row.passed) == ("default: run finished", "finished", "finished",
                                                                 True)
    failed = events[:-1] + [ev.RunFinished(time=200.0, status="failed", attempts=2, last_index=5)]
    (row,) = verdicts.check(parse_scenario("version: 1\nname: x\n").expect, failed, state)
    assert (row.observed, row.passed) == ("failed", False)
    assert [r.name for r in verdicts.check(Expect(restarts=1), events, state)] == ["restarts"]  # no default then


_FAULT = "version: 1\nname: x\nworkload: {config: {steps: 4}}\nscaling: {num_workers: 2}\nfaults:\n  - "


@pytest.mark.parametrize("fault, key, words", [
    ("{action: kill_worker, rank: 99, at: {report: 2}}", "faults[0].rank", ["rank 99", "0..1"]),
    ("{action: kill_worker, rank: [0, 2], at: {report: 2}}", "faults[0].rank", ["rank 2", "0..1"]),
    ("{action: kill_node, node: 1, rank: 5, at: {report: 2}}", "faults[0].rank", ["rank 5"]),
    ("{action: kill_worker, rank: 1, at: {report: 10}}", "faults[0].at.report", ["never happens", "4 report"]),
    ("{action: raise, at: {attempt: 2, report: 5}}", "faults[0].at.report", ["never happens"]),
    ("{action: kill_worker, at: {report: 1e38}}", "faults[0].at.report", ["at most 1000000"]),
    ("{action: kill_worker, at: {report: 1.0e+38}}", "faults[0].at.report", ["at most 1000000"]),
    ("{action: slow, delay_s: 1e300, at: {report: 1}}", "faults[0].delay_s", ["at most 3600"]),
    ("{action: hang, duration_s: .inf, at: {report: 1}}", "faults[0].duration_s", ["at most 3600"]),
    ("{action: preempt, grace_s: 1e300, at: {report: 1}}", "faults[0].grace_s", ["at most 3600"]),
    ("{action: raise, at: {time_s: 1e12}}", "faults[0].at.time_s", ["at most 3600"]),
    ("{action: kill_worker, signal: 99999999999999999999, at: {report: 1}}", "faults[0].signal", ["64"]),
])
def test_a_target_or_trigger_that_cannot_happen_and_absurd_numbers_are_schema_errors(fault, key, words):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(_FAULT + fault + "\n", "s.yaml")
    assert (e.value.line, e.value.key) == (6, key), str(e.value)
    assert str(e.value).startswith(f"s.yaml:6: {key}") and all(w in str(e.value) for w in words), str(e.value)


def test_targets_inside_the_world_and_triggers_of_unknown_report_counts_load():
    ok = parse_scenario("version: 1\nname: x\nworkload: {config: {steps: 4}}\ncluster: {nodes: 3}\n"
                        "scaling: {num_workers: [1, 3]}\nfaults:\n  - {action: kill_worker, rank: 2, at: {report: 4}}\n")
    assert ok.faults[0].rank == 2  # the elastic group's largest world
    digits = parse_scenario("version: 1\nname: x\nworkload: {entry: 'trainkit.workloads:digits'}\nfaults:\n"
                            "  - {action: kill_worker, at: {report: 500}}\n")
    assert digits.faults[0].at.report == 500  # its report count depends on the data: not checked
    assert parse_scenario("version: 1\nname: x\nfaults:\n  - {action: raise, at: {report: 10}}\n").faults
