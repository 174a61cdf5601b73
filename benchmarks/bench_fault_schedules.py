"""Generated fault schedules against trainkit's durability promises (issue 15): >= 200 of them.

Each schedule hits a local-mode run of 6 checkpointed reports with one fault: a full disk
(ENOSPC after a random number of bytes), a torn write, S3 PUTs refused by moto (transient
or for good), an exception after report k, a SIGKILLed driver process, or a second driver
on the same run. Then one clean ``fit()`` resumes the run to its end, and the schedule is
judged (``trainkit_testing.trust``): acknowledged checkpoints lost (a report that returned
whose checkpoint the resume did not start from or past, or missing from the final
history), runs left corrupted (diagnose finds problems, the status is not finished, the
history is not exactly 1..6, the latest checkpoint does not hold step 6).

Prints a table by fault kind, the totals and the wall time; exits 0 when nothing was lost
or corrupted, 1 otherwise (each bad schedule is printed with its seed parameters), 2 on
bad arguments.

    python benchmarks/bench_fault_schedules.py [--schedules N] [--seed S] [--json OUT] [--kinds k1,k2]

About 2-4 minutes for 200 schedules on a 2-core machine (the driver-process kinds cost a
Python start each). CI runs a fixed sample of 12 (tests/property/test_fault_schedules_trust.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from _common import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="generated fault schedules: nothing lost, nothing corrupted")
    p.add_argument("--schedules", type=int, default=200, help="how many schedules (default 200)")
    p.add_argument("--seed", type=int, default=20261202, help="the generator's seed (default 20261202)")
    p.add_argument("--kinds", default=None, help="comma-separated fault kinds (default: all)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT ('-': stdout)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    from trainkit_testing import trust
    from trainkit_testing.s3 import AWS_UNSET, MotoS3

    kinds = tuple(args.kinds.split(",")) if args.kinds else trust.KINDS
    bad = [k for k in kinds if k not in trust.KINDS]
    if bad or args.schedules < 1:
        p.error(f"--kinds must be among {', '.join(trust.KINDS)} and --schedules >= 1 (got {bad or args.schedules})")
    import logging
    import warnings

    logging.getLogger("trainkit").setLevel(logging.ERROR)  # the faults' own warnings are expected
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    warnings.simplefilter("ignore")
    server = MotoS3().start() if "put_fail" in kinds else None
    if server is not None:
        os.environ.update(server.env)
        for k in AWS_UNSET:
            os.environ.pop(k, None)
    base = tempfile.mkdtemp(prefix="trainkit_bench_trust_")
    plan = trust.schedules(args.schedules, args.seed, kinds)
    t0 = time.perf_counter()
    outcomes = []
    try:
        for i, (kind, params) in enumerate(plan):
            work = os.path.join(base, f"s{i:04d}")
            os.makedirs(work)
            s3_root = f"s3://{server.create_bucket('trust')}/runs" if kind == "put_fail" and server else None
            outcomes.append(trust.run_schedule(kind, params, work, s3_root=s3_root))
            if (i + 1) % 20 == 0:
                print(f"bench_fault_schedules: {i + 1}/{len(plan)} in {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if server is not None:
            server.stop()
    wall = time.perf_counter() - t0
    rows = {}
    skipped = [o for o in outcomes if o.skipped]
    for o in outcomes:
        if o.skipped:
            continue
        r = rows.setdefault(o.kind, {"schedules": 0, "acked": 0, "lost": 0, "corrupted": 0, "wall_s": 0.0})
        r["schedules"] += 1
        r["acked"] += len(o.acked)
        r["lost"] += len(o.lost)
        r["corrupted"] += bool(o.corrupted)
        r["wall_s"] += o.wall_s
    lost = sum(r["lost"] for r in rows.values())
    corrupted = sum(r["corrupted"] for r in rows.values())
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    doc = {"schedules": len(outcomes) - len(skipped), "skipped": len(skipped), "seed": args.seed, "acknowledged_lost": lost, "runs_corrupted": corrupted,
           "wall_s": round(wall, 1), "loadavg": load, "by_kind": rows,
           "bad": [{"kind": o.kind, "params": o.params, "lost": o.lost, "corrupted": o.corrupted}
                   for o in outcomes if o.lost or o.corrupted]}
    if args.json != "-":
        print(f"{'fault kind':<15}{'schedules':>10}{'acked':>8}{'lost':>6}{'corrupted':>11}{'wall s':>9}")
        for kind, r in sorted(rows.items()):
            print(f"{kind:<15}{r['schedules']:>10}{r['acked']:>8}{r['lost']:>6}{r['corrupted']:>11}{r['wall_s']:>9.1f}")
        if skipped:
            print(f"skipped {len(skipped)} schedule(s): {skipped[0].skipped}")
        print(f"{doc['schedules']} schedules (seed {args.seed}): acknowledged checkpoints lost {lost}, runs left "
              f"corrupted {corrupted}; wall time {wall:.1f} s" + (f"; load average {load[0]:.2f}" if load else ""))
        for b in doc["bad"]:
            print(f"BAD {b['kind']} {b['params']}: lost {b['lost']}; {'; '.join(b['corrupted'])}")
    write_json(doc, args.json)
    return 0 if not lost and not corrupted else 1


if __name__ == "__main__":
    sys.exit(main())
