"""A run's timeline from its event stream: text lines for the terminal, a PNG with ``--plot``.

Consecutive committed reports of one attempt collapse into one line ("reports 3-7").
The picture shows each attempt's world size while it runs (integer ticks; downtime, when
no group runs or none reports, is a shaded gap), each committed report (a dot at its
index on a second axis), and above it one lane per kind of marker, every marker labelled:
faults (red), preemption notices and hangs (purple), failures (black), restarts, resizes
and the run's end (orange), with a legend. Pure over events; runs in the driver.
"""

from __future__ import annotations

from typing import Optional

from trainkit import events as ev


def describe(e: ev.Event) -> Optional[str]:
    """One line for one event (None for events shown otherwise, e.g. reports)."""
    if isinstance(e, ev.RunStarted):
        return f"run started ({e.backend}, num_workers={e.num_workers})" + (
            f", resuming after report {e.resumed_from_index}" if e.resumed_from_index else "")
    if isinstance(e, ev.AttemptStarted):
        if not e.ranks:
            return None
        nodes = len({r.get("node_id") for r in e.ranks})
        return (f"attempt {e.attempt}: {e.world_size} worker(s) on {nodes} node(s)"
                + (f", from checkpoint of report {e.start_index}" if e.start_index else ""))
    if isinstance(e, ev.FaultInjected):
        where = f"rank {e.world_rank}" if e.world_rank is not None else ""
        if e.node is not None:
            where += f"{', ' if where else ''}node {e.node}"
        extra = {k: v for k, v in e.detail.items() if k not in ("key", "fault", "when")}
        params = ", ".join(f"{k}={v}" for k, v in extra.items())
        return (f"FAULT {e.action} ({e.detail.get('fault', '')}) {e.detail.get('when', '')} report {e.index} "
                f"on {where}" + (f" [{params}]" if params else ""))
    if isinstance(e, ev.WorkerFailed):
        first = e.failures[0] if e.failures else {}
        what = f"{first.get('exc_type', '')}: {_headline(first.get('message', ''))}".strip(": ")
        return (f"{e.kind} in attempt {e.attempt}: rank {first.get('world_rank')} {what}"
                f" -> {'retry' if e.will_retry else 'no retry'}")
    if isinstance(e, ev.GroupRestarted):
        return f"group restarted (attempt {e.attempt}) from report {e.from_index}"
    if isinstance(e, ev.Resized):
        return f"resized {e.old_world_size} -> {e.new_world_size} ({e.reason})"
    if isinstance(e, ev.Preempted):
        return f"preemption notice: ranks {list(e.world_ranks)}, grace {e.grace_s:g} s"
    if isinstance(e, ev.HangDetected):
        return f"hang at report {e.index}: missing ranks {list(e.missing_ranks)} after {e.waited_s:.1f} s"
    if isinstance(e, ev.RunFinished):
        return f"run {e.status} after {e.attempts} attempt(s), last report {e.last_index}"
    return None


def _headline(message: str, limit: int = 100) -> str:
    """The first clause of a failure message (the details stay in the event and in `trainkit diagnose`)."""
    text = " ".join(message.split())
    for stop in (" (", ". "):
        if stop in text:
            text = text[:text.index(stop)]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def text_lines(events: list) -> list[str]:
    if not events:
        return []
    t0 = events[0].time
    lines: list[str] = []
    block: Optional[list] = None  # [first time, attempt, first index, last index, world size]

    def close():
        nonlocal block
        if block:
            t, attempt, lo, hi, ws = block
            span = f"report {lo}" if lo == hi else f"reports {lo}-{hi}"
            lines.append(f"{t - t0:+8.2f}s  {span} committed (attempt {attempt}, world size {ws})")
        block = None

    for e in events:
        if isinstance(e, ev.ReportCommitted):
            if block and block[1] == e.attempt and e.index == block[3] + 1 and e.world_size == block[4]:
                block[3] = e.index
            else:
                close()
                block = [e.time, e.attempt, e.index, e.index, e.world_size]
            continue
        text = describe(e)
        if text is None:
            continue
        close()
        lines.append(f"{e.time - t0:+8.2f}s  {text}")
    close()
    return lines


