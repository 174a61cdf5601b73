"""A soak run (issue 17, target 5): a fault every 15 s for 10 minutes on a fake 3-node cluster running
the digits workload, trainkit's ``ray`` backend, then the same schedule on Ray Train 2.60 in the same run.

For each system, one private ``trainkit_testing.cluster.Cluster`` (a head with no CPUs, three
1-CPU virtual nodes, GCS health checks at 0.5 s x 2) and one elastic fit
``ScalingConfig(num_workers=(1, 3))`` of ``trainkit.workloads:digits`` (a checkpoint every step)
with ``FailureConfig(max_failures=-1)``. Ray Train runs the same function through trainkit's
``ray_train`` backend (``TorchTrainer(..., backend="ray_train")``: real
``ray.train.torch.TorchTrainer``, its own controller, storage and restarts; trainkit only forwards
``report``/``get_checkpoint``/``get_context``). Once the group reports at world size 3, the driver
injects, every ``--every-s`` seconds, in turn:

* ``kill``: SIGKILL of a non-zero rank's process;
* ``node_loss``: ``remove_node`` of a non-zero rank's node (a node is added back ``--return-s`` later);
* ``preemption``: SIGTERM (the notice, ``TRAINKIT_PREEMPTION_GRACE_S`` = ``--grace-s``) to every rank
  on a non-zero rank's node, then ``remove_node`` of it once the grace is over (added back
  ``--return-s`` later).

Both systems are measured the same way, from what the training function itself records: every
rank writes its pid and node at each start; rank 0 appends ``time step world_size attempt`` once
each ``report()`` returned (an acknowledged, checkpointed step). At the end (or when the system's
fit fails: Ray Train is measured "for as long as it survives") it prints:

* effective training time: time inside acknowledged steps of the final history (each from the
  previous acknowledged step of the same attempt) / wall time of the soak;
* acknowledged checkpoints lost: attempts that started from an older step than one acknowledged
  before them, and gaps in the final history;
* recoveries: from each fault to the first acknowledged step of a later attempt (median, p95).

    python benchmarks/bench_soak.py [--minutes M] [--ray-train-minutes M] [--every-s S] [--json OUT]

Targets (trainkit): effective training time >= 90% and 0 acknowledged checkpoints lost; exits 0
when both hold, 1 otherwise, 2 on bad arguments. ``--ray-train-minutes 0`` skips Ray Train. About
``2 x --minutes`` plus a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

from _common import write_json

EFFECTIVE_TARGET = 0.90
KINDS = ("kill", "node_loss", "preemption")
FIRST_FULL_GROUP_S = 240  # Ray Train's first fit on a fresh cluster takes 25-30 s here


def soak_loop(config):
    """The digits workload's step, made endless and stoppable: a checkpoint every step. Records
    the ranks (pid, node) at each start and, on rank 0, every acknowledged step."""
    import ray

    import trainkit
    from trainkit import workloads

    work = config["dir"]
    ctx = trainkit.get_context()
    rank, attempt = ctx.get_world_rank(), ctx.get_attempt()
    with open(os.path.join(work, f"rank-{rank}.json.tmp"), "w") as f:
        json.dump({"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "attempt": attempt}, f)
    os.replace(os.path.join(work, f"rank-{rank}.json.tmp"), os.path.join(work, f"rank-{rank}.json"))
    stop = os.path.join(work, "stop")
    cfg = {"epochs": 10_000, "batch_size": config.get("batch_size", 64), "step_s": config.get("step_s", 0.05)}
    done = {"n": 0}
    real = trainkit.report
    log = open(os.path.join(work, "progress"), "a") if rank == 0 else None

    def report(metrics, checkpoint=None, **kw):  # digits calls trainkit.report; stop between steps
        real(metrics, checkpoint=checkpoint, **kw)
        if log is not None:
            log.write(f"{time.time():.6f} {metrics['step']} {ctx.get_world_size()} {attempt}\n")
            log.flush()
        done["n"] += 1
        if done["n"] % 5 == 0 and trainkit.collective.broadcast_from_rank_zero(os.path.exists(stop)):
            raise _Stop()

    trainkit.report = report
    try:
        return workloads.digits(cfg)
    except _Stop:
        return "stopped"
    finally:
        trainkit.report = real
        if log is not None:
            log.close()


class _Stop(Exception):
    pass


def read_progress(work: str) -> list:
    """Rank 0's acknowledged steps: ``(time, step, world_size, attempt)``, in order."""
    out = []
    try:
        with open(os.path.join(work, "progress")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    out.append((float(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])))
    except OSError:
        pass
    return out


def current_ranks(work: str) -> tuple[int, list]:
    """(rank 0's attempt, the ranks of its group: ``{"world_rank", "pid", "node_id"}``) from what the
    ranks wrote at their start."""
    records = read_progress(work)
    if not records:
        return 0, []
    _t, _step, world_size, attempt = records[-1]
    ranks = []
    for r in range(world_size):
        try:
            with open(os.path.join(work, f"rank-{r}.json")) as f:
                ranks.append({"world_rank": r, **json.load(f)})
        except (OSError, ValueError):
            pass
    return attempt, ranks


