"""``trainkit chaos`` without a cluster: the verdict of real local runs, output paths checked before
anything runs, the node broker's preemption notice, and the timeline picture.

The runner's cluster is replaced by the in-process (local) backend: ``run_scenario`` is
patched to fit the scenario's workload there and judge its run folder, so ``main`` runs
as a user runs it, minus Ray.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest

from trainkit import FailureConfig, RunConfig, ScalingConfig
from trainkit import events as ev
from trainkit.errors import OutputError, TrainingFailedError
from trainkit.jsonout import check_writable
from trainkit.storage import RunStore
from trainkit.trainer import DataParallelTrainer

from fault_injection import chaos, timeline
from fault_injection.injector import FaultPlan
from fault_injection.scenario import parse_scenario, resolve_entry


def _local_run(scenario, storage):
    """The scenario's workload and faults on the local backend; its judged outcome."""
    rc = RunConfig(name=scenario.name, storage_path=storage, callbacks=[FaultPlan(scenario.faults)],
                   failure_config=FailureConfig(max_failures=scenario.run.max_failures))
    trainer = DataParallelTrainer(resolve_entry(scenario.workload.entry), run_config=rc,
                                  train_loop_config=dict(scenario.workload.config),
                                  scaling_config=ScalingConfig(num_workers=0))
    error = None
    try:
        trainer.fit()
    except TrainingFailedError as e:
        error = e
    return chaos.judge(scenario, RunStore(storage, scenario.name), 0.1, error)


@pytest.fixture
def local_chaos(monkeypatch, tmp_path):
    """``chaos.main`` with its cluster replaced by the local backend; returns main(path, json=, plot=)."""
    calls = []

    def run_scenario(scenario, *, backend, seed, storage, on_line):
        calls.append(scenario.name)  # a folder per run: a second fit of one name would resume the first
        return _local_run(scenario, str(tmp_path / f"runs{len(calls)}"))

    monkeypatch.setattr(chaos, "run_scenario", run_scenario)

    def main(text, **kw):
        path = tmp_path / "scenario.yaml"
        path.write_text(text)
        args = argparse.Namespace(path=str(path), backend="local", seed=None, storage=None,
                                  json=kw.get("json"), plot=kw.get("plot"))
        return chaos.main(args)

    main.calls = calls
    return main


FAILING = ("version: 1\nname: failing\nworkload: {config: {steps: 4}}\nrun: {max_failures: 0}\nfaults:\n"
           "  - {action: raise, message: boom, at: {report: 2}}\n")


def test_a_scenario_without_expect_whose_run_failed_fails_on_the_default_row(local_chaos, capsys):
    assert local_chaos(FAILING, json="-") == 1
    captured = capsys.readouterr()
    verdict = json.loads(captured.out[captured.out.index("{"):])
    rows = {r["name"]: r for r in verdict["expectations"]}
    assert rows["default: run finished"] == {"name": "default: run finished", "expected": "finished",
                                             "observed": "failed", "passed": False}
    assert rows["fault0 raise rank 0 at report 2"]["observed"] == "fired"
    assert verdict["passed"] is False
    assert "judged on the defaults" in captured.err  # the table goes to stderr with --json -


def test_a_fault_that_never_fired_fails_the_scenario_unless_it_is_optional(local_chaos, capsys):
    late = FAILING + "  - {action: raise, name: late, at: {report: 4}}\nexpect: {status: failed}\n"
    assert local_chaos(late, json="-") == 1
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("{"):])["expectations"]
    assert [(r["name"], r["observed"], r["passed"]) for r in rows] == [
        ("fault0 raise rank 0 at report 2", "fired", True), ("late raise rank 0 at report 4", "never fired", False),
        ("status", "failed", True)]
    optional = late.replace("name: late,", "name: late, optional: true,")
    assert local_chaos(optional, json="-") == 0


def test_a_finished_run_without_expect_passes_and_says_it_was_judged_on_the_defaults(local_chaos, capsys):
    assert local_chaos("version: 1\nname: fine\nworkload: {config: {steps: 3}}\n") == 0
    out = capsys.readouterr().out
    assert "default: run finished" in out and "judged on the defaults" in out and "PASSED" in out


@pytest.mark.parametrize("option, where", [("json", "missing/verdict.json"), ("json", "."),
                                           ("plot", "missing/timeline.png"), ("plot", "")])
