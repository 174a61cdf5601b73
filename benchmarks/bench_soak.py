"""A soak run (issue 17, target 5): a fault every 15 s for 10 minutes on a fake 3-node cluster running
the digits workload, trainkit's ``ray`` backend.

One private ``trainkit_testing.cluster.Cluster`` (a head with no CPUs, three 1-CPU virtual nodes,
GCS health checks at 0.5 s x 2). An elastic fit ``ScalingConfig(num_workers=(1, 3))`` of
``trainkit.workloads:digits`` (a checkpoint every step) runs with ``FailureConfig(max_failures=-1)``
while the driver injects, every ``--every-s`` seconds, in turn:

* ``kill``: SIGKILL of a non-zero rank's process;
* ``node_loss``: ``remove_node`` of a non-zero rank's node (a node is added back ``--return-s`` later);
* ``preemption``: SIGTERM (the notice, ``TRAINKIT_PREEMPTION_GRACE_S`` = ``--grace-s``) to every rank
  on a non-zero rank's node, then ``remove_node`` of it once the grace is over (added back
  ``--return-s`` later).

At the end it stops the run (a file the loop checks at each step) and prints, from the run's
``events.jsonl``:

* effective training time: time inside committed steps (each committed report of the final
  history, from the previous commit of the same attempt) / wall time of the soak;
* acknowledged checkpoints lost: attempts that started from an older checkpoint than the latest
  one committed before them, and gaps in the final history;
* recoveries: from each fault to the first commit after it (median, p95).

    python benchmarks/bench_soak.py [--minutes M] [--every-s S] [--json OUT]

Targets: effective training time >= 90% and 0 acknowledged checkpoints lost; exits 0 when both
hold, 1 otherwise, 2 on bad arguments. Ray Train is not run here: one resize costs it 67-71 s on
this cluster (docs/benchmarks.md), more than four fault periods.
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


def soak_loop(config):
    """The digits workload's step, made endless and stoppable: a checkpoint every step."""
    import trainkit
    from trainkit import workloads

    stop = os.path.join(config["dir"], "stop")
    cfg = {"epochs": 10_000, "batch_size": config.get("batch_size", 64), "step_s": config.get("step_s", 0.05)}
    done = {"n": 0}
    real = trainkit.report

    def report(metrics, checkpoint=None, **kw):  # digits calls trainkit.report; stop between steps
        real(metrics, checkpoint=checkpoint, **kw)
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


class _Stop(Exception):
    pass


def _events(run_path: str) -> list:
    out = []
    with open(os.path.join(run_path, "events.jsonl")) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


def _ranks(run_path: str) -> list:
    started = [e for e in _events(run_path) if e["type"] == "attempt_started"]
    return started[-1]["ranks"] if started else []