def world_size_segments(events: list) -> tuple[list[tuple], list[tuple]]:
    """``(segments, downtime)`` in seconds since the first event, for the picture.

    A segment ``(start, end, world size, attempt)`` runs from an attempt's start to its last
    committed report (to its end when it committed none); downtime ``(start, end)`` is what
    lies between segments (a failure being noticed, a hang, a restart: no group running or
    no report), and after the last one when the run failed. Pure.
    """
    if not events:
        return [], []
    t0 = events[0].time
    segments: list[tuple] = []
    current: Optional[list] = None  # [start, last report or None, world size, attempt, ended at]

    def close():
        if current is not None:
            start, last, ws, attempt, ended = current
            segments.append((start, last if last is not None else (ended if ended is not None else start), ws, attempt))

    for e in events:
        x = e.time - t0
        if isinstance(e, ev.AttemptStarted):
            close()
            current = [x, None, e.world_size, e.attempt, None]
        elif current is None:
            continue
        elif isinstance(e, ev.ReportCommitted) and e.attempt == current[3] and current[4] is None:
            current[1], current[2] = x, e.world_size or current[2]
        elif isinstance(e, (ev.WorkerFailed, ev.Resized, ev.RunFinished)) and current[4] is None:
            current[4] = x
    close()
    downtime = [(a[1], b[0]) for a, b in zip(segments, segments[1:]) if b[0] > a[1]]
    done = [e for e in events if isinstance(e, ev.RunFinished)]
    if segments and done and done[-1].status != "finished" and done[-1].time - t0 > segments[-1][1]:
        downtime.append((segments[-1][1], done[-1].time - t0))
    return segments, downtime


# marker kinds of the picture: (lane in the strip above the plot, colour, marker, line style)
_MARKS = {"fault": (3, "tab:red", "v", "--"), "notice": (2, "tab:purple", "P", ":"),
          "failure": (1, "black", "X", ":"), "restart": (0, "tab:orange", "o", "-")}
_LANES = ("restarts, resizes", "failures", "notices, hangs", "faults")


def _marks(events: list) -> list[tuple]:
    """``(x, kind, label)`` for every event the picture marks, x in seconds since the first event."""
    t0 = events[0].time if events else 0.0
    out = []
    for e in events:
        x = e.time - t0
        if isinstance(e, ev.FaultInjected):
            target = f"node {e.node}" if e.node is not None else f"rank {e.world_rank}"
            out.append((x, "fault", f"{e.action} {target} ({e.detail.get('fault', '')})"))
        elif isinstance(e, ev.WorkerFailed):
            first = e.failures[0] if e.failures else {}
            out.append((x, "failure", f"{e.kind}: rank {first.get('world_rank')}" + (
                f" {first.get('exc_type')}" if first.get("exc_type") else "") + ("" if e.will_retry else ", no retry")))
        elif isinstance(e, ev.GroupRestarted):
            out.append((x, "restart", f"restart -> attempt {e.attempt}"))
        elif isinstance(e, ev.Resized):
            out.append((x, "restart", f"resize {e.old_world_size} -> {e.new_world_size}"))
        elif isinstance(e, ev.Preempted):
            out.append((x, "notice", f"notice ranks {list(e.world_ranks)}, grace {e.grace_s:g} s"))
        elif isinstance(e, ev.HangDetected):
            out.append((x, "notice", f"hang: ranks {list(e.missing_ranks)} missing"))
        elif isinstance(e, ev.RunFinished):
            out.append((x, "restart", f"run {e.status}"))
    return out


