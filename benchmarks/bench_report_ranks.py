"""``report()`` latency against the number of ranks (issue 17, target 4): 2 ranks on one node and 8
ranks as 8 actors on 4 virtual nodes; trainkit's ``ray`` backend side by side with Ray Train 2.60
in the same run.

One private cluster per shape (``trainkit_testing.cluster.Cluster``: a head with no CPUs and
virtual nodes of 2 CPUs). On it, in turn:

* trainkit, its rounds over the report channel (the default, ``TRAINKIT_REPORT_CHANNEL=tcp``);
* trainkit, its rounds as Ray actor calls (``TRAINKIT_REPORT_CHANNEL=ray``: the path before the
  channel, kept as the fallback);
* Ray Train 2.60 (``ray.train.torch.TorchTrainer``; ``--no-ray-train`` skips it).

Each is a warm-up fit, then a fit whose rank 0 times metrics-only reports with
``time.perf_counter`` (``--reports`` for trainkit, ``--ray-reports`` for Ray Train, whose
reports take seconds). Prints the median and p90 per shape and system; exits 0 when trainkit's
default median is <= 3 ms at 2 ranks and <= 5 ms at 8 ranks, 1 otherwise, 2 on bad arguments.

    python benchmarks/bench_report_ranks.py [--reports N] [--ray-reports N] [--no-ray-train] [--json OUT]

About 3-4 minutes on a 2-core machine with Ray Train, 1 without (8 ranks on 2 cores is 4x
oversubscribed: the figure is an upper bound of what a machine with a core per rank gives).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from _common import write_json

SHAPES = ((2, 1, 0.003), (8, 4, 0.005))  # (ranks, virtual nodes, target median s)
SYSTEMS = (("trainkit", "trainkit, report channel (default)", {"TRAINKIT_REPORT_CHANNEL": "tcp"}),
           ("trainkit_actor_calls", "trainkit, actor calls (TRAINKIT_REPORT_CHANNEL=ray)",
            {"TRAINKIT_REPORT_CHANNEL": "ray"}),
           ("ray_train", "Ray Train 2.60", {}))


def _timed(report, n: int) -> list:
    import time

    times = []
    for i in range(n):
        t0 = time.perf_counter()
        report({"i": i})
        times.append(time.perf_counter() - t0)
    return times


def tk_reports(config):
    import trainkit

    return _timed(trainkit.report, config["reports"])


def rt_reports(config):
    import ray.train

    return _timed(ray.train.report, config["reports"])


def _fit(system: str, ranks: int, nodes: int, base: str, name: str, n: int):
    strategy = "SPREAD" if nodes > 1 else "PACK"
    if system == "ray_train":
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        fn = rt_reports
    else:
        from trainkit import RunConfig, ScalingConfig
        from trainkit.torch import TorchTrainer

        fn = tk_reports
    result = TorchTrainer(fn, train_loop_config={"reports": n},
                          scaling_config=ScalingConfig(num_workers=ranks, placement_strategy=strategy),
                          run_config=RunConfig(name=name, storage_path=base)).fit()
    if result.error is not None:
        raise RuntimeError(f"{system}: the fit failed: {result.error!r}")
    return result.return_value


def measure(ranks: int, nodes: int, reports: int, ray_reports: int, systems) -> dict:
    from trainkit.backends.ray import release_warm_workers
    from trainkit_testing.cluster import Cluster

    out = {"ranks": ranks, "nodes": nodes}
    base = tempfile.mkdtemp(prefix="trainkit_bench_ranks_")
    try:
        with Cluster(nodes=nodes, cpus_per_node=ranks // nodes):
            for key, label, env in systems:
                old = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    n = ray_reports if key == "ray_train" else reports
                    print(f"[bench_report_ranks] {ranks} ranks: {label}, warm-up and {n} reports", file=sys.stderr,
                          flush=True)
                    _fit(key, ranks, nodes, base, f"{key}-warm", 3)
                    times = sorted(_fit(key, ranks, nodes, base, f"{key}-timed", n))
                finally:
                    for k, v in old.items():
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                    if key != "ray_train":
                        release_warm_workers()  # the next system gets the cluster's CPUs
                out[key] = {"label": label, "n": len(times), "median_s": statistics.median(times),
                            "p90_s": times[int(0.9 * (len(times) - 1))]}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="report() latency at 2 and 8 ranks")
    p.add_argument("--reports", type=int, default=200, help="timed trainkit reports per shape (default 200)")
    p.add_argument("--ray-reports", type=int, default=10, help="timed Ray Train reports per shape (default 10)")
    p.add_argument("--no-ray-train", action="store_true", help="skip Ray Train (its column stays empty)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    args = p.parse_args(argv)
    if args.reports < 10 or args.ray_reports < 3:
        p.error("--reports must be >= 10 and --ray-reports >= 3")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    systems = [s for s in SYSTEMS if not (args.no_ray_train and s[0] == "ray_train")]
    if not args.no_ray_train:
        try:
            import ray.train.torch  # noqa: F401
        except ImportError as e:
            print(f"bench_report_ranks: Ray Train is not importable ({e}); pip install 'ray[train]==2.60.0' "
                  "or pass --no-ray-train", file=sys.stderr)
            return 2
    load = os.getloadavg()
    rows = []
    for ranks, nodes, target in SHAPES:
        r = measure(ranks, nodes, args.reports, args.ray_reports, systems)
        r["target_s"], r["ok"] = target, r["trainkit"]["median_s"] <= target
        rows.append(r)
    doc = {"loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "shapes": rows,
           "ok": all(r["ok"] for r in rows)}
    if args.json != "-":
        print(f"report() latency, rank 0, metrics only; load average {load[0]:.2f} at the start, "
              f"{doc['loadavg_at_end'][0]:.2f} at the end")
        for r in rows:
            print(f"  {r['ranks']} ranks on {r['nodes']} node(s), target <= {r['target_s'] * 1e3:.0f} ms: "
                  f"{'ok' if r['ok'] else 'MISSED'}")
            for key, label, _env in systems:
                m = r[key]
                print(f"    {label}: median {m['median_s'] * 1e3:.2f} ms, p90 {m['p90_s'] * 1e3:.2f} ms (n={m['n']})")
    write_json(doc, args.json)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
