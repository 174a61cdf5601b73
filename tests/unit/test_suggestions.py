"""Each suggestion of ``trainkit diagnose`` has a run that earns it and one that does not."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from trainkit.diagnostics.run_report import EventsRead, Fault
from trainkit.diagnostics.steps import StragglerRow
from trainkit.diagnostics.suggestions import suggestions

OK_EVENTS = EventsRead(10, None, "")


def _hang(classification, rank=1, attempt=1, frame="stuck (t.py:3)"):
    row = NS(state="missing", classification=classification, world_rank=rank, user_frame=frame)
    return NS(attempt=attempt, ranks=(row, NS(state="waiting", classification="report", world_rank=0,
                                              user_frame=None)))


def _failure(kind, rank=1):
    return NS(worker=NS(kind=kind, world_rank=rank))


def _run(**kw):
    args = dict(status="failed", failures=(), hangs=(), debuggers=(), events=OK_EVENTS, stragglers=(), faults=())
    args.update(kw)
    return suggestions(**args)


STRAGGLER = StragglerRow(1, "n", 0.6, 0.02, "data_loading", "load (t.py:5)", 1, 3)

CASES = [  # (phrase, a run that earns it, a run that does not)
    ("is busy or blocked in stuck (t.py:3)", dict(hangs=(_hang("user_code"),)), dict(hangs=(_hang("collective"),))),
    ("waits in a torch.distributed collective", dict(hangs=(_hang("collective"),)), dict(hangs=(_hang("user_code"),))),
    ("waits for data at", dict(hangs=(_hang("data_loading"),)), dict(hangs=(_hang("report"),))),
    ("is inside report() but has not arrived", dict(hangs=(_hang("report"),)),
     dict(hangs=(_hang("report"),), faults=(Fault(1, "hang", 1, None, 2),))),
    ("was held by an injected hang fault", dict(hangs=(_hang("report"),), faults=(Fault(1, "hang", 1, None, 2),)),
     dict(hangs=(_hang("report"),), faults=(Fault(1, "hang", 0, None, 2),))),
    ("process is gone", dict(hangs=(_hang("dead"),)), dict(hangs=(_hang("user_code"),))),
    ("different numbers of report()", dict(failures=(_failure("mismatch"),)), dict(failures=(_failure("exception"),))),
    ("torch.distributed collective failed with rank 1", dict(failures=(NS(worker=NS(kind="collective", world_rank=0,
                                                                                      peer_rank=1)),)),
     dict(failures=(NS(worker=NS(kind="collective", world_rank=0, peer_rank=1)), _failure("exception")))),
    ("was killed for memory", dict(failures=(_failure("oom"),)), dict(failures=(_failure("died"),))),
    ("raise FailureConfig(max_failures", dict(failures=(_failure("died"),)),
     dict(status="finished", failures=(_failure("died"),))),
    ("TRAINKIT_DEBUG_RANK", dict(hangs=(_hang("user_code"),)), dict(status="finished", hangs=(_hang("user_code"),))),
    ("slow waiting for data", dict(status="finished", stragglers=(STRAGGLER,)), dict(status="finished")),
    ("events.jsonl is damaged", dict(events=EventsRead(3, 4, "line 4 is not JSON")), dict()),
]


@pytest.mark.parametrize("phrase,earned,not_earned", CASES, ids=[c[0][:40] for c in CASES])
def test_a_suggestion_appears_for_the_run_that_earns_it_only(phrase, earned, not_earned):
    assert any(phrase in s for s in _run(**earned)), _run(**earned)
    assert not any(phrase in s for s in _run(**not_earned)), _run(**not_earned)
