"""What ``trainkit diagnose`` suggests: one line per thing to look at or change, each earned by the run.

A suggestion appears only for a run whose report shows its cause (a hang's classification,
a failure's kind in a run that failed, a straggler, a damaged event stream); the tests
give each one a run that earns it and one that does not. Pure; runs where a report is built.
"""

from __future__ import annotations

from typing import Sequence

from trainkit.diagnostics.steps import straggler_suggestions


def suggestions(status: str, failures: Sequence, hangs: Sequence, debuggers: Sequence,
                events, stragglers: Sequence = (), faults: Sequence = ()) -> tuple[str, ...]:
    out: dict[str, None] = {}  # ordered, without repeats
    injected = {(f.attempt, f.world_rank): f for f in faults if f.action in ("hang", "slow")}
    for h in hangs:
        for r in h.ranks:
            if r.state != "missing":
                continue
            c, rank, where = r.classification, r.world_rank, r.user_frame or "the training function"
            fault = injected.get((h.attempt, rank))
            if fault is not None:  # the run's own fault plan held it: nothing in the user's code to fix
                out[f"rank {rank} was held by an injected {fault.action} fault (fault_injected at report "
                    f"{fault.index}): the hang was the experiment; check that the run handled it as expected"] = None
            elif c == "user_code":
                out[f"rank {rank} is busy or blocked in {where}: look for a loop, lock, sleep or I/O there that "
                    "only some ranks run"] = None
            elif c == "collective":
                out[f"rank {rank} waits in a torch.distributed collective at {where}: check that every rank makes "
                    "the same collectives in the same order (a rank that skips one, or reports one time fewer, "
                    "leaves the others blocked)"] = None
            elif c == "data_loading":
                out[f"rank {rank} waits for data at {where}: check the Dataset/DataLoader worker (a stuck "
                    "__getitem__, a full disk, a dead worker); DataLoader(timeout=...) turns this into an error"] = None
            elif c == "report":
                out[f"rank {rank} is inside report() but has not arrived: a slow checkpoint upload or a report hook; "
                    "check storage speed and checkpoint size"] = None
            elif c == "dead":
                out[f"rank {rank}'s process is gone: look at logs/ and the node's system log (OOM killer)"] = None
    kinds = {f.worker.kind for f in failures}
    if "mismatch" in kinds:
        out["ranks made different numbers of report()/collective calls: make every rank call report() the same "
            "number of times"] = None
    for f in failures:
        if f.worker.kind == "collective" and all(g.worker.kind == "collective" for g in failures):
            peer = getattr(f.worker, "peer_rank", None)
            out[f"rank {f.worker.world_rank}'s torch.distributed collective failed"
                + (f" with rank {peer}" if peer is not None else "") + ": a peer died, hung or was stopped; look at "
                "that peer's log, and raise TorchConfig(timeout_s=...) if it was only slow"] = None
        if f.worker.kind == "oom":
            out[f"rank {f.worker.world_rank} was killed for memory: lower its batch or model size, look for memory "
                "that grows step after step (tensors kept for logging, a growing cache), or give each worker more "
                "memory (ScalingConfig(resources_per_worker={'memory': ...}), a larger node)"] = None
    if "died" in kinds and status == "failed":  # a run that recovered needs no larger budget
        out["a worker process died: raise FailureConfig(max_failures=...) to restart from the latest checkpoint, "
            "and check the node's memory"] = None
    if hangs and status == "failed" and not debuggers:
        out["to step through the stuck rank, re-run with TRAINKIT_DEBUG_RANK=<rank> and attach a debugger "
            "(debugpy) to the port in the debugger_listening event"] = None
    for line in straggler_suggestions(stragglers):
        out[line] = None
    if events.stopped_at_line:
        out["events.jsonl is damaged: the run's controller probably died while writing it; what follows the "
            "damaged line is not shown"] = None
    return tuple(out)
