"""Stragglers without Ray: the watch over step times, the classification of stack samples, and what
diagnose shows (the per-rank step table, the ``stragglers`` list, a suggestion) for a run folder
written with the real events."""

from __future__ import annotations

import json

import pytest

from trainkit import events as ev
from trainkit.config import StragglerConfig
from trainkit.diagnostics.classify import Frame
from trainkit.diagnostics.render import render_text
from trainkit.diagnostics.run_report import load_report
from trainkit.diagnostics.stragglers import StragglerWatch, sample_kind, step_times, summarize_samples
from trainkit.errors import ConfigError


def test_a_rank_slow_at_k_consecutive_reports_is_named_once_and_only_it():
    w = StragglerWatch(reports=3)
    named = []
    for i in range(1, 8):
        named += w.observe(i, {0: 0.02, 1: 0.6, 2: 0.021})
    assert [(s.world_rank, s.index) for s in named] == [(1, 3)]
    assert named[0].median_step_s == 0.6 and named[0].others_median_step_s == pytest.approx(0.0205)


@pytest.mark.parametrize("steps,why", [
    ({0: 0.1, 1: 0.19}, "under 2x the others"),
    ({0: 0.01, 1: 0.1}, "10x, but only 0.09 s slower (< 0.2 s)"),
])
def test_a_rank_that_is_not_slow_enough_is_never_named(steps, why):
    w = StragglerWatch()
    assert all(w.observe(i, steps) == [] for i in range(1, 10)), why


def test_a_slow_streak_that_breaks_starts_again_and_a_recovered_rank_can_be_named_anew():
    w = StragglerWatch(reports=2)
    slow, fast = {0: 0.02, 1: 0.6}, {0: 0.02, 1: 0.02}
    assert w.observe(1, slow) == [] and w.observe(2, fast) == [] and w.observe(3, slow) == []
    assert [s.index for s in w.observe(4, slow)] == [4]
    assert w.observe(5, slow) == []  # named once while it stays slow
    w.observe(6, fast)
    w.observe(7, slow)
    assert [s.index for s in w.observe(8, slow)] == [8]


def test_step_times_are_arrivals_minus_the_previous_release():
    assert step_times({0: 10.5, 1: 12.0}, released_at=10.0) == {0: 0.5, 1: 2.0}


def _f(fn, path, line=1):
    return Frame(fn, path, line)


@pytest.mark.parametrize("frames,kind", [
    ([_f("_next_data", "/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py"),
      _f("train", "/home/u/t.py")], "data_loading"),
    ([_f("all_reduce", "/x/site-packages/torch/distributed/distributed_c10d.py"), _f("train", "/home/u/t.py")],
     "collective"),
    ([_f("forward", "/x/site-packages/torch/nn/modules/linear.py"), _f("train", "/home/u/t.py")], "compute"),
    ([_f("save", "/x/site-packages/torch/serialization.py"), _f("train", "/home/u/t.py")], "checkpoint_io"),
    ([_f("sleep_a_bit", "/home/u/t.py"), _f("train", "/home/u/t.py")], "user_code"),
])
def test_a_sample_is_classified_by_where_the_rank_spends_it(frames, kind):
    got, user = sample_kind(frames)
    assert got == kind
    assert user is not None and user.file == "/home/u/t.py"


def test_summarize_samples_counts_every_frame_and_takes_the_most_common_kind():
    dump = ('Thread 1 (active): "MainThread"\n    slow_step (/home/u/t.py:9)\n    train (/home/u/t.py:20)\n')
    s = summarize_samples([dump, dump, "garbage"])
    assert (s["samples"], s["kind"], s["user_frame"]) == (2, "user_code", "slow_step (t.py:9)")
    assert s["frames"] == {"slow_step (t.py:9)": 2, "train (t.py:20)": 2}
    assert summarize_samples([])["kind"] == "unknown"


@pytest.mark.parametrize("kw,field", [({"factor": 0.5}, "factor"), ({"reports": 0}, "reports"),
                                      ({"min_slower_s": float("nan")}, "min_slower_s"), ({"enabled": "yes"}, "enabled")])
