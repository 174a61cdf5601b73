"""Elastic resizing on a fake 3-node cluster (issue 17, targets 2 and 3): node loss -> first report
of the smaller group, node added -> first report of the larger group; trainkit's ``ray`` backend,
then Ray Train 2.60 in the same run.

For each system, one private ``trainkit_testing.cluster.Cluster`` (a head with no CPUs, three
1-CPU virtual nodes, GCS health checks at 0.5 s x 2, as the tests and the chaos runner use). An
elastic fit (``ScalingConfig(num_workers=(1, 3))``) makes a checkpointed report every
``--step-s`` (rank 0 appends ``time.time()``, the world size and its pid to a file after each
report; every rank records its node at each start). Each round removes the node of one non-zero
rank (``ray_cluster.remove_node``), waits for the first report at world size 2, adds a node back
and waits for the first report at world size 3. The figures are from the ``remove_node`` /
``add_node`` call returning to the first such report (driver clock; the cluster is on this
machine). Also checked for trainkit: rank 0 keeps its pid through every shrink and grow
(survivors keep their processes) and no committed step is lost (the run's committed report
history, ``Result.metrics_dataframe``, is 1..n with no gap).

Ray Train runs the same function through trainkit's ``ray_train`` backend (real
``ray.train.torch.TorchTrainer`` with its defaults: it looks for capacity every
``elastic_resize_monitor_interval_s`` = 60 s, so a round takes minutes); ``--ray-train-rounds 0``
skips it.

    python benchmarks/bench_elastic.py [--rounds N] [--ray-train-rounds N] [--step-s S] [--json OUT]

Targets: node loss -> resized group reporting < 3 s; node added -> grown group reporting < 4 s
(trainkit's medians). Exits 0 when both hold, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

from _common import write_json

LOSS_TARGET_S = 3.0
GROW_TARGET_S = 4.0


def stepping_loop(config):
    import trainkit
    from trainkit import Checkpoint

    import ray

    ctx = trainkit.get_context()
    with open(os.path.join(config["dir"], f"rank-{ctx.get_world_rank()}.tmp"), "w") as f:
        json.dump({"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}, f)
    os.replace(os.path.join(config["dir"], f"rank-{ctx.get_world_rank()}.tmp"),
               os.path.join(config["dir"], f"rank-{ctx.get_world_rank()}.json"))
    ck = trainkit.get_checkpoint()
    step = int(open(os.path.join(ck.path, "step")).read()) if ck else 0
    while True:
        if trainkit.collective.broadcast_from_rank_zero(os.path.exists(os.path.join(config["dir"], "stop"))):
            return step
        step += 1
        d = tempfile.mkdtemp()
        if ctx.get_world_rank() == 0:
            with open(os.path.join(d, "step"), "w") as f:
                f.write(str(step))
        time.sleep(config["step_s"])
        trainkit.report({"step": step}, checkpoint=Checkpoint.from_directory(d))
        shutil.rmtree(d, ignore_errors=True)
        if ctx.get_world_rank() == 0:
            with open(os.path.join(config["dir"], "progress"), "a") as f:
                f.write(f"{time.time()!r} {ctx.get_world_size()} {os.getpid()} {step}\n")


def _progress(d: str) -> list:
    try:
        with open(os.path.join(d, "progress")) as f:
            lines = f.read().split("\n")[:-1]
    except OSError:
        return []
    return [(float(t), int(w), int(p), int(s)) for t, w, p, s in (line.split() for line in lines)]


def _wait(pred, timeout_s: float, what: str):
    from trainkit_testing.waiting import wait_for

    return wait_for(pred, timeout_s, what, interval_s=0.01, error=RuntimeError)


def _first_at(d: str, world_size: int, after: float):
    return next((row for row in _progress(d) if row[0] > after and row[1] == world_size), None)


def _rank_node(work: str, rank: int) -> str:
    with open(os.path.join(work, f"rank-{rank}.json")) as f:
        return json.load(f)["node_id"]


def rounds(system: str, n: int, step_s: float) -> dict:
    """``n`` rounds of node loss and return on a fresh cluster, with ``system``'s backend."""
    from trainkit import FailureConfig, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer
    from trainkit_testing.cluster import Cluster

    wait_s = 60 if system == "ray" else 600  # Ray Train resizes after its 60 s monitor interval
    load = os.getloadavg()
    base = tempfile.mkdtemp(prefix=f"trainkit_bench_elastic_{system}_")
    work = os.path.join(base, "work")
    os.makedirs(work)
    losses, grows, pids, steps = [], [], set(), []
    out: dict = {}
    try:
        with Cluster(nodes=3, cpus_per_node=1) as cluster:
            c, nodes = cluster.ray_cluster, cluster.virtual_nodes

            def go():
                try:
                    out["result"] = TorchTrainer(
                        stepping_loop, train_loop_config={"dir": work, "step_s": step_s},
                        scaling_config=ScalingConfig(num_workers=(1, 3)),
                        run_config=RunConfig(name="elastic", storage_path=base,
                                             failure_config=FailureConfig(max_failures=-1)),
                        backend=system).fit()
                except Exception as e:  # noqa: BLE001 - reported below
                    out["error"] = e

            t = threading.Thread(target=go, daemon=True)
            t.start()
            _wait(lambda: _first_at(work, 3, 0), 240, "the first report of 3 workers")
            for k in range(n):
                time.sleep(1.0)  # a few steps at full size
                rank0_node = _rank_node(work, 0)
                victim = next(r for r in (1, 2) if _rank_node(work, r) != rank0_node)
                node = next(nd for nd in nodes if nd.node_id == _rank_node(work, victim))
                print(f"[bench_elastic] {system} round {k + 1}: removing the node of rank {victim}",
                      file=sys.stderr, flush=True)
                c.remove_node(node)
                t0 = time.time()
                row = _wait(lambda: _first_at(work, 2, t0), wait_s, "the first report of 2 workers")
                losses.append(row[0] - t0)
                time.sleep(1.0)
                nodes[nodes.index(node)] = c.add_node(num_cpus=1)
                t1 = time.time()
                row = _wait(lambda: _first_at(work, 3, t1), wait_s, "the first report of 3 workers")
                grows.append(row[0] - t1)
                print(f"[bench_elastic] {system} round {k + 1}: loss {losses[-1]:.2f} s, grow {grows[-1]:.2f} s",
                      file=sys.stderr, flush=True)
            open(os.path.join(work, "stop"), "w").close()
            t.join(300)
            pids = {r[2] for r in _progress(work)}
            steps = ([int(x) for x in out["result"].metrics_dataframe["step"]]  # the committed history
                     if "result" in out else [])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if "error" in out:
        raise RuntimeError(f"{system}: the fit failed: {out['error']!r}")
    return {"system": system, "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "loss_s": losses,
            "grow_s": grows, "loss_median_s": statistics.median(losses), "grow_median_s": statistics.median(grows),
            "rank0_pids": sorted(pids), "steps_in_order": steps == list(range(1, len(steps) + 1))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="elastic shrink and grow on a fake 3-node cluster, trainkit and Ray Train")
    p.add_argument("--rounds", type=int, default=3, help="trainkit's node losses and returns (default 3)")
    p.add_argument("--ray-train-rounds", type=int, default=1, help="Ray Train's (default 1; 0 skips it)")
    p.add_argument("--step-s", type=float, default=0.1, help="seconds of work per step (default 0.1)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.ray_train_rounds < 0 or args.step_s < 0:
        p.error("--rounds must be >= 1, --ray-train-rounds >= 0 and --step-s >= 0")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    if args.ray_train_rounds:
        try:
            import ray.train.torch  # noqa: F401
        except ImportError as e:
            print(f"bench_elastic: Ray Train is not importable ({e}); pip install 'ray[train]==2.60.0' or pass "
                  "--ray-train-rounds 0", file=sys.stderr)
            return 2
    try:
        tk = rounds("ray", args.rounds, args.step_s)
    except RuntimeError as e:
        print(f"bench_elastic: {e}", file=sys.stderr)
        return 1
    doc = {"step_s": args.step_s, "trainkit": tk}
    if args.ray_train_rounds:
        try:
            doc["ray_train"] = rounds("ray_train", args.ray_train_rounds, args.step_s)
        except Exception as e:  # noqa: BLE001 - trainkit's figures stand; Ray Train's failure is the finding
            doc["ray_train"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    doc["ok"] = (tk["loss_median_s"] < LOSS_TARGET_S and tk["grow_median_s"] < GROW_TARGET_S
                 and len(tk["rank0_pids"]) == 1 and tk["steps_in_order"])
    if args.json != "-":
        print(f"elastic (1, 3) on 3 one-CPU nodes, checkpoint every step of {args.step_s} s")
        for key, label in (("trainkit", "trainkit"), ("ray_train", "Ray Train 2.60")):
            r = doc.get(key)
            if r is None:
                continue
            if "error" in r:
                print(f"  {label}: did not finish its rounds: {r['error']}")
                continue
            print(f"  {label} (load average {r['loadavg_at_start'][0]:.2f} at the start, "
                  f"{r['loadavg_at_end'][0]:.2f} at the end):")
            print(f"    node loss -> first report of 2 workers: median {r['loss_median_s']:.2f} s "
                  f"({', '.join(f'{x:.2f}' for x in r['loss_s'])})")
            print(f"    node added -> first report of 3 workers: median {r['grow_median_s']:.2f} s "
                  f"({', '.join(f'{x:.2f}' for x in r['grow_s'])})")
            print(f"    rank 0 pids over the run: {r['rank0_pids']}; report history 1..n in order: "
                  f"{r['steps_in_order']}")
        print(f"  targets (trainkit): loss < {LOSS_TARGET_S:.0f} s, grow < {GROW_TARGET_S:.0f} s, one rank 0 pid, "
              f"history in order: {'ok' if doc['ok'] else 'MISSED'}")
    write_json(doc, args.json)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
