"""``trainkit chaos`` end to end: each shipped scenario on its own local cluster, through ``main(args)``.

Every call starts and stops its own ``trainkit_testing.cluster.Cluster`` (private RAY_TMPDIR), and the
runner refuses a process already connected to a Ray: each test first disconnects this process from
the session's cluster (a later test's ``ray_up`` connects it again).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest

from fault_injection.chaos import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_ray_connection():
    from trainkit_testing.cluster import disconnect

    disconnect()


def _args(path, tmp_path, **kw):
    return argparse.Namespace(path=str(path), backend=kw.get("backend"), seed=kw.get("seed"),
                              json=kw.get("json"), plot=kw.get("plot"), storage=str(tmp_path / "runs"))


def test_worker_crash_passes_and_writes_the_json_verdict_and_the_timeline_picture(tmp_path):
    out, png = tmp_path / "verdict.json", tmp_path / "timeline.png"
    assert main(_args(ROOT / "scenarios" / "worker_crash.yaml", tmp_path, json=str(out), plot=str(png))) == 0
    verdict = json.loads(out.read_text())
    assert verdict["scenario"] == "worker_crash" and verdict["passed"] is True
    assert {r["name"] for r in verdict["expectations"]} >= {"status", "restarts", "reports", "no_lost_checkpoints"}
    assert all(set(r) == {"name", "expected", "observed", "passed"} for r in verdict["expectations"])
    assert pathlib.Path(verdict["run_path"], "events.jsonl").exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_scenario_whose_expectation_cannot_hold_exits_1_with_the_failing_row(tmp_path, capsys):
    text = (ROOT / "scenarios" / "exception.yaml").read_text().replace("restarts: 1", "restarts: 0")
    path = tmp_path / "wrong.yaml"
    path.write_text(text)
    assert main(_args(path, tmp_path, json="-")) == 1
    verdict = json.loads(capsys.readouterr().out)
    failing = [r for r in verdict["expectations"] if not r["passed"]]
    assert failing == [{"name": "restarts", "expected": 0, "observed": 1, "passed": False}]


@pytest.mark.parametrize("name", ["exception", "max_failures_exhausted", "flaky_storage", "node_loss_elastic",
                                  "preempt", "hang_restart"])
def test_shipped_scenario_passes(name, tmp_path):
    out = tmp_path / "verdict.json"
    code = main(_args(ROOT / "scenarios" / f"{name}.yaml", tmp_path, json=str(out)))
    verdict = json.loads(out.read_text())
    assert code == 0, [r for r in verdict["expectations"] if not r["passed"]]


def test_a_node_preemption_records_the_scenario_grace_and_each_fault_gets_its_row(tmp_path):
    from trainkit.events import read_run

    path = tmp_path / "preempt_grace.yaml"
    path.write_text("version: 1\nname: preempt_grace\n"
                    "workload: {config: {steps: 6, checkpoint_every: 1, step_s: 0.1}}\n"
                    "cluster: {nodes: 2, cpus_per_node: 1}\nscaling: {num_workers: [1, 2]}\nrun: {max_failures: 0}\n"
                    "faults:\n  - {action: preempt, node: 1, grace_s: 2, at: {report: 3}}\n"
                    "  - {action: raise, name: never, at: {attempt: 9}, optional: true}\n")
    out = tmp_path / "verdict.json"
    assert main(_args(path, tmp_path, json=str(out), plot=str(tmp_path / "t.png"))) == 0
    verdict = json.loads(out.read_text())
    rows = {r["name"]: r for r in verdict["expectations"]}
    assert rows["fault0 preempt node 1 at report 3"]["observed"] == "fired"
    assert rows["never raise rank 0 at the first report of attempt 9"]["passed"] is True  # optional
    assert rows["default: run finished"]["observed"] == "finished"
    events = read_run(verdict["run_path"])
    notices = [e for e in events if e.type == "preempted"]
    assert notices and all(e.grace_s == 2.0 for e in notices), notices
