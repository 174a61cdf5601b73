"""Hang detection benchmark of issue 6: how fast trainkit names a stuck rank, with stacks.

One process, one new local Ray (``ray.init(address="local", num_cpus=4, include_dashboard=False)``
with a private ``RAY_TMPDIR``). Each repetition runs a 4-worker ``TorchTrainer`` fit with
``HangConfig(timeout_s=2, action="fail")`` in which rank 1 gets stuck in a user function
before report 2 while ranks 0, 2, 3 arrive (each writes ``time.time()`` just before its
``report()``). Figures per repetition:

* ``detect_s``: from the moment the last arriving rank reached the barrier to the
  ``summary.json`` (with every rank's stack) being written; target < 3.5 s with a 2 s
  timeout (so capture + classify + write must take < 1.5 s even from the first arrival).
* ``dump_s``: wall time of the parallel dump of all 4 ranks; ``rank_dump_s``: per rank.
* ``raise_s``: from the last arrival to ``fit()`` raising ``HangDetectedError``.
* ``classified``: the summary names rank 1, ``user_code`` and the stuck function's frame.

Ray Train 2.60's equivalent is a log line after ``RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S``
(60 s by default) naming the ranks that have not called ``report``, without stacks
(see /work/shared/reference/ray-train-semantics.md §7.6).

    python benchmarks/bench_hang.py [--reps N] [--dump auto|py-spy|faulthandler] [--json OUT]

Ray's output goes to stderr; stdout holds the table (or the JSON). Exit 0 when every
repetition meets the target and is classified right, 1 otherwise. About 1 minute for 3
repetitions on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _common import write_json

WORKERS = 4
TIMEOUT_S = 2.0
TARGET_S = 3.5
STUCK_RANK = 1
STUCK_AT = 2


def stuck_in_user_code():
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.02)


def train_fn(config):
    import trainkit

    rank = trainkit.get_context().get_world_rank()
    for step in range(1, 4):
        if rank == STUCK_RANK and step == STUCK_AT:
            stuck_in_user_code()
        if step == STUCK_AT:
            with open(os.path.join(config["out"], f"arrive-{rank}"), "w") as f:
                f.write(repr(time.time()))
        trainkit.report({"step": step})


def one(storage: str, out: str, dump: str) -> dict:
    from trainkit import HangConfig, HangDetectedError, RunConfig, ScalingConfig
    from trainkit.torch import TorchTrainer

    name = f"hang-{time.time_ns()}"
    try:
        TorchTrainer(train_fn, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=WORKERS),
                     run_config=RunConfig(name=name, storage_path=storage,
                                          hang_config=HangConfig(timeout_s=TIMEOUT_S, action="fail", dump=dump))
                     ).fit()
        raised = None
    except HangDetectedError as e:
        raised = time.time()
        err = e
    if raised is None:
        return {"ok": False, "why": "fit() did not raise HangDetectedError"}
    run = os.path.join(storage, name)
    last = max(float(open(os.path.join(out, f"arrive-{r}")).read()) for r in range(WORKERS) if r != STUCK_RANK)
    diag = os.path.join(run, "diagnostics")
    (folder,) = os.listdir(diag)
    path = os.path.join(diag, folder, "summary.json")
    summary = json.load(open(path))
    missing = [r for r in summary["ranks"] if r["state"] == "missing"]
    classified = (summary["missing_ranks"] == [STUCK_RANK] and missing[0]["classification"] == "user_code"
                  and (missing[0]["user_frame"] or "").startswith("stuck_in_user_code ("))
    for r in range(WORKERS):
        os.remove(os.path.join(out, f"arrive-{r}")) if os.path.exists(os.path.join(out, f"arrive-{r}")) else None
    return {"ok": True, "detect_s": round(os.stat(path).st_mtime - last, 3), "dump_s": summary["dump_s"],
            "rank_dump_s": [r["dump_s"] for r in summary["ranks"]], "raise_s": round(raised - last, 3),
            "classified": classified, "dump": sorted({r["dump"] for r in summary["ranks"]}),
            "summary": summary["summary"], "error": str(err).splitlines()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dump", default="auto", choices=("auto", "py-spy", "faulthandler"))
    p.add_argument("--json", metavar="OUT", default=None)
    args = p.parse_args(argv)
    if args.reps < 1:
        print("error: --reps must be >= 1", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="tkbench-hang-")
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="tkray-", dir="/tmp")
    os.environ.setdefault("TRAINKIT_PROGRESS", "0")
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # Ray's chatter goes to stderr
    import ray

    from trainkit.backends.ray import release_warm_workers

    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for i in range(args.reps):
            rows.append(one(os.path.join(tmp, "storage"), tmp, args.dump))
            print(f"rep {i + 1}: {rows[-1]}", file=sys.stderr)
    finally:
        release_warm_workers()
        ray.shutdown()
        sys.stdout = real_stdout
    good = [r for r in rows if r.get("ok")]
    fig = {
        "workers": WORKERS, "timeout_s": TIMEOUT_S, "target_s": TARGET_S, "dump": args.dump, "reps": rows,
        "detect_s": [r["detect_s"] for r in good], "dump_s": [r["dump_s"] for r in good],
        "rank_dump_s": [x for r in good for x in r["rank_dump_s"] if x is not None],
        "raise_s": [r["raise_s"] for r in good], "load_average": os.getloadavg(),
    }
    ok = len(good) == len(rows) and all(r["classified"] and r["detect_s"] < TARGET_S for r in good)
    write_json(fig, args.json)
    if args.json != "-":
        def rng(xs):
            return f"{min(xs):.3f}-{max(xs):.3f} s (median {statistics.median(xs):.3f})" if xs else "n/a"

        print(f"hang detection, {WORKERS} workers, HangConfig(timeout_s={TIMEOUT_S}), dump={args.dump}, "
              f"{len(rows)} reps, load average {fig['load_average'][0]:.1f}")
        print(f"  last arrival -> summary with stacks written : {rng(fig['detect_s'])} (target < {TARGET_S} s)")
        print(f"  parallel dump of all ranks                   : {rng(fig['dump_s'])}")
        print(f"  one rank's dump                              : {rng(fig['rank_dump_s'])}")
        print(f"  last arrival -> fit() raises                 : {rng(fig['raise_s'])}")
        print(f"  classified right (rank 1, user_code, frame)  : {sum(r.get('classified', False) for r in good)}"
              f"/{len(rows)}")
        print("  Ray Train 2.60: a warning after 60 s naming the ranks that have not reported; no stacks")
        print("target: " + ("ok" if ok else "MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