def analyse(records: list, faults: list, t_start: float, t_end: float) -> dict:
    """The soak's figures from rank 0's acknowledged steps (``read_progress``)."""
    final: dict = {}  # the final history: the last acknowledgement of each step (a redone step replaces it)
    for rec in records:
        final[rec[1]] = rec
    inside = 0.0
    prev_by_attempt: dict = {}
    for rec in records:
        t, step, _ws, attempt = rec
        prev = prev_by_attempt.get(attempt)
        if prev is not None and final.get(step) is rec and t_start <= prev <= t_end:
            inside += min(t, t_end) - prev
        prev_by_attempt[attempt] = t
    lost = 0
    firsts: dict = {}
    for rec in records:
        firsts.setdefault(rec[3], rec)
    for attempt, first in firsts.items():
        before = [r[1] for r in records if r[3] < attempt]
        if before and first[1] - 1 < max(before):  # it started from an older step than one acknowledged
            lost += 1
    steps = sorted(final)
    # a step missing from rank 0's record is a gap unless a later attempt resumed from it: a report
    # committed as the attempt stopped (to grow) raises in report() on the ranks instead of returning
    resumed_from = {first[1] - 1 for first in firsts.values()}
    gaps = len(set(range(steps[0], steps[-1] + 1)) - set(steps) - resumed_from) if steps else 0
    recoveries = {k: [] for k in KINDS}
    for f in faults:
        after = [r[0] for r in records if r[0] > f["at"] and r[3] > f["attempt"]]
        if after:
            recoveries[f["kind"]].append(after[0] - f["at"])
    every = sorted(x for xs in recoveries.values() for x in xs)
    p95 = every[min(len(every) - 1, int(round(0.95 * (len(every) - 1))))] if every else None
    wall = t_end - t_start
    return {"wall_s": wall, "inside_s": inside, "effective": inside / wall if wall > 0 else 0.0,
            "acknowledged_steps": len(steps), "lost": lost + gaps, "attempts_from_older": lost, "gaps": gaps,
            "attempts": len(firsts), "recoveries_s": recoveries,
            "recovery_median_s": statistics.median(every) if every else None, "recovery_p95_s": p95,
            "faults": len(faults), "recovered": len(every)}