def analyse(events: list, faults: list, t_start: float, t_end: float) -> dict:
    commits = [e for e in events if e["type"] == "report_committed"]
    # the final history: the last commit of each index (a redone index replaces the earlier one)
    final: dict = {}
    for e in commits:
        final[e["index"]] = e
    inside = 0.0
    prev_by_attempt: dict = {}
    for e in commits:
        prev = prev_by_attempt.get(e["attempt"])
        if prev is not None and final.get(e["index"]) is e and t_start <= prev <= t_end:
            inside += e["time"] - prev
        prev_by_attempt[e["attempt"]] = e["time"]
    lost = 0
    for a in (e for e in events if e["type"] == "attempt_started"):
        before = [c["index"] for c in commits if c["time"] < a["time"] and c.get("checkpoint")]
        if before and a["start_index"] < max(before):
            lost += 1
    indices = sorted(final)
    gaps = len(set(range(1, indices[-1] + 1)) - set(indices)) if indices else 0
    recoveries = {k: [] for k in KINDS}
    for f in faults:
        after = [c["time"] for c in commits if c["time"] > f["at"] and c["attempt"] > f["attempt"]]
        if after:
            recoveries[f["kind"]].append(after[0] - f["at"])
    every = sorted(x for xs in recoveries.values() for x in xs)
    p95 = every[min(len(every) - 1, int(round(0.95 * (len(every) - 1))))] if every else None
    wall = t_end - t_start
    return {"wall_s": wall, "inside_s": inside, "effective": inside / wall if wall > 0 else 0.0,
            "committed_steps": len(indices), "lost": lost + gaps, "attempts_from_older": lost, "gaps": gaps,
            "recoveries_s": recoveries, "recovery_median_s": statistics.median(every) if every else None,
            "recovery_p95_s": p95, "faults": len(faults), "recovered": len(every)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a fault every 15 s on a fake 3-node cluster (digits workload)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--every-s", type=float, default=15.0, help="seconds between faults (default 15)")
    p.add_argument("--grace-s", type=float, default=2.0, help="preemption notice grace (default 2)")
    p.add_argument("--return-s", type=float, default=4.0, help="a removed node comes back after this (default 4)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    p.add_argument("--events-out", metavar="FILE", help="copy the run's events.jsonl to FILE (for a closer look)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.every_s < 5 or args.return_s < 0 or args.grace_s < 0:
        p.error("--minutes must be > 0, --every-s >= 5, --grace-s and --return-s >= 0")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    os.environ["TRAINKIT_PREEMPTION_GRACE_S"] = str(args.grace_s)

    from trainkit import FailureConfig, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer
    from trainkit_testing.cluster import Cluster

    load = os.getloadavg()
    base = tempfile.mkdtemp(prefix="trainkit_bench_soak_")
    work = os.path.join(base, "work")
    os.makedirs(work)
    run_path = os.path.join(base, "soak")
    out: dict = {}
    faults: list = []
    try:
        with Cluster(nodes=3, cpus_per_node=1) as cluster:
            c, nodes = cluster.ray_cluster, cluster.virtual_nodes

            def go():
                try:
                    out["result"] = TorchTrainer(
                        soak_loop, train_loop_config={"dir": work},
                        scaling_config=ScalingConfig(num_workers=(1, 3)),
                        run_config=RunConfig(name="soak", storage_path=base,
                                             failure_config=FailureConfig(max_failures=-1, max_preemptions=-1))).fit()
                except Exception as e:  # noqa: BLE001 - reported below
                    out["error"] = e

            t = threading.Thread(target=go, daemon=True)
            t.start()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not any(
                    e["type"] == "report_committed" and e["world_size"] == 3
                    for e in (_events(run_path) if os.path.exists(os.path.join(run_path, "events.jsonl")) else [])):
                time.sleep(0.1)
            t_start = time.time()
            end = t_start + args.minutes * 60
            returns: list = []  # (when, ) nodes to add back
            k = 0
            next_fault = t_start + args.every_s
            while time.time() < end and "error" not in out:
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
                ranks = _ranks(run_path)
                others = [r for r in ranks if r["world_rank"] != 0]
                if not others:
                    continue  # a group of one: skip this fault
                victim = others[0]
                attempt = max(e["attempt"] for e in _events(run_path) if e["type"] == "attempt_started")
                node = next((n for n in nodes if n.node_id == victim["node_id"]), None)
                at = time.time()
                print(f"[bench_soak] {time.strftime('%H:%M:%S')} {kind} of rank {victim['world_rank']} "
                      f"(attempt {attempt}, world size {len(ranks)})", file=sys.stderr, flush=True)
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
                faults.append({"kind": kind, "at": at, "attempt": attempt, "world_rank": victim["world_rank"]})
            t_end = time.time()
            open(os.path.join(work, "stop"), "w").close()
            t.join(180)
            events = _events(run_path)
            if args.events_out:
                shutil.copyfile(os.path.join(run_path, "events.jsonl"), args.events_out)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if "error" in out or "result" not in out:
        print(f"bench_soak: the fit did not finish: {out.get('error')!r}", file=sys.stderr)
        return 1
    doc = {"loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "minutes": args.minutes,
           "every_s": args.every_s, **analyse(events, faults, t_start, t_end),
           "timeline": [{"t": round(e["time"] - t_start, 3), "type": e["type"], "attempt": e.get("attempt"),
                         **{k: e[k] for k in ("world_size", "reason", "kind", "old_world_size", "new_world_size",
                                              "regrow") if k in e}}
                        for e in events if e["type"] != "report_committed"]
           + [{"t": round(f["at"] - t_start, 3), "type": f"FAULT {f['kind']}"} for f in faults]}
    doc["timeline"].sort(key=lambda e: e["t"])
    doc["ok"] = doc["effective"] >= EFFECTIVE_TARGET and doc["lost"] == 0
    if args.json != "-":
        rec = doc["recoveries_s"]
        print(f"soak: {args.minutes:g} min, a fault every {args.every_s:g} s ({doc['faults']} faults, "
              f"{doc['recovered']} recovered); load average at start {load[0]:.2f}, at the end "
              f"{doc['loadavg_at_end'][0]:.2f}")
        print(f"  effective training time: {doc['effective'] * 100:.1f}% ({doc['inside_s']:.0f} s inside committed "
              f"steps of {doc['wall_s']:.0f} s); target >= {EFFECTIVE_TARGET * 100:.0f}%")
        print(f"  acknowledged checkpoints lost: {doc['lost']} (target 0); committed steps {doc['committed_steps']}")
        med, p95 = doc["recovery_median_s"], doc["recovery_p95_s"]
        if med is not None:
            print(f"  recoveries: median {med:.2f} s, p95 {p95:.2f} s; by kind: "
                  + ", ".join(f"{k} {statistics.median(v):.2f} s (n={len(v)})" for k, v in rec.items() if v))
        print("  ok" if doc["ok"] else "  MISSED")
    write_json(doc, args.json)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
