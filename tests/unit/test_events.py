"""The event stream: events round-trip through JSON lines; damaged files are read up to the damage."""

from __future__ import annotations

import json

import pytest

from trainkit import events as ev
from trainkit.storage import RunStore


def _sample_events():
    return [
        ev.RunStarted(time=1.0, name="r", path="/tmp/r", backend="local", num_workers=0),
        ev.AttemptStarted(time=2.0, attempt=1, world_size=2,
                          ranks=({"world_rank": 0, "pid": 11}, {"world_rank": 1, "pid": 12})),
        ev.ReportCommitted(time=3.0, attempt=1, index=1, metrics={"loss": 0.5, "nested": {"a": 1}},
                           checkpoint="checkpoint_1", world_size=2, barrier_s=0.01),
        ev.WorkerFailed(time=4.0, attempt=1, failures=({"world_rank": 1, "message": "boom"},), will_retry=True),
        ev.GroupRestarted(time=5.0, attempt=2, reason="failure", from_index=1),
        ev.RunFinished(time=6.0, status="finished", attempts=2, last_index=1),
    ]


def test_every_event_round_trips_through_its_json_line():
    for e in _sample_events():
        line = e.to_json()
        assert json.loads(line)["type"] == e.type
        assert ev.parse_event(line) == e


def test_a_stream_of_events_round_trips_through_parse_events():
    sample = _sample_events()
    text = "".join(e.to_json() + "\n" for e in sample)
    read = ev.parse_events(text.encode())
    assert read.events == sample
    assert read.bad_line is None
    assert read.problem == ""


def test_a_truncated_last_line_is_skipped_and_reported():
    sample = _sample_events()
    text = "".join(e.to_json() + "\n" for e in sample[:3]) + sample[3].to_json()[:25]
    read = ev.parse_events(text)
    assert read.events == sample[:3]
    assert read.bad_line == 4
    assert "line 4" in read.problem and "truncated" in read.problem


def test_a_garbage_middle_line_stops_reading_there_and_names_the_line():
    sample = _sample_events()
    lines = [e.to_json() for e in sample]
    lines.insert(2, "this is not json {")
    read = ev.parse_events("\n".join(lines) + "\n")
    assert read.events == sample[:2]
    assert read.bad_line == 3
    assert "line 3" in read.problem
    assert "truncated" not in read.problem


def test_an_unknown_event_type_stops_reading_and_names_the_line():
    lines = [_sample_events()[0].to_json(), json.dumps({"type": "no_such_event"})]
    read = ev.parse_events("\n".join(lines) + "\n")
    assert len(read.events) == 1
    assert read.bad_line == 2


def test_a_missing_stream_reads_as_empty_with_a_problem():
    read = ev.parse_events(None)
    assert read.events == []
    assert "missing" in read.problem


def test_jsonable_turns_tuples_into_lists_and_unknown_objects_into_reprs():
    class Opaque:
        def __repr__(self):
            return "<opaque>"

    assert ev.jsonable({"a": (1, 2), 3: Opaque()}) == {"a": [1, 2], "3": "<opaque>"}


@pytest.mark.parametrize("storage", ["local", "memory"])
def test_event_log_appends_to_events_jsonl_in_the_run_directory(storage, tmp_path):
    if storage == "local":
        store = RunStore(str(tmp_path), "run")
    else:
        store = RunStore(f"memory://{tmp_path}", "run")
    store.ensure()
    log = ev.EventLog(store)
    sample = _sample_events()
    for e in sample[:2]:
        log.emit(e)
    log.emit(sample[2], flush=True)
    log.flush()
    read = ev.parse_events(store.read_bytes("events.jsonl"))
    assert read.events == sample[:3]
    assert log.events == sample[:3]


def test_event_log_listeners_see_every_event(tmp_path):
    store = RunStore(str(tmp_path), "run")
    store.ensure()
    seen = []
    log = ev.EventLog(store)
    log.subscribe(seen.append)
    for e in _sample_events():
        log.emit(e)
    assert seen == _sample_events()
