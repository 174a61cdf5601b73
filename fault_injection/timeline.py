"""A run's timeline from its event stream: text lines for the terminal, a PNG with ``--plot``.

Consecutive committed reports of one attempt collapse into one line ("reports 3-7").
The picture shows the world size over time (a step line), each committed report (a
dot at its index on a second axis), faults (red) and group restarts (orange).
Pure over events; runs in the driver.
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


def plot(events: list, out_path: str, title: str = "") -> str:
    """Draw world size, reports, faults and restarts over time into a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = events[0].time if events else 0.0
    reports = [e for e in events if isinstance(e, ev.ReportCommitted)]
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    if reports:
        xs = [e.time - t0 for e in reports]
        ax.step(xs, [e.world_size for e in reports], where="post", color="tab:blue", label="world size")
        ax.set_ylim(0, max(e.world_size for e in reports) + 1)
        ax2 = ax.twinx()
        ax2.plot(xs, [e.index for e in reports], ".", color="tab:green", label="report index")
        ax2.set_ylabel("report index")
    for e in events:
        x = e.time - t0
        if isinstance(e, ev.FaultInjected):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(e.action, (x, 0.2), rotation=90, color="tab:red", fontsize=8)
        elif isinstance(e, ev.GroupRestarted):
            ax.axvline(x, color="tab:orange", linewidth=1)
        elif isinstance(e, ev.Resized):
            ax.annotate(f"{e.old_world_size}->{e.new_world_size}", (x, e.new_world_size), fontsize=8)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("world size")
    ax.set_title(title or "trainkit chaos timeline (red: faults, orange: restarts)")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