def plot(events: list, out_path: str, title: str = "") -> str:
    """Draw the run into a PNG (``figure``); returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(events, title)
    try:
        fig.savefig(out_path)
    finally:
        plt.close(fig)
    return out_path


def figure(events: list, title: str = ""):
    """The picture as a matplotlib figure (the caller closes it).

    Below: the world size of each attempt while it runs (a gap, shaded, where no group runs or
    none reports) and each committed report's index (right axis). Above: one lane per kind of
    marker (faults, preemption notices and hangs, failures, restarts and resizes), every marker
    labelled; the same times are dashed lines across the plot. A legend names every mark.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    t0 = events[0].time if events else 0.0
    end = max(events[-1].time - t0, 1e-3) if events else 1.0
    segments, downtime = world_size_segments(events)
    marks = _marks(events)
    fig, (lane, ax) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.2), dpi=100,
                                   gridspec_kw={"height_ratios": [1.5, 3], "hspace": 0.05})
    for a, b in downtime:
        ax.axvspan(a, b, color="0.88", linewidth=0)
        ax.text((a + b) / 2, 0.15, f"down\n{b - a:.1f} s", ha="center", va="bottom", fontsize=7, color="0.35")
    if segments and segments[0][0] > end * 0.05:
        ax.text(segments[0][0] / 2, 0.15, "starting\n(cluster, group)", ha="center", va="bottom", fontsize=7,
                color="0.5")
    for start, stop, ws, attempt in segments:
        ax.plot([start, max(stop, start + end * 0.002)], [ws, ws], color="tab:blue", linewidth=3,
                solid_capstyle="butt")
        ax.text(start, ws + 0.08, f"attempt {attempt}", fontsize=7, color="tab:blue", va="bottom",
                bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1})
    top = max([s[2] for s in segments] or [1])
    ax.set_ylim(0, top + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("world size")
    ax.set_xlabel("seconds since the run started")
    reports = [e for e in events if isinstance(e, ev.ReportCommitted)]
    if reports:
        ax2 = ax.twinx()
        ax2.plot([e.time - t0 for e in reports], [e.index for e in reports], ".", color="tab:green", markersize=5)
        ax2.set_ylim(0, max(e.index for e in reports) * 1.1 + 1)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_ylabel("report index", color="tab:green")
    _draw_marks(lane, ax, marks, end)
    lane.set_title(title or "trainkit chaos timeline")
    ax.set_xlim(-end * 0.01, end * 1.02)
    handles = [Line2D([], [], color="tab:blue", linewidth=3, label="world size (a group running)"),
               Patch(color="0.88", label="downtime (no group, no report)"),
               Line2D([], [], marker=".", color="tab:green", linestyle="none", label="report committed (index)")]
    names = {"fault": "fault injected", "notice": "preemption notice / hang", "failure": "failure",
             "restart": "restart / resize / end"}
    handles += [Line2D([], [], color=c, marker=m, linestyle=ls, label=names[k]) for k, (_, c, m, ls) in _MARKS.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.11, right=0.93, top=0.94, bottom=0.2)
    return fig


def _draw_marks(lane, ax, marks: list, end: float) -> None:
    """Markers in their lanes, each with its label; labels close in time are staggered up and down."""
    last_x: dict = {}
    flip: dict = {}
    for x, kind, label in marks:
        row, color, marker, style = _MARKS[kind]
        ax.axvline(x, color=color, linestyle=style, linewidth=0.9, alpha=0.8)
        lane.plot(x, row, marker=marker, color=color, markersize=7, linestyle="none")
        near = row in last_x and x - last_x[row] < end * 0.12
        flip[row] = not flip.get(row, False) if near else False
        last_x[row] = x
        up = not flip[row]
        right = x > end * 0.8  # near the end: the label goes left of its marker
        lane.text(x + end * (-0.004 if right else 0.004), row + (0.1 if up else -0.1), label, fontsize=7,
                  color=color, va="bottom" if up else "top", ha="right" if right else "left", clip_on=False)
    lane.set_ylim(-0.6, len(_LANES) - 0.3)
    lane.set_yticks(range(len(_LANES)))
    lane.set_yticklabels(_LANES, fontsize=8)
    lane.grid(axis="y", color="0.92")
    lane.tick_params(axis="x", labelbottom=False)
