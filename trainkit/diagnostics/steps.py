"""Step times and stragglers of a run, read from its event stream (``report_committed.step_s``,
``straggler_detected``): parts of ``trainkit diagnose``'s report.

``step_table(events, attempt)``: per rank of that attempt, the median and the largest step
time over its committed reports and how many reports that is. ``straggler_rows(events)``:
each ``straggler_detected``, as the ``stragglers`` list of ``diagnose --json``
(``{world_rank, node, median_step_s, others_median_step_s, classification, user_frame}``,
plus the attempt and report it was named at). Pure; runs where a report is read.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from trainkit import events as ev
from trainkit.diagnostics.stragglers import DESCRIPTIONS


@dataclass(frozen=True)
class StepRow:
    world_rank: int
    median_step_s: float
    max_step_s: float
    reports: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StragglerRow:
    world_rank: int
    node: str
    median_step_s: float
    others_median_step_s: float
    classification: str
    user_frame: Optional[str]
    attempt: int
    index: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        ratio = self.median_step_s / self.others_median_step_s if self.others_median_step_s > 0 else float("inf")
        where = DESCRIPTIONS.get(self.classification, self.classification)
        return (f"rank {self.world_rank} (node {self.node[:12]}): {self.median_step_s:.3f} s per step vs "
                f"{self.others_median_step_s:.3f} s for the others ({ratio:.0f}x) from report {self.index} "
                f"of attempt {self.attempt}; {where}" + (f" at {self.user_frame}" if self.user_frame else ""))


def step_table(events: Sequence[ev.Event], attempt: Optional[int]) -> tuple[StepRow, ...]:
    per_rank: dict[int, list] = {}
    for e in events:
        if isinstance(e, ev.ReportCommitted) and e.attempt == attempt:
            for r, s in enumerate(e.step_s or ()):
                if isinstance(s, (int, float)):
                    per_rank.setdefault(r, []).append(float(s))
    return tuple(StepRow(r, round(statistics.median(v), 4), round(max(v), 4), len(v))
                 for r, v in sorted(per_rank.items()))


def straggler_rows(events: Sequence[ev.Event]) -> tuple[StragglerRow, ...]:
    return tuple(StragglerRow(e.world_rank, e.node_id, e.median_step_s, e.others_median_step_s, e.classification,
                              e.user_frame, e.attempt, e.index)
                 for e in events if isinstance(e, ev.StragglerDetected))


def straggler_suggestions(rows: Sequence[StragglerRow]) -> list[str]:
    out = []
    for s in rows:
        where = s.user_frame or "its training loop"
        if s.classification == "data_loading":
            out.append(f"rank {s.world_rank} is slow waiting for data at {where}: give its DataLoader more workers, "
                       "or check that its shard is not larger or slower to read than the others'")
        elif s.classification == "checkpoint_io":
            out.append(f"rank {s.world_rank} is slow writing checkpoints: save from rank 0 only, or check its "
                       "node's disk and network")
        elif s.classification == "compute":
            out.append(f"rank {s.world_rank} is slow computing at {where}: check its node (CPU/GPU load, thermal "
                       "throttling, another process) and that its batches are the size of the others'")
        else:
            out.append(f"rank {s.world_rank} is slower than the others at {where}: look for work only that rank "
                       "does (logging, evaluation, a sleep)")
    return out