def test_an_output_path_that_cannot_be_written_is_a_usage_error_before_anything_runs(local_chaos, capsys,
                                                                                     tmp_path, option, where):
    path = str(tmp_path / where) if where else str(tmp_path)
    assert local_chaos(FAILING, **{option: path}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --{option} {path}") and "\nhint: " in err, err
    assert local_chaos.calls == []  # nothing ran


def test_json_to_stdout_goes_to_the_chaos_stream_given_to_the_shared_writer(monkeypatch, local_chaos, capsys):
    seen = {}

    def write_json(doc, out, *, indent=2, stdout=None):
        seen.update(doc=doc, out=out, stdout=stdout)

    monkeypatch.setattr(chaos, "write_json", write_json)
    local_chaos(FAILING, json="-")
    assert seen["out"] == "-" and seen["stdout"] is not None and seen["doc"]["scenario"] == "failing"


def test_check_writable_names_what_is_wrong(tmp_path):
    check_writable("-")
    check_writable(str(tmp_path / "new.json"))
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(str(tmp_path), "--json")
    with pytest.raises(OutputError, match=r"^--plot .*: the folder .*missing does not exist"):
        check_writable(str(tmp_path / "missing" / "x.png"), "--plot")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_writable(str(ro / "x.json"))


def test_conformance_json_that_cannot_be_written_is_a_usage_error_before_any_case_runs(monkeypatch, tmp_path, capsys):
    import pytest as pytest_module

    from conformance import runner

    monkeypatch.setattr(pytest_module, "main", lambda *a, **k: pytest.fail("the suite ran"))
    args = argparse.Namespace(backend="local", keyword=None, json=str(tmp_path / "missing" / "report.json"))
    assert runner.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --json {tmp_path / 'missing' / 'report.json'}: the folder") and "hint:" in err


# -- the broker's node preemption --------------------------------------------------------------------
class _Rank:
    def __init__(self, calls):
        self.preempt = self
        self.calls = calls

    def remote(self, grace_s):
        self.calls.append(grace_s)
        return "ref"


def test_a_node_preemption_gives_each_registered_rank_the_scenario_grace_and_sigterms_the_rest(monkeypatch):
    from fault_injection import broker as B

    class Handle:
        node_id = "n1"

    class Cluster:
        removed = []

        def remove_node(self, handle, allow_graceful):
            self.removed.append(handle)

    calls, killed = [], []
    nb = B.NodeBroker(Cluster(), nodes=[object(), Handle()])
    monkeypatch.setattr(B, "ranks_on_node", lambda store, node_id: [101, 102])
    monkeypatch.setattr(nb, "_rank_handles", lambda pids: {101: _Rank(calls)})
    monkeypatch.setattr(nb, "_call", lambda ref: None)
    monkeypatch.setattr(B.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    nb._stop.set()  # no removal thread work after the grace period in this test
    result = nb._preempt({"op": "preempt", "node": 1, "grace_s": 3, "store": None})
    assert calls == [3.0] and killed == [(102, B.signal.SIGTERM)]
    assert result["notified"] == [101] and result["pids"] == [101, 102]


# -- the timeline picture ----------------------------------------------------------------------------
def _restart_stream():
    t = 50.0
    out = [ev.RunStarted(time=t), ev.AttemptStarted(time=t + 1, attempt=1, world_size=2)]
    out += [ev.ReportCommitted(time=t + 1 + i, attempt=1, index=i, world_size=2) for i in (1, 2)]
    out += [ev.FaultInjected(time=t + 3.5, attempt=1, action="kill_worker", world_rank=1, index=3,
                             detail={"fault": "fault0"}),
            ev.WorkerFailed(time=t + 4, attempt=1, kind="failure", will_retry=True,
                            failures=({"world_rank": 1, "exc_type": "WorkerDied"},)),
            ev.GroupRestarted(time=t + 4.5, attempt=2, from_index=2),
            ev.AttemptStarted(time=t + 7, attempt=2, world_size=2, start_index=2)]
    out += [ev.ReportCommitted(time=t + 5 + i, attempt=2, index=i, world_size=2) for i in (3, 4)]
    return out + [ev.RunFinished(time=t + 10, status="finished", attempts=2, last_index=4)]


def test_the_world_size_has_a_gap_where_no_group_runs_or_reports():
    segments, downtime = timeline.world_size_segments(_restart_stream())
    assert segments == [(1.0, 3.0, 2, 1), (7.0, 9.0, 2, 2)]
    assert downtime == [(3.0, 7.0)]  # last report of attempt 1 to the start of attempt 2


def test_the_picture_has_a_legend_integer_world_sizes_and_a_label_on_every_marker(tmp_path):
    import matplotlib.pyplot as plt

    events = _restart_stream()
    fig = timeline.figure(events, "t")
    try:
        lane, ax = fig.axes[:2]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert {"world size (a group running)", "downtime (no group, no report)", "fault injected", "failure",
                "restart / resize / end"} <= set(legend)
        assert all(float(t).is_integer() for t in ax.get_yticks())
        labels = [t.get_text() for t in lane.texts]
        assert labels == ["kill_worker rank 1 (fault0)", "failure: rank 1 WorkerDied", "restart -> attempt 2",
                          "run finished"]
    finally:
        plt.close(fig)
    out = timeline.plot(events, str(tmp_path / "t.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