def soak(system: str, minutes: float, args) -> dict:
    """One system's soak on a fresh cluster: its figures (``survived``: whether its fit lived to the end)."""
    from trainkit import FailureConfig, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer
    from trainkit_testing.cluster import Cluster

    base = tempfile.mkdtemp(prefix=f"trainkit_bench_soak_{system}_")
    work = os.path.join(base, "work")
    os.makedirs(work)
    out: dict = {}
    faults: list = []
    load = os.getloadavg()
    log(f"{system}: starting ({minutes:g} min, a fault every {args.every_s:g} s)")
    try:
        with Cluster(nodes=3, cpus_per_node=1) as cluster:
            c, nodes = cluster.ray_cluster, cluster.virtual_nodes

            def go():
                try:
                    out["result"] = TorchTrainer(
                        soak_loop, train_loop_config={"dir": work},
                        scaling_config=ScalingConfig(num_workers=(1, 3)),
                        run_config=RunConfig(name="soak", storage_path=base,
                                             failure_config=FailureConfig(max_failures=-1, max_preemptions=-1)),
                        backend=system).fit()
                except Exception as e:  # noqa: BLE001 - reported below
                    out["error"] = e
                finally:
                    out["ended_at"] = time.time()

            t = threading.Thread(target=go, daemon=True)
            t.start()
            deadline = time.monotonic() + FIRST_FULL_GROUP_S
            while time.monotonic() < deadline and "ended_at" not in out and not any(
                    r[2] == 3 for r in read_progress(work)):
                time.sleep(0.1)
            if not any(r[2] == 3 for r in read_progress(work)):
                raise RuntimeError(f"{system}: no report at world size 3 within {FIRST_FULL_GROUP_S} s "
                                   f"({out.get('error')!r})")
            t_start = time.time()
            end = t_start + minutes * 60
            returns: list = []  # when to add a node back
            k = 0
            next_fault = t_start + args.every_s
            while time.time() < end and "ended_at" not in out:
                now = time.time()
                for when in [w for w in returns if w <= now]:
                    returns.remove(when)
                    nodes.append(c.add_node(num_cpus=1))
                if now < next_fault:
                    time.sleep(0.05)
                    continue
                next_fault += args.every_s
                kind = KINDS[k % len(KINDS)]
                k += 1
                attempt, ranks = current_ranks(work)
                others = [r for r in ranks if r["world_rank"] != 0]
                if not others:
                    log(f"{system}: {kind} skipped: a group of one")
                    continue
                victim = others[0]
                node = next((n for n in nodes if n.node_id == victim["node_id"]), None)
                at = time.time()
                log(f"{system}: {kind} of rank {victim['world_rank']} (attempt {attempt}, world size {len(ranks)})")
                if kind == "kill":
                    try:
                        os.kill(victim["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                elif node is not None:
                    if kind == "preemption":
                        for r in ranks:
                            if r["node_id"] == victim["node_id"]:
                                try:
                                    os.kill(r["pid"], signal.SIGTERM)
                                except ProcessLookupError:
                                    pass
                        time.sleep(args.grace_s)
                    nodes.remove(node)
                    c.remove_node(node)
                    returns.append(time.time() + args.return_s)
                else:
                    continue
                faults.append({"kind": kind, "at": at, "attempt": attempt, "world_rank": victim["world_rank"]})
            t_end = min(time.time(), out.get("ended_at", float("inf")))
            survived = "ended_at" not in out
            open(os.path.join(work, "stop"), "w").close()
            t.join(300)
            records = read_progress(work)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    doc = {"system": system, "minutes": minutes, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(),
           "survived": survived, "survived_s": t_end - t_start,
           "error": repr(out["error"])[:2000] if "error" in out else None,
           **analyse(records, faults, t_start, t_end)}
    if survived and "result" not in out:
        doc["error"] = doc["error"] or f"the fit did not end within 300 s of the stop ({system})"
    return doc


def log(msg: str) -> None:
    print(f"[bench_soak] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def show(doc: dict, label: str) -> None:
    rec = doc["recoveries_s"]
    lived = "to the end" if doc["survived"] else f"{doc['survived_s']:.0f} s, then its fit failed: {doc['error']}"
    print(f"{label}: {doc['minutes']:g} min ({lived}); {doc['faults']} faults, {doc['recovered']} recovered; "
          f"load average {doc['loadavg_at_start'][0]:.2f} at the start, {doc['loadavg_at_end'][0]:.2f} at the end")
    print(f"  effective training time: {doc['effective'] * 100:.1f}% ({doc['inside_s']:.0f} s inside acknowledged "
          f"steps of {doc['wall_s']:.0f} s)")
    print(f"  acknowledged checkpoints lost: {doc['lost']}; acknowledged steps {doc['acknowledged_steps']}, "
          f"attempts {doc['attempts']}")
    med, p95 = doc["recovery_median_s"], doc["recovery_p95_s"]
    if med is not None:
        print(f"  recoveries: median {med:.2f} s, p95 {p95:.2f} s; by kind: "
              + ", ".join(f"{k} {statistics.median(v):.2f} s (n={len(v)})" for k, v in rec.items() if v))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a fault every 15 s on a fake 3-node cluster (digits workload), "
                                            "trainkit then Ray Train")
    p.add_argument("--minutes", type=float, default=10.0, help="trainkit's soak length (default 10)")
    p.add_argument("--ray-train-minutes", type=float, default=None,
                   help="Ray Train's soak length (default: --minutes; 0 skips Ray Train)")
    p.add_argument("--every-s", type=float, default=15.0, help="seconds between faults (default 15)")
    p.add_argument("--grace-s", type=float, default=2.0, help="preemption notice grace (default 2)")
    p.add_argument("--return-s", type=float, default=4.0, help="a removed node comes back after this (default 4)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    args = p.parse_args(argv)
    rt_minutes = args.minutes if args.ray_train_minutes is None else args.ray_train_minutes
    if args.minutes <= 0 or rt_minutes < 0 or args.every_s < 5 or args.return_s < 0 or args.grace_s < 0:
        p.error("--minutes must be > 0, --ray-train-minutes >= 0, --every-s >= 5, --grace-s and --return-s >= 0")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    os.environ["TRAINKIT_PREEMPTION_GRACE_S"] = str(args.grace_s)
    if rt_minutes:
        try:
            import ray.train.torch  # noqa: F401
        except ImportError as e:
            print(f"bench_soak: Ray Train is not importable ({e}); pip install 'ray[train]==2.60.0' or pass "
                  "--ray-train-minutes 0", file=sys.stderr)
            return 2
    doc: dict = {"every_s": args.every_s, "grace_s": args.grace_s, "return_s": args.return_s}
    doc["trainkit"] = soak("ray", args.minutes, args)
    if rt_minutes:
        try:
            doc["ray_train"] = soak("ray_train", rt_minutes, args)
        except Exception as e:  # noqa: BLE001 - trainkit's figures stand; Ray Train's failure is the finding
            doc["ray_train"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    tk = doc["trainkit"]
    doc["ok"] = tk["survived"] and tk["error"] is None and tk["effective"] >= EFFECTIVE_TARGET and tk["lost"] == 0
    if args.json != "-":
        show(tk, "trainkit")
        rt = doc.get("ray_train")
        if rt and "system" in rt:
            show(rt, "Ray Train 2.60")
        elif rt:
            print(f"Ray Train 2.60: did not run its soak: {rt['error']}")
        print(f"target (trainkit): effective >= {EFFECTIVE_TARGET * 100:.0f}% and 0 lost: "
              f"{'ok' if doc['ok'] else 'MISSED'}")
    write_json(doc, args.json)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
