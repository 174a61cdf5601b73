"""``report()`` latency against the number of ranks (issue 17, target 4): 2 ranks on one node and 8
ranks as 8 actors on 4 virtual nodes, trainkit's ``ray`` backend.

One private cluster per shape (``trainkit_testing.cluster.Cluster``: a head with no CPUs and
virtual nodes of 2 CPUs), a warm-up fit, then a fit whose rank 0 times ``--reports`` metrics-only
reports with ``time.perf_counter``. Prints the median and p90 per shape; exits 0 when the
median is <= 3 ms at 2 ranks and <= 5 ms at 8 ranks, 1 otherwise, 2 on bad arguments.

    python benchmarks/bench_report_ranks.py [--reports N] [--json OUT]

About 1-2 minutes on a 2-core machine (8 ranks on 2 cores is 4x oversubscribed: the figure is
an upper bound of what a machine with a core per rank gives).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from _common import write_json

SHAPES = ((2, 1, 0.003), (8, 4, 0.005))  # (ranks, virtual nodes, target median s)


def timed_reports(config):
    import trainkit

    times = []
    for i in range(config["reports"]):
        t0 = time.perf_counter()
        trainkit.report({"i": i})
        times.append(time.perf_counter() - t0)
    return times


def measure(ranks: int, nodes: int, reports: int) -> dict:
    from trainkit import RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer
    from trainkit_testing.cluster import Cluster

    base = tempfile.mkdtemp(prefix="trainkit_bench_ranks_")
    try:
        with Cluster(nodes=nodes, cpus_per_node=ranks // nodes):
            sc = ScalingConfig(num_workers=ranks, placement_strategy="SPREAD" if nodes > 1 else "PACK")

            def fit(name, n):
                return TorchTrainer(timed_reports, train_loop_config={"reports": n}, scaling_config=sc,
                                    run_config=RunConfig(name=name, storage_path=base)).fit()

            fit("warm", 5)
            times = sorted(fit("timed", reports).return_value)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"ranks": ranks, "nodes": nodes, "n": len(times), "median_s": statistics.median(times),
            "p90_s": times[int(0.9 * (len(times) - 1))]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="report() latency at 2 and 8 ranks")
    p.add_argument("--reports", type=int, default=200, help="timed reports per shape (default 200)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    args = p.parse_args(argv)
    if args.reports < 10:
        p.error("--reports must be >= 10")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    load = os.getloadavg()
    rows = []
    for ranks, nodes, target in SHAPES:
        r = measure(ranks, nodes, args.reports)
        r["target_s"], r["ok"] = target, r["median_s"] <= target
        rows.append(r)
    doc = {"loadavg_at_start": load, "shapes": rows, "ok": all(r["ok"] for r in rows)}
    if args.json != "-":
        print(f"report() latency, rank 0, metrics only; load average at start {load[0]:.2f}")
        for r in rows:
            print(f"  {r['ranks']} ranks on {r['nodes']} node(s): median {r['median_s'] * 1e3:.2f} ms, p90 "
                  f"{r['p90_s'] * 1e3:.2f} ms (n={r['n']}); target <= {r['target_s'] * 1e3:.0f} ms: "
                  f"{'ok' if r['ok'] else 'MISSED'}")
    write_json(doc, args.json)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