def test_straggler_config_refuses_bad_values_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"StragglerConfig.{field}"):
        StragglerConfig(**kw)


def _run_with_straggler(tmp_path, straggler: bool):
    run = tmp_path / "run"
    run.mkdir()
    ranks = tuple({"world_rank": r, "local_rank": r, "node_rank": 0, "node_id": "n" * 40, "pid": 10 + r}
                  for r in range(2))
    evs = [ev.RunStarted(name="run", path=str(run), backend="ray", num_workers=2),
           ev.AttemptStarted(attempt=1, world_size=2, ranks=ranks)]
    evs += [ev.ReportCommitted(attempt=1, index=i, metrics={}, world_size=2,
                               step_s=(0.02, 0.6 if straggler else 0.021)) for i in range(1, 6)]
    if straggler:
        evs.append(ev.StragglerDetected(attempt=1, index=3, world_rank=1, node_id="n" * 40, median_step_s=0.6,
                                        others_median_step_s=0.02, classification="user_code",
                                        user_frame="slow_step (t.py:9)", samples=8,
                                        frames={"slow_step (t.py:9)": 8}))
    evs.append(ev.RunFinished(status="finished", attempts=1, last_index=5))
    (run / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in evs))
    (run / "run_state.json").write_text(json.dumps({"status": "finished", "checkpoints": [], "attempts": [
        {"attempt": 1, "world_size": 2, "outcome": "finished"}]}))
    return run


def test_diagnose_names_the_straggler_in_text_and_json_with_a_step_table(tmp_path):
    rep = load_report(str(_run_with_straggler(tmp_path, True)))
    d = rep.to_dict()
    assert d["stragglers"] == [{"world_rank": 1, "node": "n" * 40, "median_step_s": 0.6,
                                "others_median_step_s": 0.02, "classification": "user_code",
                                "user_frame": "slow_step (t.py:9)", "attempt": 1, "index": 3}]
    assert [(r["world_rank"], r["median_step_s"], r["reports"]) for r in d["steps"]] == [(0, 0.02, 5), (1, 0.6, 5)]
    text = render_text(rep)
    assert "rank 1: median 0.600 s, max 0.600 s over 5 report(s)  <- straggler" in text
    assert "rank 0: median 0.020 s" in text and "rank 0: median 0.020 s, max 0.020 s over 5 report(s)  <-" not in text
    assert any(s.startswith("rank 1 is slower than the others at slow_step (t.py:9)") for s in rep.suggestions)


def test_a_run_without_stragglers_has_none_and_no_straggler_suggestion(tmp_path):
    rep = load_report(str(_run_with_straggler(tmp_path, False)))
    assert rep.to_dict()["stragglers"] == [] and len(rep.steps) == 2
    assert not any("slower" in s or "slow " in s for s in rep.suggestions)
    assert "<- straggler" not in render_text(rep)


def test_timeline_spans_give_each_attempt_its_outcome_and_the_downtime_between():
    from trainkit.diagnostics.plot import timeline_spans

    t = 1000.0
    evs = [ev.RunStarted(time=t), ev.AttemptStarted(attempt=1, world_size=2, time=t + 1),
           ev.ReportCommitted(attempt=1, index=1, time=t + 2),
           ev.WorkerFailed(attempt=1, failures=({"world_rank": 1, "kind": "died"},), will_retry=True, time=t + 3),
           ev.AttemptStarted(attempt=2, world_size=2, time=t + 4.5),
           ev.AttemptStarted(attempt=3, world_size=3, time=t + 6),  # a resize: no failure in between
           ev.RunFinished(status="finished", time=t + 8)]
    spans, downtime, end = timeline_spans(evs)
    assert [(s.attempt, s.start, s.end, s.outcome) for s in spans] == [
        (1, 1.0, 3.0, "restarted"), (2, 4.5, 6.0, "resized"), (3, 6.0, 8.0, "finished")]
    assert downtime == [(3.0, 4.5)] and end == 8.0
