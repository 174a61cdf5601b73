"""``trainkit diagnose RUN --plot OUT.png``: the run's story, one lane per rank.

Read from the event stream alone (``events.jsonl``): x is seconds since the run started,
y one lane per world rank. Each attempt is a shaded band over the lanes of its ranks,
labelled ``attempt N (world size W)``; the downtime between an attempt's end and the
next one's start is hatched red, so a restart's cost is visible; reports are ticks on
every lane of their attempt; faults (``fault_injected``), failures (``worker_failed``,
on the failed ranks), hangs (``hang_detected``, on the missing ranks) and preemption
notices are markers with a label; a straggler's lane is highlighted from the report that
named it. A legend names every kind of mark. ``timeline_spans`` is the pure part.

Runs in the process of ``trainkit diagnose`` (matplotlib, the ``chaos`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from trainkit import events as ev


@dataclass(frozen=True)
class Span:
    attempt: int
    world_size: int
    start: float  # seconds since the run started
    end: float
    outcome: str  # "finished", "failed", "restarted", "resized", "running", ...


def timeline_spans(events: Sequence[ev.Event]) -> tuple[list[Span], list[tuple[float, float]], float]:
    """``(attempt spans, downtime intervals, end of the timeline)`` in seconds since the first event."""
    if not events:
        return [], [], 0.0
    t0 = events[0].time
    end = events[-1].time - t0
    spans, downtime = [], []
    open_: Optional[tuple] = None  # (attempt, world size, start)
    ended_at: Optional[float] = None  # when the open attempt failed or was stopped
    outcome = "running"
    for e in events:
        x = e.time - t0
        if isinstance(e, ev.AttemptStarted):
            if open_ is not None:
                stop = ended_at if ended_at is not None else x
                spans.append(Span(open_[0], open_[1], open_[2], stop, outcome if ended_at is not None else "resized"))
                if x > stop:
                    downtime.append((stop, x))
            open_, ended_at, outcome = (e.attempt, e.world_size, x), None, "running"
        elif isinstance(e, ev.WorkerFailed) and open_ is not None and ended_at is None:
            ended_at, outcome = x, "restarted" if e.will_retry else "failed"
        elif isinstance(e, ev.RunFinished) and open_ is not None:
            stop = ended_at if ended_at is not None else x
            spans.append(Span(open_[0], open_[1], open_[2], stop, outcome if ended_at is not None else e.status))
            open_ = None
    if open_ is not None:
        spans.append(Span(open_[0], open_[1], open_[2], ended_at if ended_at is not None else end, outcome))
    return spans, downtime, end


def plot_run(events: Sequence[ev.Event], out_path: str, title: str = "") -> str:
    """Draw the run's timeline into a PNG at ``out_path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    spans, downtime, end = timeline_spans(events)
    t0 = events[0].time if events else 0.0
    lanes = max([s.world_size for s in spans] or [1])
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.55 * lanes), dpi=100)
    if spans and spans[0].start > 0:  # fit() to the first group running: placement and worker start
        ax.axvspan(0, spans[0].start, color="0.85", alpha=0.6, linewidth=0)
        ax.text(spans[0].start / 2, -0.75, "starting", fontsize=7, color="0.4", ha="center")
    colors = ("tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive")
    for s in spans:
        ax.add_patch(plt.Rectangle((s.start, -0.45), max(s.end - s.start, 1e-3), s.world_size - 0.1,
                                   color=colors[(s.attempt - 1) % len(colors)], alpha=0.18, linewidth=0))
        ax.text(s.start, s.world_size - 0.5, f" attempt {s.attempt} (world size {s.world_size}): {s.outcome}",
                fontsize=8, va="bottom")
    for a, b in downtime:
        ax.axvspan(a, b, facecolor="none", edgecolor="tab:red", hatch="//", alpha=0.6, linewidth=0)
        ax.text((a + b) / 2, -0.75, f"down {b - a:.1f} s", fontsize=7, color="tab:red", ha="center")
    size_at = {s.attempt: s.world_size for s in spans}
    for e in events:
        x = e.time - t0
        if isinstance(e, ev.ReportCommitted):
            ax.vlines(x, -0.3, size_at.get(e.attempt, 1) - 0.7, color="0.35", linewidth=0.6)
        elif isinstance(e, ev.FaultInjected):
            y = e.world_rank if isinstance(e.world_rank, int) and e.world_rank >= 0 else lanes - 1
            ax.plot(x, y, marker="v", color="tab:red", markersize=9, linestyle="none")
            ax.annotate(f"{e.action}", (x, y), xytext=(3, 6), textcoords="offset points", fontsize=7,
                        color="tab:red")
        elif isinstance(e, ev.WorkerFailed):
            for f in e.failures:
                r = f.get("world_rank", -1) if isinstance(f, dict) else -1
                if isinstance(r, int) and r >= 0:
                    ax.plot(x, r, marker="X", color="black", markersize=8, linestyle="none")
                    ax.annotate(str(f.get("kind", "failed")), (x, r), xytext=(3, -10), textcoords="offset points",
                                fontsize=7)
        elif isinstance(e, ev.HangDetected):
            for r in e.missing_ranks:
                ax.plot(x, r, marker="D", color="tab:orange", markersize=8, linestyle="none")
                ax.annotate("hang", (x, r), xytext=(3, 6), textcoords="offset points", fontsize=7,
                            color="tab:orange")
        elif isinstance(e, ev.Preempted):
            for r in e.world_ranks:
                ax.plot(x, r, marker="P", color="tab:brown", markersize=8, linestyle="none")
                ax.annotate(f"notice {e.grace_s:g} s", (x, r), xytext=(3, 6), textcoords="offset points", fontsize=7)
        elif isinstance(e, ev.StragglerDetected):
            stop = next((s.end for s in spans if s.attempt == e.attempt), end)
            ax.plot([x, stop], [e.world_rank, e.world_rank], color="gold", linewidth=7, alpha=0.7,
                    solid_capstyle="butt")
            late = x > 0.75 * max(end, 1e-3)  # near the right edge: label to the left of the mark
            ax.annotate(f"straggler {e.median_step_s:.2f} s/step", (x, e.world_rank), xytext=(-3 if late else 3, 6),
                        textcoords="offset points", fontsize=7, color="darkgoldenrod", ha="right" if late else "left")
    ax.set_yticks(range(lanes))
    ax.set_yticklabels([f"rank {r}" for r in range(lanes)])
    ax.set_ylim(-1.0, lanes + 0.1)
    ax.set_xlim(0, max(end, 1e-3) * 1.02)
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title or "trainkit run timeline")
    handles = [Patch(facecolor="0.85", label="starting (placement, worker start)"),
               Patch(facecolor="tab:blue", alpha=0.18, label="attempt (its ranks)"),
               Patch(facecolor="none", edgecolor="tab:red", hatch="//", label="downtime (no group)"),
               Line2D([], [], color="0.35", linewidth=0.8, label="report committed"),
               Line2D([], [], marker="v", color="tab:red", linestyle="none", label="fault injected"),
               Line2D([], [], marker="X", color="black", linestyle="none", label="rank failed"),
               Line2D([], [], marker="D", color="tab:orange", linestyle="none", label="hang detected"),
               Line2D([], [], marker="P", color="tab:brown", linestyle="none", label="preemption notice"),
               Line2D([], [], color="gold", linewidth=6, alpha=0.7, label="straggler")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
